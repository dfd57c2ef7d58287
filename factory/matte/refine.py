"""Alpha in the unknown band: un-mixing against the plate, level clipping, optional Laplacian.

With the board colour ``B`` known at every pixel (the plate) and the foreground colour ``F``
interpolated from the object's core, the compositing equation ``I = a F + (1 - a) B`` gives alpha as
the projection of ``I - B`` on ``F - B``. That estimate is only as good as ``F``: where the pixel's
offset from the board does not point the way of ``F - B`` (a different material than the core's),
or ``F`` is too close to the board to divide by, GreenPost falls back to the colour-difference key.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from factory.matte.canvas import dot3, two_direction_fit


def projected_alpha(
    image: np.ndarray,
    plate: np.ndarray,
    fg_guess: np.ndarray,
    key_alpha: np.ndarray,
    sharpness: float = 4.0,
    min_contrast: float = 50.0,
    shading_mix: float = 0.0,
) -> np.ndarray:
    """Blend of the un-mixing estimate and the key, per pixel (float32, clipped to [0, 1]).

    The un-mixing estimate is the projection of ``I - B`` on ``F - B`` (exact if the object's colour
    is ``F``), blended with ``shading_mix`` of :func:`shading_invariant_alpha` (exact if it is
    ``F`` made brighter or darker). The two fail in different ways, so their mean errs less than
    either. Weight of the un-mixing estimate: ``cos^(2 sharpness)`` of the angle between ``I - B``
    and ``F - B``, times ``|F - B|^2 / (|F - B|^2 + min_contrast^2)``."""
    d = fg_guess.astype(np.float32) - plate
    diff = image.astype(np.float32) - plate
    dd = dot3(d, d)
    dot = dot3(diff, d)
    unmixed = np.clip(dot / np.maximum(dd, 1.0), 0.0, 1.0)
    if shading_mix > 0:
        unmixed = (1.0 - shading_mix) * unmixed + shading_mix * shading_invariant_alpha(image, plate, fg_guess, unmixed)
    weight = _weight(dot, dot3(diff, diff), dd, sharpness, min_contrast)
    return np.clip(weight * unmixed + (1.0 - weight) * key_alpha, 0.0, 1.0).astype(np.float32)


def _weight(dot: np.ndarray, diff2: np.ndarray, dd: np.ndarray, sharpness: float, min_contrast: float) -> np.ndarray:
    cos2 = dot * dot / np.maximum(diff2 * dd, 1e-6)
    return cos2**sharpness * (dd / (dd + min_contrast**2))


def unmix_weight(
    image: np.ndarray, plate: np.ndarray, fg_guess: np.ndarray, sharpness: float = 2.0, min_contrast: float = 50.0
) -> np.ndarray:
    """How far :func:`projected_alpha` trusts un-mixing over the fallback key, per pixel (float32 in
    [0, 1]): ``cos^(2 sharpness)`` of the angle between ``I - B`` and ``F - B`` times
    ``|F - B|^2 / (|F - B|^2 + min_contrast^2)``. Low where the pixel's colour is off the line from
    the board to the object's colour (spill, another material) or the two colours are close."""
    d = np.asarray(fg_guess, dtype=np.float32) - plate
    diff = np.asarray(image, dtype=np.float32) - plate
    return _weight(dot3(diff, d), dot3(diff, diff), dot3(d, d), sharpness, min_contrast).astype(np.float32)


