"""Recipes: every number a composite is made from, drawn once, written as ``KEY.json``.

:func:`draw_baked` and :func:`draw_scene` draw a recipe from the generator of (seed, key, k);
:mod:`factory.composite.render` turns a recipe into pixels and nothing else, so rendering a recipe
read back from its JSON gives the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from factory.composite.backgrounds import PROCEDURAL, BackgroundRef, BackgroundSource
from factory.composite.blend import LABEL_APPROX, LABEL_EXACT
from factory.composite.generative import public_model
from factory.composite.objects import ObjectRef, ObjectSource
from factory.composite.placement import Placement, draw_placement, place_object, rng_for
from factory.composite.shadow import draw_shadow
from factory.manifest import CompositeSettings

RECIPE_VERSION = 1


def frame_side(settings: CompositeSettings, bg: BackgroundRef) -> tuple[int, int]:
    """(height, width) of the composite for this background."""
    if settings.size is not None or bg.size is None:
        side = settings.size or 512
        return side, side
    return bg.size[1], bg.size[0]


def draw_background(rng: np.random.Generator, backgrounds: BackgroundSource, settings: CompositeSettings) -> dict[str, Any]:
    """Which background, and (with ``size``) how it is scaled and where it is cropped."""
    ref = backgrounds.refs[int(rng.integers(len(backgrounds.refs)))]
    out: dict[str, Any] = {"id": ref.id, "source": backgrounds.kind, "licence": ref.licence, "resize": None, "crop": [0, 0]}
    if settings.size is not None and ref.size is not None:
        w, h = ref.size
        scale = settings.size / min(w, h)
        rw, rh = max(settings.size, round(w * scale)), max(settings.size, round(h * scale))
        out["resize"] = [rw, rh]
        out["crop"] = [int(rng.integers(0, rw - settings.size + 1)), int(rng.integers(0, rh - settings.size + 1))]
    return out


def _edge(rng: np.random.Generator, mode: str, side: float) -> dict[str, Any]:
    if mode == "gaussian":
        return {"mode": mode, "sigma": round(float(rng.uniform(0.5, 2.0)) * max(side / 512, 0.5), 3)}
    if mode == "motion":
        return {"mode": mode, "length": int(rng.integers(3, 12)), "angle": round(float(rng.uniform(0, 180)), 3)}
    return {"mode": mode}


def _placed(
    rng: np.random.Generator, ref: ObjectRef, objects: ObjectSource, frame: tuple[int, int], s: CompositeSettings
) -> tuple[dict[str, Any], Placement]:
    _, alpha = objects.load(ref)
    p = draw_placement(rng, alpha.shape, frame, s)
    return {"key": ref.key, "class_name": ref.class_name, "placement": p.to_dict()}, p


def _common(key: str, layout: str, seed: int, k: int, s: CompositeSettings) -> dict[str, Any]:
    return {"version": RECIPE_VERSION, "key": key, "layout": layout, "seed": seed, "k": k, "alpha_bits": s.alpha_bits}


def _finish(recipe: dict[str, Any], rng: np.random.Generator, s: CompositeSettings, frame: tuple[int, int]) -> dict[str, Any]:
    recipe["harmonize"] = round(s.harmonize, 4)
    recipe["shadow"] = draw_shadow(rng, s.shadow, 0.5 * min(frame)).to_dict() if s.shadow > 0 else None
    recipe["generative"] = (
        {"model": public_model(s.generative), "prompt": s.prompt, "ring": s.ring, "steps": s.steps, "seed": int(rng.integers(2**31))}
        if s.generative
        else None
    )
    edges = [o["edge"]["mode"] for o in recipe["objects"]]
    recipe["label"] = LABEL_APPROX if "poisson" in edges else LABEL_EXACT
    return recipe


def draw_baked(
    obj: ObjectRef, k: int, objects: ObjectSource, backgrounds: BackgroundSource, s: CompositeSettings
) -> dict[str, Any]:
    """Composite ``k`` of one object: a background, a placement, maybe a second foreground mixed in
    (below the first, ViTMatte-style), harmonisation, shadow and generative settings."""
    rng = rng_for(s.seed, obj.key, k)
    recipe = _common(f"{obj.key}-{k:03d}", "baked", s.seed, k, s)
    recipe["background"] = bg = draw_background(rng, backgrounds, s)
    frame = frame_side(s, _ref(backgrounds, bg["id"]))
    entries = []
    if s.mix > 0 and rng.random() < s.mix and len(objects.refs) > 1:
        others = [r for r in objects.refs if r.key != obj.key]
        second = others[int(rng.integers(len(others)))]
        entries.append(_placed(rng, second, objects, frame, s)[0])
    entries.append(_placed(rng, obj, objects, frame, s)[0])
    for e in entries:
        e["edge"] = {"mode": "none"}
    recipe["objects"] = entries
    return _finish(recipe, rng, s, frame)


def draw_scene(number: int, objects: ObjectSource, backgrounds: BackgroundSource, s: CompositeSettings) -> dict[str, Any]:
    """Scene ``number``: a background and several objects, bottom to top, each placed so that at
    least ``min_visible`` of it shows under the ones above (redrawn a few times, else left out)."""
    key = f"scene-{number:06d}"
    rng = rng_for(s.seed, "scene", number)
    recipe = _common(key, "scenes", s.seed, number, s)
    recipe["background"] = bg = draw_background(rng, backgrounds, s)
    frame = frame_side(s, _ref(backgrounds, bg["id"]))
    count = int(rng.integers(s.objects[0], s.objects[1] + 1))
    chosen = [objects.refs[int(i)] for i in rng.integers(len(objects.refs), size=count)]
    entries: list[dict[str, Any]] = []
    alphas: list[np.ndarray] = []
    for ref in chosen:
        for _ in range(8):
            entry, p = _placed(rng, ref, objects, frame, s)
            fg, alpha = objects.load(ref)
            _, a, inside = place_object(fg, alpha, p, frame)
            if inside < 1e-6:
                continue
            # the new object goes on top: it must not hide too much of those below, nor be hidden
            ok = all(_visible_fraction(b, [*alphas[j + 1 :], a]) >= s.min_visible for j, b in enumerate(alphas))
            if ok and inside >= s.min_visible:
                entry["edge"] = _edge(rng, s.blend[int(rng.integers(len(s.blend)))], min(frame))
                entries.append(entry)
                alphas.append(a)
                break
    recipe["objects"] = entries
    recipe["dropped_objects"] = count - len(entries)
    return _finish(recipe, rng, s, frame)


def _visible_fraction(a: np.ndarray, above: list[np.ndarray]) -> float:
    total = float(a.sum())
    if total <= 0:
        return 0.0
    vis = a.copy()
    for b in above:
        vis *= 1.0 - b
    return float(vis.sum()) / total


def _ref(backgrounds: BackgroundSource, bg_id: str) -> BackgroundRef:
    if bg_id.startswith(PROCEDURAL + ":"):
        return backgrounds.refs[int(bg_id.split(":")[1])]
    found = backgrounds.by_id().get(bg_id)
    if found is None:
        raise KeyError(bg_id)
    return found
