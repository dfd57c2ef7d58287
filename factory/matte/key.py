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

from factory.matte.canvas import chroma_direction, key_excess


def local_difference_key(image: np.ndarray, plate: np.ndarray, key_color: tuple[int, int, int]) -> np.ndarray:
    """``1 - e(I) / e(B)`` against the per-pixel plate, clipped to [0, 1] (float32)."""
    e_i = key_excess(image, key_color)
    e_b = np.maximum(key_excess(plate, key_color), 1.0)
    return np.clip(1.0 - e_i / e_b, 0.0, 1.0).astype(np.float32)


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
    differs = np.linalg.norm(x - plate, axis=-1) >= min_difference
    off_hue = (chroma_direction(x) * chroma_direction(plate)).sum(-1) < np.cos(np.deg2rad(hue_deg))
    d = int(np.argmax(key_color))
    lighter = x[..., d] > brighter * plate[..., d]
    found = greenish & differs & (off_hue | lighter)
    return ndimage.binary_opening(found, structure=np.ones((5, 5), dtype=bool))
