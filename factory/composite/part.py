"""One part of a composite job: a fixed run of units (objects, composites or scenes) rendered and
written, then committed by its journal record ``parts/part-NNNNNN.json``.

The store's discipline: every file goes to a temporary name and is renamed (a shard as a whole);
the journal record is written last, so a part with a record is complete and a part without one is
redone on resume (its units render to the same bytes). A part runs in this process or as a Ray
task (:mod:`factory.composite.fanout`); it needs only the picklable :class:`PartJob`.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.composite.backgrounds import BackgroundSource
from factory.composite.layouts import baked_folder_name, baked_members, dim_members, scene_members
from factory.composite.objects import ObjectSource
from factory.composite.recipe import draw_baked, draw_scene, frame_side
from factory.composite.render import render
from factory.errors import InputError
from factory.export.webdataset import TarShard
from factory.fsutil import atomic_write_bytes, atomic_write_text, read_json_object
from factory.manifest import CompositeSettings

PARTS_DIR = "parts"
#: Test hook: kill this process with SIGKILL right after committing this part number.
KILL_ENV = "FACTORY_COMPOSITE_TEST_KILL_AFTER"


def part_record_path(out: Path, number: int) -> Path:
    return out / PARTS_DIR / f"part-{number:06d}.json"


def shard_name(number: int) -> str:
    return f"composite-{number:06d}.tar"


@dataclass
class PartJob:
    out: Path
    number: int
    units: list[Any]  # object indices (dim), (object index, k) (baked) or scene numbers (scenes)
    settings: CompositeSettings
    objects: ObjectSource
    backgrounds: BackgroundSource
    device: str | None = None
    painter: Any = None  # on Ray with --generative: repaints in a painter actor (factory.composite.fanout)


def _repaint(job: PartJob) -> Any:
    s = job.settings
    if not s.generative:
        return None
    if job.painter is not None:
        return job.painter
    from factory.composite.generative import load_pipeline, make_repaint

    return make_repaint(load_pipeline(s.generative, job.device))


def _write_files(out: Path, files: list[tuple[str, bytes]], written: set[str]) -> int:
    size = 0
    for name, data in files:
        if name in written:
            continue
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, fsync=False)
        written.add(name)
        size += len(data)
    return size


def _row(recipe: dict[str, Any], file: str) -> dict[str, Any]:
    top = recipe["objects"][-1] if recipe["objects"] else {"key": "", "class_name": ""}
    bg = recipe["background"]
    return {"key": recipe["key"], "layout": recipe["layout"], "label": recipe["label"], "file": file,
            "object": top["key"], "class_name": top["class_name"], "objects": len(recipe["objects"]),
            "background": bg["id"], "bg_source": bg["source"], "licence": bg["licence"],
            "generative": bool(recipe.get("generative"))}


def render_part(job: PartJob) -> dict[str, Any]:
    """Render and write a part, then commit it; returns its journal record."""
    s, out = job.settings, job.out
    objects, backgrounds = job.objects, job.backgrounds
    rows: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    written: set[str] = set()
    nbytes = 0
    if s.layout == "dim":
        for i in job.units:
            files, pairs = dim_members(objects.refs[i], backgrounds, s)
            nbytes += _write_files(out, files, written)
            rows += pairs
    elif s.layout == "baked":
        repaint = _repaint(job)
        shard = TarShard(out / shard_name(job.number), 0, fsync=True) if s.format == "webdataset" else None
        try:
            for i, k in job.units:
                recipe = draw_baked(objects.refs[i], k, objects, backgrounds, s)
                frame = frame_side(s, backgrounds.by_id().get(recipe["background"]["id"]) or backgrounds.refs[0])
                members = baked_members(recipe, render(recipe, objects, backgrounds, frame, repaint), s.layers)
                key = recipe["key"]
                if shard is not None:
                    shard.add([(f"{key}.{suffix}", data) for suffix, data in members])
                    rows.append(_row(recipe, shard.final.name))
                else:
                    nbytes += _write_files(out, [(baked_folder_name(key, suf), data) for suf, data in members], written)
                    rows.append(_row(recipe, baked_folder_name(key, "png")))
            if shard is not None:
                nbytes += shard.close()
                shard = None
        finally:
            if shard is not None:
                shard.abort()
    else:
        repaint = _repaint(job)
        for n in job.units:
            recipe = draw_scene(n, objects, backgrounds, s)
            frame = frame_side(s, backgrounds.by_id().get(recipe["background"]["id"]) or backgrounds.refs[0])
            files, instances = scene_members(recipe, render(recipe, objects, backgrounds, frame, repaint), s.threshold)
            nbytes += _write_files(out, files, written)
            rows.append(_row(recipe, files[0][0]))
            scenes.append({"key": recipe["key"], "file_name": files[0][0], "height": frame[0], "width": frame[1],
                           "label": recipe["label"], "instances": instances})
    record = {"part": job.number, "units": len(job.units), "bytes": nbytes, "rows": rows, "scenes": scenes}
    path = part_record_path(out, job.number)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, sort_keys=True)
    atomic_write_text(path, text + "\n")
    if os.environ.get(KILL_ENV) not in (None, "") and int(os.environ[KILL_ENV]) == job.number:
        os.kill(os.getpid(), signal.SIGKILL)
    return json.loads(text)  # as a resumed part's record reads back (same key order)


def read_record(out: Path, number: int) -> dict[str, Any] | None:
    """A committed part's record, or None (missing or unreadable: the part is redone)."""
    try:
        record = read_json_object(part_record_path(out, number), "part record")
    except InputError:
        return None
    return record if record.get("part") == number else None
