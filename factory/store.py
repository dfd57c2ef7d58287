"""The run store: a directory that records what exists, so nothing is lost, duplicated or redone.

Layout of a run directory::

    run.json               identity: manifest name and fingerprint, model identity, N, versions
    manifest.yaml          the manifest as run, with its prompt sources inlined
    plan.parquet           the plan (factory.plan), N rows
    samples/00000/KEY.png        image on green       (bucket = plan index // 1000)
                 KEY.alpha.png  alpha matte (8- or 16-bit, one channel)
                 KEY.fg.png     decontaminated foreground
                 KEY.json       metadata
    index.parquet          one row per sample (planned/done/failed), folded from the journal
    index/chunk-*.parquet  the journal: index rows committed since index.parquet was written
    selections/NAME.parquet   written by ``factory filter``
    .lock                  held by the one process writing the run

Rules (the "store's rules" other stages rely on):

- Every file is written to a temporary name in its final folder and renamed into place, so a file
  under a final name is always complete. Sample files are written before the index row that says
  they are done; the index row is the commit.
- The index is a journal of Parquet chunks, each written atomically; the latest row for a key wins.
  ``index.parquet`` is rewritten (atomically) from the journal every so often and at the end of a
  run, then the folded chunks are deleted. A reader ignores chunks already folded (their sequence
  number is in index.parquet's metadata), so a crash between the two steps is harmless. A killed
  process therefore never leaves the index unreadable.
- Resume: done samples whose files are all present are skipped; failed, planned and done-but-
  damaged samples are (re)done; temporary files and files of samples not done are deleted.
- One writer: a process holds ``.lock`` (an advisory ``flock``) while it writes.
- Memory does not grow with N: plan.parquet is written and read a row group at a time,
  index.parquet is kept sorted by plan index, and resume, fold and ``index()`` merge it with the
  journal and the plan a step of buckets (``STEP_ROWS``) at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
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
from factory.errors import InputError, RunError
from factory.manifest import Manifest, manifest_from_dict
from factory.plan import PLAN_ROW_GROUP, PLAN_SCHEMA, PlanReader, PlanRows, plan_chunks

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.yaml"
PLAN_FILE = "plan.parquet"
INDEX_FILE = "index.parquet"
JOURNAL_DIR = "index"
SAMPLES_DIR = "samples"
SELECTIONS_DIR = "selections"
LOCK_FILE = ".lock"
LATEST_RUN_FILE = ".factory-latest-run"  # in the working directory: the run that --run defaults to
STORE_FORMAT = 1
BUCKET_SIZE = 1000
#: Plan indices per step of the store's streaming passes (resume, fold, index): whole buckets, so a
#: pass holds one step of rows (a few MB) however large the run.
STEP_ROWS = 16 * BUCKET_SIZE
TMP_PREFIX = ".tmp-"

#: The files of one sample, by suffix after the key.
SAMPLE_SUFFIXES = (".png", ".alpha.png", ".fg.png", ".json")
_SIZE_COLUMN = {".png": "image_bytes", ".alpha.png": "alpha_bytes", ".fg.png": "fg_bytes", ".json": "meta_bytes"}

STATUS_PLANNED = "planned"
STATUS_DONE = "done"
STATUS_FAILED = "failed"

#: Index rows: the plan's columns, then what happened to the sample.
RESULT_FIELDS = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("alpha_source", pa.string()),  # "head" (matting head + GreenPost) or "greenpost" alone
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("alpha_bits", pa.int8()),
    pa.field("image_bytes", pa.int64()),
    pa.field("alpha_bytes", pa.int64()),
    pa.field("fg_bytes", pa.int64()),
    pa.field("meta_bytes", pa.int64()),
    pa.field("gsg", pa.float32()),
    pa.field("gsg_distance", pa.float32()),
    pa.field("bg_uniformity", pa.float32()),
    pa.field("canvas_color", pa.string()),  # "#rrggbb", estimated key colour
    pa.field("alpha_coverage", pa.float32()),  # mean alpha
    pa.field("touches_border", pa.bool_()),
    pa.field("contains_key_color", pa.bool_()),
    pa.field("phash", pa.int64()),  # 64-bit perceptual hash of the alpha-weighted image
    pa.field("t_sample_s", pa.float32()),  # sampler time per image (batch time / batch size)
    pa.field("t_post_s", pa.float32()),  # matting, scoring and encoding
    pa.field("worker", pa.string()),
    pa.field("updated_at", pa.timestamp("ms", tz="UTC")),
]
INDEX_SCHEMA = pa.schema([*PLAN_SCHEMA, *RESULT_FIELDS])
RESULT_NAMES = [f.name for f in RESULT_FIELDS]


# ------------------------------------------------------------------------------ atomic writes


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _os_error(exc, path) from exc


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None, **options: Any) -> bytes:
    """Serialize a table with fixed options: the same table always gives the same bytes.
    ``options`` go to ``pyarrow.parquet.write_table`` (e.g. which columns get dictionaries)."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    settings: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "write_statistics": True, **options}
    pq.write_table(table, buf, **settings)
    return buf.getvalue()


