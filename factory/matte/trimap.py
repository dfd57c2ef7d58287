"""The trimap: definite background, a definite foreground core, and the unknown band between."""

from __future__ import annotations

import functools
from collections.abc import Callable
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
    it, a few pixels away, is farther out on the same ray. One compiled loop over the candidates and
    their neighbours (about 70 offsets by default): several times faster than a numpy pass per
    offset, and this test runs on every pixel the key calls solid, often half the image.
    """
    h, w = candidates.shape
    out = np.ones((h, w), dtype=np.float32)
    ys, xs = np.nonzero(candidates)
    if len(ys) == 0:
        return out
    pad = radius
    # Per pixel: the offset I - B, and 1 / |I - B|^2 where it is long enough to define a ray, else 0.
    planes = np.zeros((h + 2 * pad, w + 2 * pad, 4), dtype=np.float32)
    planes[pad : pad + h, pad : pad + w, :3] = offset
    length2 = np.einsum("ijc,ijc->ij", planes[..., :3], planes[..., :3], dtype=np.float64)
    planes[..., 3] = np.where(length2 >= float(min_offset) ** 2, 1.0 / np.maximum(length2, 1.0), 0.0)
    dy, dx = _disc_offsets(radius, step)
    row = w + 2 * pad
    start = ((ys + pad) * row + xs + pad).astype(np.int64) * 4  # each pixel's first value in ``flat``
    shift = (dy * row + dx).astype(np.int64) * 4
    flat = planes.reshape(-1)
    out[ys, xs] = _mix_ratio_kernel()(flat, start, shift, np.float32(tolerance**2), np.float32(rel_tolerance**2))
    return out


@functools.cache
def _mix_ratio_kernel() -> Callable[..., np.ndarray]:
    """The compiled loop of ``board_mix_ratio`` over a flat (pixel, 4) float32 array: the offset and
    its inverse squared length. numba, float32 like the inputs: about 2 s to compile once, then
    cached on disk; imported on first use so that importing the package stays quick."""
    import numba

    def kernel(flat, start, shift, tol2, rel2):  # type: ignore[no-untyped-def]
        ratio = np.ones(len(start), dtype=np.float32)
        one = np.float32(1.0)
        for i in range(len(start)):
            p = start[i]
            p0, p1, p2 = flat[p], flat[p + 1], flat[p + 2]
            pp = p0 * p0 + p1 * p1 + p2 * p2
            # Off the neighbour's ray by at most the tolerance: |D_p|^2 - (D_p . D_q)^2 / |D_q|^2 <= tol^2.
            need = pp - (tol2 + rel2 * pp)
            best = one
            for k in range(len(shift)):
                q = p + shift[k]
                dot = p0 * flat[q] + p1 * flat[q + 1] + p2 * flat[q + 2]
                t = dot * flat[q + 3]  # 0 where the neighbour is too close to the board to define a ray
                # A select, not a branch: which neighbours pass is unpredictable (7x faster so).
                best = min(best, t if (t > 0) & (dot * t >= need) else one)
            ratio[i] = best
        return ratio

    try:
        return numba.njit(cache=True, nogil=True)(kernel)
    except RuntimeError:  # no writable cache directory: compile in every process instead
        return numba.njit(nogil=True)(kernel)


def deeper_than(mask: np.ndarray, depth: float) -> np.ndarray:
    """The pixels of ``mask`` farther than ``depth`` px from every pixel outside it (the image's
    border does not count as outside). For 1 <= depth < sqrt(2) that is an erosion by the
    4-neighbour cross, several times faster than the distance transform it equals (on a mask
    without any outside pixel the erosion keeps everything, the transform has nothing to measure)."""
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
