"""How far a matte can be trusted, from the image alone (no ground truth): the numbers that
``factory.finish`` stores per sample and ``factory filter`` reads (docs/matting.md, "Matte
confidence").

Each measure looks at the unknown band, where every matting error lives:

- ``residual``: the recomposition error ``|I - (a F + (1 - a) B)|`` with the matte ``a``, the
  foreground ``F`` that is written out (un-mixed, then despilled) and the plate ``B``, in 8-bit
  levels (mean over the band's partly transparent pixels and the channels). Un-mixing alone
  reproduces ``I`` exactly, so what is left is what the matte and the foreground could not explain
  together: spill taken out of ``F`` but left in ``a`` (green light read as transparency), a plate
  that is not the board (a wrong board colour), colour interpolated where un-mixing was not trusted.
- ``green_residue``: the green left in the written foreground on the object's rim, the solid pixels
  within twice the despill width of the band: mean ``max(0, G - max(R, B))`` in levels. Spill that
  reaches deeper than despill does, or a key-coloured rim.
- ``ambiguous_fraction``: the share of the band's partly transparent pixels (at least 15 levels
  from the board: fainter ones have no direction to test) whose colour is not on
  the line from the board to the object's colour (the un-mixing weight of ``refine.unmix_weight``
  under 0.8: ``I - B`` about 18 degrees or more off ``F - B``, or ``F`` too close to the board):
  there a green shift cannot be told from lower coverage, and the alpha leans on a fallback key.
- ``key_colored_fraction``: the share of the image that is object keyed as board (GreenPost's flag).

``confidence`` folds them into one number in [0, 1] (1: nothing unexplained):
``exp(-residual / 10) * exp(-green_residue / 10) * (1 - ambiguous_fraction)``, and 0 for an image
whose object contains the key colour or that has no board.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from factory.matte.canvas import key_excess
from factory.matte.pipeline import MatteResult
from factory.matte.refine import unmix_weight

#: Levels (8-bit) of residual and of green residue at which the confidence falls to 1/e.
RESIDUAL_SCALE = 10.0
GREEN_SCALE = 10.0


@dataclass(frozen=True)
class MatteConfidence:
    residual: float  # mean |I - (a F + (1 - a) B)| over the band, 8-bit levels
    green_residue: float  # mean max(0, G - max(R, B)) of the foreground on the object's rim, levels
    ambiguous_fraction: float  # share of the band where spill and coverage could not be told apart
    key_colored_fraction: float  # share of the image that is object keyed as board
    confidence: float  # all of it in one number in [0, 1]


def matte_confidence(
    image: np.ndarray,
    result: MatteResult,
    despill_width: float = 6.0,
    sharpness: float = 2.0,
    min_contrast: float = 50.0,
    min_offset: float = 15.0,
    ambiguous_weight: float = 0.8,
) -> MatteConfidence:
    """The confidence measures of GreenPost's ``result`` for ``image`` (module doc)."""
    if result.no_board or result.plate is None or result.fg_guess is None or result.band is None:
        return MatteConfidence(0.0, 0.0, 0.0, 0.0, 0.0)
    alpha = result.alpha
    partial = result.band & (alpha > 0.02) & (alpha < 0.98)
    x = image[partial].astype(np.float32)
    b = result.plate[partial]
    residual = ambiguous = 0.0
    if x.size:
        a = alpha[partial][:, None]
        recomposed = a * result.fg[partial].astype(np.float32) + (1.0 - a) * b
        residual = float(np.abs(x - recomposed).mean())
        # A pixel too close to the board to have a direction (noise, the faintest hair) is left out.
        offset2 = ((x - b) ** 2).sum(axis=-1)
        signal = offset2 >= min_offset**2
        if signal.any():
            weight = unmix_weight(x[signal], b[signal], result.fg_guess[partial][signal], sharpness, min_contrast)
            ambiguous = float((weight < ambiguous_weight).mean())
    solid = alpha >= 0.999
    rim = solid & (ndimage.distance_transform_edt(solid) <= 2.0 * despill_width)
    green = float(np.maximum(key_excess(result.fg[rim], result.canvas_color), 0.0).mean()) if rim.any() else 0.0
    score = float(np.exp(-residual / RESIDUAL_SCALE) * np.exp(-green / GREEN_SCALE) * (1.0 - ambiguous))
    if result.contains_key_color:
        score = 0.0
    return MatteConfidence(residual, green, ambiguous, float(result.key_colored_fraction), score)
