"""Arrow helpers of the run store's index: conforming stored tables, streaming sorted files,
picking the latest row per sample, and the rows of samples not done yet."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.errors import RunError
from factory.fsutil import open_parquet
from factory.plan import PLAN_SCHEMA
from factory.sample import SIZE_COLUMNS, STATUS_PLANNED, SampleResult
from factory.store.layout import INDEX_SCHEMA, RESULT_NAMES


def readable_columns(path: Path, schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` that the index file at ``path`` has (older files may lack some).

    Raises ``pa.ArrowInvalid`` for a file whose stored schema is damaged (checked by
    :func:`check_index_schema`).
    """
    stored = pq.read_schema(path)
    check_index_schema(stored)
    have = set(stored.names)
    return [name for name in schema.names if name in have]


def check_index_schema(stored: pa.Schema) -> None:
    """Refuse an index file's schema that is not a part of ``INDEX_SCHEMA``: a column of another
    name or type (columns were only ever added to the index, never renamed or retyped).

    A bit flip in a Parquet file's footer (not covered by the page checksums) that still decodes
    renames or retypes a column; read as "a column this older file lacks" it would become nulls
    or be cast into other values. Raises ``pa.ArrowInvalid`` naming the column.
    """
    for f in stored:
        if f.name not in INDEX_SCHEMA.names:
            raise pa.ArrowInvalid(f"unknown column {f.name!r} in the file's schema")
        kind = f.type.value_type if pa.types.is_dictionary(f.type) else f.type  # read_dictionary's
        if not kind.equals(INDEX_SCHEMA.field(f.name).type):
            raise pa.ArrowInvalid(f"column {f.name!r} is {kind}, the index's is {INDEX_SCHEMA.field(f.name).type}")


def conform(table: pa.Table, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """Bring a stored index table to ``schema`` (missing columns become nulls)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table[f.name].cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def latest_per_index(table: pa.Table) -> pa.Table:
    """Keep the last row of each plan index (rows are in commit order)."""
    if table.num_rows == 0:
        return table
    numbered = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    last = numbered.group_by("index").aggregate([("_row", "max")])["_row_max"]
    return table.take(pc.take(last, pc.sort_indices(last)))  # in commit order


class SortedRows:
    """index.parquet read forwards in batches: the rows below a bound, then the next ones."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self._buffer = schema.empty_table()
        self._groups: Iterator[pa.Table] | None = None
        if path.is_file():
            try:
                self._groups = _row_groups(open_parquet(path), readable_columns(path, schema))
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
        part = conform(group, self.schema)
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


def damaged_rows(done: pa.Table, listing: dict[str, int]) -> np.ndarray:
    """Which of these done rows lack a file, or have one whose size differs from the recorded one."""
    bad = np.zeros(done.num_rows, dtype=bool)
    if done.num_rows == 0:
        return bad
    keys = done["key"].to_pylist()
    sizes = {suffix: done[column].to_pylist() for suffix, column in SIZE_COLUMNS.items()}
    for i, key in enumerate(keys):
        for suffix, recorded in sizes.items():
            size = listing.get(f"{key}{suffix}")
            if size is None or (recorded[i] is not None and size != recorded[i]):
                bad[i] = True
                break
    return bad


def planned_rows(plan: pa.Table, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
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


def index_row(res: SampleResult, fields: dict[str, Any]) -> dict[str, Any]:
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


