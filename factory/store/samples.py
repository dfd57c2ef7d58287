"""Writing a sample's files into the run: by the driver, or by the worker that finished it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from factory.fsutil import atomic_write_bytes, fsync_path
from factory.sample import SAMPLE_SUFFIXES, SIZE_COLUMNS, STATUS_DONE, SampleResult
from factory.store.layout import SAMPLES_DIR, bucket_name


def write_sample_files(root: Path, results: Sequence[SampleResult]) -> list[SampleResult]:
    """Write the done samples' files into the run's ``samples/`` folders and return the results
    without their bytes, their sizes recorded in the fields: what is left is the index row.

    Each file goes to a temporary name, is fsynced and renamed into place, and each folder is
    fsynced once after, so the files are durable before the row that commits them. Called by the
    driver (``--writes driver``) or by the finishing task on the node that made the sample
    (``--writes workers``: the run directory is storage every node sees); either way nothing
    exists until the driver commits the row, and a resume deletes files of uncommitted samples.
    A small thread pool does the writes: fsync waits on the disk, not the CPU.
    """
    writes: list[tuple[Path, bytes]] = []
    folders: set[Path] = set()
    out = []
    for res in results:
        if res.status != STATUS_DONE or not res.files:
            out.append(res)
            continue
        folder = Path(root) / SAMPLES_DIR / bucket_name(res.index)
        if folder not in folders:
            folder.mkdir(parents=True, exist_ok=True)
            folders.add(folder)
        fields = dict(res.fields)
        for suffix, data in res.files.items():
            if suffix not in SAMPLE_SUFFIXES:
                raise ValueError(f"unknown sample file suffix {suffix!r}")
            writes.append((folder / f"{res.key}{suffix}", data))
            fields[SIZE_COLUMNS[suffix]] = len(data)
        out.append(dataclasses.replace(res, files={}, fields=fields))
    if len(writes) > 1:
        list(_writer_pool().map(lambda w: atomic_write_bytes(*w), writes))
    elif writes:
        atomic_write_bytes(*writes[0])
    for folder in folders:
        fsync_path(folder)
    return out


_POOL: ThreadPoolExecutor | None = None


def _writer_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="factory-store")
    return _POOL
