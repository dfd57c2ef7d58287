"""The `factory export` command: write a run's selected samples as WebDataset shards or a folder tree.

Steps: resolve the run and the selection (:mod:`factory.export.prepare`), decide the order (split by
class, shuffle), write (:mod:`~factory.export.webdataset` or :mod:`~factory.export.folder`),
then the sidecar files (``samples.parquet``, ``stats.json``, wids index) and the dataset card
(:mod:`~factory.export.card`). ``export.json`` in the output folder records the plan's fingerprint
and whether the export is complete; re-running resumes a matching export or restarts a stale one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from factory.errors import Interrupted
from factory.feedback import rate_bar
from factory.export.card import (
    CONTACT_SHEET,
    HISTOGRAM,
    README,
    CardInfo,
    human_bytes,
    pick_sheet_rows,
    plural,
    stats_json,
    write_card,
)
from factory.export.folder import FolderFormat
from factory.export.options import ExportOptions
from factory.export.outdir import OutDir, export_state
from factory.export.prepare import Prepared, prepare
from factory.export.records import WriteResult
from factory.export.webdataset import WebDatasetFormat
from factory.store import LOCK_FILE
from factory.fsutil import atomic_write_parquet, atomic_write_text, is_locked, write_error

#: The output formats by name (the manifest's ``export.format`` values). A format writes the
#: planned samples into the output folder, resuming its own finished work (``write``), adds its
#: index files (``sidecars``), removes what it wrote before (``clean``) and tells the dataset card
#: how to load it (``loading``): a new output format is one more class here.
FORMATS = {f.name: f for f in (WebDatasetFormat(), FolderFormat())}

SAMPLES_FILE = "samples.parquet"
STATS_FILE = "stats.json"


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
            out.append(f"resumed: {plural(self.resumed_samples, 'sample')} already written {'was' if self.resumed_samples == 1 else 'were'} kept")
        for name, s in self.splits.items():
            if not s["samples"]:
                why = "empty" if name == "train" else "empty: classes of one sample stay in train"
                out.append(f"  {name:<8} {0:>9} samples  ({why})")
                continue
            where = f"{s['shards']} shard{'s' if s['shards'] != 1 else ''}" if self.format == "webdataset" else f"{name}/"
            out.append(f"  {name:<8} {s['samples']:>9} sample{'s' if s['samples'] != 1 else ' '}  {where}  {human_bytes(s['bytes'])}")
        out.append(
            f"exported {plural(self.exported, 'sample')} ({self.format}) to {self.out} in {self.seconds:.1f} s"
            + (f" ({_rate(self.bytes_written, self.seconds)} written)" if self.bytes_written else "")
        )
        if self.problems:
            out.append(f"skipped {plural(len(self.problems), 'damaged sample')} (listed above and in {STATS_FILE})")
        out.append(f"dataset card: {self.out / README}")
        return out


def _rate(nbytes: int, seconds: float) -> str:
    """Bytes per second with a unit that shows a non-zero figure (``0.2 MB/s``, ``35 kB/s``)."""
    per_s = nbytes / seconds if seconds > 0 else 0.0
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if per_s >= scale:
            value = per_s / scale
            return f"{value:,.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{per_s:.0f} B/s"


def bar_rate(bytes_per_s: float) -> str:
    """The progress bar's rate, in the unit that shows a non-zero figure (``150 kB/s``, not ``0 MB/s``)."""
    return _rate(bytes_per_s, 1.0)


