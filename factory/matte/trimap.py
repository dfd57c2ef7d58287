"""The trimap: definite background, a definite foreground core, and the unknown band between."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Trimap:
    """Boolean masks; the unknown band is ``~(core | bg)``."""

    core: np.ndarray  # foreground for sure (alpha 1; the foreground colour is sampled here)
    bg: np.ndarray  # background for sure (alpha 0)
    coarse_core: np.ndarray | None = None  # deep inside the coarse alpha's object, when given

    @property
    def unknown(self) -> np.ndarray:
        return ~(self.core | self.bg)


def _disc_offsets(radius: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) on a grid of ``step`` px within ``radius`` px, the centre left out."""
    r = np.arange(-(radius // step) * step, radius + 1, step)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    keep = (dy * dy + dx * dx <= radius * radius) & ((dy != 0) | (dx != 0))
    return dy[keep], dx[keep]


def board_mix_ratio(
    offset: np.ndarray,
    candidates: np.ndarray,
    radius: int = 12,
    step: int = 3,
    tolerance: float = 5.0,
    rel_tolerance: float = 0.05,
    min_offset: float = 20.0,
) -> np.ndarray:
    """How far each candidate pixel lies towards its neighbours' colour, seen from the board.

    ``offset`` is the image minus the plate, ``I - B``. A pixel mixed from a material and the board
    sits on the segment from ``B`` to that material's colour: its offset is ``t`` times the offset of
    an opaque neighbour of the same material, with ``t`` < 1. For every candidate this returns the
    smallest such ``t`` over the neighbours within ``radius`` (sampled every ``step`` px) whose offset
    is at least ``min_offset`` long and whose ray from the board passes within ``tolerance +
    rel_tolerance * |I - B|`` (RGB) of the pixel; 1 where no neighbour lies farther out on its ray.
    Other pixels get 1.

    This is what the colour-difference key cannot see: it over-rates objects that are far from the
    key colour (pink hair at 40 % coverage keys as opaque), but the same hair with no board behind
    it, a few pixels away, is farther out on the same ray. Computed over the candidates' bounding
    box with one shifted view per neighbour offset (about 70 of them by default): contiguous slices,
    faster than gathering the candidates (often half the image) by index.
    """
    h, w = candidates.shape
    out = np.ones((h, w), dtype=np.float32)
    ys, xs = np.nonzero(candidates)
    if len(ys) == 0:
        return out
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    pad = radius
    planes = np.zeros((3, h + 2 * pad, w + 2 * pad), dtype=np.float32)
    planes[:, pad : pad + h, pad : pad + w] = np.moveaxis(np.asarray(offset, dtype=np.float32), -1, 0)
    length2 = (planes * planes).sum(axis=0)
    # 1 / |D_q|^2 where the neighbour is far enough from the board to define a ray, else 0 (t = 0).
    inv = np.where(length2 >= min_offset**2, 1.0 / np.maximum(length2, 1.0), 0.0).astype(np.float32)
    box = np.s_[pad + y0 : pad + y1, pad + x0 : pad + x1]
    d0, d1, d2 = planes[0][box], planes[1][box], planes[2][box]
    pp = length2[box]
    # Off the neighbour's ray by at most the tolerance: |D_p|^2 - (D_p . D_q)^2 / |D_q|^2 <= tol^2.
    need = pp - (tolerance**2 + rel_tolerance**2 * pp)
    ratio = np.ones(pp.shape, dtype=np.float32)
    dot, part, t = (np.empty(pp.shape, dtype=np.float32) for _ in range(3))
    bh, bw = pp.shape
    for dy, dx in zip(*_disc_offsets(radius, step)):
        shifted = np.s_[pad + y0 + dy : pad + y0 + dy + bh, pad + x0 + dx : pad + x0 + dx + bw]
        np.multiply(d0, planes[0][shifted], out=dot)
        dot += np.multiply(d1, planes[1][shifted], out=part)
        dot += np.multiply(d2, planes[2][shifted], out=part)
        np.multiply(dot, inv[shifted], out=t)
        on_ray = (t > 0) & (dot * t >= need)
        np.minimum(ratio, np.where(on_ray, t, 1.0), out=ratio)
    inside = candidates[y0:y1, x0:x1]
    out[y0:y1, x0:x1][inside] = ratio[inside]
    return out


def deeper_than(mask: np.ndarray, depth: float) -> np.ndarray:
    """The pixels of ``mask`` farther than ``depth`` px from every pixel outside it (the image's
    border does not count as outside). For 1 <= depth < sqrt(2) that is an erosion by the
    4-neighbour cross, several times faster than the distance transform it equals."""
    if 1.0 <= depth < np.sqrt(2.0):
        cross = ndimage.generate_binary_structure(2, 1)
        return ndimage.binary_erosion(mask, structure=cross, border_value=1)
    return ndimage.distance_transform_edt(mask) > depth


def make_trimap(
    key_alpha: np.ndarray,
    coarse_alpha: np.ndarray | None = None,
    lo: float = 0.04,
    hi: float = 0.85,
    bg_erode: int = 1,
    core_depth: float = 1.0,
    coarse_core: float = 8.0,
    coarse_far: float | None = None,
    board: np.ndarray | None = None,
    mix_ratio: np.ndarray | None = None,
    mix_max: float = 0.9,
) -> Trimap:
    """The trimap from the key alpha and, when given, the coarse alpha.

    Background: the key alpha is at most ``lo``, shrunk by ``bg_erode`` px. Foreground core: the
    key alpha is at least ``hi``, the pixel is not mixed with the board (``mix_ratio``, from
    ``board_mix_ratio``, at least ``mix_max``) and it lies more than ``core_depth`` px inside that
    region. The mix test matters because the key over-rates mixed pixels of strongly non-green
    objects (red hair keys as opaque at half coverage), and the core is set to alpha 1 and is where
    the foreground colour is sampled. With a coarse alpha (the matting head's): pixels more than
    ``coarse_core`` px inside its object (and >= 0.95 there, and not ``board``: holes show the
    board) join the core even if key-coloured; with ``coarse_far``, pixels more than that many px
    outside its object are background even if the key saw something there (off by default: a coarse
    mask misses the thin strands that the key finds).
    """
    bg = key_alpha <= lo
    if bg_erode > 0:
        bg = ndimage.binary_erosion(bg, iterations=bg_erode, border_value=1)
    solid = key_alpha >= hi
    if mix_ratio is not None:
        solid &= mix_ratio >= mix_max
    core = deeper_than(solid, core_depth)
    deep = None
    if coarse_alpha is not None:
        obj = coarse_alpha >= 0.5
        # Distance transforms: large radii at O(pixels), unlike a morphological disk.
        deep = (ndimage.distance_transform_edt(obj) > coarse_core) & (coarse_alpha >= 0.95)
        if board is not None:  # a hole through the object shows the board: leave it to the key
            deep &= ~board
        core |= deep
        bg &= ~deep
        if coarse_far is not None:
            far = ndimage.distance_transform_edt(~obj) > coarse_far
            core &= ~far
            bg |= far
    return Trimap(core=core, bg=bg, coarse_core=deep)
