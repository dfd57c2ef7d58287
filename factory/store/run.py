"""The run store: :class:`RunStore`, a run directory that records what exists, so nothing is
lost, duplicated or redone. The layout and the rules are in :mod:`factory.store`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from factory import __version__
from factory.errors import InputError, RunError, ignore_signals_in_this_thread
from factory.feedback import plural
from factory.fsutil import (
    TMP_PREFIX,
    FileLock,
    atomic_write_parquet,
    atomic_write_text,
    check_writable_dir,
    fsync_path,
    open_parquet,
    read_json_object,
)
from factory.manifest import Manifest, manifest_from_dict
from factory.plan import KEY_PATTERN, PLAN_ROW_GROUP, PLAN_SCHEMA, ManifestPlan, PlanAbandoned, PlanReader, PlanRows
from factory.sample import SAMPLE_SUFFIXES, SIZE_COLUMNS, STATUS_DONE, STATUS_FAILED, STATUS_PLANNED, SampleResult, key_of
from factory.store import layout, planfiles, recover, segments
from factory.store.samples import write_sample_files
from factory.store.layout import (
    INDEX_FILE,
    INDEX_SCHEMA,
    JOURNAL_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    RUN_FILE,
    RUN_FILE_KEYS,
    SAMPLES_DIR,
    SELECTIONS_DIR,
    STORE_FORMAT,
    bucket_name,
)
from factory.store.tables import (
    check_index_schema,
    damaged_rows,
    index_row,
    planned_rows,
)


@dataclass(frozen=True)
class ResumeState:
    """What a (re)started run has to do."""

    pending: PlanRows  # plan rows to do, in plan order (read from plan.parquet on demand)
    done: int
    failed_before: int  # failed earlier, retried now
    damaged: int  # marked done but files missing or of the wrong size: redone
    left_alone: list[str] = field(default_factory=list)  # symlinks and foreign files under samples/ (kept)

    def left_alone_line(self) -> str | None:
        """One line naming what resume found under ``samples/`` that the store did not write."""
        if not self.left_alone:
            return None
        shown = ", ".join(self.left_alone[:3]) + (f" and {len(self.left_alone) - 3} more" if len(self.left_alone) > 3 else "")
        return f"left alone: {plural(len(self.left_alone), 'entry', 'entries')} the store did not write (symlinks or foreign files): {shown}"


# ------------------------------------------------------------------------------ the store


class RunStore:
    """A run directory. Create or reopen it with :meth:`prepare`; open it read-only with :meth:`open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock: FileLock | None = None
        self._seq: int | None = None
        self._chunks_since_fold = 0
        self._left_alone: list[str] = []
        self.fold_every = 64  # journal chunks between folds of the journal into a segment
        self._plan_thread: threading.Thread | None = None
        self._plan_stop: threading.Event | None = None

    # -------------------------------------------------------------- opening

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        """An existing run (read access). Raises ``InputError`` if ``root`` is not one."""
        root = Path(root)
        if not (root / RUN_FILE).is_file():
            raise InputError(f"{root}: not a run directory (no {RUN_FILE}); runs are made by `factory generate`")
        return cls(root)

    @classmethod
    def prepare(
        cls,
        root: str | Path,
        manifest: Manifest,
        n: int,
        model_identity: str,
        restart: bool = False,
        on_plan_rows: Callable[[int], None] | None = None,
        write_plan: bool = True,
    ) -> RunStore:
        """Create the run directory, or check that it was made by this manifest and model.

        Writes run.json, manifest.yaml and the plan of ``n`` rows. Nothing is written when the
        checks fail. ``restart`` deletes an existing run's samples and index first. Without
        ``write_plan`` the plan file is left to :meth:`start_plan_writer` (``generate`` starts on
        the first rows while it is written; until then readers make plan rows from the manifest).
        ``on_plan_rows(k)`` is called as each group of k plan rows is written (a progress bar).
        """
        root = Path(root)
        store = cls(root)
        existing = store._read_run_json() if (root / RUN_FILE).is_file() else None
        if existing is None and root.exists() and (not root.is_dir() or not _unstarted(root)):
            raise InputError(f"{root}: exists and is not a run directory; choose another --out")
        if existing is not None and not restart:
            problem = run_mismatch(existing, manifest, model_identity)
            if problem and not run_mismatch(existing, manifest, existing.get("model", "")) and not store.has_commits():
                problem = None  # no sample made yet (its model failed to load): the run takes the new one
            if problem:
                raise InputError(f"{root}: {problem}; pass --restart to start this run over, or choose another --out")
        check_writable_dir(root, "output directory")
        store.acquire_lock()
        try:
            if existing is not None and restart:
                store._wipe()
            if write_plan and (existing is None or restart or existing.get("n") != n or store._plan_rows() != n):
                store._write_plan(manifest, n, on_plan_rows)
            else:  # a longer plan is cut to N or goes; a shorter one is extended by start_plan_writer
                planfiles.trim(root, n)
            (root / SAMPLES_DIR).mkdir(exist_ok=True)
            (root / JOURNAL_DIR).mkdir(exist_ok=True)
            info = {
                "format": STORE_FORMAT,
                "manifest": manifest.name,
                "fingerprint": manifest.fingerprint(),
                "model": model_identity,
                "n": n,
                "created": (existing or {}).get("created") if not restart else None,
                "updated": _now_iso(),
                "factory_version": __version__,
            }
            info["created"] = info["created"] or info["updated"]
            atomic_write_text(root / MANIFEST_FILE, yaml.safe_dump(manifest.resolved_dict(), sort_keys=False, allow_unicode=True))
            atomic_write_text(root / RUN_FILE, json.dumps(info, indent=2) + "\n")
        except BaseException:
            store.release_lock()
            raise
        return store

    def _write_plan(self, manifest: Manifest, n: int, on_rows: Callable[[int], None] | None = None) -> None:
        """Write the plan's files in row groups, built a group at a time (the plan is never whole):
        only the new rows when N grew (:mod:`factory.store.planfiles`)."""
        planfiles.write(manifest, n, self.root, on_rows=on_rows, group=PLAN_ROW_GROUP)

    def start_plan_writer(self) -> None:
        """Write the plan's files in a background thread if they are not complete (a cache of rows that
        are a pure function of the manifest: nothing waits for it). Call after :meth:`resume`,
        which deletes temporary files; :meth:`finish_plan_writer` waits for it or abandons it."""
        n = self.plan_size()
        if self._plan_rows() == n or self._plan_thread is not None:
            return
        manifest = self.manifest()
        stop = threading.Event()

        def write() -> None:
            ignore_signals_in_this_thread()  # Ctrl-C and SIGTERM go to the main thread
            with contextlib.suppress(PlanAbandoned, OSError, InputError):
                planfiles.write(manifest, n, self.root, stop=stop, group=PLAN_ROW_GROUP)

        self._plan_stop = stop
        self._plan_thread = threading.Thread(target=write, name="factory-plan", daemon=True)
        self._plan_thread.start()

    def finish_plan_writer(self, wait: bool = True) -> None:
        """Wait for the plan's background write (``wait``) or stop it (its temporary file goes)."""
        if self._plan_thread is None:
            return
        if not wait and self._plan_stop is not None:
            self._plan_stop.set()
        # Stopped, the writer ends at its next row group; a stuck one (a hung file system) is a
        # daemon thread that goes with the process.
        self._plan_thread.join(timeout=None if wait else 10.0)
        self._plan_thread = None

    def _plan_rows(self) -> int | None:
        """Rows in the plan's files (plan.parquet and its extensions), or None when there is no
        readable plan."""
        return planfiles.chain_rows(self.root)

    def has_commits(self) -> bool:
        """Whether any sample was committed (done or failed): a journal chunk, or a row of
        index.parquet that is not ``planned``."""
        if self._journal():
            return True
        try:
            status = pq.read_table(self.root / INDEX_FILE, columns=["status"], page_checksum_verification=True)["status"]
        except FileNotFoundError:
            return False
        except (OSError, pa.ArrowException):
            return True  # unreadable: assume there is something to protect
        return bool(pc.any(pc.not_equal(status, STATUS_PLANNED)).as_py())

    def _wipe(self) -> None:
        for name in (SAMPLES_DIR, JOURNAL_DIR, SELECTIONS_DIR):
            shutil.rmtree(self.root / name, ignore_errors=True)
        planfiles.remove_all(self.root)
        for name in (INDEX_FILE, RUN_FILE, MANIFEST_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()

    # -------------------------------------------------------------- locking

    def acquire_lock(self, purpose: str = "written") -> None:
        """Take the run's writer lock, or fail in one line if another process holds it or the run
        cannot be written (``purpose`` says what the command was to do: "repaired")."""
        self.root.mkdir(parents=True, exist_ok=True)
        unwritable = f"{self.root}: the run cannot be written" + ("" if purpose == "written" else f", so it cannot be {purpose}")
        self._lock = FileLock(self.root / LOCK_FILE, f"{self.root}: another factory process is writing this run", unwritable)
        try:
            layout.refuse_linked_folders(self.root)
        except BaseException:
            self.release_lock()
            raise

    def release_lock(self) -> None:
        self.finish_plan_writer(wait=False)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_lock()

    # -------------------------------------------------------------- reading

    def _read_run_json(self) -> dict[str, Any]:
        return read_json_object(self.root / RUN_FILE, "run file", required=RUN_FILE_KEYS)

    @property
    def info(self) -> dict[str, Any]:
        return self._read_run_json()

    def manifest(self) -> Manifest:
        """The manifest as run (prompt sources inlined), read with libyaml's C loader when there is
        one: the pure-Python loader takes about 0.5 s for a 500-class manifest, more than filtering
        100,000 rows."""
        path = self.root / MANIFEST_FILE
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise InputError(f"{path}: unreadable manifest copy ({exc})") from exc
        return manifest_from_dict(data, str(path))

    def plan(self) -> pa.Table:
        files = planfiles.chain(self.root) or [self.root / PLAN_FILE]
        return pa.concat_tables([open_parquet(p).read().cast(PLAN_SCHEMA) for p in files])

    def sample_dir(self, index: int) -> Path:
        return self.root / SAMPLES_DIR / bucket_name(index)

    def sample_path(self, index: int, key: str, suffix: str) -> Path:
        return self.sample_dir(index) / f"{key}{suffix}"

    def _journal(self) -> list[tuple[int, Path]]:
        """The journal chunks on disk, (sequence number, path), oldest first."""
        return segments.journal_chunks(self.root)

    def plan_size(self) -> int:
        """N: the number of planned samples (run.json's ``n``, else the plan file's rows)."""
        n = self._read_run_json().get("n") if (self.root / RUN_FILE).is_file() else None
        if isinstance(n, int) and n > 0:
            return n
        rows = self._plan_rows()
        if rows is None:
            raise InputError(f"{self.root / PLAN_FILE}: missing or unreadable plan")
        return rows

    def plan_reader(self) -> PlanReader | ManifestPlan:
        """The plan's rows by index: plan.parquet when it is complete, else made from the manifest
        (a plan row is a pure function of the manifest and its index; the file is a cache that
        ``generate`` writes beside the run)."""
        n = self.plan_size()
        if self._plan_rows() == n:
            return PlanReader(planfiles.chain(self.root), fallback=lambda: ManifestPlan(self.manifest(), n))
        return ManifestPlan(self.manifest(), n)

    def replace_damaged_plan(self, damaged: Sequence[Path]) -> str | None:
        """Set aside the plan files a reader found damaged (their rows were made from the manifest)
        and write the plan again in the background; the line that says so, or None. Needs the lock."""
        if not damaged:
            return None
        note = planfiles.set_aside_damaged(self.root, damaged)
        self.start_plan_writer()
        return note

    def _index_sources(self, schema: pa.Schema) -> tuple[list[segments.IndexFile], pa.Table]:
        """The live base and segment files, oldest first, and the journal's rows not in them."""
        live = segments.live_files(segments.all_files(self.root))
        top = segments.top_of(live)
        chunks = [(seq, path) for seq, path in segments.journal_chunks(self.root) if seq > top]
        return live, segments.read_chunks(chunks, schema)

    def committed(self, columns: Sequence[str] | None = None, only_plan: bool = False) -> Iterator[pa.Table]:
        """The committed rows (latest per plan index, ``planned`` rows that undo older ones
        included), a step of plan indices at a time in index order. Costs what is committed,
        whatever the plan's size."""
        names = list(INDEX_SCHEMA.names if columns is None else dict.fromkeys(["index", "status", *columns]))
        schema = pa.schema([INDEX_SCHEMA.field(c) for c in names])
        files, journal = self._index_sources(schema)
        stop = self.plan_size() if only_plan else None
        for lo, parts in segments.committed_steps(files, journal, schema, stop=stop):
            table = segments.pick_latest(lo, parts, keep_planned=True)
            if stop is not None and table.num_rows and table["index"][table.num_rows - 1].as_py() >= stop:
                table = table.filter(pc.less(table["index"], stop))
            if table.num_rows:
                yield table if columns is None else table.select(list(columns))

    def _merged(self, columns: Sequence[str] | None = None, only_plan: bool = False) -> Iterator[pa.Table]:
        """The index, ``STEP_ROWS`` plan indices at a time, in plan-index order.

        For every plan index: its latest committed row, else a ``planned`` row made from the plan;
        then the committed rows of indices beyond the plan (a run whose N was lowered), unless
        ``only_plan``. Memory does not grow with N: sorted streams merged a step at a time.
        Parts hold ``columns`` (all columns by default; ``index`` and ``status`` are always read).
        """
        names = list(INDEX_SCHEMA.names if columns is None else dict.fromkeys(["index", "status", *columns]))
        schema = pa.schema([INDEX_SCHEMA.field(c) for c in names])
        n = self.plan_size()
        step = layout.STEP_ROWS
        reader: PlanReader | ManifestPlan | None = None

        def planned(lo: int, hi: int, have: np.ndarray) -> pa.Table:
            nonlocal reader
            hi = min(hi, n)
            missing = np.setdiff1d(np.arange(lo, hi, dtype=np.int64), have, assume_unique=True)
            if missing.size == 0:
                return schema.empty_table()
            reader = reader or self.plan_reader()
            return planned_rows(reader.take(missing), schema)

        def out(table: pa.Table) -> pa.Table:
            return table if columns is None else table.select(list(columns))

        at = 0  # the first plan index not yet yielded
        files, journal = self._index_sources(schema)
        for lo, parts in segments.committed_steps(files, journal, schema, stop=n if only_plan else None):
            while at < min(lo, n):
                yield out(planned(at, at + step, np.zeros(0, np.int64)))
                at += step
            rows = segments.pick_latest(lo, parts, keep_planned=True)
            if rows.num_rows and pc.any(pc.equal(rows["status"], STATUS_PLANNED)).as_py():
                rows = rows.filter(pc.not_equal(rows["status"], STATUS_PLANNED))  # made again from the plan below
            if only_plan and rows.num_rows:
                rows = rows.filter(pc.less(rows["index"], n))
            if lo < n:
                fill = planned(lo, lo + step, rows["index"].to_numpy())
                if fill.num_rows:
                    rows = pa.concat_tables([rows, fill]).sort_by("index")
                at = lo + step
            if rows.num_rows:
                yield out(rows)
        while at < n:
            yield out(planned(at, at + step, np.zeros(0, np.int64)))
            at += step

    def records(self) -> pa.Table:
        """The latest index row of every key that has one (planned rows excluded)."""
        parts = [t.filter(pc.not_equal(t["status"], STATUS_PLANNED)) for t in self.committed()]
        return pa.concat_tables(parts) if parts else INDEX_SCHEMA.empty_table()

    def index(
        self, only_plan: bool = True, columns: Sequence[str] | None = None, dictionary: Sequence[str] = ()
    ) -> pa.Table:
        """One row per sample, sorted by plan index: records, plus ``planned`` rows for the rest.

        With ``only_plan`` (the default), rows outside the current plan (a run whose N was
        lowered) are left out. ``columns`` reads only those (faster on large runs). Columns named
        in ``dictionary`` come dictionary-encoded (``dictionary<int32, string>``): few distinct
        strings, such as the class and the status, read without decoding a million strings.
        """
        names = list(columns or INDEX_SCHEMA.names)
        encoded = [c for c in dictionary if c in names]
        table = self._folded_index(names, encoded) if only_plan else None
        if table is None:
            parts = list(self._merged(columns, only_plan=only_plan))
            table = pa.concat_tables(parts) if parts else pa.schema([INDEX_SCHEMA.field(c) for c in names]).empty_table()
            for c in encoded:
                table = table.set_column(table.column_names.index(c), c, pc.dictionary_encode(table[c]))
        fields = [pa.field(c, pa.dictionary(pa.int32(), pa.string())) if c in encoded else INDEX_SCHEMA.field(c) for c in names]
        return pa.Table.from_arrays([table[f.name].cast(f.type) for f in fields], schema=pa.schema(fields))

    def _folded_index(self, columns: list[str], encoded: list[str]) -> pa.Table | None:
        """index.parquet's columns read in one call, when it *is* the index; else None.

        When index.parquet is the only live index file, no journal chunk is newer, and it holds
        exactly the plan's rows (plan index 0..N-1, in order: a finished, compacted run), one read
        is enough (0.04 s for a million rows here, against 0.15-0.6 s merging). Anything else
        returns None and takes the merging path, which also reports damaged files.
        """
        path = self.root / INDEX_FILE
        try:
            if not path.is_file():
                return None
            live = segments.live_files(segments.all_files(self.root))
            if len(live) != 1 or not live[0].is_base:
                return None
            file = pq.ParquetFile(path, read_dictionary=encoded or None, page_checksum_verification=True)
            check_index_schema(file.schema_arrow)
            if any(seq > live[0].hi for seq, _ in segments.journal_chunks(self.root)):
                return None
            n_plan = self.plan_size()
            if file.metadata.num_rows != n_plan or not set(columns) <= set(file.schema_arrow.names):
                return None
            table = file.read(columns=list(dict.fromkeys(["index", "status", *columns])))
            if not np.array_equal(table["index"].to_numpy(zero_copy_only=False), np.arange(n_plan)):
                return None
            if pc.any(pc.equal(table["status"], STATUS_PLANNED)).as_py():
                return None
            return table.select(columns)
        except (OSError, ValueError, pa.ArrowException, RunError):
            return None  # the merging reader reports real problems

    # -------------------------------------------------------------- resuming

    def resume(self, verify: str = "recent") -> ResumeState:
        """Clean temporary and uncommitted files and work out what is left to do.

        The committed index is trusted for presence: files are written and synced before their
        row is committed. One pass over the committed rows (its cost follows what is done, not N)
        finds the done samples; the sample folders that can hold uncommitted files (those not all
        done) and those of the rows still in the journal (the last, uncertain commits) are listed,
        their done samples' files checked for presence and size, and files of samples not done
        deleted. ``verify="all"`` lists every folder with done samples (the old full check; the
        thorough one, PNG CRCs and JSON, is ``factory check``).
        """
        n = self.plan_size()
        self._left_alone = []
        columns = ["index", "key", "status", *SIZE_COLUMNS.values()]
        schema = pa.schema([INDEX_SCHEMA.field(c) for c in columns])
        files, journal = self._index_sources(schema)
        recent = set((journal["index"].to_numpy() // layout.BUCKET_SIZE).tolist())
        done_parts: list[pa.Table] = []
        failed = 0
        for lo, parts in segments.committed_steps(files, journal, schema):
            rows = segments.pick_latest(lo, parts, keep_planned=True)
            status = rows["status"]
            in_plan = pc.less(rows["index"], n)
            failed += int(pc.sum(pc.and_(pc.equal(status, STATUS_FAILED), in_plan)).as_py() or 0)
            done_parts.append(rows.filter(pc.equal(status, STATUS_DONE)))
        done = pa.concat_tables(done_parts) if done_parts else schema.empty_table()
        done_index = done["index"].to_numpy()
        buckets = done_index // layout.BUCKET_SIZE
        per_bucket = np.bincount(buckets, minlength=1) if buckets.size else np.zeros(1, np.int64)
        existing = self._bucket_numbers()
        used = set(np.unique(buckets).tolist())
        for entry in self._left_alone:  # a bucket folder this run uses that is a symlink: refused in one line
            name = entry.split("/")[1].split(" ")[0]
            if entry.endswith("(symlink)") and name.isdigit() and (int(name) * layout.BUCKET_SIZE < n or int(name) in used):
                self._listing(int(name))
        to_list = {b for b in existing if b >= per_bucket.size or per_bucket[b] < layout.BUCKET_SIZE}
        to_list |= recent & existing
        if verify == "all":
            to_list |= set(np.unique(buckets).tolist()) & existing
        bad_index: list[int] = []
        order = np.argsort(buckets, kind="stable")
        starts = np.searchsorted(buckets[order], sorted(to_list))
        stops = np.searchsorted(buckets[order], sorted(to_list), side="right")
        for bucket, lo, hi in zip(sorted(to_list), starts.tolist(), stops.tolist()):
            listing = self._listing(bucket)
            rows = done.take(pa.array(order[lo:hi]))
            bad = damaged_rows(rows, listing)
            bad_index.extend(rows["index"].to_numpy()[bad].tolist())
            good_keys = set(rows.filter(pa.array(~bad))["key"].to_pylist())
            self._clean_bucket(bucket, listing, good_keys)
        gone = np.isin(buckets, np.fromiter(existing, np.int64, len(existing)), invert=True)
        bad_index.extend(done_index[gone].tolist())  # whole folders gone: their samples are redone
        self._clean_temporary()
        bad = np.asarray(bad_index, dtype=np.int64)
        todo_mask = np.ones(n, dtype=bool)
        todo_mask[done_index[done_index < n]] = False
        todo_mask[bad[bad < n]] = True
        todo = np.flatnonzero(todo_mask)
        return ResumeState(
            pending=PlanRows(self.plan_reader(), todo),
            done=n - int(todo.size),
            failed_before=failed,
            damaged=int(np.count_nonzero(bad < n)),
            left_alone=list(self._left_alone),
        )

    def rebuild_index(self) -> str | None:
        """Set aside every unreadable index file and give its done samples their rows back from
        their JSON files (:mod:`factory.store.recover`). Returns the one line that says what was
        done, or None when nothing was damaged. Needs the writer lock. A rebuild stopped half way
        (Ctrl-C, a kill) is finished by the next call (:func:`~factory.store.recover.begin_rebuild`).
        """
        bad = recover.unreadable_files(self.root)
        if not bad and not self.rebuild_pending():
            return None
        asides = recover.begin_rebuild(self.root, bad)
        known: set[int] = set()
        for part in self.committed(["index"]):
            known.update(part["index"].to_pylist())
        rows = recover.recover_rows(self.root, self.plan_reader(), self.plan_size(), known)
        self._seq = None
        if rows:
            self._commit(rows)
        recover.end_rebuild(self.root)
        if bad:
            names = ", ".join(f"{p.relative_to(self.root)} (set aside as {a.name})" for p, a in zip(bad, asides))
            return f"index rebuilt: damaged {names}; {len(rows)} done samples recovered from their JSON files"
        return f"index rebuilt: finished the rebuild a stopped run began; {len(rows)} done samples recovered from their JSON files"

    def rebuild_pending(self) -> bool:
        """Whether a rebuild of the index was stopped half way (:meth:`rebuild_index` finishes it)."""
        return recover.rebuild_pending(self.root)

    def _bucket_numbers(self) -> set[int]:
        base = self.root / SAMPLES_DIR
        if not base.is_dir():
            return set()
        numbers = set()
        for p in base.iterdir():
            if p.is_symlink() or not p.is_dir() or not p.name.isdigit():
                self._left_alone.append(f"{SAMPLES_DIR}/{p.name}" + (" (symlink)" if p.is_symlink() else ""))
                continue
            numbers.add(int(p.name))
        return numbers

    def _listing(self, bucket: int) -> dict[str, int]:
        """The store's own files in one bucket folder, name -> size (one scandir).

        Only regular files named as the store names them (a temporary name, or a key of this
        bucket and a sample suffix) are listed; anything else (a symlink, a sub-folder, a foreign
        file) is noted in ``left_alone`` and never touched. A bucket folder of the run that is a
        symlink is refused: its samples would be redone, written through the link.
        """
        folder = self.root / SAMPLES_DIR / f"{bucket:05d}"
        if folder.is_symlink():
            raise InputError(
                f"{folder}: is a symlink, where this run keeps samples; the store writes only into folders it "
                "makes: move the link away and re-run"
            )
        out = {}
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.is_file(follow_symlinks=False) and _store_file_name(e.name, bucket):
                        out[e.name] = e.stat(follow_symlinks=False).st_size
                    else:
                        self._left_alone.append(f"{SAMPLES_DIR}/{folder.name}/{e.name}" + (" (symlink)" if e.is_symlink() else ""))
        except FileNotFoundError:
            return {}
        return out

    def _clean_bucket(self, bucket: int, listing: dict[str, int], done_keys: set[str]) -> None:
        """Delete a bucket's temporary files and the files of samples not done (they are redone).
        ``listing`` holds only the store's own regular files (see :meth:`_listing`)."""
        folder = self.root / SAMPLES_DIR / f"{bucket:05d}"
        for name in listing:
            if name.startswith(TMP_PREFIX) or key_of(name) not in done_keys:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()

    def _clean_temporary(self) -> None:
        for folder in (self.root, self.root / JOURNAL_DIR):
            if folder.is_dir() and not folder.is_symlink():
                for p in folder.glob(f"{TMP_PREFIX}*"):
                    if p.is_file() and not p.is_symlink():
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()

    # -------------------------------------------------------------- writing

    def save(self, results: Sequence[SampleResult]) -> None:
        """Write the samples' files (unless a worker already did), then commit their index rows as
        one journal chunk: the commit point. See :func:`write_sample_files`."""
        if not results:
            return
        results = write_sample_files(self.root, results)
        rows = []
        for res in results:
            if res.status == STATUS_DONE and any(res.fields.get(c) is None for c in SIZE_COLUMNS.values()):
                raise ValueError(f"{res.key}: a done sample with neither files nor their sizes")
            rows.append(index_row(res, res.fields))
        self._commit(rows)

    def _commit(self, rows: list[dict[str, Any]]) -> None:
        self.commit_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))

    def commit_table(self, table: pa.Table) -> None:
        """Commit index rows (``INDEX_SCHEMA``) as one journal chunk: written, fsynced, renamed."""
        journal = self.root / JOURNAL_DIR
        journal.mkdir(exist_ok=True)
        if self._seq is None:
            self._seq = max([segments.top_of(segments.all_files(self.root)), *(s for s, _ in segments.journal_chunks(self.root))])
        self._seq += 1
        atomic_write_parquet(table, journal / f"chunk-{self._seq:09d}.parquet")
        fsync_path(journal)
        self._chunks_since_fold += 1
        if self._chunks_since_fold >= self.fold_every:
            segments.compact(self.root)
            self._chunks_since_fold = 0

    def fold(self) -> None:
        """Compact the whole index into index.parquet (committed rows, sorted by plan index): at
        the end of a run, so readers find one file. Costs the rows committed, not the plan's size.

        A crash at any point leaves the old files or a complete new one that supersedes them.
        """
        segments.compact(self.root, full=True)
        self._chunks_since_fold = 0

    def mark_updated(self, **extra: Any) -> None:
        info = self._read_run_json()
        info.update(extra)
        info["updated"] = _now_iso()
        atomic_write_text(self.root / RUN_FILE, json.dumps(info, indent=2) + "\n")


# ------------------------------------------------------------------------------ helpers


#: A file the store writes in a bucket: ``<manifest>-<8-digit index>-<slug><suffix>`` or a temporary name.
_SAMPLE_FILE_RE = re.compile(r"^(" + KEY_PATTERN + r")(" + "|".join(re.escape(s) for s in SAMPLE_SUFFIXES) + r")$")


def _store_file_name(name: str, bucket: int) -> bool:
    """Whether ``name`` is a file the store writes in bucket folder ``bucket``."""
    if name.startswith(TMP_PREFIX):
        return True
    match = _SAMPLE_FILE_RE.match(name)
    return match is not None and int(match.group(1).rsplit("-", 2)[1]) // layout.BUCKET_SIZE == bucket


def _unstarted(root: Path) -> bool:
    """Whether ``root`` holds nothing, or only what a start killed before run.json leaves.

    A start writes, under its lock: the plan (via a temporary file), the empty ``samples/`` and
    ``index/`` folders, manifest.yaml, and run.json last. A folder with the lock and nothing but
    those is a run that never started, taken over as a new run; anything else is not ours.
    """
    entries = list(root.iterdir())
    names = {p.name for p in entries}
    if not entries:
        return True
    if LOCK_FILE not in names:
        return False
    for p in entries:
        if p.is_symlink():
            return False
        if p.name in (SAMPLES_DIR, JOURNAL_DIR):
            if not p.is_dir() or any(p.iterdir()):
                return False
        elif not (p.is_file() and (p.name in (LOCK_FILE, MANIFEST_FILE) or planfiles.is_plan_file(p.name) or p.name.startswith(TMP_PREFIX))):
            return False
    return True


def run_mismatch(existing: dict[str, Any], manifest: Manifest, model_identity: str) -> str | None:
    """Why a run (its ``run.json``, ``existing``) cannot be resumed with this manifest and model, or None."""
    if existing.get("format") != STORE_FORMAT:
        return f"made by an incompatible store format {existing.get('format')}"
    if existing.get("manifest") != manifest.name or existing.get("fingerprint") != manifest.fingerprint():
        return (
            f"made by a different manifest ({existing.get('manifest')} {existing.get('fingerprint')}, "
            f"now {manifest.name} {manifest.fingerprint()})"
        )
    if existing.get("model") != model_identity:
        return f"made with a different model ({existing.get('model')}, now {model_identity})"
    return None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


