"""Scattered-data filling on an image grid (push-pull), used for the board plate and for the
foreground colour behind the unknown band."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def push_pull(values: np.ndarray, weights: np.ndarray, min_weight: float = 1.0) -> np.ndarray:
    """Fill a sparsely weighted (h, w, c) grid: average down a pyramid, blend back up.

    A cell whose weight reaches ``min_weight`` keeps its own value; cells with less take more of the
    coarser level's estimate, so holes get a smooth interpolation of the values around them.
    Weights are in [0, 1] (or any non-negative scale consistent with ``min_weight``). Computed in
    float32 (colours and weights need no more; twice as fast as float64 on a full image)."""
    values = np.asarray(values, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    num = values * weights[..., None]
    if min(weights.shape) <= 2 or weights.sum() == 0:
        total = max(float(weights.sum()), 1e-12)
        mean = num.reshape(-1, num.shape[-1]).sum(axis=0) / total
        if weights.sum() == 0:
            mean = values.reshape(-1, values.shape[-1]).mean(axis=0)
        return np.broadcast_to(mean, values.shape).copy()
    # Spread a little before decimating so every cell reaches its neighbours.
    num_s = _box3_decimated(num)
    den_s = _box3_decimated(weights)
    coarse_val = num_s / np.maximum(den_s, 1e-12)[..., None]
    coarse = push_pull(coarse_val, den_s, min_weight)
    up = upsample2(coarse)[: values.shape[0], : values.shape[1]]
    t = np.clip(weights / min_weight, 0.0, 1.0)[..., None]
    # t * own + (1 - t) * up, in place (the same operations: the same bits, fewer temporaries)
    own = num
    own /= np.maximum(weights, 1e-12)[..., None]
    own *= t
    up *= 1.0 - t
    own += up
    return own


def _box3_decimated(grid: np.ndarray) -> np.ndarray:
    """``uniform_filter(grid, 3 x 3, mode="nearest")[::2, ::2]`` with the second axis filtered on
    the kept rows only (separable, so the same values)."""
    rows = ndimage.uniform_filter1d(grid, 3, axis=0, mode="nearest")[::2]
    return ndimage.uniform_filter1d(rows, 3, axis=1, mode="nearest")[:, ::2]


def upsample2(grid: np.ndarray) -> np.ndarray:
    """Double an (h, w, c) grid whose cell k sits at fine pixel 2k (what ``[::2, ::2]`` keeps):
    even pixels copy it, odd ones average their two (or four) neighbours; the last row and column
    repeat. Much faster than a general spline zoom."""
    h, w = grid.shape[:2]
    ext = np.concatenate([grid, grid[-1:]], axis=0)
    ext = np.concatenate([ext, ext[:, -1:]], axis=1)
    out = np.empty((2 * h, 2 * w) + grid.shape[2:], dtype=grid.dtype)
    out[0::2, 0::2] = grid
    out[1::2, 0::2] = 0.5 * (ext[:-1, :-1] + ext[1:, :-1])
    out[0::2, 1::2] = 0.5 * (ext[:-1, :-1] + ext[:-1, 1:])
    out[1::2, 1::2] = 0.25 * (ext[:-1, :-1] + ext[1:, :-1] + ext[:-1, 1:] + ext[1:, 1:])
    return out


def tile_sums(values: np.ndarray, weights: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums of an (h, w, c) grid over ``block x block`` tiles (edges padded with zero
    weight): (sum of value * weight (hb, wb, c), sum of weight (hb, wb))."""
    h, w = weights.shape
    ph, pw = -h % block, -w % block
    wt = np.pad(np.asarray(weights, dtype=np.float64), ((0, ph), (0, pw)))
    num = np.pad(np.asarray(values, dtype=np.float64) * np.asarray(weights, dtype=np.float64)[..., None],
                 ((0, ph), (0, pw), (0, 0)))  # fmt: skip
    hb, wb = wt.shape[0] // block, wt.shape[1] // block
    return (
        num.reshape(hb, block, wb, block, -1).sum(axis=(1, 3)),
        wt.reshape(hb, block, wb, block).sum(axis=(1, 3)),
    )


def tile_sums_at(
    values: np.ndarray, weights: np.ndarray, ys: np.ndarray, xs: np.ndarray, block: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tile_sums` of values and weights given at the pixels ``(ys, xs)`` only ((n, c) and
    (n,); every other pixel has weight 0): the same sums, without a full-size image."""
    hb, wb = -(-shape[0] // block), -(-shape[1] // block)
    tile = (ys // block) * wb + xs // block
    w = np.asarray(weights, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    num = np.stack([np.bincount(tile, weights=v[:, k] * w, minlength=hb * wb) for k in range(v.shape[1])], axis=-1)
    return num.reshape(hb, wb, -1), np.bincount(tile, weights=w, minlength=hb * wb).reshape(hb, wb)


Taps = tuple[np.ndarray, np.ndarray, np.ndarray]


def _linear_taps(n_out: int, n_tiles: int, block: int) -> Taps:
    """Indices and weights to interpolate ``n_tiles`` tile centres (at ``(k + 0.5) block - 0.5``)
    onto ``n_out`` pixels, holding the edge tiles' values beyond the outer centres."""
    pos = np.clip((np.arange(n_out) + 0.5) / block - 0.5, 0.0, n_tiles - 1.0)
    i0 = np.minimum(pos.astype(np.int64), n_tiles - 1)
    i1 = np.minimum(i0 + 1, n_tiles - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def tiles_to_pixels(grid: np.ndarray, block: int, shape: tuple[int, int]) -> np.ndarray:
    """A (hb, wb, c) tile grid back to (h, w, c) pixels (float32): bilinear between tile centres,
    the edge tiles' values held beyond them (what ``ndimage.zoom(..., order=1, mode="nearest",
    grid_mode=True)`` computes, as two separable gathers, about 20x faster)."""
    g = np.asarray(grid, dtype=np.float32)
    rows, cols = _linear_taps(shape[0], g.shape[0], block), _linear_taps(shape[1], g.shape[1], block)
    return separable_bilinear(g, rows, cols)


def tiles_at(grid: np.ndarray, block: int, shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """:func:`tiles_to_pixels` at the pixels ``(ys, xs)`` only: (n, c) float32, the same values."""
    g = np.asarray(grid, dtype=np.float32)
    y0, y1, fy = (t[ys] for t in _linear_taps(shape[0], g.shape[0], block))
    x0, x1, fx = (t[xs] for t in _linear_taps(shape[1], g.shape[1], block))
    fy, fx = fy[:, None], fx[:, None]
    left = g[y0, x0] * (1 - fy) + g[y1, x0] * fy
    right = g[y0, x1] * (1 - fy) + g[y1, x1] * fy
    return left * (1 - fx) + right * fx


def separable_bilinear(grid: np.ndarray, rows: Taps, cols: Taps) -> np.ndarray:
    """Bilinear interpolation of an (gh, gw, c) grid as two gathers, rows first: each tap is
    (lower index, upper index, weight of the upper one) per output row or column."""
    y0, y1, fy = rows
    x0, x1, fx = cols
    r = grid[y0] * (1 - fy)[:, None, None] + grid[y1] * fy[:, None, None]
    # r[:, x0] (1 - fx) + r[:, x1] fx on the full image, in place: the same bits, fewer temporaries
    out = r[:, x0]
    out *= (1 - fx)[None, :, None]
    right = r[:, x1]
    right *= fx[None, :, None]
    out += right
    return out
