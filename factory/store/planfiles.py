"""The plan's files in a run directory: ``plan.parquet`` (rows from 0) and, when a run's N grew,
extension parts ``plan-from-LO.parquet`` (rows LO..), read in order as one plan.

A plan row is a pure function of the manifest and its index, and a run's manifest is fixed (a
different one needs ``--restart``, which deletes every plan file), so a part is right for its rows
whenever it was written. Readers follow the chain ``plan.parquet``, then the part that starts
where the rows so far end, and so on; a part off the chain is ignored. Extending N to M writes
one part of M - N rows and leaves the files before it untouched. Every file is written atomically
(a temporary name renamed into place), so a killed write leaves the chain as it was.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.manifest import Manifest
from factory.plan import PLAN_ROW_GROUP, write_plan_file
from factory.store.layout import PLAN_FILE
from factory.store.recover import set_aside

_PART_RE = re.compile(r"^plan-from-(\d{12})\.parquet$")


def part_name(lo: int) -> str:
    """The file of the plan rows from index ``lo`` (an extension of a plan of ``lo`` rows)."""
    return f"plan-from-{lo:012d}.parquet"


def is_plan_file(name: str) -> bool:
    return name == PLAN_FILE or _PART_RE.match(name) is not None


def _rows(path: Path) -> int | None:
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return None


def _parts(root: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            match = _PART_RE.match(p.name)
            if match:
                out[int(match.group(1))] = p
    return out


def chain(root: Path) -> list[Path]:
    """The plan's files in row order: plan.parquet and the parts that continue it (empty when
    there is no readable plan.parquet)."""
    first = root / PLAN_FILE
    at = _rows(first)
    if at is None:
        return []
    files = [first]
    parts = _parts(root)
    while at in parts:
        rows = _rows(parts[at])
        if not rows:
            break
        files.append(parts[at])
        at += rows
    return files


def chain_rows(root: Path) -> int | None:
    """Rows in the plan's chain of files, or None when there is no readable plan."""
    files = chain(root)
    return sum(_rows(p) or 0 for p in files) if files else None


def set_aside_damaged(root: Path, damaged: Sequence[Path]) -> str:
    """Rename each of these damaged files of the plan's chain to ``NAME.damaged``, and the chain's
    files after it too (they continue a plan that :func:`write` writes again from the damaged file
    on). Returns the line that says so."""
    asides: dict[Path, Path] = {}
    for path in damaged:
        files = chain(root)
        if path in files:
            for later in files[files.index(path) :]:
                asides[later] = set_aside(later)
    names = ", ".join(f"{p.name} (set aside as {asides[p].name})" for p in damaged if p in asides)
    return f"plan written again from the manifest: damaged {names}; the samples were made from the manifest's rows"


def remove_all(root: Path) -> None:
    """Delete every plan file: the parts first, so plan.parquet never continues into stale ones."""
    for path in [*_parts(root).values(), root / PLAN_FILE]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def trim(root: Path, n: int) -> None:
    """Fit the plan's files to a run of ``n`` rows: parts that start at or beyond ``n`` go (a
    lowered N back to an earlier one keeps its files); a chain still longer than ``n`` goes whole
    (written again by :func:`write`). A shorter chain stays: :func:`write` extends it."""
    for lo, path in _parts(root).items():
        if lo >= n:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    rows = chain_rows(root)
    if rows is not None and rows > n:
        remove_all(root)


def write(
    manifest: Manifest,
    n: int,
    root: Path,
    stop: Any = None,
    on_rows: Callable[[int], None] | None = None,
    group: int = PLAN_ROW_GROUP,
) -> None:
    """Make the plan's files hold rows 0..n-1: nothing when they do, one extension part of the
    missing rows when they hold a prefix, else plan.parquet whole. ``stop`` abandons the write
    (:class:`factory.plan.PlanAbandoned`)."""
    trim(root, n)
    rows = chain_rows(root)
    if rows == n:
        return
    if rows:
        write_plan_file(manifest, n, root / part_name(rows), stop=stop, start=rows, on_rows=on_rows, group=group)
    else:
        remove_all(root)
        write_plan_file(manifest, n, root / PLAN_FILE, stop=stop, on_rows=on_rows, group=group)
