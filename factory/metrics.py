"""Matting metrics with the Composition-1k definitions (Deep Image Matting's MATLAB evaluation code).

Written from the definitions of ``compute_sad_loss.m``, ``compute_mse_loss.m``,
``compute_gradient_loss.m`` (with ``gaussgradient.m``) and ``compute_connectivity_error.m``:

- **SAD**: ``sum(|pred - gt|)`` over the evaluation region, divided by 1000.
- **MSE**: ``sum((pred - gt)^2) / n`` over the region's ``n`` pixels (not scaled).
- **Grad**: both mattes min-max normalised over the whole image (MATLAB ``mat2gray``), filtered with
  a first-order Gaussian-derivative kernel (sigma 1.4, half size 4, normalised to unit L2 norm,
  replicate border); ``sum((|grad pred| - |grad gt|)^2)`` over the region, divided by 1000.
- **Conn**: for thresholds 0.1, 0.2, ..., 1.0 the largest 4-connected component of
  ``(pred >= t) & (gt >= t)`` over the whole image; a pixel's level ``l`` is the previous threshold
  at the first ``t`` where it falls outside that component (1 if never);
  ``phi = 1 - d * [d >= 0.15]`` with ``d = alpha - l``; ``sum(|phi_pred - phi_gt|)`` over the
  region, divided by 1000.

Mattes are float arrays in [0, 1] (``uint8`` and ``uint16`` arrays are divided by 255 / 65535). The
evaluation region is the trimap's unknown band: pixels that are neither 0 nor the top value (128 in
the usual 0/128/255 trimaps; strictly between 0 and 1 for float trimaps). Without a trimap the region
is the whole image. ``whole_image_sad`` and ``mad`` always use every pixel.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from factory.errors import InputError

GRAD_SIGMA = 1.4
CONN_STEP = 0.1
CONN_THETA = 0.15
# 8-bit values exactly on a threshold (51/255 == 0.2) must count as reaching it, as in MATLAB.
_THRESH_TOL = 1e-6


def as_matte(x: np.ndarray, name: str = "matte") -> np.ndarray:
    """Return ``x`` as a float64 matte in [0, 1]; integer arrays are scaled by their type's range."""
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., 0]
    if a.ndim != 2:
        raise InputError(f"{name}: expected a 2-D matte, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise InputError(f"{name}: matte has NaN or infinite values")
    return np.clip(a, 0.0, 1.0)


def unknown_region(trimap: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the evaluation region: the trimap's unknown band, or everything."""
    if trimap is None:
        return np.ones(shape, dtype=bool)
    t = np.asarray(trimap)
    if t.ndim == 3:
        t = t[..., 0]
    if t.shape != tuple(shape):
        raise InputError(f"trimap shape {t.shape} does not match the matte's {tuple(shape)}")
    if t.dtype == np.uint8:
        return (t != 0) & (t != 255)
    if t.dtype == np.uint16:
        return (t != 0) & (t != 65535)
    t = t.astype(np.float64)
    return (t > 0.0) & (t < 1.0)


def _prepare(
    pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, g = as_matte(pred, "prediction"), as_matte(gt, "ground truth")
    if p.shape != g.shape:
        raise InputError(f"prediction shape {p.shape} does not match ground truth {g.shape}")
    return p, g, unknown_region(trimap, p.shape)


@lru_cache(maxsize=4)
def _gauss_derivative_kernel(sigma: float) -> np.ndarray:
    """``gaussgradient.m``'s x kernel: gauss(row) * dgauss(col), unit L2 norm (9x9 for sigma 1.4)."""
    eps = 1e-2
    half = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(np.sqrt(2.0 * np.pi) * sigma * eps))))
    u = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-(u**2) / (2.0 * sigma**2)) / (sigma * np.sqrt(2.0 * np.pi))
    dgauss = -u * gauss / sigma**2
    hx = np.outer(gauss, dgauss)
    return hx / np.sqrt((hx**2).sum())


