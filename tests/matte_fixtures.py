"""Green-screen images with known alpha, made in code, for the matting tests.

Small on purpose (about 128 px): soft-edged discs, thin hair-like strands with fractional alpha, and
a board that is not one flat colour (gradient, vignette, the object's soft shadow), composited with
``I = a F + (1 - a) B``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BOARD_GREEN = (40, 190, 60)


def soft_disc(size: int = 128, radius: float = 34.0, softness: float = 4.0, center=None) -> np.ndarray:
    """Alpha of a disc whose edge ramps linearly from 1 to 0 over ``softness`` px."""
    cy, cx = center if center is not None else (size / 2, size / 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.hypot(yy - cy, xx - cx)
    return np.clip((radius + softness / 2 - r) / softness, 0.0, 1.0).astype(np.float32)


def strands(size: int = 128, n: int = 14, seed: int = 0) -> np.ndarray:
    """Alpha of hair-like strands hanging from a solid blob at the top: curved lines under 1 px wide,
    drawn with 4x4 supersampling, so their alpha is fractional (about 0.1 to 0.8)."""
    rng = np.random.default_rng(seed)
    s = 4
    big = np.zeros((size * s, size * s), dtype=np.float64)
    yy, xx = np.mgrid[0 : size * s, 0 : size * s]
    big[(yy - 0.12 * size * s) ** 2 + (xx - 0.5 * size * s) ** 2 < (0.22 * size * s) ** 2] = 1.0
    for _ in range(n):
        x0 = rng.uniform(0.3, 0.7) * size * s
        bend = rng.uniform(-0.25, 0.25) * size * s
        width = rng.uniform(1.5, 3.0)  # in supersampled px: a quarter to three quarters of a pixel
        t = np.linspace(0.1, 0.95, 4000)
        px = x0 + bend * t**2
        py = t * size * s
        for dx in np.arange(-width / 2, width / 2 + 1e-9, 0.5):
            big[np.clip(py.astype(int), 0, size * s - 1), np.clip((px + dx).astype(int), 0, size * s - 1)] = 1.0
    return big.reshape(size, s, size, s).mean(axis=(1, 3)).astype(np.float32)


def shaded_board(
    alpha: np.ndarray,
    color: tuple[int, int, int] = BOARD_GREEN,
    gradient: float = 0.2,
    vignette: float = 0.25,
    shadow: float = 0.35,
) -> np.ndarray:
    """A board (float, 0..255) with a left-right lighting gradient, a vignette and the object's soft
    shadow (its alpha shifted down-right and blurred)."""
    h, w = alpha.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = (xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)
    light = (1 + gradient * u) * (1 - vignette * np.clip((u**2 + v**2) / 2, 0, 1))
    cast = ndimage.gaussian_filter(ndimage.shift(alpha.astype(np.float64), (h * 0.06, w * 0.04), order=1), h * 0.04)
    light *= 1 - shadow * cast
    return np.asarray(color, dtype=np.float64) * light[..., None]


def composite(alpha: np.ndarray, fg_color, board: np.ndarray, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """``a F + (1 - a) B`` with a little noise, as uint8 RGB. ``fg_color`` is a colour or an image."""
    f = np.broadcast_to(np.asarray(fg_color, dtype=np.float64), board.shape)
    a = alpha[..., None].astype(np.float64)
    img = a * f + (1 - a) * board
    img += np.random.default_rng(seed).normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def flat(color, size: int = 96) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[...] = color
    return img


PURE_GREEN = (0, 255, 0)
RING_RED = (200, 40, 40)


def ring_with_disc(inner_color=None, size: int = 160, board: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A red ring on a board (default pure green) with an opaque inner disc of ``inner_color``, or a
    true hole through which the board shows (``inner_color`` None). Returns (image, inner disc mask)."""
    outer = soft_disc(size, radius=52, softness=3)
    inner = soft_disc(size, radius=26, softness=3)
    b = np.broadcast_to(np.asarray(PURE_GREEN, np.float64), (size, size, 3)) if board is None else board
    if inner_color is None:
        return composite(np.clip(outer - inner, 0, 1), RING_RED, b), inner >= 1.0
    f = inner[..., None] * np.asarray(inner_color, np.float64) + (1 - inner[..., None]) * np.asarray(RING_RED, np.float64)
    return composite(outer, f, b), inner >= 1.0


def textured_blob(color, size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Foliage-like: a disc of ``color`` with a blurred-noise texture (+-40 levels) on a shaded board."""
    rng = np.random.default_rng(seed)
    alpha = soft_disc(size, radius=45, softness=3)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size, 1)), (2, 2, 0)) * 40
    return composite(alpha, np.clip(np.asarray(color, np.float64) + texture, 0, 255), shaded_board(alpha)), alpha
