"""Bookkeeping of an export: the rows of each split read lazily, the exported samples
(``samples.parquet``) and what each split wrote."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


class LazyRows:
    """Sequential-friendly row access to an Arrow table: converts 1024 rows at a time to dicts,
    so a million-row export never holds a million Python dicts."""

    def __init__(self, table: pa.Table, batch: int = 1024) -> None:
        self.table = table
        self.batch = batch
        self._start = -1
        self._rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.table.num_rows:
            raise IndexError(i)
        start = i - i % self.batch
        if start != self._start:
            self._rows = self.table.slice(start, self.batch).to_pylist()
            self._start = start
        return self._rows[i - start]

    def iter_from(self, first: int) -> Iterator[dict[str, Any]]:
        for i in range(first, len(self)):
            yield self[i]


RECORD_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("index", pa.int64()),
    pa.field("split", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("path", pa.string()),
    pa.field("class_name", pa.string()),
    pa.field("category", pa.string()),
    pa.field("gsg", pa.float32()),
    pa.field("alpha_coverage", pa.float32()),
    pa.field("image_bytes", pa.int64()),
    pa.field("alpha_bytes", pa.int64()),
    pa.field("fg_bytes", pa.int64()),
    pa.field("json_bytes", pa.int64()),
]


def record_schema(attribute_keys: list[str]) -> pa.Schema:
    """The columns of samples.parquet; ``attributes`` is a struct of the export's attribute keys."""
    return pa.schema(
        [
            *RECORD_FIELDS[:7],
            pa.field("attributes", pa.struct([pa.field(k, pa.string()) for k in attribute_keys])),
            *RECORD_FIELDS[7:],
            pa.field("phash", pa.string()),  # imagehash's 16 hex digits
        ]
    )


class Records:
    """The exported samples (rows of samples.parquet), kept column by column."""

    def __init__(self, attribute_keys: list[str]) -> None:
        self.schema = record_schema(attribute_keys)
        self.cols: dict[str, list[Any]] = {name: [] for name in self.schema.names}

    def __len__(self) -> int:
        return len(self.cols["key"])

    def append(self, row: dict[str, Any]) -> None:
        for name, values in self.cols.items():
            values.append(row.get(name))

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=self.schema)


def split_rows(ordered: pa.Table, split: str) -> LazyRows:
    return LazyRows(ordered.filter(pc.equal(ordered["split"], split)))


@dataclass
class SplitResult:
    name: str
    shards: list[dict[str, Any]] = field(default_factory=list)  # url, nsamples, filesize
    samples: int = 0
    bytes: int = 0


@dataclass
class WriteResult:
    records: Records
    splits: dict[str, SplitResult]
    problems: list[str]
    resumed_samples: int = 0
    bytes_written: int = 0  # by this invocation
