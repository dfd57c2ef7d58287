"""GSG, green-screen generation quality: how pure a generated image's canvas is.

DiffuMatting clusters a generated image's colours with K-Means and measures the distance between
the dominant (canvas) colour and the green-screen colour; the normalisation is not published. Ours:

- ``canvas_color``: ``factory.matte.canvas.estimate_canvas_color`` (the same estimate GreenPost
  keys with) on at most ``max_pixels`` pixels sampled on a grid (only background pixels, where
  ``mask > 0.5``, when a mask is given): K-Means with 4 clusters in RGB; the canvas is the cluster
  with the largest share of all samples plus share of the image-border samples, merged with the
  clusters pointing within 8 degrees of it in RGB (the same board in shade); its colour is the mean
  of those pixels.
- ``distance``: Euclidean distance in RGB (0..255 per channel) from ``canvas_color`` to the
  reference green, 0..441.7.
- ``score = exp(-distance^2 / (2 * 100^2))``: 1 on the reference, 0.88 at a distance of 50 (e.g. a
  board at 80 % brightness), 0.61 at 100, 0.09 for mid grey; higher is purer, and it falls strictly
  with the distance.
- ``spread``: median RGB distance of the canvas pixels from ``canvas_color`` (gradients, vignetting,
  shadows, noise); ``uniformity = max(0, 1 - spread / 64)``: about 0.95 for a flat board with
  camera noise, 0.6 to 0.8 for a board with a strong gradient or vignette.
- ``coverage``: the canvas pixels' share of the sampled pixels.

A 512x512 image takes a few milliseconds on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from factory.errors import InputError
from factory.matte.canvas import estimate_canvas_color

REFERENCE_GREEN: tuple[int, int, int] = (0, 255, 0)  # pure green; manifests may override per run
DISTANCE_SCALE = 100.0  # RGB distance at which the score is exp(-1/2) = 0.61
SPREAD_SCALE = 64.0  # canvas spread at which uniformity reaches 0
SAMPLES = 4096


@dataclass(frozen=True)
class GSGResult:
    """The GSG score of one image, with its parts."""

    score: float  # exp(-distance^2 / (2 * 100^2)), in (0, 1], higher is purer
    distance: float  # RGB distance of the canvas colour from the reference
    canvas_color: tuple[int, int, int]  # K-Means canvas colour
    uniformity: float  # max(0, 1 - spread / 64), in [0, 1]
    spread: float = 0.0  # median RGB distance of the canvas pixels from canvas_color
    coverage: float = 0.0  # share of the sampled pixels that are canvas
    reference: tuple[int, int, int] = REFERENCE_GREEN


def _check_reference(reference: tuple[int, int, int]) -> tuple[int, int, int]:
    ref = tuple(int(v) for v in reference)
    if len(ref) != 3 or not all(0 <= v <= 255 for v in ref):
        raise InputError(f"reference colour must be three integers 0..255, got {reference!r}")
    return ref  # type: ignore[return-value]


def gsg(
    image: np.ndarray,
    reference: tuple[int, int, int] = REFERENCE_GREEN,
    mask: np.ndarray | None = None,
    max_pixels: int = SAMPLES,
) -> GSGResult:
    """Score the canvas of an RGB uint8 image (H, W, 3) against ``reference``.

    ``mask`` is optional: an (H, W) *background* mask (bool, float in [0, 1] or uint8, e.g.
    ``1 - alpha``); only pixels where it is > 0.5 (> 127 for uint8) are scored. A mask that leaves
    fewer than 64 pixels is ignored."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"GSG needs an 8-bit RGB image (H, W, 3) uint8, got {img.shape} {img.dtype}")
    ref = _check_reference(reference)
    exclude = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != img.shape[:2]:
            raise InputError(f"mask shape {m.shape} does not match the image's {img.shape[:2]}")
        exclude = ~(m > (127 if m.dtype == np.uint8 else 0.5))
    canvas = estimate_canvas_color(img, exclude, max_samples=max_pixels)
    distance = float(np.linalg.norm(np.asarray(canvas.color, dtype=np.float64) - np.asarray(ref, dtype=np.float64)))
    return GSGResult(
        score=float(np.exp(-0.5 * (distance / DISTANCE_SCALE) ** 2)),
        distance=distance,
        canvas_color=canvas.color,
        uniformity=max(0.0, 1.0 - canvas.spread / SPREAD_SCALE),
        spread=canvas.spread,
        coverage=canvas.coverage,
        reference=ref,
    )
