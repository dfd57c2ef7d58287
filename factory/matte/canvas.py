"""The green canvas: its colour (K-Means) and a spatially varying background plate.

A generated "pure green" board is never one flat colour: it has lighting gradients, vignetting, a
drift of hue across the board and soft shadows cast by the object. GreenPost therefore keys against
a *plate*: an estimate of the board's colour at every pixel, including behind the object, built from
the pixels that are board for sure and filled in elsewhere by push-pull interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from factory.matte.fill import Taps, push_pull, separable_bilinear, tiles_to_pixels
from factory.matte.morphology import within_distance

# Two canvas-like clusters with directions closer than this are one board under different lighting.
_SAME_BOARD_DEG = 8.0


def key_channels(key_color: tuple[int, int, int] | np.ndarray) -> tuple[int, int, int]:
    """(dominant channel, other, other) of a key colour: (1, 0, 2) for any green."""
    d = int(np.argmax(np.asarray(key_color, dtype=np.float64)))
    o1, o2 = [c for c in range(3) if c != d]
    return d, o1, o2


def key_excess(rgb: np.ndarray, key_color: tuple[int, int, int] | np.ndarray) -> np.ndarray:
    """Colour-difference signal ``dominant - max(others)`` (``G - max(R, B)`` for green), float32.

    It is about zero for greys and below zero for most object colours, and largest on the canvas,
    which is what makes a colour-difference key work."""
    d, o1, o2 = key_channels(key_color)
    x = np.asarray(rgb, dtype=np.float32)
    return x[..., d] - np.maximum(x[..., o1], x[..., o2])


def dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel dot product over the colour axis. Written out: numpy's reductions over a last axis
    of length 3 (``(a * b).sum(-1)``, ``norm(axis=-1)``) are several times slower."""
    out = a[..., 0] * b[..., 0]
    out += a[..., 1] * b[..., 1]
    out += a[..., 2] * b[..., 2]
    return out


