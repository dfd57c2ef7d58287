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
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from factory import __version__
from factory.errors import InputError, RunError
from factory.manifest import Manifest, manifest_from_dict
from factory.plan import PLAN_SCHEMA, build_plan

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


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize a table with fixed options: the same table always gives the same bytes."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3, write_statistics=True)
    return buf.getvalue()


def atomic_write_parquet(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, parquet_bytes(table, metadata))


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

    pending: pa.Table  # plan rows to do, in plan order
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
            plan = build_plan(manifest, n)
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
            atomic_write_parquet(plan, root / PLAN_FILE)
            atomic_write_text(root / RUN_FILE, json.dumps(info, indent=2) + "\n")
        except BaseException:
            store.release_lock()
            raise
        return store

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

    def _folded(self) -> tuple[pa.Table | None, int]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return None, 0
        table = pq.read_table(path)
        covers = int((table.schema.metadata or {}).get(b"covers", b"0"))
        return _conform(table), covers

    def records(self) -> pa.Table:
        """The latest index row of every key that has one (planned rows excluded)."""
        folded, covers = self._folded()
        parts = []
        if folded is not None:
            parts.append(folded.filter(pc.not_equal(folded["status"], STATUS_PLANNED)))
        for seq, path in self._journal():
            if seq > covers:
                parts.append(_conform(pq.read_table(path)))
        if not parts:
            return INDEX_SCHEMA.empty_table()
        table = pa.concat_tables(parts)
        return _latest_per_key(table)

    def index(self, only_plan: bool = True) -> pa.Table:
        """One row per sample, sorted by plan index: records, plus ``planned`` rows for the rest.

        With ``only_plan`` (the default), keys outside the current plan (a run whose N was
        lowered) are left out.
        """
        plan = self.plan()
        records = self.records()
        if only_plan:
            records = records.filter(pc.is_in(records["key"], value_set=plan["key"]))
        missing = plan.filter(pc.invert(pc.is_in(plan["key"], value_set=records["key"])))
        planned = _planned_rows(missing)
        table = pa.concat_tables([records, planned])
        return table.sort_by("index")

    # -------------------------------------------------------------- resuming

    def resume(self, verify_files: bool = True) -> ResumeState:
        """Clean temporary and orphan files and work out what is left to do."""
        plan = self.plan()
        records = self.records()
        done = records.filter(pc.equal(records["status"], STATUS_DONE))
        present = self._present_files()
        damaged_keys: set[str] = set()
        if verify_files:
            for row in done.select(["key", "index", *_SIZE_COLUMN.values()]).to_pylist():
                for suffix, column in _SIZE_COLUMN.items():
                    size = present.get(f"{row['key']}{suffix}")
                    if size is None or (row[column] is not None and size != row[column]):
                        damaged_keys.add(row["key"])
                        break
        good_done = set(done["key"].to_pylist()) - damaged_keys
        cleaned = self._clean(present, good_done)
        in_plan_done = pc.is_in(plan["key"], value_set=pa.array(sorted(good_done), pa.string()))
        pending = plan.filter(pc.invert(in_plan_done))
        failed = records.filter(pc.equal(records["status"], STATUS_FAILED))
        failed_in_plan = int(pc.sum(pc.is_in(failed["key"], value_set=plan["key"])).as_py() or 0)
        done_in_plan = plan.num_rows - pending.num_rows
        return ResumeState(
            pending=pending,
            done=done_in_plan,
            failed_before=failed_in_plan,
            damaged=len(damaged_keys),
            cleaned_files=cleaned,
        )

    def _present_files(self) -> dict[str, int]:
        """File name -> size for every file under samples/ (one scandir per bucket)."""
        out: dict[str, int] = {}
        base = self.root / SAMPLES_DIR
        if not base.is_dir():
            return out
        for bucket in os.scandir(base):
            if bucket.is_dir():
                for entry in os.scandir(bucket.path):
                    if entry.is_file():
                        out[entry.name] = entry.stat().st_size
        return out

    def _clean(self, present: dict[str, int], done_keys: set[str]) -> int:
        """Delete temporary files and files of samples that are not done (they will be redone)."""
        removed = 0
        base = self.root / SAMPLES_DIR
        for bucket in (p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
            for name in os.listdir(bucket):
                if name.startswith(TMP_PREFIX) or _key_of(name) not in done_keys:
                    with contextlib.suppress(FileNotFoundError):
                        (bucket / name).unlink()
                        removed += 1
        journal = self.root / JOURNAL_DIR
        for folder in (self.root, journal):
            if folder.is_dir():
                for p in folder.glob(f"{TMP_PREFIX}*"):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
        return removed

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
            chunks = self._journal()
            _, covers = self._folded()
            self._seq = max([covers, *(s for s, _ in chunks)])
        self._seq += 1
        atomic_write_parquet(table, journal / f"chunk-{self._seq:09d}.parquet")
        fsync_path(journal)
        self._chunks_since_fold += 1
        if self._chunks_since_fold >= self.fold_every:
            self.fold()

    def fold(self) -> None:
        """Rewrite index.parquet from the journal, then delete the folded chunks."""
        chunks = self._journal()
        _, covers = self._folded()
        top = max([covers, *(s for s, _ in chunks)])
        plan = self.plan()
        records = self.records()
        missing = plan.filter(pc.invert(pc.is_in(plan["key"], value_set=records["key"])))
        table = pa.concat_tables([records, _planned_rows(missing)]).sort_by("index")
        atomic_write_parquet(table, self.root / INDEX_FILE, metadata={"covers": str(top)})
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


def _conform(table: pa.Table) -> pa.Table:
    """Bring a stored index table to the current schema (missing columns become nulls)."""
    cols = []
    for f in INDEX_SCHEMA:
        if f.name in table.column_names:
            cols.append(table[f.name].cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=INDEX_SCHEMA)


def _latest_per_key(table: pa.Table) -> pa.Table:
    """Keep the last row of each key (rows are in commit order)."""
    if table.num_rows == 0:
        return table
    numbered = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    last = numbered.group_by("key").aggregate([("_row", "max")])["_row_max"]
    return table.take(pc.take(last, pc.sort_indices(last)))  # in commit order


def _planned_rows(plan: pa.Table) -> pa.Table:
    n = plan.num_rows
    cols = {name: plan[name] for name in PLAN_SCHEMA.names}
    for f in RESULT_FIELDS:
        if f.name == "status":
            cols["status"] = pa.array([STATUS_PLANNED] * n, pa.string())
        elif f.name == "attempts":
            cols["attempts"] = pa.array([0] * n, pa.int32())
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.Table.from_pydict(cols, schema=INDEX_SCHEMA)


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

