"""What one sample produced, as the finishing stage hands it to the run store.

A :class:`SampleResult` is the unit that crosses from the worker side (sampling and finishing, on
any node) to the store (the index row that commits it): the plan row's columns, a status, the
encoded files by suffix and the index fields (scores, sizes, timings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUS_PLANNED = "planned"
STATUS_DONE = "done"
STATUS_FAILED = "failed"

#: The files of one sample, by suffix after the key, and the index column holding each one's size.
SIZE_COLUMNS = {".png": "image_bytes", ".alpha.png": "alpha_bytes", ".fg.png": "fg_bytes", ".json": "meta_bytes"}
SAMPLE_SUFFIXES = tuple(SIZE_COLUMNS)

#: Tokens of CLIP's text encoder (SD1.x), start and end tokens included: a longer prompt is cut.
PROMPT_TOKEN_LIMIT = 77


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


def key_of(file_name: str) -> str:
    """Sample key of a file name: keys have no dots, so the key ends at the first dot."""
    return file_name.split(".", 1)[0]
