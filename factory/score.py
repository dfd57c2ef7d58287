"""GSG, the green-screen generation quality score (our definition; the paper gives no formula).

1. Subsample the image on a regular grid (at most ``max_pixels`` pixels) and convert to CIELAB.
2. K-Means (scikit-learn, k=3, fixed seed) on those pixels; the canvas colour is the centre of the
   largest cluster (the dominant colour of an object-on-canvas image).
3. ``distance`` = CIE76 colour difference (Euclidean distance in Lab) between the canvas colour
   and the reference green.
4. ``score`` = exp(-(distance / 40)^2 / 2): 1 for the reference, 0.73 at 32 Lab units (a mild
   shadow), 0.14 at 80, near 0 for a non-green canvas. Monotone decreasing in the distance.
5. ``uniformity`` = exp(-sigma / 10), with sigma the mean Lab standard deviation of the canvas
   cluster's pixels: 1 for a flat board, lower for gradients, vignetting and shadows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

REFERENCE_GREEN: tuple[int, int, int] = (0, 255, 0)

SCORE_SCALE = 40.0  # Lab units: the distance at which the score has fallen to exp(-1/2)
UNIFORMITY_SCALE = 10.0


@dataclass(frozen=True)
class GSGResult:
    score: float
    distance: float
    canvas_color: tuple[int, int, int]
    uniformity: float


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) to CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def gsg(
    image: np.ndarray,
    reference: tuple[int, int, int] = REFERENCE_GREEN,
    mask: np.ndarray | None = None,
    max_pixels: int = 4096,
) -> GSGResult:
    """Score how well the canvas kept to the reference green. ``mask`` (H, W) > 0.5 marks background."""
    h, w = image.shape[:2]
    step = max(1, int(np.sqrt(h * w / max_pixels)))
    pixels = image[::step, ::step].reshape(-1, 3)
    if mask is not None:
        keep = np.asarray(mask)[::step, ::step].reshape(-1) > 0.5
        if keep.sum() >= 16:
            pixels = pixels[keep]
    lab = srgb_to_lab(pixels)
    k = min(3, len(np.unique(pixels, axis=0)))
    if k <= 1:
        labels = np.zeros(len(lab), dtype=int)
    else:
        labels = KMeans(n_clusters=k, n_init=1, random_state=0, max_iter=50).fit_predict(lab)
    dominant = np.bincount(labels).argmax()
    members = labels == dominant
    canvas_rgb = np.median(pixels[members], axis=0)
    canvas_lab = lab[members].mean(axis=0)
    distance = float(np.linalg.norm(canvas_lab - srgb_to_lab(np.array(reference))))
    sigma = float(lab[members].std(axis=0).mean())
    return GSGResult(
        score=float(np.exp(-0.5 * (distance / SCORE_SCALE) ** 2)),
        distance=distance,
        canvas_color=tuple(int(round(v)) for v in canvas_rgb),
        uniformity=float(np.exp(-sigma / UNIFORMITY_SCALE)),
    )