def atomic_write_parquet(table: pa.Table, path: Path, metadata: dict[str, str] | None = None, **options: Any) -> None:
    atomic_write_bytes(path, parquet_bytes(table, metadata, **options))


@contextlib.contextmanager
def atomic_parquet_writer(path: Path, schema: pa.Schema, metadata: dict[str, str] | None = None) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer on a temporary file that becomes ``path`` (fsynced) when the block ends.

    For tables written in parts (a plan or an index of millions of rows): nothing is held whole in
    memory, and ``path`` is the old file or the complete new one, never a partial file.
    """
    if metadata:
        meta = dict(schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        schema = schema.with_metadata(meta)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd", compression_level=3, write_statistics=True) as writer:
            yield writer
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _os_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _os_error(exc: OSError, path: Path) -> RunError:
    import errno

    if exc.errno == errno.ENOSPC:
        return RunError(f"disk full while writing {path}; free space and re-run the same command to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunError(f"cannot write {path}: permission denied")
    return RunError(f"cannot write {path}: {exc.strerror or exc}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (errors ignored: some filesystems refuse directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def take_lock(path: Path, busy_message: str) -> io.BufferedRandom:
    """An exclusive advisory lock (``flock``) on ``path``, held until released or the process dies."""
    fh = open(path, "a+b")  # noqa: SIM115 - held by the caller
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise InputError(busy_message) from exc
    return fh


def release_lock(fh: io.BufferedRandom | None) -> None:
    if fh is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


# ------------------------------------------------------------------------------ results


@dataclass
class SampleResult:
    """What one sample produced: its files (suffix -> encoded bytes) and its index fields.

    ``plan`` carries the plan row's columns (so index rows are self-contained), ``fields`` the
    result columns (scores, sizes, timings). Failed samples have no files and an ``error``.
    """

    plan: dict[str, Any]
    status: str
    error: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return str(self.plan["key"])

    @property
    def index(self) -> int:
        return int(self.plan["index"])


@dataclass(frozen=True)
class ResumeState:
    """What a (re)started run has to do."""

    pending: PlanRows  # plan rows to do, in plan order (read from plan.parquet on demand)
    done: int
    failed_before: int  # failed earlier, retried now
    damaged: int  # marked done but files missing or of the wrong size: redone
    cleaned_files: int  # temporary and orphan files removed


# ------------------------------------------------------------------------------ the store


class RunStore:
    """A run directory. Create or reopen it with :meth:`prepare`; open it read-only with :meth:`open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fh: io.BufferedRandom | None = None
        self._seq: int | None = None
        self._chunks_since_fold = 0
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
    ) -> RunStore:
        """Create the run directory, or check that it was made by this manifest and model.

        Writes run.json, manifest.yaml and the plan of ``n`` rows. Nothing is written when the
        checks fail. ``restart`` deletes an existing run's samples and index first.
        """
        root = Path(root)
        if n <= 0:
            raise InputError(f"N must be a positive integer, got {n}")
        store = cls(root)
        existing = store._read_run_json() if (root / RUN_FILE).is_file() else None
        if existing is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise InputError(f"{root}: exists and is not a run directory; choose another --out")
        if existing is not None and not restart:
            problem = _mismatch(existing, manifest, model_identity)
            if problem:
                raise InputError(f"{root}: {problem}; pass --restart to start this run over, or choose another --out")
        _check_writable(root)
        store.acquire_lock()
        try:
            if existing is not None and restart:
                store._wipe()
            if existing is None or restart or existing.get("n") != n or store._plan_rows() != n:
                store._write_plan(manifest, n)
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

    def _write_plan(self, manifest: Manifest, n: int) -> None:
        """Write plan.parquet in row groups, built a group at a time (the plan is never whole)."""
        with atomic_parquet_writer(self.root / PLAN_FILE, PLAN_SCHEMA) as writer:
            for chunk in plan_chunks(manifest, n, PLAN_ROW_GROUP):
                writer.write_table(chunk, row_group_size=PLAN_ROW_GROUP)

    def _plan_rows(self) -> int | None:
        """Rows in plan.parquet, or None when there is no readable plan."""
        try:
            return pq.read_metadata(self.root / PLAN_FILE).num_rows
        except (OSError, pa.ArrowException):
            return None

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
        self._lock_fh = take_lock(self.root / LOCK_FILE, f"{self.root}: another factory process is writing this run")

    def release_lock(self) -> None:
        release_lock(self._lock_fh)
        self._lock_fh = None

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
        data = yaml.safe_load((self.root / MANIFEST_FILE).read_text())
        return manifest_from_dict(data, str(self.root / MANIFEST_FILE))

    def plan(self) -> pa.Table:
        return pq.read_table(self.root / PLAN_FILE).cast(PLAN_SCHEMA)

    def sample_dir(self, index: int) -> Path:
        return self.root / SAMPLES_DIR / f"{index // BUCKET_SIZE:05d}"

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
                parts.append(_conform(pq.read_table(path, columns=_readable(path, schema)), schema))
        if not parts:
            return schema.empty_table()
        latest = _latest_per_index(pa.concat_tables(parts))
        return latest.sort_by("index")

    def _merged(self, columns: Sequence[str] | None = None, only_plan: bool = False) -> Iterator[pa.Table]:
        """The index, STEP_ROWS plan indices at a time, in plan-index order.

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
        folded = _SortedRows(self.root / INDEX_FILE, schema)
        lo = 0
        while True:
            upcoming = [i for i in (folded.next_index(), int(j_index[j_at]) if j_at < j_index.size else None) if i is not None]
            if lo >= n:  # past the plan: jump to the next committed row, if any
                if only_plan or not upcoming:
                    return
                lo = max(lo, min(upcoming) // STEP_ROWS * STEP_ROWS)
            hi = lo + STEP_ROWS
            j_stop = int(np.searchsorted(j_index, hi))
            parts = [folded.take_below(hi), journal.slice(j_at, j_stop - j_at)]
            j_at = j_stop
            pick = np.full(STEP_ROWS, -1, dtype=np.int64)
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
                parts.append(_planned_rows(reader.take(missing + lo), schema))
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

    def index(self, only_plan: bool = True, columns: Sequence[str] | None = None) -> pa.Table:
        """One row per sample, sorted by plan index: records, plus ``planned`` rows for the rest.

        With ``only_plan`` (the default), rows outside the current plan (a run whose N was
        lowered) are left out. ``columns`` reads only those (faster on large runs).
        """
        parts = list(self._merged(columns, only_plan=only_plan))
        if parts:
            return pa.concat_tables(parts)
        return pa.schema([INDEX_SCHEMA.field(c) for c in (columns or INDEX_SCHEMA.names)]).empty_table()

    # -------------------------------------------------------------- resuming

    def resume(self, verify_files: bool = True) -> ResumeState:
        """Clean temporary and orphan files and work out what is left to do.

        One streaming pass over the index, a bucket folder at a time: a done sample counts only
        if its four files are present with the recorded sizes (``verify_files``); files of
        samples that are not done (or not done intact) are deleted. Memory: one step of index
        rows, one folder listing, and the pending plan indices (8 bytes per sample to do).
        """
        n = self.plan_size()
        pending: list[np.ndarray] = []
        failed = damaged = cleaned = 0
        seen_buckets: set[int] = set()
        columns = ["index", "key", "status", *_SIZE_COLUMN.values()]
        for part in self._merged(columns):
            index = part["index"].to_numpy()
            status = part["status"]
            good = pc.equal(status, STATUS_DONE).to_numpy(zero_copy_only=False).copy()
            in_plan = index < n
            failed += int(np.count_nonzero(pc.equal(status, STATUS_FAILED).to_numpy(zero_copy_only=False) & in_plan))
            buckets = index // BUCKET_SIZE
            for bucket in np.unique(buckets).tolist():
                rows = np.flatnonzero(buckets == bucket)
                listing = self._listing(bucket)
                if verify_files:
                    bad = _damaged(part.take(pa.array(rows[good[rows]])), listing)
                    bad_rows = rows[good[rows]][bad]
                    good[bad_rows] = False
                    damaged += int(np.count_nonzero(in_plan[bad_rows]))
                done_keys = set(part["key"].take(pa.array(rows[good[rows]])).to_pylist())
                cleaned += self._clean_bucket(bucket, listing, done_keys)
                seen_buckets.add(bucket)
            pending.append(index[in_plan & ~good])
        for bucket in self._bucket_numbers() - seen_buckets:  # folders with no index row at all
            cleaned += self._clean_bucket(bucket, self._listing(bucket), set())
        self._clean_temporary()
        todo = np.concatenate(pending) if pending else np.zeros(0, np.int64)
        return ResumeState(
            pending=PlanRows(self.plan_reader(), todo),
            done=n - int(todo.size),
            failed_before=failed,
            damaged=damaged,
            cleaned_files=cleaned,
        )

    def _bucket_numbers(self) -> set[int]:
        base = self.root / SAMPLES_DIR
        if not base.is_dir():
            return set()
        return {int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()}

    def _listing(self, bucket: int) -> dict[str, int]:
        """File name -> size in one bucket folder (one scandir)."""
        folder = self.root / SAMPLES_DIR / f"{bucket:05d}"
        try:
            with os.scandir(folder) as entries:
                return {e.name: e.stat().st_size for e in entries if e.is_file()}
        except FileNotFoundError:
            return {}

    def _clean_bucket(self, bucket: int, listing: dict[str, int], done_keys: set[str]) -> int:
        """Delete a bucket's temporary files and the files of samples not done (they are redone)."""
        removed = 0
        folder = self.root / SAMPLES_DIR / f"{bucket:05d}"
        for name in listing:
            if name.startswith(TMP_PREFIX) or _key_of(name) not in done_keys:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
                    removed += 1
        return removed

    def _clean_temporary(self) -> None:
        for folder in (self.root, self.root / JOURNAL_DIR):
            if folder.is_dir():
                for p in folder.glob(f"{TMP_PREFIX}*"):
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
                    fields[_SIZE_COLUMN[suffix]] = len(data)
            rows.append(_index_row(res, fields))
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


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f"{TMP_PREFIX}probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{root}: output directory is not writable ({exc.strerror or exc})") from exc


def _key_of(file_name: str) -> str:
    """Sample key of a file name: keys have no dots, so the key ends at the first dot."""
    return file_name.split(".", 1)[0]


def _readable(path: Path, schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` that the Parquet file at ``path`` has (older files may lack some)."""
    have = set(pq.read_schema(path).names)
    return [name for name in schema.names if name in have]


def _conform(table: pa.Table, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """Bring a stored index table to ``schema`` (missing columns become nulls)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table[f.name].cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _latest_per_index(table: pa.Table) -> pa.Table:
    """Keep the last row of each plan index (rows are in commit order)."""
    if table.num_rows == 0:
        return table
    numbered = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    last = numbered.group_by("index").aggregate([("_row", "max")])["_row_max"]
    return table.take(pc.take(last, pc.sort_indices(last)))  # in commit order


