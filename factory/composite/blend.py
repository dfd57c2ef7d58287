"""Compositing, and how exact each label is.

``exact``: the written image is ``I = round(a F + (1 - a) B)`` computed in float from the written
layers (the alpha already quantised to its file depth, the foreground and background as 8-bit), so
``|I - round(a F + (1 - a) B)| <= 1`` holds on every pixel of what a user reads back (0 in practice;
the 1 covers float32 rounding at .5). Edge modes (Gaussian feather, motion blur) change the alpha
itself before compositing, so the written alpha still explains the pixels. ``approx``: Poisson
blending, whose pixels no alpha explains.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


LABEL_EXACT = "exact"
LABEL_APPROX = "approx"


def quantized(alpha: np.ndarray, bits: int) -> np.ndarray:
    """The alpha as its file will hold it (float32 in [0, 1])."""
    top = np.float32(255.0 if bits == 8 else 65535.0)
    q = np.clip(alpha, 0.0, 1.0, dtype=np.float32) * top
    np.rint(q, out=q)
    q /= top
    return q


def to_uint8(x: np.ndarray) -> np.ndarray:
    y = np.rint(x)
    np.clip(y, 0, 255, out=y)
    return y.astype(np.uint8)


def composite(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """``round(a F + (1 - a) B)`` in float32, rounded once, as uint8; computed on the box of
    ``alpha > 0`` only (elsewhere the result is ``B``)."""
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    image = bg.copy()
    if rows.size == 0:
        return image
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a = alpha[box][..., None]
    b = bg[box].astype(np.float32)
    b += a * (fg[box].astype(np.float32) - b)  # a convex mix of values in 0..255: no clipping
    np.rint(b, out=b)
    image[box] = b.astype(np.uint8)
    return image


def mix_foregrounds(f1: np.ndarray, a1: np.ndarray, f2: np.ndarray, a2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two foregrounds as one (ViTMatte's mixing): ``a = 1 - (1 - a1)(1 - a2)`` and the ``F`` with
    ``a F = a1 F1 + (1 - a1) a2 F2``, so compositing the pair over B equals F1 over (F2 over B)."""
    a = 1.0 - (1.0 - a1) * (1.0 - a2)
    num = a1[..., None] * f1 + ((1.0 - a1) * a2)[..., None] * f2
    f = np.where(a[..., None] > 1e-6, num / np.where(a > 1e-6, a, 1.0)[..., None], 0.0)
    return f.astype(np.float32), a.astype(np.float32)


def feather(alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-feathered edge: the alpha times its own blur, so the edge softens inwards only
    (never onto pixels where the foreground is undefined)."""
    return (alpha * ndimage.gaussian_filter(alpha, sigma, mode="constant")).astype(np.float32)


def motion_edge(alpha: np.ndarray, length: int, angle: float) -> np.ndarray:
    """Motion-blurred edge: the alpha times its blur along a line of ``length`` px at ``angle``."""
    length = max(3, int(length) | 1)
    kernel = np.zeros((length, length), np.float32)
    c = length // 2
    t = np.linspace(-c, c, 4 * length)
    xs = np.rint(c + t * np.cos(np.radians(angle))).astype(int)
    ys = np.rint(c - t * np.sin(np.radians(angle))).astype(int)
    kernel[ys, xs] = 1.0
    kernel /= kernel.sum()
    return (alpha * ndimage.convolve(alpha, kernel, mode="constant")).astype(np.float32)


def poisson(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray, iterations: int = 400) -> np.ndarray:
    """Poisson (gradient-domain) blending of ``fg`` into ``bg`` inside ``alpha >= 0.5``: the
    background seeps into the object, so the result is labelled ``approx``. Jacobi iterations on the
    object's box, float32."""
    inside = alpha >= 0.5
    out = bg.astype(np.float32).copy()
    if not inside.any():
        return to_uint8(out)
    ys, xs = np.nonzero(inside)
    y0, y1, x0, x1 = max(ys.min() - 1, 0), ys.max() + 2, max(xs.min() - 1, 0), xs.max() + 2
    m = inside[y0:y1, x0:x1]
    f = fg[y0:y1, x0:x1].astype(np.float32)
    g = out[y0:y1, x0:x1]
    lap = 4 * f - sum(np.roll(f, s, axis=ax) for s, ax in ((1, 0), (-1, 0), (1, 1), (-1, 1)))
    x = np.where(m[..., None], f, g)
    for _ in range(iterations):
        nb = sum(np.roll(x, s, axis=ax) for s, ax in ((1, 0), (-1, 0), (1, 1), (-1, 1)))
        x = np.where(m[..., None], (nb + lap) / 4.0, g)
    out[y0:y1, x0:x1] = x
    return to_uint8(out)


def trimap(alpha: np.ndarray, radius: int) -> np.ndarray:
    """A trimap from the alpha (0 background, 128 unknown, 255 foreground): unknown within
    ``radius`` px of any pixel that is neither fully opaque nor fully transparent."""
    out = np.where(alpha >= 1.0, 255, 0).astype(np.uint8)
    soft = (alpha > 0) & (alpha < 1)
    ys, xs = np.nonzero(alpha > 0)
    if ys.size == 0:
        return out
    r = int(radius)
    y0, y1 = max(ys.min() - r - 1, 0), ys.max() + r + 2
    x0, x1 = max(xs.min() - r - 1, 0), xs.max() + r + 2
    inner = alpha[y0:y1, x0:x1] >= 1.0
    # the edge between opaque and transparent counts as soft, even without soft pixels
    edge = soft[y0:y1, x0:x1] | (inner ^ ndimage.minimum_filter(inner, size=3, mode="nearest"))
    band = ndimage.maximum_filter(edge.view(np.uint8), size=2 * r + 1, mode="constant") > 0
    out[y0:y1, x0:x1][band] = 128
    return out
