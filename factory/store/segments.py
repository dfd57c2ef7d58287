"""The index's files: which are live, how they merge into one stream of committed rows, and how
they are compacted. The format is described in :mod:`factory.store`.

The index holds committed rows only (done and failed); the plan is the source of planned rows. Its
files, oldest first:

- ``index.parquet``: the base, sorted by plan index; its metadata ``covers`` is the last journal
  chunk it includes (it holds chunks 1..covers);
- ``index/seg-LO-HI.parquet``: a segment, sorted by plan index, holding journal chunks LO..HI;
- ``index/chunk-SEQ.parquet``: journal chunks not yet in a segment, one per commit.

A file whose chunk range lies inside another's has been merged into it (a crash between writing a
merged file and deleting its inputs leaves such files): readers ignore it and compaction deletes
it. For a plan index, the newest file that has a row wins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.errors import InputError, RunError
from factory.fsutil import atomic_parquet_writer, fsync_path
from factory.sample import STATUS_PLANNED
from factory.store import layout
from factory.store.layout import INDEX_FILE, INDEX_SCHEMA, JOURNAL_DIR
from factory.store.tables import SortedRows, conform, latest_per_index, readable_columns


class DamagedIndex(RunError):
    """An index file that cannot be read (truncated, bit-flipped): names the file."""

    def __init__(self, path: Path, exc: BaseException) -> None:
        self.path = Path(path)
        detail = " ".join(str(exc).split())[:200]
        super().__init__(
            f"{self.path}: damaged index file ({type(exc).__name__}: {detail}); re-run the same "
            "`factory generate` command (it rebuilds the index from the plan, the journal and the samples' "
            "JSON files), or run `factory check --repair`"
        )


@dataclass(frozen=True, order=True)
class IndexFile:
    """A base or segment file and the journal chunks ``lo..hi`` it holds (the base has ``lo`` 0)."""

    lo: int
    hi: int
    path: Path

    @property
    def is_base(self) -> bool:
        return self.lo == 0

    def rows(self) -> int:
        try:
            return pq.read_metadata(self.path).num_rows
        except (OSError, pa.ArrowException) as exc:
            raise index_read_error(self.path, exc) from exc


def index_read_error(path: Path | str, exc: BaseException) -> InputError | DamagedIndex:
    """The error for an index file that could not be read: ``DamagedIndex`` (which generate
    rebuilds and sets the file aside for) unless the file is only not readable by this user."""
    if isinstance(exc, PermissionError):
        return InputError(f"{path}: cannot read this index file (permission denied); nothing was changed")
    return DamagedIndex(Path(path), exc)


def segment_name(lo: int, hi: int) -> str:
    return f"seg-{lo:09d}-{hi:09d}.parquet"


def base_covers(root: Path) -> int | None:
    """The last chunk index.parquet holds; None when there is no index.parquet."""
    path = root / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return int((pq.read_schema(path).metadata or {}).get(b"covers", b"0"))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise index_read_error(path, exc) from exc


def all_files(root: Path) -> list[IndexFile]:
    """The base and every segment file on disk, live or merged."""
    files = []
    covers = base_covers(root)
    if covers is not None:
        files.append(IndexFile(0, covers, root / INDEX_FILE))
    folder = root / JOURNAL_DIR
    if folder.is_dir():
        for p in folder.glob("seg-*.parquet"):
            parts = p.stem.split("-")
            with contextlib.suppress(ValueError, IndexError):
                files.append(IndexFile(int(parts[1]), int(parts[2]), p))
    return sorted(files)


def live_files(files: Sequence[IndexFile]) -> list[IndexFile]:
    """The files not merged into another (see the module's note), oldest first."""
    live = [f for f in files if not any(o is not f and o.lo <= f.lo and f.hi <= o.hi and (o.lo, o.hi) != (f.lo, f.hi) for o in files)]
    return sorted(live)


def journal_chunks(root: Path) -> list[tuple[int, Path]]:
    folder = root / JOURNAL_DIR
    if not folder.is_dir():
        return []
    chunks = []
    for p in folder.glob("chunk-*.parquet"):
        with contextlib.suppress(ValueError, IndexError):
            chunks.append((int(p.stem.split("-")[1]), p))
    return sorted(chunks)


def top_of(files: Sequence[IndexFile]) -> int:
    """The last journal chunk held by a base or segment file (0: none)."""
    return max([0, *(f.hi for f in files)])


def read_chunks(chunks: Sequence[tuple[int, Path]], schema: pa.Schema) -> pa.Table:
    """The latest row per plan index among these journal chunks, sorted by index."""
    parts = []
    for _, path in chunks:
        try:
            columns = readable_columns(path, schema)
            parts.append(conform(pq.read_table(path, columns=columns, page_checksum_verification=True), schema))
        except (OSError, pa.ArrowException) as exc:
            raise index_read_error(path, exc) from exc
    if not parts:
        return schema.empty_table()
    return latest_per_index(pa.concat_tables(parts)).sort_by("index")


def committed_steps(
    files: Sequence[IndexFile], journal: pa.Table, schema: pa.Schema, stop: int | None = None
) -> Iterator[tuple[int, list[pa.Table]]]:
    """The rows of ``files`` and ``journal`` (oldest first), ``STEP_ROWS`` plan indices at a time:
    ``(lo, parts)`` for each step that has rows, parts oldest first (a later part wins).

    Memory: one step of each file. Steps with no rows are skipped, so the cost follows the rows
    committed, not the plan's size. ``stop`` ends the stream at that plan index.
    """
    streams = []
    for f in files:
        try:
            streams.append(SortedRows(f.path, schema))
        except RunError as exc:
            raise index_read_error(f.path, exc.__cause__ or exc) from exc
    j_index = journal["index"].to_numpy()
    j_at = 0
    while True:
        upcoming = []
        for f, s in zip(files, streams):
            try:
                nxt = s.next_index()
            except RunError as exc:
                raise index_read_error(f.path, exc.__cause__ or exc) from exc
            if nxt is not None:
                upcoming.append(nxt)
        if j_at < j_index.size:
            upcoming.append(int(j_index[j_at]))
        if not upcoming:
            return
        lo = min(upcoming) // layout.STEP_ROWS * layout.STEP_ROWS
        if stop is not None and lo >= stop:
            return
        hi = lo + layout.STEP_ROWS
        parts = []
        for f, s in zip(files, streams):
            try:
                parts.append(s.take_below(hi))
            except RunError as exc:
                raise index_read_error(f.path, exc.__cause__ or exc) from exc
        j_stop = int(np.searchsorted(j_index, hi))
        parts.append(journal.slice(j_at, j_stop - j_at))
        j_at = j_stop
        yield lo, parts


def pick_latest(lo: int, parts: Sequence[pa.Table], keep_planned: bool = False) -> pa.Table:
    """One step's rows, the latest part winning for each plan index, sorted by index."""
    parts = [p for p in parts if p.num_rows]
    if len(parts) == 1 and keep_planned:
        return parts[0]
    pick = np.full(layout.STEP_ROWS, -1, dtype=np.int64)
    offset = 0
    for part in parts:
        idx = part["index"].to_numpy() - lo
        pick[idx] = offset + np.arange(part.num_rows)
        offset += part.num_rows
    chosen = pick[pick >= 0]
    table = pa.concat_tables(parts).take(pa.array(chosen)) if parts else INDEX_SCHEMA.empty_table()
    if not keep_planned and table.num_rows:
        table = table.filter(pc.not_equal(table["status"], STATUS_PLANNED))
    return table


def write_merged(
    root: Path, files: Sequence[IndexFile], chunks: Sequence[tuple[int, Path]], as_base: bool = False
) -> IndexFile:
    """Merge ``files`` and ``chunks`` (consecutive, oldest first) into one file, then delete them.

    The result is the base when the oldest input is the base or ``as_base`` (everything merged;
    then ``planned`` rows, which only undo older rows, are dropped), else a segment ``seg-LO-HI``.
    Written a step at a time to a temporary name, fsynced, renamed; the inputs are deleted after,
    so a crash leaves either the inputs or a file that supersedes them.
    """
    lo = 0 if as_base else min([f.lo for f in files] + [s for s, _ in chunks])
    hi = max([f.hi for f in files] + [s for s, _ in chunks] + [0])
    journal = read_chunks(chunks, INDEX_SCHEMA)
    target = IndexFile(lo, hi, root / INDEX_FILE if lo == 0 else root / JOURNAL_DIR / segment_name(lo, hi))
    with atomic_parquet_writer(target.path, INDEX_SCHEMA, metadata={"covers": str(hi)}) as writer:
        for step_lo, parts in committed_steps(files, journal, INDEX_SCHEMA):
            table = pick_latest(step_lo, parts, keep_planned=lo != 0)
            if table.num_rows:
                writer.write_table(table)
    fsync_path(target.path.parent)
    for f in files:
        if f.path != target.path:
            with contextlib.suppress(FileNotFoundError):
                f.path.unlink()
    for _, path in chunks:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return target


def compact(root: Path, full: bool = False) -> None:
    """Fold the journal into a new segment, then merge segments of similar size (a binary counter:
    each row is rewritten about log2(rows / rows per fold) times in all), or everything into the
    base with ``full``. A fold costs what was committed since the last one, not the plan's size."""
    files = all_files(root)
    live = live_files(files)
    for f in files:  # files merged into another by a fold that crashed before deleting them
        if f not in live:
            with contextlib.suppress(FileNotFoundError):
                f.path.unlink()
    top = top_of(live)
    chunks = []
    for seq, path in journal_chunks(root):
        if seq > top:
            chunks.append((seq, path))
        else:  # folded by a fold that crashed before deleting it
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if full:
        if chunks or len(live) > 1 or (live and not live[0].is_base):
            write_merged(root, live, chunks, as_base=True)
        return
    if chunks:
        live.append(write_merged(root, [], chunks))
    while len(live) >= 2 and 2 * live[-1].rows() > live[-2].rows():
        live[-2:] = [write_merged(root, live[-2:], [])]
