"""Foreground colour: interpolate it from the core, un-mix the board from edge pixels, despill."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from factory.matte.canvas import key_channels
from factory.matte.fill import push_pull
from factory.matte.morphology import depth_at


def interpolate_foreground(image: np.ndarray, core: np.ndarray) -> np.ndarray:
    """The object's colour spread from its core over the rest of the image (float32, 0..255):
    push-pull interpolation, so each band pixel gets the colour of the nearby solid object."""
    if not core.any():
        return image.astype(np.float32)
    return push_pull(image.astype(np.float32), core.astype(np.float32), min_weight=0.5).astype(np.float32)


def refit_foreground(
    image: np.ndarray, plate: np.ndarray, alpha: np.ndarray, core: np.ndarray, min_alpha: float = 0.6
) -> np.ndarray:
    """The object's colour re-estimated from the band itself (float32, 0..255).

    Where a first alpha is at least ``min_alpha``, solving ``I = a F + (1 - a) B`` for F is well
    conditioned, so those pixels tell the colour of the strands themselves (lighter tips, another
    shade than the solid core); they are weighted by ``a^2`` (the weight the compositing equation
    gives them), the core by 1, and push-pull spreads the result over the band, as for
    :func:`interpolate_foreground`. One pass: iterating drifts, since F and alpha trade off."""
    x = image.astype(np.float32)
    weight = np.where(alpha >= min_alpha, alpha * alpha, 0.0).astype(np.float32)
    weight[core] = 1.0
    if not weight.any():
        return x
    # Solved where it has weight (outside, push-pull ignores the value), the core keeps the image.
    solve = (weight > 0) & ~core
    observed = x.copy()
    b = np.asarray(plate, dtype=np.float32)[solve]
    observed[solve] = b + (x[solve] - b) / np.maximum(alpha[solve], 1e-3)[:, None]
    return push_pull(observed, weight, min_weight=0.5).astype(np.float32)


def unmix_foreground(
    image: np.ndarray,
    plate: np.ndarray,
    alpha: np.ndarray,
    fg_guess: np.ndarray,
    solid_from: float = 0.5,
    spill: np.ndarray | None = None,
) -> np.ndarray:
    """Solve ``I = a F + (1 - a) B`` for F with the plate as B (float32, 0..255).

    Dividing by alpha amplifies noise where alpha is small, so the solution is blended with the
    interpolated core colour: fully trusted from ``solid_from`` up, not at all at alpha 0. With
    the rim's ``spill`` ``s`` (the camera saw ``F + s B``), the solution is the colour minus
    ``s B``: the despilled colour, consistent with an alpha un-mixed against ``F + s B``."""
    x = image.astype(np.float32)
    fg = np.where((alpha >= 1.0)[..., None], x, np.asarray(fg_guess, dtype=np.float32))
    mixed = (alpha > 0.0) & (alpha < 1.0)  # alpha 0 keeps the interpolated colour, 1 the image
    a = alpha[mixed].astype(np.float32)[:, None]
    b = np.asarray(plate, dtype=np.float32)[mixed]
    t = np.clip(a / solid_from, 0.0, 1.0)
    solved = b + (x[mixed] - b) / np.maximum(a, 1e-3)
    if spill is not None:
        solved -= spill[mixed][:, None] * b
        spilled_solid = (alpha >= 1.0) & (spill > 0)
        fg[spilled_solid] -= spill[spilled_solid][:, None] * np.asarray(plate, dtype=np.float32)[spilled_solid]
    fg[mixed] = t * solved + (1.0 - t) * fg[mixed]
    return np.clip(fg, 0.0, 255.0)


def ml_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """pymatting's multi-level foreground estimate (float32, 0..255); alpha = 1 keeps the image."""
    from pymatting import estimate_foreground_ml

    f = estimate_foreground_ml(image.astype(np.float64) / 255.0, alpha.astype(np.float64))
    f = np.clip(f * 255.0, 0.0, 255.0).astype(np.float32)
    solid = alpha >= 1.0
    f[solid] = image[solid]
    return f


def despill(
    fg: np.ndarray,
    alpha: np.ndarray,
    key_color: tuple[int, int, int],
    width: float = 6.0,
    strength: float = 1.0,
) -> np.ndarray:
    """Limit the key channel to the larger other channel (``G <= max(R, B)`` for green) near edges.

    Spill is board light on the object's edge, so the correction applies fully on every pixel that
    is not solid (alpha < 1) and fades out over ``width`` px into the solid interior, leaving the
    green parts of an object's inside alone."""
    d, o1, o2 = key_channels(key_color)
    out = fg.astype(np.float32, copy=True)
    excess = np.maximum(out[..., d] - np.maximum(out[..., o1], out[..., o2]), 0.0)
    solid = alpha >= 0.999
    # The depth into the solid object matters only where there is key excess to take away, and
    # only up to ``width``: usually a few pixels of the rim, not worth a whole distance transform.
    ys, xs = np.nonzero(solid & (excess > 0))
    if ys.size > solid.size // 16:
        depth = ndimage.distance_transform_edt(solid)
    else:
        depth = np.zeros(solid.shape)
        depth[solid] = np.inf
        depth[ys, xs] = depth_at(solid, ys, xs, max(width, 0.0))
    weight = strength * np.clip(1.0 - depth / max(width, 1e-6), 0.0, 1.0)
    out[..., d] -= weight * excess
    return out
