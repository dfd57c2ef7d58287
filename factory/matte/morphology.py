"""Binary morphology by Euclidean distance, for the few "within r px of" tests GreenPost makes.

``distance_transform_edt(~mask) <= r`` answers such a test exactly but computes every distance in
the image; a disc dilation answers it alone, and a disc is a stack of horizontal segments: for each
row offset ``dy`` the half-width is ``floor(sqrt(r^2 - dy^2))``, so the dilation is an OR of row-
shifted running maxima (one per distinct half-width). Same pixels, 3-4x faster on an 800-px image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def within_distance(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose Euclidean distance to a True pixel of ``mask`` is at most ``radius`` (bool).

    Equal to ``ndimage.distance_transform_edt(~mask) <= radius`` wherever ``mask`` has a True
    pixel (with none, no pixel is within any distance)."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    if radius < 0 or not mask.any():
        return out
    h = mask.shape[0]
    r2 = radius * radius
    reach = math.floor(radius)
    rows: dict[int, np.ndarray] = {}
    m8 = mask.view(np.uint8)
    for dy in range(-min(reach, h - 1), min(reach, h - 1) + 1):
        half = math.isqrt(int(math.floor(r2 - dy * dy)))
        if half not in rows:
            rows[half] = ndimage.maximum_filter1d(m8, 2 * half + 1, axis=1, mode="constant", cval=0).view(bool)
        seg = rows[half]
        if dy >= 0:
            out[dy:] |= seg[: h - dy]
        else:
            out[:dy] |= seg[-dy:]
    return out


def square_opening(mask: np.ndarray, size: int) -> np.ndarray:
    """``ndimage.binary_opening(mask, np.ones((size, size)))`` for odd ``size``, as running minima
    then maxima along each axis (a square is separable): the same pixels, several times faster."""
    if size % 2 == 0:
        raise ValueError(f"square_opening needs an odd size, got {size}")
    m8 = np.asarray(mask, dtype=bool).view(np.uint8)
    for axis in (0, 1):
        m8 = ndimage.minimum_filter1d(m8, size, axis=axis, mode="constant", cval=0)
    for axis in (0, 1):
        m8 = ndimage.maximum_filter1d(m8, size, axis=axis, mode="constant", cval=0)
    return m8.view(bool)


def depth_at(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean distance (float64) of the pixels ``(ys, xs)`` of ``mask`` to the nearest pixel
    outside it, exact where it is at most ``cap``, ``inf`` beyond.

    The values ``ndimage.distance_transform_edt(mask)[ys, xs]`` has up to ``cap``, found by looking
    at the offsets within ``cap`` nearest first, for the queried pixels only: cheaper than a
    transform of the whole image when they are few."""
    inside = np.asarray(mask, dtype=bool)
    h, w = inside.shape
    depth = np.full(ys.shape, np.inf)
    reach = int(math.floor(cap))
    offsets = [(dy * dy + dx * dx, dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    todo = np.arange(ys.size)
    for d2, dy, dx in sorted(o for o in offsets if 0 < o[0] <= cap * cap):
        if todo.size == 0:
            break
        y, x = ys[todo] + dy, xs[todo] + dx
        seen = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        hit = np.zeros(todo.size, dtype=bool)
        hit[seen] = ~inside[y[seen], x[seen]]
        depth[todo[hit]] = math.sqrt(d2)
        todo = todo[~hit]
    return depth
