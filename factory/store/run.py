"""The run store: :class:`RunStore`, a run directory that records what exists, so nothing is
lost, duplicated or redone. The layout and the rules are in :mod:`factory.store`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from factory.errors import InputError
from factory.feedback import plural
from factory.fsutil import (
    TMP_PREFIX,
    FileLock,
    atomic_parquet_writer,
    atomic_write_bytes,
    atomic_write_parquet,
    atomic_write_text,
    check_writable_dir,
    fsync_path,
)
from factory.manifest import Manifest, manifest_from_dict
from factory.plan import KEY_PATTERN, PLAN_ROW_GROUP, PLAN_SCHEMA, PlanReader, PlanRows, plan_chunks
from factory.sample import SAMPLE_SUFFIXES, SIZE_COLUMNS, STATUS_DONE, STATUS_FAILED, STATUS_PLANNED, SampleResult, key_of
from factory.store import layout
from factory.store.layout import (
    INDEX_FILE,
    INDEX_SCHEMA,
    JOURNAL_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    RUN_FILE,
    SAMPLES_DIR,
    SELECTIONS_DIR,
    STORE_FORMAT,
    bucket_name,
)
from factory.store.tables import (
    SortedRows,
    conform,
    damaged_rows,
    index_row,
    latest_per_index,
    planned_rows,
    readable_columns,
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
        self.fold_every = 64  # journal chunks between rewrites of index.parquet

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
    ) -> RunStore:
        """Create the run directory, or check that it was made by this manifest and model.

        Writes run.json, manifest.yaml and the plan of ``n`` rows. Nothing is written when the
        checks fail. ``restart`` deletes an existing run's samples and index first.
        ``on_plan_rows(k)`` is called as each group of k plan rows is written (a progress bar).
        """
        root = Path(root)
        store = cls(root)
        existing = store._read_run_json() if (root / RUN_FILE).is_file() else None
        if existing is None and root.exists() and (not root.is_dir() or not _unstarted(root)):
            raise InputError(f"{root}: exists and is not a run directory; choose another --out")
        if existing is not None and not restart:
            problem = _mismatch(existing, manifest, model_identity)
            if problem and not _mismatch(existing, manifest, existing.get("model", "")) and not store._has_commits():
                problem = None  # no sample made yet (its model failed to load): the run takes the new one
            if problem:
                raise InputError(f"{root}: {problem}; pass --restart to start this run over, or choose another --out")
        check_writable_dir(root, "output directory")
        store.acquire_lock()
        try:
            if existing is not None and restart:
                store._wipe()
            if existing is None or restart or existing.get("n") != n or store._plan_rows() != n:
                store._write_plan(manifest, n, on_plan_rows)
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
        """Write plan.parquet in row groups, built a group at a time (the plan is never whole)."""
        with atomic_parquet_writer(self.root / PLAN_FILE, PLAN_SCHEMA) as writer:
            for chunk in plan_chunks(manifest, n, PLAN_ROW_GROUP):
                writer.write_table(chunk, row_group_size=PLAN_ROW_GROUP)
                if on_rows is not None:
                    on_rows(chunk.num_rows)

    def _plan_rows(self) -> int | None:
        """Rows in plan.parquet, or None when there is no readable plan."""
        try:
            return pq.read_metadata(self.root / PLAN_FILE).num_rows
        except (OSError, pa.ArrowException):
            return None

    def _has_commits(self) -> bool:
        """Whether any sample was committed (done or failed): a journal chunk, or a row of
        index.parquet that is not ``planned``."""
        if self._journal():
            return True
        try:
            status = pq.read_table(self.root / INDEX_FILE, columns=["status"])["status"]
        except FileNotFoundError:
            return False
        except (OSError, pa.ArrowException):
            return True  # unreadable: assume there is something to protect
        return bool(pc.any(pc.not_equal(status, STATUS_PLANNED)).as_py())

    def _wipe(self) -> None:
        for name in (SAMPLES_DIR, JOURNAL_DIR, SELECTIONS_DIR):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in (INDEX_FILE, PLAN_FILE, RUN_FILE, MANIFEST_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()

    # -------------------------------------------------------------- locking

    def acquire_lock(self) -> None:
        """Take the run's writer lock, or fail in one line if another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.root / LOCK_FILE, f"{self.root}: another factory process is writing this run")

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_lock()

    # -------------------------------------------------------------- reading

    def _read_run_json(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{self.root / RUN_FILE}: unreadable run file ({exc})") from exc

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
        return pq.read_table(self.root / PLAN_FILE).cast(PLAN_SCHEMA)

    def sample_dir(self, index: int) -> Path:
        return self.root / SAMPLES_DIR / bucket_name(index)

    def sample_path(self, index: int, key: str, suffix: str) -> Path:
        return self.sample_dir(index) / f"{key}{suffix}"

    def _journal(self) -> list[tuple[int, Path]]:
        folder = self.root / JOURNAL_DIR
        if not folder.is_dir():
            return []
        chunks = []
        for p in folder.glob("chunk-*.parquet"):
            with contextlib.suppress(ValueError):
                chunks.append((int(p.stem.split("-")[1]), p))
        return sorted(chunks)

    def plan_size(self) -> int:
        """N: the number of planned samples (read from the plan file's metadata)."""
        rows = self._plan_rows()
        if rows is None:
            raise InputError(f"{self.root / PLAN_FILE}: missing or unreadable plan")
        return rows

    def plan_reader(self) -> PlanReader:
        return PlanReader(self.root / PLAN_FILE)

    def _covers(self) -> int:
        """The last journal chunk folded into index.parquet (0: none, or no index.parquet)."""
        path = self.root / INDEX_FILE
        if not path.is_file():
            return 0
        return int((pq.read_schema(path).metadata or {}).get(b"covers", b"0"))

    def _journal_rows(self, schema: pa.Schema) -> pa.Table:
        """The latest row per plan index among journal chunks not yet folded, sorted by index.

        The journal is short (it is folded every ``fold_every`` chunks and at the end of a run).
        """
        covers = self._covers()
        parts = []
        for seq, path in self._journal():
            if seq > covers:
                parts.append(conform(pq.read_table(path, columns=readable_columns(path, schema)), schema))
        if not parts:
            return schema.empty_table()
        latest = latest_per_index(pa.concat_tables(parts))
        return latest.sort_by("index")

    def _merged(self, columns: Sequence[str] | None = None, only_plan: bool = False) -> Iterator[pa.Table]:
        """The index, ``STEP_ROWS`` plan indices at a time, in plan-index order.

        For every plan index: its latest journal row, else its row in index.parquet, else a
        ``planned`` row made from the plan; then the committed rows of indices beyond the plan (a
        run whose N was lowered), unless ``only_plan``. Three sorted streams merged a step at a
        time (index.parquet is written sorted by index), so memory does not grow with N.
        Parts hold ``columns`` (all columns by default; ``index`` and ``status`` are always read).
        """
        names = list(INDEX_SCHEMA.names if columns is None else dict.fromkeys(["index", "status", *columns]))
        schema = pa.schema([INDEX_SCHEMA.field(c) for c in names])
        n = self.plan_size()
        reader: PlanReader | None = None
        journal = self._journal_rows(schema)
        j_index = journal["index"].to_numpy()
        j_at = 0
        folded = SortedRows(self.root / INDEX_FILE, schema)
        lo = 0
        while True:
            upcoming = [i for i in (folded.next_index(), int(j_index[j_at]) if j_at < j_index.size else None) if i is not None]
            if lo >= n:  # past the plan: jump to the next committed row, if any
                if only_plan or not upcoming:
                    return
                lo = max(lo, min(upcoming) // layout.STEP_ROWS * layout.STEP_ROWS)
            hi = lo + layout.STEP_ROWS
            j_stop = int(np.searchsorted(j_index, hi))
            parts = [folded.take_below(hi), journal.slice(j_at, j_stop - j_at)]
            j_at = j_stop
            pick = np.full(layout.STEP_ROWS, -1, dtype=np.int64)
            offset = 0
            for part in parts:  # later parts win: the journal over index.parquet
                idx = part["index"].to_numpy() - lo
                in_plan = idx + lo < n
                keep = in_plan if only_plan else in_plan | pc.not_equal(part["status"], STATUS_PLANNED).to_numpy(zero_copy_only=False)
                pick[idx[keep]] = offset + np.flatnonzero(keep)
                offset += part.num_rows
            missing = np.flatnonzero(pick[: max(0, min(hi, n) - lo)] < 0)
            if missing.size:
                reader = reader or self.plan_reader()
                parts.append(planned_rows(reader.take(missing + lo), schema))
                pick[missing] = offset + np.arange(missing.size)
            lo = hi
            chosen = pick[pick >= 0]
            if chosen.size == parts[0].num_rows and np.array_equal(chosen, np.arange(chosen.size)):
                table = parts[0]  # the common case, a folded run: index.parquet's rows as they are
            else:
                table = pa.concat_tables(parts).take(pa.array(chosen))
            if table.num_rows:
                yield table if columns is None else table.select(list(columns))

    def records(self) -> pa.Table:
        """The latest index row of every key that has one (planned rows excluded)."""
        parts = [t.filter(pc.not_equal(t["status"], STATUS_PLANNED)) for t in self._merged()]
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

        :meth:`_merged` merges index.parquet, the journal and the plan a step at a time (0.15 s for
        the filter's columns of a million rows here, 0.6 s for all). When no journal chunk is newer
        than what index.parquet covers and index.parquet holds exactly the plan's rows (plan index
        0..N-1, in order, as :meth:`fold` writes it), one read is enough (0.04 s). Anything else (a
        run being written, N changed since the fold) returns None and takes the merging path.
        """
        path = self.root / INDEX_FILE
        try:
            if not path.is_file():
                return None
            file = pq.ParquetFile(path, read_dictionary=encoded or None)
            covers = int((file.schema_arrow.metadata or {}).get(b"covers", b"0"))
            if any(seq > covers for seq, _ in self._journal()):
                return None
            n_plan = self.plan_size()
            if file.metadata.num_rows != n_plan or not set(columns) <= set(file.schema_arrow.names):
                return None
            table = file.read(columns=list(dict.fromkeys(["index", *columns])))
            if not np.array_equal(table["index"].to_numpy(zero_copy_only=False), np.arange(n_plan)):
                return None
            return table.select(columns)
        except (OSError, ValueError, pa.ArrowException):
            return None  # the merging reader reports real problems

    # -------------------------------------------------------------- resuming

    def resume(self, verify_files: bool = True) -> ResumeState:
        """Clean temporary and orphan files and work out what is left to do.

        One streaming pass over the index, a bucket folder at a time: a done sample counts only
        if its four files are present with the recorded sizes (``verify_files``); files of
        samples that are not done (or not done intact) are deleted. Memory: one step of index
        rows, one folder listing, and the pending plan indices (8 bytes per sample to do).
        """
        n = self.plan_size()
        self._left_alone = []
        pending: list[np.ndarray] = []
        failed = damaged = 0
        seen_buckets: set[int] = set()
        columns = ["index", "key", "status", *SIZE_COLUMNS.values()]
        for part in self._merged(columns):
            index = part["index"].to_numpy()
            status = part["status"]
            good = pc.equal(status, STATUS_DONE).to_numpy(zero_copy_only=False).copy()
            in_plan = index < n
            failed += int(np.count_nonzero(pc.equal(status, STATUS_FAILED).to_numpy(zero_copy_only=False) & in_plan))
            buckets = index // layout.BUCKET_SIZE
            for bucket in np.unique(buckets).tolist():
                rows = np.flatnonzero(buckets == bucket)
                listing = self._listing(bucket)
                if verify_files:
                    bad = damaged_rows(part.take(pa.array(rows[good[rows]])), listing)
                    bad_rows = rows[good[rows]][bad]
                    good[bad_rows] = False
                    damaged += int(np.count_nonzero(in_plan[bad_rows]))
                done_keys = set(part["key"].take(pa.array(rows[good[rows]])).to_pylist())
                self._clean_bucket(bucket, listing, done_keys)
                seen_buckets.add(bucket)
            pending.append(index[in_plan & ~good])
        for bucket in self._bucket_numbers() - seen_buckets:  # folders with no index row at all
            self._clean_bucket(bucket, self._listing(bucket), set())
        self._clean_temporary()
        todo = np.concatenate(pending) if pending else np.zeros(0, np.int64)
        return ResumeState(
            pending=PlanRows(self.plan_reader(), todo),
            done=n - int(todo.size),
            failed_before=failed,
            damaged=damaged,
            left_alone=list(self._left_alone),
        )

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
        """Write the samples' files, then commit their index rows as one journal chunk.

        Files are written (and fsynced) by a small thread pool: fsync waits on the disk, not the
        CPU, so parallel writes keep one driver ahead of many GPUs.
        """
        if not results:
            return
        writes: list[tuple[Path, bytes]] = []
        rows = []
        for res in results:
            fields = dict(res.fields)
            if res.status == STATUS_DONE:
                folder = self.sample_dir(res.index)
                folder.mkdir(parents=True, exist_ok=True)
                for suffix, data in res.files.items():
                    if suffix not in SAMPLE_SUFFIXES:
                        raise ValueError(f"unknown sample file suffix {suffix!r}")
                    writes.append((folder / f"{res.key}{suffix}", data))
                    fields[SIZE_COLUMNS[suffix]] = len(data)
            rows.append(index_row(res, fields))
        if len(writes) > 1:
            list(_writer_pool().map(lambda w: atomic_write_bytes(*w), writes))
        elif writes:
            atomic_write_bytes(*writes[0])
        self._commit(rows)

    def _commit(self, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        journal = self.root / JOURNAL_DIR
        journal.mkdir(exist_ok=True)
        if self._seq is None:
            self._seq = max([self._covers(), *(s for s, _ in self._journal())])
        self._seq += 1
        atomic_write_parquet(table, journal / f"chunk-{self._seq:09d}.parquet")
        fsync_path(journal)
        self._chunks_since_fold += 1
        if self._chunks_since_fold >= self.fold_every:
            self.fold()

    def fold(self) -> None:
        """Rewrite index.parquet from itself, the journal and the plan, then delete folded chunks.

        Written a step at a time (see :meth:`_merged`) to a temporary file that replaces the old
        one; a crash before the rename leaves the old index and the journal, which is harmless.
        """
        chunks = self._journal()
        top = max([self._covers(), *(s for s, _ in chunks)])
        with atomic_parquet_writer(self.root / INDEX_FILE, INDEX_SCHEMA, metadata={"covers": str(top)}) as writer:
            for part in self._merged():
                writer.write_table(part)
        fsync_path(self.root)
        for seq, path in chunks:
            if seq <= top:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
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
        elif not (p.is_file() and (p.name in (LOCK_FILE, PLAN_FILE, MANIFEST_FILE) or p.name.startswith(TMP_PREFIX))):
            return False
    return True


def _mismatch(existing: dict[str, Any], manifest: Manifest, model_identity: str) -> str | None:
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


_POOL: ThreadPoolExecutor | None = None


def _writer_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="factory-store")
    return _POOL


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


