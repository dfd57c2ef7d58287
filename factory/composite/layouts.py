"""What each layout writes for one unit of work, as (relative name, bytes) members.

- ``dim``: the object's ``fg/KEY.png`` and ``alpha/KEY.png`` (its files as stored) and the
  backgrounds it is paired with under ``bg/``; the pairing rows go to ``pairs.csv``. Nothing is
  composited: a trimap-based trainer composites on the fly.
- ``baked``: ``KEY.png`` (composite), ``KEY.alpha.png``, ``KEY.trimap.png``, ``KEY.json`` (the
  recipe) and with ``--layers`` ``KEY.fg.png``, ``KEY.bg.png`` (plus ``KEY.fg_original.png`` when
  harmonised and ``KEY.shadow.png`` with a shadow). In shards these are tar members; as folders
  they go to ``im/``, ``gt/``, ``trimap/``, ``recipe/``, ``fg/``, ``bg/``, ... (BiRefNet style).
- ``scenes``: ``images/KEY.png``, one visible alpha per instance ``masks/KEY.I.png``,
  ``recipes/KEY.json``; the instances' COCO annotations (:mod:`factory.composite.coco`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from factory.composite.backgrounds import PROCEDURAL, BackgroundSource, procedural_background
from factory.composite.blend import LABEL_EXACT
from factory.composite.coco import instance_annotation
from factory.composite.encode import alpha_png, encode
from factory.composite.objects import ObjectRef, read_bytes
from factory.composite.placement import rng_for
from factory.composite.recipe import draw_background
from factory.composite.render import Rendered
from factory.manifest import CompositeSettings

#: Folder names of the baked layout's members (suffix in shards -> folder).
BAKED_FOLDERS = {
    "png": "im",
    "alpha.png": "gt",
    "trimap.png": "trimap",
    "json": "recipe",
    "fg.png": "fg",
    "bg.png": "bg",
    "fg_original.png": "fg_original",
    "shadow.png": "shadow",
}


def recipe_bytes(recipe: dict[str, Any]) -> bytes:
    return (json.dumps(recipe, indent=1, sort_keys=True) + "\n").encode()


def baked_members(recipe: dict[str, Any], r: Rendered, layers: bool) -> list[tuple[str, bytes]]:
    """(suffix, bytes) of one baked composite, in a fixed order."""
    bits = int(recipe["alpha_bits"])
    out = [
        ("png", encode(r.image)),
        ("alpha.png", alpha_png(r.alpha, bits)),
        ("trimap.png", encode(r.trimap)),
        ("json", recipe_bytes(recipe)),
    ]
    if layers:
        out += [("fg.png", encode(r.fg)), ("bg.png", encode(r.bg))]
        if r.fg_original is not None:
            out.append(("fg_original.png", encode(r.fg_original)))
        if r.shadow is not None:
            out.append(("shadow.png", alpha_png(r.shadow, 8)))
    return out


def baked_folder_name(key: str, suffix: str) -> str:
    ext = "json" if suffix == "json" else "png"
    return f"{BAKED_FOLDERS[suffix]}/{key}.{ext}"


def scene_members(recipe: dict[str, Any], r: Rendered, threshold: float) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
    """A scene's files and its instances' annotations (without ids: they are given when folding)."""
    key, bits = recipe["key"], int(recipe["alpha_bits"])
    files = [(f"images/{key}.png", encode(r.image)), (f"recipes/{key}.json", recipe_bytes(recipe))]
    instances = []
    for i, (entry, vis) in enumerate(zip(recipe["objects"], r.visible, strict=True)):
        name = f"masks/{key}.{i}.png"
        files.append((name, alpha_png(vis, bits)))
        ann = instance_annotation(vis, threshold)
        if ann is not None:
            ann.update({"class_name": entry["class_name"], "object": entry["key"], "alpha_file": name, "order": i,
                        "blend": entry["edge"]["mode"]})
            instances.append(ann)
    return files, instances


def _bg_name(bg_id: str, ext: str) -> str:
    """A flat file name for a background id, one per id: a top-level file keeps its name; a file in
    a sub-folder or a shard is flattened (``/`` and ``#`` to ``__``) and gets a hash of its id, as
    flattening alone gives ``a/b.png`` and ``a__b.png`` the same name."""
    if bg_id.startswith(PROCEDURAL + ":"):
        return f"bg/{bg_id.replace(':', '-')}{ext}"
    if "/" not in bg_id and "#" not in bg_id and bg_id.endswith(ext):
        return f"bg/{bg_id}"
    safe = bg_id.replace("/", "__").replace("#", "__")
    digest = hashlib.sha256(bg_id.encode("utf-8")).hexdigest()[:8]
    return f"bg/{Path(safe).stem}-{digest}{ext}"


def dim_members(
    ref: ObjectRef, backgrounds: BackgroundSource, s: CompositeSettings
) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
    """One object's ``fg``/``alpha`` files as stored, and its ``per_object`` background pairings."""
    files = [(f"fg/{ref.key}.png", read_bytes(ref.fg)), (f"alpha/{ref.key}.png", read_bytes(ref.alpha))]
    rows = []
    for k in range(s.per_object):
        bg = draw_background(rng_for(s.seed, ref.key, k), backgrounds, s.model_copy(update={"size": None}))
        if bg["id"].startswith(PROCEDURAL + ":"):
            name = _bg_name(bg["id"], ".png")
            data = encode(procedural_background(int(bg["id"].split(":")[1]), s.size or 512))
        elif (photo := backgrounds.by_id()[bg["id"]]).orientation != 1:  # stored turned: written as shown
            name = _bg_name(bg["id"], ".png")
            data = encode(np.asarray(backgrounds.open(photo)))
        else:
            name = _bg_name(bg["id"], Path(bg["id"]).suffix.lower())
            data = read_bytes(photo.where)
        files.append((name, data))
        rows.append({"key": f"{ref.key}-{k:03d}", "fg": f"fg/{ref.key}.png", "alpha": f"alpha/{ref.key}.png", "bg": name,
                     "k": k, "object": ref.key, "class_name": ref.class_name, "background": bg["id"],
                     "bg_source": bg["source"], "licence": bg["licence"], "label": LABEL_EXACT})
    return files, rows