def _mat2gray(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:  # a constant matte has no gradient whatever its scaling
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def gradient_magnitude(a: np.ndarray, sigma: float = GRAD_SIGMA) -> np.ndarray:
    """Gaussian-derivative gradient magnitude of a min-max normalised matte."""
    hx = _gauss_derivative_kernel(float(sigma))
    g = _mat2gray(a)
    gx = ndimage.convolve(g, hx, mode="nearest")
    gy = ndimage.convolve(g, hx.T, mode="nearest")
    return np.sqrt(gx**2 + gy**2)


_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component; ties go to the first in column-major order, as with
    MATLAB's ``bwconncomp`` and ``max`` (hence labelling the transpose)."""
    labels, n = ndimage.label(mask.T, structure=_FOUR_CONNECTED)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == int(np.argmax(sizes))).T


def connectivity_levels(pred: np.ndarray, gt: np.ndarray, step: float = CONN_STEP) -> np.ndarray:
    """The level map ``l``: the threshold before the first one at which a pixel is outside the
    largest 4-connected component of both mattes thresholded; 1 where that never happens."""
    n_steps = int(round(1.0 / step))
    level = np.full(pred.shape, -1.0)
    for k in range(1, n_steps + 1):
        t = k * step
        omega = _largest_component((pred >= t - _THRESH_TOL) & (gt >= t - _THRESH_TOL))
        level[(level == -1.0) & ~omega] = (k - 1) * step
    level[level == -1.0] = 1.0
    return level


def _sad(p: np.ndarray, g: np.ndarray, region: np.ndarray) -> float:
    return float(np.abs(p - g)[region].sum() / 1000.0)


def _mse(p: np.ndarray, g: np.ndarray, region: np.ndarray) -> float:
    n = int(region.sum())
    return float(((p - g) ** 2)[region].sum() / n) if n else 0.0


def _grad(p: np.ndarray, g: np.ndarray, region: np.ndarray, sigma: float = GRAD_SIGMA) -> float:
    diff = (gradient_magnitude(p, sigma) - gradient_magnitude(g, sigma)) ** 2
    return float(diff[region].sum() / 1000.0)


def _conn(
    p: np.ndarray, g: np.ndarray, region: np.ndarray, step: float = CONN_STEP, theta: float = CONN_THETA
) -> float:
    level = connectivity_levels(p, g, step)
    d_p, d_g = p - level, g - level
    phi_p = 1.0 - d_p * (d_p >= theta)
    phi_g = 1.0 - d_g * (d_g >= theta)
    return float(np.abs(phi_p - phi_g)[region].sum() / 1000.0)


def sad(pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray | None = None) -> float:
    """Sum of absolute differences over the region, divided by 1000."""
    return _sad(*_prepare(pred, gt, trimap))


def mse(pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray | None = None) -> float:
    """Mean squared error over the region's pixels (0 for an empty region)."""
    return _mse(*_prepare(pred, gt, trimap))


def grad(pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray | None = None, sigma: float = GRAD_SIGMA) -> float:
    """Gradient error: squared difference of gradient magnitudes over the region, divided by 1000."""
    return _grad(*_prepare(pred, gt, trimap), sigma=sigma)


def conn(
    pred: np.ndarray,
    gt: np.ndarray,
    trimap: np.ndarray | None = None,
    step: float = CONN_STEP,
    theta: float = CONN_THETA,
) -> float:
    """Connectivity error over the region, divided by 1000."""
    return _conn(*_prepare(pred, gt, trimap), step=step, theta=theta)


def whole_image_sad(pred: np.ndarray, gt: np.ndarray) -> float:
    """SAD over every pixel, divided by 1000."""
    return sad(pred, gt, None)


def mad(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute difference over every pixel."""
    p, g, _ = _prepare(pred, gt, None)
    return float(np.abs(p - g).mean())


METRIC_NAMES = ("sad", "mse", "grad", "conn", "sad_whole", "mad")


def evaluate_pair(pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray | None = None) -> dict[str, float]:
    """All metrics for one prediction. ``sad``/``mse``/``grad``/``conn`` use the trimap's unknown
    region (the whole image without a trimap); ``sad_whole`` and ``mad`` always use every pixel."""
    p, g, region = _prepare(pred, gt, trimap)
    everywhere = np.ones_like(region)
    return {
        "sad": _sad(p, g, region),
        "mse": _mse(p, g, region),
        "grad": _grad(p, g, region),
        "conn": _conn(p, g, region),
        "sad_whole": _sad(p, g, everywhere),
        "mad": float(np.abs(p - g).mean()),
    }
