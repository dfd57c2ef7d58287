"""Where and how an object lands on a background, drawn from a generator seeded by
(seed, key, k), so any composite can be drawn again from those three numbers and re-rendered from
its recipe alone.

A :class:`Placement` is plain numbers (the recipe's ``placement``); :func:`place_object` turns an
object's cropped foreground and alpha into full-frame layers: flip, resize (premultiplied, so no
dark or light fringe comes from the pixels under alpha 0), rotate, paste at the position.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from factory.manifest import CompositeSettings


def key_number(key: str) -> int:
    """A stable 64-bit number for a key (Python's ``hash`` changes between processes)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def rng_for(seed: int, key: str, k: int) -> np.random.Generator:
    """The generator of composite ``k`` of ``key``: the same three inputs draw the same numbers."""
    return np.random.default_rng([seed, key_number(key), k])


@dataclass(frozen=True)
class Placement:
    """An object's transform into the background frame (recorded in the recipe)."""

    factor: float  # resize factor of the cropped object
    angle: float  # degrees, counter-clockwise
    flip: bool  # horizontal flip, before the resize
    x: int  # left of the transformed object's box in the frame (negative: cut by the border)
    y: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        return cls(float(d["factor"]), float(d["angle"]), bool(d["flip"]), int(d["x"]), int(d["y"]))


def rotated_size(h: int, w: int, angle: float) -> tuple[int, int]:
    """The box of an ``h`` x ``w`` image rotated by ``angle`` degrees with PIL's ``expand=True``."""
    if angle == 0:
        return h, w
    img = Image.new("L", (w, h))
    out = img.rotate(angle, expand=True)
    return out.height, out.width


def draw_placement(
    rng: np.random.Generator, obj_hw: tuple[int, int], frame_hw: tuple[int, int], s: CompositeSettings
) -> Placement:
    """A placement drawn within the settings' ranges: scale, flip, rotation, position, truncation.

    The longer side of the object becomes ``scale`` x the frame's shorter side (at least
    ``min_size`` pixels); the position keeps at most ``truncation`` of the object's box outside the
    frame on each axis (the object is shrunk when it could not fit otherwise).
    """
    h, w = obj_hw
    H, W = frame_hw
    rel = float(rng.uniform(*s.scale))
    angle = float(rng.uniform(-s.rotation, s.rotation)) if s.rotation > 0 else 0.0
    flip = bool(rng.random() < s.flip)
    longest = max(rel * min(H, W), float(s.min_size))
    factor = longest / max(h, w)
    ph, pw = _box(h, w, factor, angle)
    keep = 1.0 - s.truncation  # fraction of the box that must stay inside, per axis
    fit = min(1.0, W / max(pw * keep, 1e-9), H / max(ph * keep, 1e-9))
    if fit < 1.0:  # too big for the frame: shrink, but never below the minimum size
        factor = max(factor * fit * 0.999, s.min_size / max(h, w))
        ph, pw = _box(h, w, factor, angle)
    x = _position(rng, pw, W, s.truncation)
    y = _position(rng, ph, H, s.truncation)
    return Placement(round(factor, 6), round(angle, 4), flip, x, y)


def _box(h: int, w: int, factor: float, angle: float) -> tuple[int, int]:
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    return rotated_size(nh, nw, angle)


def _position(rng: np.random.Generator, size: int, frame: int, truncation: float) -> int:
    out = math.floor(size * truncation)
    lo, hi = -out, frame - size + out
    if hi < lo:  # larger than the frame even after shrinking: centre it
        return (frame - size) // 2
    return int(rng.integers(lo, hi + 1))


def crop_to_alpha(fg: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object's foreground and alpha cropped to the box of its alpha > 0."""
    ys, xs = np.nonzero(alpha > 0)
    if ys.size == 0:
        return fg[:1, :1], alpha[:1, :1] * 0
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return fg[y0:y1, x0:x1], alpha[y0:y1, x0:x1]


def _resample(chan: np.ndarray, size: tuple[int, int], angle: float) -> np.ndarray:
    """One float channel resized to ``size`` (w, h), then rotated with expand."""
    im = Image.fromarray(np.ascontiguousarray(chan, dtype=np.float32), mode="F")
    if im.size != size:
        shrink = size[0] < im.width
        im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0 if shrink else None)
    if angle:
        im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return np.asarray(im, dtype=np.float32)


def _is_8bit(alpha: np.ndarray) -> bool:
    scaled = alpha * np.float32(255.0)
    return bool(np.abs(scaled - np.rint(scaled)).max(initial=0.0) < 1e-3)


def _resample_rgba8(af: np.ndarray, alpha: np.ndarray, size: tuple[int, int], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """``a F`` (rounded to 8 bits) and an 8-bit ``a`` resampled together as the four bands of one
    RGBX image, in one call instead of four. (Not RGBA: Pillow premultiplies RGBA itself when it
    resamples; RGBX bands are resampled independently, and rotation fills all four with 0.)"""
    packed = np.empty((*alpha.shape, 4), np.uint8)
    packed[..., :3] = np.rint(af)
    packed[..., 3] = np.rint(alpha * np.float32(255.0))
    im = Image.frombuffer("RGBX", (packed.shape[1], packed.shape[0]), packed.tobytes(), "raw", "RGBX", 0, 1)
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0 if size[0] < im.width else None)
    if angle:
        im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    out = np.asarray(im, dtype=np.float32)
    return out[..., :3], out[..., 3] / np.float32(255.0)


def transform_object(fg: np.ndarray, alpha: np.ndarray, p: Placement) -> tuple[np.ndarray, np.ndarray]:
    """The cropped object flipped, resized and rotated: (foreground float32 HxWx3, alpha float32).

    Resampling is premultiplied: ``a F`` and ``a`` are resampled, then divided, so colours from
    under alpha 0 never bleed into the edge. An 8-bit alpha goes through one RGBA resize; a deeper
    one keeps float channels (its precision is kept)."""
    if p.flip:
        fg, alpha = fg[:, ::-1], alpha[:, ::-1]
    h, w = alpha.shape
    size = (max(1, round(w * p.factor)), max(1, round(h * p.factor)))
    af = alpha.astype(np.float32)[..., None] * fg.astype(np.float32)
    if _is_8bit(alpha):
        out, a = _resample_rgba8(af, alpha, size, p.angle)
    else:
        a = np.clip(_resample(alpha, size, p.angle), 0.0, 1.0)
        out = np.stack([_resample(af[..., c], size, p.angle) for c in range(3)], axis=-1)
    safe = np.where(a > 1e-6, a, 1.0)[..., None]
    f = np.where(a[..., None] > 1e-6, np.clip(out / safe, 0.0, 255.0), 0.0)
    return f.astype(np.float32), a


def paste(layer: np.ndarray, x: int, y: int, frame_hw: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """The frame and layer slices where a layer placed at (x, y) overlaps the frame, or None."""
    H, W = frame_hw
    h, w = layer.shape[:2]
    fx0, fy0, fx1, fy1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if fx0 >= fx1 or fy0 >= fy1:
        return None
    return (slice(fy0, fy1), slice(fx0, fx1)), (slice(fy0 - y, fy1 - y), slice(fx0 - x, fx1 - x))


def place_object(
    fg: np.ndarray, alpha: np.ndarray, p: Placement, frame_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Full-frame layers of a placed object: (foreground float32, alpha float32, visible fraction of
    the alpha's mass that falls inside the frame)."""
    f, a = transform_object(fg, alpha, p)
    F = np.zeros((*frame_hw, 3), np.float32)
    A = np.zeros(frame_hw, np.float32)
    total = float(a.sum())
    where = paste(a, p.x, p.y, frame_hw)
    if where is None:
        return F, A, 0.0
    dst, src = where
    A[dst] = a[src]
    F[dst] = f[src]
    return F, A, (float(A[dst].sum()) / total if total > 0 else 0.0)
