"""`factory export`: write a run's selected samples as WebDataset shards or a folder tree.

Steps: resolve the run and the selection (:mod:`factory.export.common`), decide the plan (split by
class, shuffle), write (:mod:`~factory.export.webdataset` or :mod:`~factory.export.folder`),
then the sidecar files (``samples.parquet``, ``stats.json``, wids index) and the dataset card
(:mod:`~factory.export.card`). ``export.json`` in the output folder records the plan's fingerprint
and whether the export is complete; re-running resumes a matching export or restarts a stale one.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from factory.errors import Interrupted
from factory.export.card import (
    CONTACT_SHEET,
    FOLDER_LOADING,
    HISTOGRAM,
    README,
    CardInfo,
    pick_sheet_rows,
    stats_json,
    webdataset_loading,
    write_card,
)
from factory.export.common import EXPORT_FILE, ExportOptions, OutDir, Prepared, prepare
from factory.export.folder import METADATA, SUBDIRS, write_folder
from factory.export.webdataset import SHARD_RE, WriteResult, write_webdataset
from factory.store import atomic_write_parquet, atomic_write_text

__all__ = ["ExportOptions", "ExportSummary", "run_export"]

SAMPLES_FILE = "samples.parquet"
STATS_FILE = "stats.json"
WIDS_SUFFIX = ".wids.json"


@dataclass
class ExportSummary:
    out: Path
    format: str
    source: str
    settings: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    resumed_samples: int = 0
    restarted: str | None = None
    seconds: float = 0.0
    bytes_written: int = 0

    @property
    def exported(self) -> int:
        return sum(s["samples"] for s in self.splits.values())

    def lines(self) -> list[str]:
        out = [f"samples: {self.source}"]
        if self.restarted:
            out.append(f"restarted: {self.restarted}")
        if self.resumed_samples:
            out.append(f"resumed: {self.resumed_samples} samples already written were kept")
        for name, s in self.splits.items():
            if not s["samples"]:
                why = "empty" if name == "train" else "empty: classes of one sample stay in train"
                out.append(f"  {name:<8} {0:>9} samples  ({why})")
                continue
            where = f"{s['shards']} shard{'s' if s['shards'] != 1 else ''}" if self.format == "webdataset" else f"{name}/"
            out.append(f"  {name:<8} {s['samples']:>9} samples  {where}  {s['bytes'] / 1e6:,.1f} MB")
        rate = self.bytes_written / 1e6 / self.seconds if self.seconds > 0 else 0.0
        out.append(
            f"exported {self.exported} samples ({self.format}) to {self.out} in {self.seconds:.1f} s"
            + (f" ({rate:,.0f} MB/s written)" if self.bytes_written else "")
        )
        if self.problems:
            out.append(f"skipped {len(self.problems)} damaged samples (listed above and in {STATS_FILE})")
        out.append(f"dataset card: {self.out / README}")
        return out


def run_export(options: ExportOptions, on_problem: Callable[[str], None] | None = None) -> ExportSummary:
    """Export a run. ``on_problem`` receives each ``KEY: corrupt ...`` line as it is found."""
    start = time.perf_counter()
    p = prepare(options)
    outdir = OutDir(p.out)
    previous = outdir.open()
    problems_cb = on_problem or (lambda _line: None)
    try:
        restarted = None
        if previous is not None and (options.restart or previous.get("plan") != p.fingerprint):
            restarted = "--restart given" if options.restart else "the folder held an export of another plan"
            if previous.get("plan") is None and not options.restart:
                restarted = "the folder's export.json was unreadable"
            clean(p.out)
        outdir.remove_temporaries()
        started = datetime.now(UTC).isoformat(timespec="seconds")
        outdir.write_state(_state(p, "writing", started=started))
        writer = write_webdataset if p.settings.format == "webdataset" else write_folder
        total_bytes = int(
            sum(np.nansum(p.ordered[c].to_numpy(zero_copy_only=False).astype(float)) for c in ("image_bytes", "alpha_bytes", "fg_bytes"))
        )
        with _progress(options.progress, p.ordered.num_rows, total_bytes) as advance:
            try:
                result = writer(p, outdir, advance, problems_cb)
            except KeyboardInterrupt as exc:
                raise Interrupted(f"interrupted; finished parts of {p.out} are kept: re-run the same command to resume") from exc
        summary = _finish(p, outdir, result, started)
        summary.restarted = restarted
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        outdir.close()


def _state(p: Prepared, state: str, **extra: Any) -> dict[str, Any]:
    from factory.export.common import export_state

    return export_state(p, state, **extra)


def clean(out: Path) -> None:
    """Delete what an earlier export wrote in ``out`` (known names only, never foreign files)."""
    for path in list(out.iterdir()):
        name = path.name
        if path.is_file() and (
            SHARD_RE.match(name)
            or name.endswith(WIDS_SUFFIX)
            or name in (SAMPLES_FILE, STATS_FILE, README, HISTOGRAM, CONTACT_SHEET, EXPORT_FILE)
        ):
            path.unlink()
        elif path.is_dir() and ((path / METADATA).exists() or any((path / s).is_dir() for s in SUBDIRS)):
            for sub in SUBDIRS:
                shutil.rmtree(path / sub, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (path / METADATA).unlink()
            with contextlib.suppress(OSError):
                path.rmdir()


def _finish(p: Prepared, outdir: OutDir, result: WriteResult, started: str) -> ExportSummary:
    out = outdir.root
    fmt = p.settings.format
    table = result.records.table()
    atomic_write_parquet(table, out / SAMPLES_FILE)

    splits: dict[str, dict[str, Any]] = {}
    for name, s in result.splits.items():
        splits[name] = {"samples": s.samples, "bytes": s.bytes}
        if fmt == "webdataset":
            splits[name]["shards"] = len(s.shards)
            if s.shards:  # an empty split (every class too small) gets no index
                index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": s.shards}
                atomic_write_text(out / f"{name}{WIDS_SUFFIX}", stats_json(index))
    for path in out.glob(f"*{WIDS_SUFFIX}"):
        split = path.name[: -len(WIDS_SUFFIX)]
        if fmt != "webdataset" or split not in result.splits or not result.splits[split].shards:
            path.unlink()

    per_class: dict[str, dict[str, int]] = {}
    counts = table.group_by(["class_name", "split"]).aggregate([("key", "count")])
    for cls, split, n in zip(*(counts[c].to_pylist() for c in ("class_name", "split", "key_count")), strict=True):
        per_class.setdefault(cls, {})[split] = n
    gsg = {}
    for name in result.splits:
        part = table.filter(pc.equal(table["split"], name))["gsg"]
        gsg[name] = pc.drop_null(part).to_numpy(zero_copy_only=False).astype(np.float64)

    settings = asdict(p.settings)
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    stats = {
        "format": fmt,
        "run": str(p.store.root),
        "source": p.source.description,
        "settings": settings,
        "splits": splits,
        "per_class": per_class,
        "exported": table.num_rows,
        "planned": p.ordered.num_rows,
        "skipped": result.problems,
        "resumed_samples": result.resumed_samples,
        "started": started,
        "finished": finished,
    }
    atomic_write_text(out / STATS_FILE, stats_json(stats))

    last_train = len(result.splits["train"].shards) - 1 if fmt == "webdataset" and "train" in result.splits else 0
    card = CardInfo(
        format=fmt,
        out=out,
        store=p.store,
        manifest=p.manifest,
        settings=settings,
        source=p.source.description,
        selection_meta=p.source.selection.meta if p.source.selection is not None else None,
        splits=splits,
        per_class=per_class,
        gsg=gsg,
        sheet_rows=pick_sheet_rows(table.slice(0, 5000).to_pylist()),
        problems=result.problems,
        loading=webdataset_loading(p.settings.image_ext, last_train) if fmt == "webdataset" else FOLDER_LOADING,
    )
    write_card(card)
    outdir.write_state(
        _state(p, "complete", started=started, finished=finished, exported=table.num_rows, skipped=len(result.problems))
    )
    return ExportSummary(
        out=out,
        format=fmt,
        source=p.source.description,
        settings=settings,
        splits=splits,
        problems=result.problems,
        resumed_samples=result.resumed_samples,
        bytes_written=result.bytes_written,
    )


@contextlib.contextmanager
def _progress(enabled: bool, total: int, total_bytes: int):
    """A rich progress bar on stderr (samples, MB/s); yields ``advance(samples, bytes)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]export"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} MB/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )
    start = time.perf_counter()
    written = [0]
    with progress:
        task = progress.add_task("export", total=total, rate="-")

        def advance(samples: int, nbytes: int) -> None:
            written[0] += nbytes
            elapsed = time.perf_counter() - start
            progress.update(task, advance=samples, rate=f"{written[0] / 1e6 / elapsed:.0f}" if elapsed > 0 else "-")

        yield advance