class _SortedRows:
    """index.parquet read forwards in batches: the rows below a bound, then the next ones."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self._buffer = schema.empty_table()
        self._groups: Iterator[pa.Table] | None = None
        if path.is_file():
            try:
                self._groups = _row_groups(pq.ParquetFile(path), _readable(path, schema))
            except (OSError, pa.ArrowException) as exc:
                raise RunError(f"{path}: unreadable index ({exc}); the journal and samples are intact") from exc

    def _fill(self) -> bool:
        """Read one more row group into the buffer; False at the end of the file."""
        if self._groups is None:
            return False
        try:
            group = next(self._groups, None)
        except (OSError, pa.ArrowException) as exc:
            raise RunError(f"unreadable index.parquet ({exc}); the journal and samples are intact") from exc
        if group is None:
            self._groups = None
            return False
        part = _conform(group, self.schema)
        self._buffer = pa.concat_tables([self._buffer, part]) if self._buffer.num_rows else part  # no copy
        return True

    def next_index(self) -> int | None:
        while self._buffer.num_rows == 0:
            if not self._fill():
                return None
        return int(self._buffer["index"][0].as_py())

    def take_below(self, bound: int) -> pa.Table:
        """Rows with index < ``bound`` (the file is sorted by index); the rest stay buffered.

        Indices are unique, so once the buffer ends at ``bound - 1`` the next group is not read.
        """
        while self._buffer.num_rows == 0 or int(self._buffer["index"][self._buffer.num_rows - 1].as_py()) < bound - 1:
            if not self._fill():
                break
        index = self._buffer["index"].to_numpy()
        cut = int(np.searchsorted(index, bound))
        out, self._buffer = self._buffer.slice(0, cut), self._buffer.slice(cut)
        return out


def _row_groups(file: pq.ParquetFile, columns: list[str]) -> Iterator[pa.Table]:
    """A Parquet file's row groups in order (the store writes index.parquet a step per group).

    Row group by row group rather than ``iter_batches``: the driver's resident memory then stayed
    level as the index grew (``iter_batches`` left more behind the larger the file).
    """
    for g in range(file.metadata.num_row_groups):
        yield file.read_row_group(g, columns=columns)


def _damaged(done: pa.Table, listing: dict[str, int]) -> np.ndarray:
    """Which of these done rows lack a file, or have one whose size differs from the recorded one."""
    bad = np.zeros(done.num_rows, dtype=bool)
    if done.num_rows == 0:
        return bad
    keys = done["key"].to_pylist()
    sizes = {suffix: done[column].to_pylist() for suffix, column in _SIZE_COLUMN.items()}
    for i, key in enumerate(keys):
        for suffix, recorded in sizes.items():
            size = listing.get(f"{key}{suffix}")
            if size is None or (recorded[i] is not None and size != recorded[i]):
                bad[i] = True
                break
    return bad


def _planned_rows(plan: pa.Table, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """``planned`` index rows (no result yet) for these plan rows, with ``schema``'s columns."""
    n = plan.num_rows
    cols = []
    for f in schema:
        if f.name in PLAN_SCHEMA.names:
            cols.append(plan[f.name])
        elif f.name == "status":
            cols.append(pa.array([STATUS_PLANNED] * n, pa.string()))
        elif f.name == "attempts":
            cols.append(pa.array(np.zeros(n, dtype=np.int32)))
        else:
            cols.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _index_row(res: SampleResult, fields: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {name: res.plan.get(name) for name in PLAN_SCHEMA.names}
    if isinstance(row.get("attributes"), dict):
        row["attributes"] = json.dumps(row["attributes"], sort_keys=True)
    for name in RESULT_NAMES:
        row[name] = fields.get(name)
    row["status"] = res.status
    row["error"] = res.error
    row["updated_at"] = datetime.now(UTC)
    unknown = set(fields) - set(RESULT_NAMES)
    if unknown:
        raise ValueError(f"unknown index fields: {sorted(unknown)}")
    return row


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ latest run


def remember_latest_run(root: Path, cwd: Path | None = None) -> None:
    """Record ``root`` as the run that ``--run`` defaults to in this working directory."""
    cwd = cwd or Path.cwd()
    with contextlib.suppress(OSError, RunError):
        atomic_write_text(cwd / LATEST_RUN_FILE, str(Path(root).resolve()) + "\n")


def resolve_run(run: str | Path | None, cwd: Path | None = None) -> Path:
    """The run a command works on: the one given, else the latest made in this directory."""
    if run is not None:
        return RunStore.open(run).root
    cwd = cwd or Path.cwd()
    pointer = cwd / LATEST_RUN_FILE
    if pointer.is_file():
        candidate = Path(pointer.read_text().strip())
        if (candidate / RUN_FILE).is_file():
            return candidate
    runs = sorted(cwd.glob(f"runs/*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime)
    if runs:
        return runs[-1].parent
    raise InputError("no run found in this directory; give --run DIR (runs are made by `factory generate`)")

