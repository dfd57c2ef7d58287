"""The board's shadow behind the object, which the plate cannot see.

An object casts a soft shadow on a generated board; where that shadow lies under dense
semi-transparent hair, no board pixel shows it, so the plate (interpolated from the lit board
around) is too bright there and the hair comes out too opaque. The pixels of the band tell how dark
the board behind them is: with the object's colour ``F`` known, ``I = a F + (1 - a) s B`` is linear
in ``a`` and ``(1 - a) s`` (:func:`factory.matte.refine.two_colour_fit`), so each band pixel gives
an estimate of the darkening ``s``. A shadow is smooth, so the estimates are pooled per tile
(weighted by the board's share ``(1 - a)^2``, which is what makes ``s`` well determined), the
visible board pins ``s = 1`` (the plate already has its shadows), and push-pull fills the rest.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from factory.matte.fill import push_pull, tile_sums, tiles_to_pixels
from factory.matte.refine import two_colour_fit


def hidden_shadow(
    image: np.ndarray,
    plate: np.ndarray,
    fg_guess: np.ndarray,
    band: np.ndarray,
    board: np.ndarray,
    block: int = 8,
    floor: float = 0.6,
    min_sin2: float = 0.05,
    coverage: tuple[float, float] = (0.1, 0.9),
    min_share: float = 0.1,
) -> np.ndarray:
    """Per-pixel factor (float32 in [``floor``, 1]) by which the board behind the object is darker
    than the plate.

    Band pixels count where the two-colour fit is well conditioned (``sin^2`` of the angle between
    ``F`` and ``B`` at least ``min_sin2``) and the object's share ``u`` lies within ``coverage``
    (nearly opaque pixels hardly see the board; nearly bare ones are noise over ``1 - u``). A tile
    gets full weight once its pooled weight reaches ``min_share`` of its pixels. The field is
    smoothed over a tile and clipped to ``[floor, 1]``: the plate is never brightened, and a
    darkening beyond ``1 - floor`` is more likely a wrong ``F`` than a shadow."""
    u, v, sin2 = two_colour_fit(image, fg_guess, plate)
    lo, hi = coverage
    usable = band & (sin2 > min_sin2) & (u > lo) & (u < hi)
    board_share = np.maximum(1.0 - u, 1e-3)
    darkening = np.clip(v / board_share, 0.4, 1.2)
    weight = np.where(usable, board_share * board_share, 0.0)
    darkening = np.where(board, 1.0, darkening)
    weight = np.where(board, 1.0, weight)
    num, den = tile_sums(darkening[..., None], weight, block)
    grid = num / np.maximum(den, 1e-6)[..., None]
    grid = push_pull(grid, np.clip(den / (block * block * min_share), 0.0, 1.0), min_weight=1.0)
    grid = ndimage.gaussian_filter(grid, (1.0, 1.0, 0.0), mode="nearest")
    return np.clip(tiles_to_pixels(grid, block, band.shape)[..., 0], floor, 1.0)
