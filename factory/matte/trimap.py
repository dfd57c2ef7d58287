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


def make_trimap(
    key_alpha: np.ndarray,
    coarse_alpha: np.ndarray | None = None,
    lo: float = 0.04,
    hi: float = 0.93,
    bg_erode: int = 1,
    core_depth: float = 4.0,
    coarse_core: float = 8.0,
    coarse_far: float | None = None,
    board: np.ndarray | None = None,
) -> Trimap:
    """The trimap from the key alpha and, when given, the coarse alpha.

    Background: the key alpha is at most ``lo``, shrunk by ``bg_erode`` px. Foreground core: the
    key alpha is at least ``hi`` and the pixel lies more than ``core_depth`` px inside that region;
    the depth matters because the key over-rates mixed pixels of strongly non-green objects (red
    hair keys as opaque at half coverage), and the core is where the foreground colour is sampled.
    With a coarse alpha (the matting head's): pixels more than ``coarse_core`` px inside its object
    (and >= 0.95 there, and not ``board``: holes show the board) join the core even if
    key-coloured; with ``coarse_far``, pixels more than that many px outside its object are
    background even if the key saw something there (off by default: a coarse mask misses the thin
    strands that the key finds).
    """
    bg = key_alpha <= lo
    if bg_erode > 0:
        bg = ndimage.binary_erosion(bg, iterations=bg_erode, border_value=1)
    core = ndimage.distance_transform_edt(key_alpha >= hi) > core_depth
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