def two_direction_fit(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares ``y = p u + q v`` per pixel (RGB: three equations, two unknowns), float32.

    Returns ``(p, q, sin2)``; ``sin2`` is ``sin^2`` of the angle between ``u`` and ``v``: near 0
    the two directions point the same way and ``p``, ``q`` are unreliable."""
    uu, vv, uv = dot3(u, u), dot3(v, v), dot3(u, v)
    uy, vy = dot3(u, y), dot3(v, y)
    det = uu * vv - uv * uv
    safe = np.maximum(det, 1e-3)
    p = (vv * uy - uv * vy) / safe
    q = (uu * vy - uv * uy) / safe
    return p, q, det / np.maximum(uu * vv, 1e-6)


def chroma(rgb: np.ndarray) -> np.ndarray:
    """The colour minus its grey component (float32): what is left when brightness is taken out."""
    x = np.asarray(rgb, dtype=np.float32)
    return x - ((x[..., 0] + x[..., 1] + x[..., 2]) / 3.0)[..., None]


def chroma_direction(rgb: np.ndarray) -> np.ndarray:
    """Unit chroma vector: the colour minus its grey component, normalised (brightness-free)."""
    c = chroma(rgb)
    return c / (np.sqrt(dot3(c, c)) + 1e-6)[..., None]


@dataclass(frozen=True)
class CanvasColor:
    """The estimated canvas colour and how much of the sampled image it covers."""

    color: tuple[int, int, int]
    coverage: float  # share of the sampled (non-excluded) pixels assigned to the canvas clusters
    border_coverage: float  # the same share among the sampled border pixels
    spread: float  # median RGB distance (0..255 scale) of the canvas pixels from ``color``


def grid_samples(image: np.ndarray, keep: np.ndarray | None, max_samples: int) -> np.ndarray:
    """About ``max_samples`` pixels on a regular grid (those where ``keep`` is False left out)."""
    h, w = image.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / max_samples))))
    sub = image[step // 2 :: step, step // 2 :: step]
    if keep is not None:
        sub = sub[keep[step // 2 :: step, step // 2 :: step]]
    return sub.reshape(-1, 3).astype(np.float32)


def _border_mask(shape: tuple[int, int], width: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return m


def estimate_canvas_color(
    image: np.ndarray,
    exclude: np.ndarray | None = None,
    n_clusters: int = 4,
    max_samples: int = 4096,
    seed: int = 0,
    border_weight: float = 2.0,
) -> CanvasColor:
    """Estimate the canvas colour of an RGB uint8 image with K-Means.

    Pixels on a regular grid (about ``max_samples``; those where ``exclude`` is True left out) are
    clustered in RGB. Clusters whose colours point in nearly the same RGB direction (the same
    surface, lit differently) form a group. The canvas is the group with the largest share of all
    samples plus ``border_weight`` times its share of the image-border samples: the board surrounds
    an object drawn in the middle, so a large object, even one that touches the border, does not
    win. The colour is the mean of the group's pixels.
    """
    h, w = image.shape[:2]
    keep = None if exclude is None else ~np.asarray(exclude, dtype=bool)
    if keep is not None and keep.sum() < 64:  # the mask left nothing to look at: use everything
        keep = None
    x = grid_samples(image, keep, max_samples)
    border = _border_mask((h, w), max(1, min(h, w) // 32))
    xb = grid_samples(image, border if keep is None else border & keep, max(256, max_samples // 4))
    if len(xb) == 0:
        xb = x
    k = int(min(n_clusters, len(np.unique(x, axis=0))))
    km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed).fit(x)
    lab, lab_b = km.labels_, km.predict(xb)
    share = np.bincount(lab, minlength=k) / len(lab)
    share_b = np.bincount(lab_b, minlength=k) / len(lab_b)
    centers = km.cluster_centers_
    unit = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-6)
    # Clusters of one colour under different light (a board that K-Means split into its lit and
    # shaded halves; an object's lit and shaded sides) are scored as one surface.
    same_colour = (unit @ unit.T >= np.cos(np.deg2rad(_SAME_BOARD_DEG))) | np.eye(k, dtype=bool)
    score = same_colour.astype(np.float64) @ (share + border_weight * share_b)
    best = int(np.argmax(score))
    same = np.flatnonzero(same_colour[best])
    members = np.isin(lab, same)
    color = x[members].mean(axis=0)
    # Median, not RMS: the few soft-edge pixels merged into the board must not count as unevenness.
    spread = float(np.median(np.linalg.norm(x[members] - color, axis=1)))
    return CanvasColor(
        color=tuple(int(v) for v in np.clip(np.rint(color), 0, 255)),  # type: ignore[arg-type]
        coverage=float(members.mean()),
        border_coverage=float(np.isin(lab_b, same).mean()),
        spread=spread,
    )


def canvas_likeness(image: np.ndarray, key_color: tuple[int, int, int], hue_tolerance_deg: float) -> np.ndarray:
    """Pixels whose chroma points within ``hue_tolerance_deg`` of the key's and is at least half as
    saturated: a loose, brightness-free test, so shadowed and vignetted board counts as canvas."""
    x = image.astype(np.float32)
    ck = np.asarray(key_color, dtype=np.float32)
    ck = ck - ck.mean()
    nk = float(np.linalg.norm(ck)) + 1e-6
    cx = chroma(x)
    nx = np.sqrt(dot3(cx, cx)) + 1e-6
    cos = dot3(cx, ck) / (nx * nk)
    sat = nx / (x.max(axis=-1) + 1.0)
    sat_k = nk / (float(max(key_color)) + 1.0)
    return (cos >= np.cos(np.deg2rad(hue_tolerance_deg))) & (sat >= 0.5 * sat_k)


def _poly_basis(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(yy), yy, xx, yy * yy, yy * xx, xx * xx], axis=-1)


def board_chroma_field(
    image: np.ndarray, candidates: np.ndarray, max_samples: int = 4096, iterations: int = 3
) -> np.ndarray:
    """The board's chroma direction at every pixel (float32 (H, W, 3), unit vectors).

    A quadratic in x and y fitted to candidate canvas pixels, reweighted to drop those more than
    12 degrees off: it follows a drift of hue across the board, which one key colour cannot, and
    leaves out the object's own greens."""
    h, w = image.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / max_samples))))
    ys, xs = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    keep = candidates[ys, xs]
    if keep.sum() < 16:
        keep = np.ones_like(keep)
    ys, xs = ys[keep], xs[keep]
    u = chroma_direction(image[ys, xs])
    basis = _poly_basis(ys / h - 0.5, xs / w - 0.5)
    weight = np.ones(len(u))
    coef = np.zeros((basis.shape[1], 3))
    for _ in range(iterations):
        sw = np.sqrt(weight)[:, None]
        coef, *_ = np.linalg.lstsq(basis * sw, u * sw, rcond=None)
        fit = basis @ coef
        fit /= np.linalg.norm(fit, axis=-1, keepdims=True) + 1e-6
        weight = ((u * fit).sum(-1) >= np.cos(np.deg2rad(12.0))) + 1e-3
    # Evaluate on a coarse grid and upsample: the field is smooth.
    gy, gx = np.linspace(-0.5, 0.5, max(2, h // 16)), np.linspace(-0.5, 0.5, max(2, w // 16))
    field = _poly_basis(*np.meshgrid(gy, gx, indexing="ij")) @ coef
    field = _resize_grid(field.astype(np.float32), h, w)
    return field / (np.linalg.norm(field, axis=-1, keepdims=True) + 1e-6)


def _resize_grid(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of an (gh, gw, c) grid whose corners map to the image corners."""
    gh, gw = grid.shape[:2]

    def taps(n: int, g: int) -> Taps:
        r = np.linspace(0, g - 1, n)
        i0 = np.minimum(r.astype(int), g - 2) if g > 1 else np.zeros(n, int)
        return i0, np.minimum(i0 + 1, g - 1), (r - i0).astype(grid.dtype)

    return separable_bilinear(grid, taps(h, gh), taps(w, gw)).astype(grid.dtype)


def strict_canvas(
    image: np.ndarray, key_color: tuple[int, int, int], hue_tolerance_deg: float = 30.0, strict_deg: float = 6.0
) -> np.ndarray:
    """Pixels that are board for sure: loosely canvas-like, and within ``strict_deg`` of the board's
    local chroma direction. Mixed edge pixels and the object's own greens fail the second test."""
    loose = canvas_likeness(image, key_color, hue_tolerance_deg)
    field = board_chroma_field(image, loose)
    return loose & (dot3(chroma_direction(image), field) >= np.cos(np.deg2rad(strict_deg)))


def background_plate(
    image: np.ndarray,
    key_color: tuple[int, int, int],
    canvas: np.ndarray | None = None,
    block: int = 8,
    min_valid: float = 0.5,
) -> np.ndarray:
    """Estimate the board colour at every pixel (float32 (H, W, 3), 0..255).

    Per ``block x block`` tile, among board pixels (``canvas``, by default ``strict_canvas``), the
    mean colour of those in the top half by colour-difference signal: dark strands mixed into a
    tile fall in the bottom half, while a soft shadow darkens the whole tile and is kept. A tile's
    weight is its share of board pixels (full from ``min_valid`` up); push-pull fills the rest and
    the tile grid is upsampled bilinearly."""
    h, w = image.shape[:2]
    if canvas is None:
        canvas = strict_canvas(image, key_color)
    e = key_excess(image, key_color)
    ph, pw = -h % block, -w % block
    img_p = np.pad(image.astype(np.float32), ((0, ph), (0, pw), (0, 0)), mode="edge")
    e_p = np.pad(np.where(canvas, e, -np.inf), ((0, ph), (0, pw)), mode="edge")
    hb, wb, n = img_p.shape[0] // block, img_p.shape[1] // block, block * block
    tiles_e = e_p.reshape(hb, block, wb, block).transpose(0, 2, 1, 3).reshape(hb, wb, n)
    tiles_x = img_p.reshape(hb, block, wb, block, 3).transpose(0, 2, 1, 3, 4).reshape(hb, wb, n, 3)
    n_valid = np.isfinite(tiles_e).sum(axis=-1)
    # The median of the valid signal per tile (-inf, not board, sorts first); keep those above it.
    med_idx = np.clip(n - (n_valid + 1) // 2, 0, n - 1)
    med = np.take_along_axis(np.sort(tiles_e, axis=-1), med_idx[..., None], axis=-1)
    top = np.isfinite(tiles_e) & (tiles_e >= med)
    val = (tiles_x * top[..., None]).sum(axis=2) / np.maximum(top.sum(axis=-1), 1)[..., None]
    weight = np.clip(n_valid / (n * min_valid), 0.0, 1.0)
    return tiles_to_pixels(push_pull(val, weight, min_weight=1.0), block, (h, w))


def board_without_object(
    board: np.ndarray, alpha: np.ndarray, core: np.ndarray, min_alpha: float = 0.02, core_gap: float = 10.0
) -> np.ndarray:
    """The board pixels minus those where a first alpha finds the object, away from its core.

    Faint hair spread over the board passes the strict board test (a strand at 10 % coverage
    turns the board's chroma by only a few degrees), and where it covers a whole plate tile it
    becomes the plate: the hair is then measured against itself and comes out too faint. Once a
    first alpha exists, pixels with ``alpha > min_alpha`` are object, not board. Only those more
    than ``core_gap`` px from the foreground core are taken out: next to a solid edge the first
    alpha is the edge's blur, and those pixels carry the board's colour (its shadow most of all)
    right up to the object."""
    far = ~within_distance(core, core_gap)  # no core: every pixel is far
    return board & ~((alpha > min_alpha) & far)
