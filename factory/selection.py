"""Named selections of a run: which samples a filter kept, stored without copying any file.

A selection is a small Parquet file, ``<run>/selections/<name>.parquet``, listing the kept samples
(plan index, key, class, GSG, coverage) sorted by plan index; what made it (the filter's
parameters, counts by reason and per class, the run's fingerprint and model) is a JSON object in
its Parquet metadata under ``factory.selection``. ``class_name`` and ``category`` are stored as
Arrow dictionaries (categoricals in pandas).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.errors import InputError
from factory.fsutil import atomic_write_parquet, write_error
from factory.store import SELECTIONS_DIR

SELECTION_META_KEY = "factory.selection"
DEFAULT_SELECTION = "default"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

#: Columns of a selection file (kept rows, sorted by plan index).
SELECTION_COLUMNS = ("index", "key", "class_name", "category", "gsg", "alpha_coverage")
#: Selection columns stored as dictionaries (few distinct values).
_DICTIONARY_COLUMNS = ("class_name", "category")


@dataclass(frozen=True)
class Selection:
    name: str
    path: Path
    table: pa.Table  # SELECTION_COLUMNS
    meta: dict[str, Any]


#: What ``factory export`` calls every done sample (``--all``, or a run with no selection): its
#: default folder is RUN/export/all-FORMAT, so no selection may take this name.
ALL_DONE = "all"


def check_selection_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InputError(f"selection name {name!r}: use lowercase letters, digits, '-' or '_' (at most 64)")
    return name


def check_new_selection_name(name: str) -> str:
    """A name ``factory filter`` may write: a valid one that is not :data:`ALL_DONE` (its export would
    share RUN/export/all-FORMAT with the export of every done sample, each replacing the other)."""
    if check_selection_name(name) == ALL_DONE:
        raise InputError(
            f"selection name {name!r}: reserved for every done sample (`factory export --all` writes "
            f"RUN/export/{ALL_DONE}-FORMAT); choose another name"
        )
    return name


def selection_path(run_root: Path, name: str) -> Path:
    return Path(run_root) / SELECTIONS_DIR / f"{check_selection_name(name)}.parquet"


def list_selections(run_root: Path) -> list[Path]:
    """Selections of a run, oldest first (by modification time)."""
    folder = Path(run_root) / SELECTIONS_DIR
    if not folder.is_dir():
        return []
    paths = [p for p in folder.glob("*.parquet") if not p.name.startswith(".")]
    return sorted(paths, key=lambda p: (p.stat().st_mtime_ns, p.name))


def save_selection(run_root: Path, name: str, rows: pa.Table, meta: dict[str, Any]) -> Path:
    """Write (or overwrite) the selection ``name`` atomically; returns its path."""
    path = selection_path(run_root, name)
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path.parent) from exc
    atomic_write_parquet(
        rows.select(list(SELECTION_COLUMNS)),
        path,
        metadata={SELECTION_META_KEY: json.dumps(meta, sort_keys=True)},
        # dictionaries only where values repeat (a dictionary attempt on the unique keys costs
        # a third of the write), statistics only on the plan index
        use_dictionary=list(_DICTIONARY_COLUMNS),
        write_statistics=["index"],
    )
    return path


def load_selection(run_root: Path, name: str) -> Selection:
    path = selection_path(run_root, name)
    if not path.is_file():
        known = ", ".join(p.stem for p in list_selections(run_root)) or "none"
        raise InputError(f"{run_root}: no selection named '{name}' (selections: {known}); make one with `factory filter`")
    try:
        table = pq.read_table(path, page_checksum_verification=True)  # a bit flip: damaged, not other keys
        raw = (table.schema.metadata or {}).get(SELECTION_META_KEY.encode(), b"{}")
        meta = json.loads(raw)
    except (OSError, pa.ArrowException, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable selection ({exc}); re-run `factory filter --name {name}`") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{path}: damaged selection (its metadata is not a JSON object); re-run `factory filter --name {name}`")
    if "key" not in table.column_names:
        raise InputError(f"{path}: not a selection (no key column)")
    return Selection(name=name, path=path, table=table, meta=meta)