def two_colour_fit(
    image: np.ndarray, fg_guess: np.ndarray, plate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares ``I = u F + v B`` per pixel (float32 ``u``, ``v`` and the conditioning).

    Three equations (RGB), two unknowns. The conditioning is ``sin^2`` of the angle between ``F``
    and ``B`` in RGB: near 0 the two colours point the same way and ``u``, ``v`` are unreliable.
    Read with ``F`` exact, ``u = a k`` and ``v = 1 - a`` (a strand lit more or less than the core);
    read with ``F`` exact and the board darkened by ``s``, ``u = a`` and ``v = (1 - a) s``."""
    return two_direction_fit(image.astype(np.float32), fg_guess.astype(np.float32), plate.astype(np.float32))


def shading_invariant_alpha(
    image: np.ndarray, plate: np.ndarray, fg_guess: np.ndarray, fallback: np.ndarray, min_sin2: float = 0.05
) -> np.ndarray:
    """Alpha when the object's colour is ``k F`` for an unknown brightness ``k`` (float32 in [0, 1]).

    ``I = a k F + (1 - a) B`` is linear in ``u = a k`` and ``v = 1 - a`` (:func:`two_colour_fit`);
    ``a = 1 - v``. A strand lit more or less than the core it was interpolated from (highlights,
    self-shadow) keeps ``F``'s chromaticity but not its brightness, which the projection on
    ``F - B`` mistakes for more or less coverage. Where ``F`` and ``B`` point nearly the same way in
    RGB (``sin^2`` of their angle below ``min_sin2``), the system is ill-conditioned and
    ``fallback`` is blended in."""
    _, board_share, sin2 = two_colour_fit(image, fg_guess, plate)
    alpha = np.clip(1.0 - board_share, 0.0, 1.0)
    trust = np.clip(sin2 / min_sin2, 0.0, 1.0)
    return (trust * alpha + (1.0 - trust) * fallback).astype(np.float32)


def clip_levels(alpha: np.ndarray, black: float, white: float) -> np.ndarray:
    """Stretch ``[black, white]`` to ``[0, 1]``: the residual noise on the board and the slight
    under-estimate on the solid edge (blur, spill, JPEG) go to exact 0 and 1 (a keyer's clip
    black / clip white)."""
    if white <= black:
        raise ValueError("clip white must be above clip black")
    return np.clip((alpha - black) / (white - black), 0.0, 1.0).astype(np.float32)


def _crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    h, w = mask.shape
    return (
        slice(max(0, rows[0] - margin), min(h, rows[-1] + margin + 1)),
        slice(max(0, cols[0] - margin), min(w, cols[-1] + margin + 1)),
    )


def laplacian_refine(
    image: np.ndarray,
    prior: np.ndarray,
    prior_weight: float,
    epsilon: float = 1e-6,
    radius: int = 1,
    rtol: float = 1e-4,
    maxiter: int = 500,
) -> np.ndarray:
    """Regularise the fractional part of ``prior`` with the closed-form matting Laplacian:

        min_a  a^T L a + prior_weight * |a - prior|^2   on pixels with 0 < prior < 1,

    the others fixed. Local colour-line models smooth noise along the object's colours without
    blurring across edges. Only the bounding box of the band is built and solved (pymatting's
    Laplacian and its incomplete-Cholesky-preconditioned conjugate gradient)."""
    from pymatting import cf_laplacian, cg, ichol

    unknown = (prior > 0.0) & (prior < 1.0)
    box = _crop_box(unknown, margin=2 * radius + 1)
    if box is None or prior_weight <= 0:
        return prior.astype(np.float32)
    known = ~unknown[box]
    kn, unk = known.ravel(), ~known.ravel()
    lap = cf_laplacian(image[box].astype(np.float64) / 255.0, epsilon=epsilon, radius=radius, is_known=known)
    p = prior[box].astype(np.float64).ravel()
    lap_u = lap[unk][:, unk]
    a = (lap_u + scipy.sparse.identity(lap_u.shape[0], format="csr") * prior_weight).tocsr()
    rhs = -lap[unk][:, kn] @ p[kn] + prior_weight * p[unk]
    x = cg(a, rhs, x0=p[unk], M=ichol(a), rtol=rtol, maxiter=maxiter)
    out = prior.astype(np.float64).copy()
    sub = out[box].ravel()
    sub[unk] = x
    out[box] = sub.reshape(out[box].shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
