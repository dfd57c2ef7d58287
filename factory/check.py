"""`factory check`: every done sample's files against the index, in full.

``generate``'s resume trusts the committed index for presence (the files were synced before their
row) and checks sizes only where a crash can have left something; this is the thorough check:
every PNG's chunk walk and CRCs, sizes, dimensions and bit depth against the index, and the JSON
(it parses, and its key, index and file sizes agree with the index). Samples are checked in a
thread pool (file reads and CRCs release the GIL) with a progress bar (on a terminal, none with ``-q``).

``--repair`` commits a ``planned`` row for each damaged sample, so the next ``factory generate``
redoes it, and first rebuilds damaged index files (:mod:`factory.store.recover`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from factory.feedback import Feedback, plural
from factory.integrity import CorruptSample, checked_png, stored_metadata
from factory.sample import SIZE_COLUMNS, STATUS_DONE
from factory.store import RunStore, resolve_run
from factory.store import recover
from factory.store.segments import DamagedIndex, index_read_error
from factory.store.tables import planned_rows

_COLUMNS = ["index", "key", "status", "width", "height", "alpha_bits", *SIZE_COLUMNS.values()]
_BATCH = 256  # samples per task: few enough tasks to keep the pool's overhead small


@dataclass
class CheckSummary:
    run: Path
    checked: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    index_note: str | None = None  # the damaged index file, or what the repair did with it
    repaired: int = 0
    repair: bool = False

    @property
    def exit_code(self) -> int:
        if self.repair:
            return 0
        return 1 if self.damaged or self.index_note else 0

    def problems(self) -> list[str]:
        """One line per damaged sample, then the damaged index file (or what the repair did)."""
        return [f"{key}: {reason}" for key, reason in self.damaged] + ([self.index_note] if self.index_note else [])

    def lines(self) -> list[str]:
        """The problems, then the run, the counts and what to do next."""
        return self.problems() + self.report()

    def report(self) -> list[str]:
        out = [f"run: {self.run}"]
        out.append(f"checked: {plural(self.checked, 'done sample')}, {len(self.damaged)} damaged")
        if self.repaired:
            out.append(f"repaired: {plural(self.repaired, 'sample')} marked planned; re-run `factory generate` with the run's options to redo them")
        elif self.damaged and not self.repair:
            out.append("run `factory check --repair` to mark them for the next `factory generate`")
        return out


def check_record(store: RunStore, rec: dict[str, Any]) -> str | None:
    """Why a done sample's files are damaged, or None when they are intact."""
    try:
        for suffix in (".png", ".alpha.png", ".fg.png"):
            checked_png(store, rec, suffix, "crc")
        meta = stored_metadata(store, rec)
    except CorruptSample as exc:
        return f"{exc.what} ({exc.why})"
    if meta.get("key") not in (None, rec["key"]) or meta.get("index") not in (None, rec["index"]):
        return f"corrupt metadata ({rec['key']}.json names another sample: {meta.get('key')!r})"
    sizes = meta.get("file_bytes")
    if isinstance(sizes, dict):
        for name, column in (("image", "image_bytes"), ("alpha", "alpha_bytes"), ("fg", "fg_bytes")):
            if name in sizes and rec.get(column) is not None and sizes[name] != rec[column]:
                return f"corrupt metadata ({rec['key']}.json: {name} {sizes[name]} bytes, the index says {rec[column]})"
    return None


def _done_batches(store: RunStore) -> Iterator[list[dict[str, Any]]]:
    for part in store.committed(_COLUMNS, only_plan=True):
        done = part.filter(pc.equal(part["status"], STATUS_DONE))
        for start in range(0, done.num_rows, _BATCH):
            yield done.slice(start, _BATCH).to_pylist()


def run_check(run: Path | None, repair: bool = False, progress: bool = True, threads: int | None = None) -> CheckSummary:
    """Check (and with ``repair`` mark for redoing) every done sample of a run."""
    store = RunStore.open(resolve_run(run))
    summary = CheckSummary(run=store.root, repair=repair)
    if repair:
        store.acquire_lock("repaired")
    try:
        if not repair and store.rebuild_pending():
            summary.index_note = (
                f"{store.root}: a rebuild of the index was stopped half way; re-run the same `factory generate` "
                "command, or run `factory check --repair`"
            )
            return summary
        if not repair:  # every column of every index file: the counts below read only a few
            for path, exc in recover.damaged_files(store.root)[:1]:
                summary.index_note = str(index_read_error(path, exc))
                return summary
        try:
            total = sum(int(pc.sum(pc.equal(p["status"], STATUS_DONE)).as_py() or 0) for p in store.committed(["status"], only_plan=True))
        except DamagedIndex as exc:
            if not repair:
                summary.index_note = str(exc)
                return summary
            summary.index_note = store.rebuild_index()
            total = sum(int(pc.sum(pc.equal(p["status"], STATUS_DONE)).as_py() or 0) for p in store.committed(["status"], only_plan=True))
        if repair and summary.index_note is None:
            summary.index_note = store.rebuild_index()  # parts of files the status column did not show
        bad: list[tuple[int, str, str]] = []
        workers = threads or min(16, (os.cpu_count() or 2) * 2)
        with Feedback("check", enabled=progress) as bar, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="factory-check") as pool:
            task = bar.bar(total)

            def check_batch(batch: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
                found = []
                for rec in batch:
                    reason = check_record(store, rec)
                    if reason is not None:
                        found.append((rec["index"], rec["key"], reason))
                return found

            pending = []
            for batch in _done_batches(store):
                pending.append((len(batch), pool.submit(check_batch, batch)))
                if len(pending) >= 2 * workers:  # bounded: memory stays flat however many samples
                    size, fut = pending.pop(0)
                    bad.extend(fut.result())
                    summary.checked += size
                    bar.advance(task, size)
            for size, fut in pending:
                bad.extend(fut.result())
                summary.checked += size
                bar.advance(task, size)
        bad.sort()
        summary.damaged = [(key, reason) for _, key, reason in bad]
        if repair and bad:
            plan = store.plan_reader().take([i for i, _, _ in bad])
            store.commit_table(planned_rows(plan))
            summary.repaired = len(bad)
        if repair:
            store.fold()
        return summary
    finally:
        if repair:
            store.release_lock()

