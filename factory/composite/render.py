"""A recipe turned into pixels: the background, the placed objects, harmonisation, the shadow, the
exact composite, and (with a generative model) the repainted ring around the object.

Nothing here draws a random number: everything comes from the recipe, so a recipe read back from
``KEY.json`` renders to the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from factory.composite.backgrounds import PROCEDURAL, BackgroundSource, procedural_background
from factory.composite.blend import composite, feather, mix_foregrounds, motion_edge, poisson, quantized, to_uint8, trimap
from factory.composite.harmonize import harmonize
from factory.composite.objects import ObjectSource
from factory.composite.placement import Placement, place_object
from factory.composite.shadow import Shadow, cast, shadow_layer


@dataclass
class Rendered:
    """What one recipe makes (uint8 images, float32 alphas already quantised to their file depth)."""

    image: np.ndarray
    bg: np.ndarray  # the background layer: darkened by the shadow, repainted by the generative mode
    alpha: np.ndarray  # all objects as one matte (baked)
    fg: np.ndarray  # all objects as one foreground (baked; harmonised when asked)
    fg_original: np.ndarray | None = None  # before harmonisation
    shadow: np.ndarray | None = None
    visible: list[np.ndarray] = field(default_factory=list)  # scenes: each instance's visible alpha
    ring: np.ndarray | None = None  # generative: the repainted pixels
    trimap: np.ndarray | None = None


def load_frame(recipe: dict[str, Any], backgrounds: BackgroundSource, frame: tuple[int, int]) -> np.ndarray:
    bg = recipe["background"]
    if bg["id"].startswith(PROCEDURAL + ":"):
        return procedural_background(int(bg["id"].split(":")[1]), frame[0])
    ref = backgrounds.by_id()[bg["id"]]
    if bg["resize"] is None:
        return backgrounds.load(ref, None)
    rw, rh = bg["resize"]
    pil = backgrounds.open(ref, draft=(rw, rh))
    x, y = bg["crop"]
    if pil.size == (rw, rh):
        return np.asarray(pil.crop((x, y, x + frame[1], y + frame[0])), np.uint8)
    # only the crop is resampled: the source box that maps onto it
    sx, sy = pil.width / rw, pil.height / rh
    box = (x * sx, y * sy, (x + frame[1]) * sx, (y + frame[0]) * sy)
    return np.asarray(pil.resize((frame[1], frame[0]), Image.Resampling.BILINEAR, box=box), np.uint8)


def _edge(alpha: np.ndarray, edge: dict[str, Any]) -> np.ndarray:
    if edge["mode"] == "gaussian":
        return feather(alpha, edge["sigma"])
    if edge["mode"] == "motion":
        return motion_edge(alpha, edge["length"], edge["angle"])
    return alpha


def _over(layers: list[tuple[np.ndarray, np.ndarray, str]], bg: np.ndarray) -> np.ndarray:
    """Objects over the background, bottom first, in float; rounded once (Poisson objects excepted)."""
    out = bg.astype(np.float32)
    for f, a, mode in layers:
        if mode == "poisson":
            out = poisson(to_uint8(f), a, to_uint8(out)).astype(np.float32)
        else:
            out += a[..., None] * (f - out)
    return to_uint8(out)


def render(
    recipe: dict[str, Any],
    objects: ObjectSource,
    backgrounds: BackgroundSource,
    frame: tuple[int, int],
    repaint: Any = None,
) -> Rendered:
    """Render a recipe at ``frame`` (height, width). ``repaint(image, mask, generative) -> image``
    repaints the ring (the generative mode); it is needed only when the recipe has ``generative``."""
    bits = int(recipe["alpha_bits"])
    bg = load_frame(recipe, backgrounds, frame)
    refs = objects.by_key()
    placed: list[tuple[np.ndarray, np.ndarray, str]] = []
    originals: list[np.ndarray] = []
    for entry in recipe["objects"]:
        fg, alpha = objects.load(refs[entry["key"]])
        f, a, _ = place_object(fg, alpha, Placement.from_dict(entry["placement"]), frame)
        a = quantized(_edge(a, entry["edge"]), bits)
        originals.append(f)
        if recipe.get("harmonize"):
            f = harmonize(f, a, bg, float(recipe["harmonize"]))
        placed.append((f, a, entry["edge"]["mode"]))
    union = placed[0][1] if len(placed) == 1 else np.zeros(frame, np.float32)
    for _, a, _ in placed if len(placed) > 1 else []:
        union = 1.0 - (1.0 - union) * (1.0 - a)
    shadow = None
    if recipe.get("shadow"):
        shadow = quantized(shadow_layer(union, Shadow.from_dict(recipe["shadow"])), 8)
        bg = cast(bg, shadow)

    if recipe["layout"] == "scenes":
        out = Rendered(image=_over(placed, bg), bg=bg, alpha=quantized(union, bits), fg=np.zeros((*frame, 3), np.uint8), shadow=shadow)
        for i, (_, a, _) in enumerate(placed):
            vis = a.copy()
            for _, b, _ in placed[i + 1 :]:
                vis *= 1.0 - b
            out.visible.append(quantized(vis, bits))
        redo = lambda b: _over(placed, b)  # noqa: E731
    else:
        f, a = _combine([(p[0], p[1]) for p in placed])
        fg_q, a_q = to_uint8(f), (a if len(placed) == 1 else quantized(a, bits))  # one object: quantised already
        approx = any(p[2] == "poisson" for p in placed)
        make = (lambda b: poisson(fg_q, a_q, b)) if approx else (lambda b: composite(fg_q, a_q, b))
        out = Rendered(image=make(bg), bg=bg, alpha=a_q, fg=fg_q, shadow=shadow)
        if recipe.get("harmonize"):
            out.fg_original = to_uint8(_combine([(o, p[1]) for o, p in zip(originals, placed, strict=True)])[0])
        out.trimap = trimap(a_q, max(3, round(min(frame) / 64)))
        redo = make

    gen = recipe.get("generative")
    if gen:
        if repaint is None:
            raise ValueError("this recipe needs its generative model to render")
        ring = ring_mask(union, shadow, int(gen["ring"]))
        painted = repaint(out.image, ring, gen)
        out.bg = np.where(ring[..., None], painted, bg).astype(np.uint8)
        out.image = redo(out.bg)
        out.ring = ring
    return out


def _combine(layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    f, a = layers[0]
    for f2, a2 in layers[1:]:
        f, a = mix_foregrounds(f2, a2, f, a)  # the later object lies on top
    return f, a


def ring_mask(union: np.ndarray, shadow: np.ndarray | None, width: int) -> np.ndarray:
    """The pixels around the object (and under its shadow) that the generative mode repaints; never
    a pixel where any object has alpha > 0."""
    obj = union > 0
    ys, xs = np.nonzero(obj)
    ring = np.zeros_like(obj)
    if ys.size:
        y0, y1 = max(ys.min() - width - 1, 0), ys.max() + width + 2
        x0, x1 = max(xs.min() - width - 1, 0), xs.max() + width + 2
        ring[y0:y1, x0:x1] = ndimage.distance_transform_edt(~obj[y0:y1, x0:x1]) <= width  # a round ring
    if shadow is not None:
        ring |= shadow > 0.02
    return ring & ~obj
