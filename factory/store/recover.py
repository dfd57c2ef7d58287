"""Rebuilding a damaged index from what is on disk: the plan, the readable index files, and every
done sample's ``KEY.json`` (which records the plan row, the scores and the file sizes).

A damaged file (truncated, bit-flipped: Parquet refuses it) is renamed ``NAME.damaged`` (never
deleted: it is the user's evidence), the other index files are kept, and a sample whose four
files are in its folder but which no readable file mentions gets its row back from its JSON,
committed as a new journal chunk. Failed rows that were only in the damaged file are lost, so
those samples are tried again, which is what a resume does with them anyway.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from factory.fsutil import atomic_write_text, fsync_path, open_parquet
from factory.plan import PLAN_SCHEMA
from factory.sample import SAMPLE_SUFFIXES, SIZE_COLUMNS, STATUS_DONE
from factory.store.layout import INDEX_FILE, INDEX_SCHEMA, JOURNAL_DIR, REBUILD_MARKER, SAMPLES_DIR
from factory.store.tables import check_index_schema

#: What a rebuilt row takes from ``KEY.json``'s ``scores`` (the rest of the row is the plan's): every
#: score the index holds, the matte's trust measures included (``filter`` drops on ``no_board``,
#: ``matte_residual`` and ``matte_confidence``; a row without them would pass those filters).
_SCORES = (
    "gsg", "gsg_distance", "bg_uniformity", "canvas_color", "alpha_coverage", "touches_border", "contains_key_color",
    "no_board", "key_colored_fraction", "matte_residual", "matte_green_residue", "matte_ambiguous", "matte_confidence",
)  # fmt: skip


def set_aside(path: Path) -> Path:
    """Rename a damaged file to ``NAME.damaged`` (``.damaged-2`` ... when taken); returns the new path."""
    target = path.with_name(path.name + ".damaged")
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.damaged-{k}")
    os.replace(path, target)
    return target


def rebuild_pending(root: Path) -> bool:
    """Whether a rebuild was stopped between :func:`begin_rebuild` and :func:`end_rebuild`."""
    return (root / JOURNAL_DIR / REBUILD_MARKER).is_file()


def begin_rebuild(root: Path, bad: list[Path]) -> list[Path]:
    """Note the rebuild in its marker (the damaged files' names), then set ``bad`` aside; returns
    their new paths. Until :func:`end_rebuild`, a run finishes the rebuild before anything else:
    the samples only the set-aside files held must get their rows back, not look uncommitted."""
    if bad:
        marker = root / JOURNAL_DIR / REBUILD_MARKER
        earlier = marker.read_text(encoding="utf-8") if marker.is_file() else ""
        marker.parent.mkdir(exist_ok=True)
        atomic_write_text(marker, earlier + "".join(f"{p.relative_to(root)}\n" for p in bad))
        fsync_path(marker.parent)
    return [set_aside(path) for path in bad]


def end_rebuild(root: Path) -> None:
    """The recovered rows are committed: the rebuild is over."""
    marker = root / JOURNAL_DIR / REBUILD_MARKER
    if marker.is_file():
        marker.unlink()
        fsync_path(marker.parent)


def unreadable_files(root: Path) -> list[Path]:
    """The index files (base, segments, journal chunks) that do not read back whole."""
    return [path for path, _ in damaged_files(root)]


def damaged_files(root: Path) -> list[tuple[Path, Exception]]:
    """The index files that do not read back whole, each with what reading it raised."""
    paths = [root / INDEX_FILE] if (root / INDEX_FILE).is_file() else []
    folder = root / JOURNAL_DIR
    if folder.is_dir():
        paths += sorted(folder.glob("seg-*.parquet")) + sorted(folder.glob("chunk-*.parquet"))
    bad: list[tuple[Path, Exception]] = []
    for path in paths:
        try:  # every column of every row group, pages' checksums and the schema verified
            file = open_parquet(path)
            check_index_schema(file.schema_arrow)
            for g in range(file.metadata.num_row_groups):
                file.read_row_group(g)
        except (OSError, pa.ArrowException) as exc:
            bad.append((path, exc))
    return bad


def row_from_metadata(meta: dict[str, Any], plan_row: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any] | None:
    """An index row for a done sample from its JSON and its plan row; None when they disagree."""
    if meta.get("key") != plan_row["key"] or meta.get("index") != plan_row["index"]:
        return None
    row: dict[str, Any] = {name: plan_row.get(name) for name in PLAN_SCHEMA.names}
    scores = meta.get("scores") or {}
    size = meta.get("size") or {}
    row.update({name: scores.get(name) for name in _SCORES})
    phash = scores.get("phash")
    if isinstance(phash, str):
        value = int(phash, 16)
        row["phash"] = value - (1 << 64) if value >= (1 << 63) else value
    row.update(
        {
            "status": STATUS_DONE,
            "attempts": 1,
            "model": meta.get("model"),
            "alpha_source": meta.get("alpha_source"),
            "width": size.get("width"),
            "height": size.get("height"),
            "alpha_bits": meta.get("alpha_bits"),
            "worker": "rebuilt",
            "updated_at": datetime.now(UTC),
        }
    )
    row.update({SIZE_COLUMNS[suffix]: sizes[suffix] for suffix in SAMPLE_SUFFIXES})
    return row


def recover_rows(root: Path, plan: Any, n: int, known: set[int]) -> list[dict[str, Any]]:
    """Rows for the samples on disk that no readable index file mentions (``known`` plan indices):
    those with all four files and a JSON that matches their plan row."""
    rows: list[dict[str, Any]] = []
    base = root / SAMPLES_DIR
    if not base.is_dir():
        return rows
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and p.name.isdigit()):
        with os.scandir(folder) as entries:
            sizes = {e.name: e.stat().st_size for e in entries if e.is_file(follow_symlinks=False)}
        wanted: list[tuple[int, str]] = []
        for name in sizes:
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            try:
                index = int(key.split("-")[-2])
            except (ValueError, IndexError):
                continue
            if index < n and index not in known and all(f"{key}{s}" in sizes for s in SAMPLE_SUFFIXES):
                wanted.append((index, key))
        if not wanted:
            continue
        plan_rows = plan.take([i for i, _ in wanted]).to_pylist()
        for (index, key), plan_row in zip(wanted, plan_rows):
            try:
                meta = json.loads((folder / f"{key}.json").read_bytes())
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict):
                continue
            row = row_from_metadata(meta, plan_row, {s: sizes[f"{key}{s}"] for s in SAMPLE_SUFFIXES})
            if row is not None:
                rows.append(row)
    return rows


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
