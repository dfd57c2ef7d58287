"""Chroma keys: GreenPost's colour-difference key against the local plate, and two plain baselines.

With the compositing model ``I = a F + (1 - a) B`` and a foreground whose colour-difference signal
``e(F) = F_dom - max(F_others)`` is zero or below (greys, skin, hair, most objects), the signal of a
pixel is ``e(I) ~ (1 - a) e(B)``, so ``a ~ 1 - e(I) / e(B)``. Dividing by the *local* plate ``B``
instead of one global key colour keeps shadows, vignetting and lighting gradients on the board out of
the matte.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from factory.matte.canvas import chroma, chroma_direction, dot3, key_excess


def local_difference_key(image: np.ndarray, plate: np.ndarray, key_color: tuple[int, int, int]) -> np.ndarray:
    """``1 - e(I) / e(B)`` against the per-pixel plate, clipped to [0, 1] (float32)."""
    e_i = key_excess(image, key_color)
    e_b = np.maximum(key_excess(plate, key_color), 1.0)
    return np.clip(1.0 - e_i / e_b, 0.0, 1.0).astype(np.float32)


def object_hue_key(image: np.ndarray, plate: np.ndarray, fg: np.ndarray, ridge: float = 5.0) -> np.ndarray:
    """Board content measured across the object's own hue (float32 alpha in [0, 1]).

    In the chroma plane (colours minus their grey part) the compositing equation is
    ``c(I) = a c(F) + (1 - a) c(B)``; a foreground that only changes brightness or saturation
    (shading, highlights, backlit strands) stays on the line of ``c(F)``. Solving
    ``c(I) = u c(F) + v c(B)`` by least squares gives the board's share ``v``, and ``a = 1 - v``,
    whatever ``F``'s brightness. The colour-difference key is the special case of a yellow object
    (``G - R`` vanishes on greys and yellows; cyan where blue exceeds red), which is why it over-rates
    red and pink and under-rates olive; here the hue is ``fg``'s, the colour interpolated from the
    object's core. ``ridge`` (RGB) damps ``u`` so that a greyish ``fg`` (no hue) falls
    back to measuring along the board's chroma."""
    cf, cb, ci = chroma(fg), chroma(plate), chroma(image)
    ff = dot3(cf, cf) + ridge**2
    fb, bb = dot3(cf, cb), dot3(cb, cb)
    fi, bi = dot3(cf, ci), dot3(cb, ci)
    board_share = (ff * bi - fb * fi) / np.maximum(ff * bb - fb * fb, 1e-6)
    return np.clip(1.0 - board_share, 0.0, 1.0).astype(np.float32)


def object_hue_weight(plate: np.ndarray, fg: np.ndarray, contrast: float = 50.0) -> np.ndarray:
    """How far to trust ``object_hue_key`` over the colour-difference key (float32 in [0, 1]):
    ``sin^4`` of the angle between the object's and the board's chroma (an object of the board's
    hue cannot be told from it) times ``|c(F)|^2 / (|c(F)|^2 + contrast^2)`` (a grey has no hue)."""
    cf, cb = chroma(fg), chroma(plate)
    ff, bb, fb = dot3(cf, cf), dot3(cb, cb), dot3(cf, cb)
    sin2 = 1.0 - fb * fb / np.maximum(ff * bb, 1e-6)
    return (sin2**2 * ff / (ff + contrast**2)).astype(np.float32)


def color_difference_key(image: np.ndarray, key_color: tuple[int, int, int]) -> np.ndarray:
    """Baseline: the classic colour-difference key ``1 - e(I) / e(K)`` with one global key colour."""
    e_k = max(float(key_excess(np.asarray(key_color, dtype=np.float32)[None, None], key_color)[0, 0]), 1.0)
    return np.clip(1.0 - key_excess(image, key_color) / e_k, 0.0, 1.0).astype(np.float32)


def _rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = image.astype(np.float32) / 255.0
    mx, mn = x.max(axis=-1), x.min(axis=-1)
    delta = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(
        mx == r, (g - b) / safe % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    h = np.where(delta > 0, h * 60.0, 0.0)
    s = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s, mx


def hsv_threshold_key(
    image: np.ndarray,
    key_color: tuple[int, int, int],
    hue_tolerance_deg: float = 30.0,
    min_saturation: float = 0.25,
    min_value: float = 0.15,
) -> np.ndarray:
    """Baseline: a hard HSV key. Background (0) where the hue is within the tolerance of the key's
    hue and the pixel is saturated and bright enough; foreground (1) elsewhere."""
    h, s, v = _rgb_to_hsv(image)
    hk, _, _ = _rgb_to_hsv(np.asarray(key_color, dtype=np.uint8)[None, None])
    dh = np.abs((h - float(hk[0, 0]) + 180.0) % 360.0 - 180.0)
    background = (dh <= hue_tolerance_deg) & (s >= min_saturation) & (v >= min_value)
    return (~background).astype(np.float32)


def key_colored_pixels(
    image: np.ndarray,
    plate: np.ndarray,
    key_alpha: np.ndarray,
    key_color: tuple[int, int, int],
    object_core: np.ndarray | None = None,
    min_difference: float = 30.0,
    hue_deg: float = 10.0,
    brighter: float = 1.15,
) -> np.ndarray:
    """Pixels of the object that are themselves key-coloured (the Smith-Blinn hard case).

    With a coarse alpha, those are the pixels deep inside its object (``object_core``) that the key
    calls mostly background. Without one: pixels the key calls mostly background although they are
    clearly not the board: at least ``min_difference`` (RGB) from the plate and either off the
    board's chroma by more than ``hue_deg`` or brighter than the board by ``brighter`` (a shadow is
    darker board of the same chroma, so it does not count). A 5x5 opening keeps solid regions
    only: the thin rim of a non-green object mixed with the board can look off-hue too."""
    greenish = key_alpha < 0.5
    if object_core is not None:
        return greenish & object_core
    x = image.astype(np.float32)
    diff = x - plate
    found = greenish & (dot3(diff, diff) >= min_difference**2)
    # The colour tests on those pixels only (usually few: the board is greenish but close to the plate).
    xs, ps = x[found], np.asarray(plate, dtype=np.float32)[found]
    off_hue = dot3(chroma_direction(xs), chroma_direction(ps)) < np.cos(np.deg2rad(hue_deg))
    d = int(np.argmax(key_color))
    lighter = xs[:, d] > brighter * ps[:, d]
    found[found] = off_hue | lighter
    return ndimage.binary_opening(found, structure=np.ones((5, 5), dtype=bool))
