"""Spill versus coverage: green light on the object's rim told apart from transparency.

Board light reflected by the object's edge adds the board's colour to the foreground: near the board
the object's colour is ``F + s B`` rather than ``F``, with ``s >= 0`` strongest next to the board and
fading into the object. At a single pixel that looks exactly like lower coverage (both move the
colour towards the board), so un-mixing with the core's colour ``F`` reads spill as transparency:
alpha too low on rims and strands that are truly opaque or nearly so.

Two things tell them apart when seen over a region. With ``F`` known, the compositing equation with
spill, ``I - B = a (F - B) + a s B``, is linear in ``a`` and ``a s``; least squares over R, G, B
(:func:`factory.matte.refine.two_colour_fit`, ``I = u F + v B``, read as ``u = a`` and
``v = 1 - a + a s``) gives the spill ``s = (u + v - 1) / u`` wherever ``F - B`` and ``B`` point
different ways. And spill is smooth along the rim: the per-pixel estimates are pooled per tile,
weighted by how well they are determined, filled and smoothed, so one strand lit more brightly than
the core (which the fit reads the same way) does not make its own spill. The band is then un-mixed
against the spilled colour ``F + s B`` (the compositing equation with the foreground the camera
saw), and the written foreground is that colour without the spill.

Where ``F - B`` is nearly parallel to ``B`` (a green-ish object on green), spill and coverage cannot
be told apart; those pixels are counted (``ambiguous``), and the matte confidence reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from factory.matte.canvas import dot3, two_direction_fit
from factory.matte.fill import push_pull, tile_sums_at, tiles_at


@dataclass
class SpillField:
    strength: np.ndarray  # float32 (H, W): the spill s >= 0, the share of board light in the object's colour
    ambiguous: np.ndarray  # bool (H, W): band pixels where spill and coverage cannot be told apart
    near_board: np.ndarray  # float32 (H, W): how plausible spill is at the pixel's distance from the board, 0..1


def spill_fit(
    image: np.ndarray, fg_guess: np.ndarray, plate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares ``I - B = p (F - B) + q B`` per pixel: (p, q, conditioning), float32.

    ``p`` is the coverage ``a`` and ``q`` is ``a s``. The conditioning is ``sin^2`` of the angle
    between ``F - B`` and ``B``: near 0 (an object of the board's hue, lighter or darker) the two
    directions cannot be told apart."""
    x = np.asarray(image, dtype=np.float32)
    b = np.asarray(plate, dtype=np.float32)
    return two_direction_fit(x - b, np.asarray(fg_guess, dtype=np.float32) - b, b)


def spill_field(
    image: np.ndarray,
    plate: np.ndarray,
    fg_guess: np.ndarray,
    band: np.ndarray,
    block: int = 8,
    min_coverage: float = 0.3,
    min_sin2: float = 0.1,
    max_spill: float = 0.8,
    min_share: float = 0.1,
    smooth: float = 1.0,
    min_offset: float = 10.0,
    background: np.ndarray | None = None,
    reach: float = 16.0,
    falloff: float = 3.0,
) -> SpillField:
    """The spill ``s`` behind every pixel (0 away from the band), from the band's pixels.

    A band pixel gives an estimate ``q / p`` where it is covered enough for it to be measured
    (``p >= min_coverage``: ``s`` is ``q`` over the coverage, noise over a small one) and the fit
    is conditioned (``sin^2 >= min_sin2``); estimates are clipped to ``[0, max_spill]`` (spill adds
    light: a negative one is a darker strand, not spill) and pooled per ``block`` tile with weight
    ``p^2 sin^2``. Tiles with pooled weight below ``min_share`` of their pixels are filled by
    push-pull from those around, then smoothed by ``smooth`` tiles. Band pixels at least
    ``min_offset`` (RGB) off the board where the fit is not conditioned are ``ambiguous``.

    Spill is board light, so it lives next to the board: with the ``background`` (the pixels
    showing the board), ``near_board`` is 1 up to ``reach`` px from it and ``exp(-(d - reach) /
    falloff)`` beyond, per tile. The key-colour flag accepts spill as the explanation of a green
    pixel only that far: a green disc inside a ring, far from the board, is the object's colour.
    (Alpha uses the spill in full: dense hair lit by the board shows little board between its
    strands, and limiting its spill there cost accuracy.)

    Only the band's pixels are computed (it is a fifth of a typical image)."""
    strength = np.zeros(band.shape, dtype=np.float32)
    ambiguous = np.zeros(band.shape, dtype=bool)
    near = np.ones(band.shape, dtype=np.float32)
    ys, xs = np.nonzero(band)
    if ys.size == 0:
        return SpillField(strength=strength, ambiguous=ambiguous, near_board=near)
    x = np.asarray(image, dtype=np.float32)[ys, xs]
    b = np.asarray(plate, dtype=np.float32)[ys, xs]
    p, q, sin2 = spill_fit(x, np.asarray(fg_guess, dtype=np.float32)[ys, xs], b)
    usable = (p >= min_coverage) & (sin2 >= min_sin2)
    s_hat = np.clip(q / np.maximum(p, 1e-3), 0.0, max_spill)
    weight = np.where(usable, p * p * np.minimum(sin2 / 0.5, 1.0), 0.0)
    if weight.sum() > 0:
        num, den = tile_sums_at(s_hat[:, None], weight, ys, xs, block, band.shape)
        grid = num / np.maximum(den, 1e-6)[..., None]
        grid = push_pull(grid, np.clip(den / (block * block * min_share), 0.0, 1.0), min_weight=1.0)
        if smooth > 0:
            grid = ndimage.gaussian_filter(grid, (smooth, smooth, 0.0), mode="nearest")
        strength[ys, xs] = np.clip(tiles_at(grid, block, band.shape, ys, xs)[:, 0], 0.0, max_spill)
    if background is not None:
        near[ys, xs] = tiles_at(_near_board(background, block, reach, falloff)[..., None], block, band.shape, ys, xs)[:, 0]
    # Where the fit is ill-conditioned its coverage is noise too: any pixel off the board counts.
    off_board = dot3(x - b, x - b) >= min_offset**2
    ambiguous[ys, xs] = off_board & (sin2 < min_sin2)
    return SpillField(strength=strength, ambiguous=ambiguous, near_board=near)


def _near_board(background: np.ndarray, block: int, reach: float, falloff: float) -> np.ndarray:
    """Per ``block`` tile, the share of spill kept at its distance ``d`` (px, tile centre to tile
    centre) from the nearest tile showing the board: 1 up to ``reach``, then ``exp(-(d - reach) /
    falloff)``. Measured on the tile grid: the spill is pooled per tile anyway, and a transform of
    the grid costs nothing beside one of the image."""
    h, w = background.shape
    ph, pw = -h % block, -w % block
    padded = np.pad(np.asarray(background, dtype=bool), ((0, ph), (0, pw)))
    tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block).any(axis=(1, 3))
    if not tiles.any():
        return np.zeros(tiles.shape, dtype=np.float64)
    d = ndimage.distance_transform_edt(~tiles) * block
    return np.minimum(np.exp(-(d - reach) / max(falloff, 1e-6)), 1.0)


def spilled_colour(fg_guess: np.ndarray, plate: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """The object's colour as the camera saw it near the board: ``F + s B`` (float32, 0..255)."""
    out = np.asarray(fg_guess, dtype=np.float32) + strength[..., None] * np.asarray(plate, dtype=np.float32)
    return np.clip(out, 0.0, 255.0)