def run_export(options: ExportOptions, on_problem: Callable[[str], None] | None = None) -> ExportSummary:
    """Export a run. ``on_problem`` receives each ``KEY: corrupt ...`` line as it is found, and the
    warning that the run's done samples are still being added to (a ``generate`` holds the run)."""
    start = time.perf_counter()
    p = prepare(options)
    outdir = OutDir(p.out)
    previous = outdir.open()
    problems_cb = on_problem or (lambda _line: None)
    if p.source.selection is None and is_locked(p.store.root / LOCK_FILE):  # a selection is fixed; the run is not
        problems_cb(
            f"{p.store.root} is being written (a `factory generate` is running): this export holds the "
            f"{plural(p.source.rows.num_rows, 'sample')} done so far; export again when the run has finished"
        )
    try:
        restarted = None
        if previous is not None and (options.restart or previous.get("plan") != p.fingerprint):
            restarted = "--restart given" if options.restart else "the folder held an export of another plan"
            if previous.get("plan") is None and not options.restart:
                restarted = "the folder's export.json was unreadable"
            clean(p.out)
        outdir.remove_temporaries()
        started = datetime.now(UTC).isoformat(timespec="seconds")
        outdir.write_state(export_state(p, "writing", started=started))
        output = FORMATS[p.settings.format]
        try:
            with rate_bar("export", p.ordered.num_rows, options.progress, bar_rate) as advance:
                try:
                    result = output.write(p, outdir, advance, problems_cb)
                except KeyboardInterrupt as exc:
                    raise Interrupted(f"interrupted; finished parts of {p.out} are kept: re-run the same command to resume") from exc
            summary = _finish(p, outdir, result, started)
        except OSError as exc:  # disk full, a read-only folder: one line, and the finished shards stay
            raise write_error(exc, Path(exc.filename) if exc.filename else p.out) from exc
        summary.restarted = restarted
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        outdir.close()


def clean(out: Path) -> None:
    """Delete what an earlier export wrote in ``out`` (known names only, never foreign files)."""
    for output in FORMATS.values():
        output.clean(out)
    for name in (SAMPLES_FILE, STATS_FILE, README, HISTOGRAM, CONTACT_SHEET):
        path = out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()


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
    FORMATS[fmt].sidecars(out, result)

    per_class: dict[str, dict[str, int]] = {}
    counts = table.group_by(["class_name", "split"]).aggregate([("key", "count")])
    for cls, split, n in zip(*(counts[c].to_pylist() for c in ("class_name", "split", "key_count")), strict=True):
        per_class.setdefault(cls, {})[split] = n
    gsg = {}
    for name in result.splits:
        part = table.filter(pc.equal(table["split"], name))["gsg"]
        gsg[name] = pc.drop_null(part).to_numpy(zero_copy_only=False).astype(np.float64)
    confidence = np.zeros(0)
    if "matte_confidence" in p.ordered.column_names:  # the index's, for the samples exported
        exported = p.ordered.filter(pc.is_in(p.ordered["key"], value_set=table["key"]))["matte_confidence"]
        confidence = pc.drop_null(exported).to_numpy(zero_copy_only=False).astype(np.float64)

    settings = p.settings.model_dump(mode="json")
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    stats = {
        "format": fmt,
        "run": p.store.root.name,
        "source": p.source.description,
        "settings": settings,
        "splits": splits,
        "per_class": per_class,
        "exported": table.num_rows,
        "planned": p.ordered.num_rows,
        "skipped": [relative_text(line, p) for line in result.problems],
        "resumed_samples": result.resumed_samples,
        "started": started,
        "finished": finished,
    }
    atomic_write_text(out / STATS_FILE, stats_json(stats))

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
        loading=FORMATS[fmt].loading(p, result),
        attribute_keys=p.attribute_keys,
        confidence=confidence,
        image_sizes=_image_sizes(p),
    )
    write_card(card)
    outdir.write_state(
        export_state(p, "complete", started=started, finished=finished, exported=table.num_rows, skipped=len(result.problems))
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


def relative_text(text: str, p: Prepared) -> str:
    """``text`` with the run's and the export's absolute paths named relative to the export."""
    for root, name in ((p.out.resolve(), "."), (p.store.root.resolve(), p.store.root.name)):
        text = text.replace(f"{root}/", f"{name}/").replace(str(root), name)
    return text


def _image_sizes(p: Prepared) -> dict[str, int]:
    """``"WxH" -> samples`` of the exported rows, from the index (the true sizes)."""
    counts = p.ordered.group_by(["width", "height"]).aggregate([("key", "count")])
    return {f"{w}x{h}": n for w, h, n in zip(*(counts[c].to_pylist() for c in ("width", "height", "key_count")), strict=True)}


