"""The ``factory composite`` command: objects pasted into backgrounds, in one of three layouts.

Steps: the sources (objects, backgrounds) and settings, checked before anything is written; the
units of work split into parts of ``maxcount``; the output folder locked, resumed (parts with a
journal record are kept when the plan's fingerprint matches) or restarted; the remaining parts run
here or as Ray tasks; then the fold: ``samples.parquet``, ``pairs.csv`` (dim), ``annotations.json``
(scenes), the wids index (shards), the dataset card, and ``composite.json`` marked complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from factory import __version__
from factory.composite.backgrounds import BackgroundSource, check_apart, load_backgrounds
from factory.composite.card import public_settings, write_card
from factory.composite.coco import coco_document
from factory.composite.objects import ObjectSource, load_objects
from factory.composite.options import CompositeOptions, resolve_settings
from factory.composite.part import PARTS_DIR, PartJob, read_record, render_part, shard_name
from factory.errors import InputError, Interrupted
from factory.feedback import plural, rate_bar
from factory.fsutil import atomic_write_parquet, atomic_write_text, open_owned_folder, remove_temporaries, write_error
from factory.manifest import CompositeSettings

STATE_FILE = "composite.json"
STATE_KIND = "factory-composite"
SAMPLES_FILE = "samples.parquet"
PAIRS_FILE = "pairs.csv"
COCO_FILE = "annotations.json"
WIDS_FILE = "composites.wids.json"
#: Names the command writes at the top of its folder (a restart deletes only these).
OWN_DIRS = ("fg", "alpha", "bg", "im", "gt", "trimap", "recipe", "fg_original", "shadow", "images", "masks", "recipes", PARTS_DIR)
OWN_FILES = (STATE_FILE, SAMPLES_FILE, PAIRS_FILE, COCO_FILE, WIDS_FILE, "README.md", "contact_sheet.png")


@dataclass
class CompositeSummary:
    out: Path
    layout: str
    units: int
    rows: int
    labels: dict[str, int]
    objects: str
    backgrounds: str
    skipped_backgrounds: int
    damaged_objects: list[str] = field(default_factory=list)
    resumed_parts: int = 0
    restarted: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"objects: {self.objects}", f"backgrounds: {self.backgrounds}"]
        if self.skipped_backgrounds:
            out.append(f"skipped {plural(self.skipped_backgrounds, 'unreadable background file')}")
        if self.damaged_objects:
            out.append(f"skipped {plural(len(self.damaged_objects), 'damaged object')} (listed above and in {STATE_FILE})")
        if self.restarted:
            out.append(f"restarted: {self.restarted}")
        if self.resumed_parts:
            out.append(f"resumed: {plural(self.resumed_parts, 'part')} already written {'was' if self.resumed_parts == 1 else 'were'} kept")
        what = {"dim": "pairing", "baked": "composite", "scenes": "scene"}[self.layout]
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        labels = ", ".join(f"{n} {k}" for k, n in sorted(self.labels.items()))
        out.append(f"wrote {plural(self.rows, what)} ({self.layout}; labels: {labels}) to {self.out} in {self.seconds:.1f} s ({rate:.1f}/s)")
        out.append(f"dataset card: {self.out / 'README.md'}")
        return out


def plan_units(settings: CompositeSettings, n_objects: int) -> list[Any]:
    if settings.layout == "dim":
        return list(range(n_objects))
    if settings.layout == "baked":
        return [(i, k) for i in range(n_objects) for k in range(settings.per_object)]
    mean = (settings.objects[0] + settings.objects[1]) / 2
    return list(range(max(1, math.ceil(n_objects * settings.per_object / mean))))


def fingerprint(settings: CompositeSettings, objects: ObjectSource, backgrounds: BackgroundSource) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode())
    for r in objects.refs:
        h.update(f"{r.key}\0{r.class_name}\0".encode())
    h.update(backgrounds.kind.encode())
    for b in backgrounds.refs:
        h.update(f"{b.id}\0{b.size}\0{b.licence}\0".encode())
        if b.orientation != 1:  # a turned photo is drawn from as shown (unturned ones keep their plans)
            h.update(f"orientation {b.orientation}\0".encode())
    return h.hexdigest()[:16]


def _settings_defaults(options: CompositeOptions) -> CompositeSettings:
    """The manifest's ``composite:`` section: the run's manifest when objects come from a run."""
    if options.objects is not None:
        return CompositeSettings()
    from factory.store import RunStore, resolve_run

    return RunStore.open(resolve_run(options.run)).manifest().composite


def prepare(
    options: CompositeOptions, on_problem: Callable[[str], None] | None = None
) -> tuple[CompositeSettings, ObjectSource, BackgroundSource, Path]:
    """Everything checked before a file is written: settings, objects, backgrounds, model, output.
    ``on_problem`` receives one line per damaged object left out."""
    settings = resolve_settings(options, _settings_defaults(options))
    objects = load_objects(options.run, options.selection, options.objects)
    for line in objects.damaged:
        (on_problem or (lambda _line: None))(f"object {line}; skipped")
    backgrounds = load_backgrounds(settings.backgrounds, settings.min_size, settings.size)
    if settings.generative:
        if settings.layout == "dim":
            raise InputError("--generative needs a composited layout (baked or scenes), not dim")
        from factory.composite.generative import check_inpainting_model

        check_inpainting_model(settings.generative)
    if options.out is not None:
        out = Path(options.out)
    elif options.objects is None:
        from factory.store import resolve_run

        out = resolve_run(options.run) / "composite" / settings.layout
    else:
        out = Path("composite") / settings.layout
    check_apart(out, backgrounds)
    return settings, objects, backgrounds, out


def clean(out: Path) -> None:
    """Delete what an earlier composite wrote in ``out`` (its own names only)."""
    import shutil

    for name in OWN_DIRS:
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
    for path in [*(out / n for n in OWN_FILES), *out.glob("composite-*.tar")]:
        if path.is_file() and not path.is_symlink():
            path.unlink()


def run_composite(options: CompositeOptions, on_problem: Callable[[str], None] | None = None) -> CompositeSummary:
    """Run ``factory composite``. ``on_problem`` receives one line per damaged object left out
    (``object KEY: corrupt alpha (...); skipped``), before anything is written."""
    start = time.perf_counter()
    settings, objects, backgrounds, out = prepare(options, on_problem)
    units = plan_units(settings, len(objects.refs))
    plan = fingerprint(settings, objects, backgrounds)
    lock, previous = open_owned_folder(out, STATE_FILE, STATE_KIND, "factory composite")
    try:
        restarted = None
        if previous is not None and (options.restart or previous.get("plan") != plan):
            restarted = "--restart given" if options.restart else "the folder held a composite of another plan"
            clean(out)
        remove_temporaries(out)
        state = {"kind": STATE_KIND, "version": 1, "state": "writing", "plan": plan, "layout": settings.layout,
                 "settings": public_settings(settings, out), "objects": objects.described(out),
                 "backgrounds": backgrounds.described(out), "units": len(units), "factory_version": __version__,
                 "damaged_objects": objects.damaged}
        atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        size = settings.maxcount
        jobs = [PartJob(out, n, units[lo : lo + size], settings, objects, backgrounds, options.device)
                for n, lo in enumerate(range(0, len(units), size))]
        records: dict[int, dict[str, Any]] = {}
        for job in jobs:
            rec = read_record(out, job.number)
            if rec is not None and rec.get("units") == len(job.units) and _part_files_exist(out, settings, rec):
                records[job.number] = rec
        resumed = len(records)
        todo = [j for j in jobs if j.number not in records]
        try:
            with rate_bar(f"composite ({settings.layout})", len(units), options.progress, lambda r: f"{r:.1f}/s") as advance:
                done = sum(len(j.units) for j in jobs if j.number in records)
                advance(done, 0)  # resumed parts count as done, not in the rate
                try:
                    for rec in _execute(todo, options):
                        records[rec["part"]] = rec
                        advance(rec["units"], rec["units"])
                except KeyboardInterrupt as exc:
                    raise Interrupted(f"interrupted; finished parts in {out} are kept: re-run the same command to resume") from exc
            ordered = [records[j.number] for j in jobs]
            summary = _fold(out, settings, objects, backgrounds, ordered, state)
        except OSError as exc:  # disk full, a read-only folder (a shard's raw writes): one line, committed parts stay
            raise write_error(exc, Path(exc.filename) if exc.filename else out) from exc
        summary.resumed_parts, summary.restarted = resumed, restarted
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        lock.release()


def _part_files_exist(out: Path, settings: CompositeSettings, rec: dict[str, Any]) -> bool:
    if settings.layout == "baked" and settings.format == "webdataset":
        if not rec["rows"]:
            return True
        shard = out / shard_name(rec["part"])  # the part's one file: its size is the record's bytes
        return shard.is_file() and rec.get("bytes") in (None, shard.stat().st_size)
    names = [r[c] for r in rec["rows"] for c in ("file", "fg", "alpha", "bg") if c in r]
    return all((out / name).is_file() for name in names)


def _execute(jobs: list[PartJob], options: CompositeOptions) -> Iterator[dict[str, Any]]:
    """Run the parts: here (one worker) or on Ray (:mod:`factory.composite.fanout`); yields records."""
    if not jobs:
        return
    if options.workers <= 1 and options.address is None:
        for job in jobs:
            yield render_part(job)
        return
    from factory.composite.fanout import run_parts_on_ray

    yield from run_parts_on_ray(jobs, max(1, options.workers), options.address, options.ray_tmp)


def _fold(
    out: Path, s: CompositeSettings, objects: ObjectSource, backgrounds: BackgroundSource,
    records: list[dict[str, Any]], state: dict[str, Any],
) -> CompositeSummary:
    rows = [r for rec in records for r in rec["rows"]]
    atomic_write_parquet(pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())}), out / SAMPLES_FILE)
    if s.layout == "dim":
        buf = io.StringIO()
        fields = ["fg", "alpha", "bg", "key", "object", "k", "class_name", "background", "licence"]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / PAIRS_FILE, buf.getvalue())
    if s.layout == "scenes":
        doc = coco_document([sc for rec in records for sc in rec["scenes"]], f"factory composite scenes ({objects.described(out)})")
        atomic_write_text(out / COCO_FILE, json.dumps(doc, sort_keys=True) + "\n")
    if s.layout == "baked" and s.format == "webdataset":
        shards = [{"url": shard_name(rec["part"]), "nsamples": len(rec["rows"]), "filesize": (out / shard_name(rec["part"])).stat().st_size}
                  for rec in records if rec["rows"]]
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "composites", "shardlist": shards}
        atomic_write_text(out / WIDS_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    labels: dict[str, int] = {}
    for r in rows:
        labels[r["label"]] = labels.get(r["label"], 0) + 1
    write_card(out, s, rows, objects, backgrounds, records)
    state = {**state, "state": "complete", "rows": len(rows), "labels": labels}
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    return CompositeSummary(out, s.layout, state["units"], len(rows), labels, objects.description,
                            backgrounds.description, backgrounds.skipped, objects.damaged)


