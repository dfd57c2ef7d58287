"""Spill versus coverage (factory.matte.spill) and the noise-adaptive clip black, on fixtures made in
code: green rim spill must not be read as transparency, a truly soft edge must stay soft, and an
object of the board's own hue is counted as ambiguous."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from matte_fixtures import BOARD_GREEN, composite, shaded_board, soft_disc
from scipy import ndimage

from factory.matte import GreenPostSettings, greenpost
from factory.matte.pipeline import _clip_black
from factory.matte.spill import spill_field, spill_fit, spilled_colour

RED = (190, 60, 50)
DARK = (70, 50, 40)  # a dark rim: spill on it keys as partly board, so it falls out of the solid core
NO_SPILL_MODEL = GreenPostSettings(spill_block=None)


def rim_spilled(alpha: np.ndarray, color, board: np.ndarray, strength: float = 0.45, width: float = 3.0, noise: float = 1.0):
    """``a (F + s B) + (1 - a) B``: board light added to the object's colour, ``s`` = ``strength``
    next to the board (where alpha falls below 1/2), fading as ``exp(-d / width)`` into the object."""
    depth = ndimage.distance_transform_edt(alpha >= 0.5)
    s = strength * np.exp(-depth / width)[..., None] * (alpha > 0)[..., None]
    return composite(alpha, np.minimum(np.asarray(color, np.float64) + s * board, 255.0), board, noise=noise)


def test_spill_fit_recovers_coverage_and_spill() -> None:
    f, b = np.array([[190.0, 60, 50]]), np.array([[40.0, 190, 60]])
    for a, s in ((1.0, 0.4), (0.5, 0.3), (0.7, 0.0)):
        image = a * (f + s * b) + (1 - a) * b
        p, q, sin2 = spill_fit(image, f, b)
        assert abs(p[0] - a) < 1e-3 and abs(q[0] - a * s) < 1e-3 and sin2[0] > 0.5


def test_opaque_rim_with_green_spill_stays_opaque() -> None:
    alpha = soft_disc(radius=34, softness=3)
    board = shaded_board(alpha)
    image = rim_spilled(alpha, DARK, board)
    rim = (alpha >= 1.0) & (ndimage.distance_transform_edt(alpha >= 1.0) <= 3)  # opaque, spilled
    new = greenpost(image).alpha
    old = greenpost(image, settings=NO_SPILL_MODEL).alpha
    assert new[rim].mean() > 0.965
    assert old[rim].mean() < new[rim].mean() - 0.01  # the old path read more of the spill as transparency
    edge = (alpha > 0.05) & (alpha < 0.95)
    assert np.abs(new - alpha)[edge].mean() < np.abs(old - alpha)[edge].mean()


def test_despilled_foreground_is_the_object_colour() -> None:
    alpha = soft_disc(radius=34, softness=3)
    board = shaded_board(alpha)
    result = greenpost(rim_spilled(alpha, DARK, board))
    rim = (alpha >= 0.5) & (ndimage.distance_transform_edt(alpha >= 0.5) <= 3)
    err = np.abs(result.fg[rim].astype(np.float64) - np.asarray(DARK)).mean()
    assert err < 18.0  # the board light is taken out of the written colour (spill 0.45 x B is ~60 levels)


def test_soft_edge_without_spill_keeps_its_fractional_alpha() -> None:
    alpha = soft_disc(radius=30, softness=14)  # a wide, truly semi-transparent ramp
    board = shaded_board(alpha)
    image = composite(alpha, RED, board)
    result = greenpost(image)
    ramp = (alpha > 0.15) & (alpha < 0.85)
    error = np.abs(result.alpha - alpha)[ramp].mean()
    assert error < 0.07
    assert error < np.abs(greenpost(image, settings=NO_SPILL_MODEL).alpha - alpha)[ramp].mean() + 0.01
    assert result.alpha[ramp].max() < 0.97  # not pushed to opaque
    assert result.spill is not None and float(result.spill[ramp].mean()) < 0.1  # little spill found where none is


def test_green_ish_object_is_ambiguous() -> None:
    alpha = soft_disc(radius=30, softness=6)
    board = shaded_board(alpha)
    dark_green = 0.55 * np.asarray((40, 190, 60), np.float64)  # the board's own hue, darker
    image = composite(alpha, dark_green, board, noise=0.0)
    fg = np.broadcast_to(dark_green, board.shape).astype(np.float32)
    band = (alpha > 0.3) & (alpha < 0.99)
    field = spill_field(image, board.astype(np.float32), fg, band)
    assert field.ambiguous[band].mean() > 0.9
    red_image = composite(alpha, RED, board, noise=0.0)
    red = spill_field(red_image, board.astype(np.float32), np.broadcast_to(np.asarray(RED, np.float32), board.shape), band)
    assert not red.ambiguous.any()
    assert float(red.strength.max()) < 0.02  # no spill in a clean composite


def test_spilled_colour_adds_board_light() -> None:
    f = np.full((2, 2, 3), 100.0, np.float32)
    b = np.full((2, 2, 3), (40.0, 200.0, 60.0), np.float32)
    out = spilled_colour(f, b, np.array([[0.0, 0.5], [1.0, 0.25]], np.float32))
    assert np.allclose(out[0, 1], (120, 200, 130)) and np.allclose(out[0, 0], 100) and out.max() <= 255


def _faint_strands(noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A solid disc with faint straight strands (alpha 0.06) reaching out from it."""
    alpha = soft_disc(size=128, radius=24, softness=3)
    for x in (20, 40, 88, 108):
        alpha[10:118, x] = np.maximum(alpha[10:118, x], 0.06)
    board = shaded_board(alpha, gradient=0.1, vignette=0.1, shadow=0.0)
    return composite(alpha, (60, 40, 30), board, noise=noise, seed=3), alpha, board


def test_adaptive_clip_keeps_faint_strands_on_a_clean_board() -> None:
    image, alpha, board = _faint_strands(noise=0.0)
    strand = (alpha > 0.05) & (alpha < 0.1)
    adaptive = greenpost(image).alpha
    assert adaptive[strand].mean() > 0.025 and (adaptive[strand] > 0).mean() > 0.95  # the strands are kept


def test_adaptive_clip_level_follows_the_board_noise() -> None:
    levels = {}
    for noise in (0.0, 3.0):
        image, alpha, board = _faint_strands(noise)
        is_board = alpha == 0
        levels[noise] = _clip_black(image, board.astype(np.float32), is_board, (40, 190, 60), GreenPostSettings())
    assert levels[0.0] < 0.012  # a noise-free board: little over the floor 0.004 (the plate's fit error)
    assert levels[3.0] > 0.02 and levels[3.0] <= 0.03  # a noisy board is clipped harder, at most clip_black
    image, alpha, _ = _faint_strands(noise=3.0)
    bare = ndimage.distance_transform_edt(alpha == 0) > 4
    speckle = (greenpost(image).alpha[bare] > 0).mean()
    low = (greenpost(image, settings=GreenPostSettings(adaptive_clip=False, clip_black=0.01)).alpha[bare] > 0).mean()
    assert speckle < low - 0.1  # its noise is cleaned off the board more than a clean board's level would


def _spilled_hair_mass(size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A solid light-brown core inside a wide mass of fine radial strands (alpha 0.12-0.5, no board
    showing between them), every strand lit by the board: F + 0.4 B."""
    yy, xx = np.mgrid[:size, :size]
    r, ang = np.hypot(yy - size / 2, xx - size / 2), np.arctan2(yy - size / 2, xx - size / 2)
    mass = np.clip((62 - r) / 2, 0, 1) * (0.12 + 0.38 * (0.5 + 0.5 * np.cos(40 * ang)))
    alpha = np.maximum(soft_disc(size, radius=28, softness=2), mass)
    board = shaded_board(alpha)
    seen = np.minimum(np.asarray((170.0, 120.0, 80.0)) + 0.4 * (alpha < 0.5)[..., None] * board, 255.0)
    noise = np.random.default_rng(0).normal(0, 1, board.shape)
    image = alpha[..., None] * seen + (1 - alpha[..., None]) * board + noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), alpha


def test_spilled_strands_are_not_taken_for_a_key_colour() -> None:
    """Board light on strands makes them greener than any mix of the board and the hair's colour;
    without the spill model the key-colour flag fires on the hair mass (and the filter would drop
    the sample), with it the strands are explained as the spilled colour, and alpha is closer."""
    image, alpha = _spilled_hair_mass()
    with_spill = greenpost(image)
    without = greenpost(image, settings=replace(GreenPostSettings(), spill_block=None))
    assert without.contains_key_color and without.key_colored_fraction > 0.05
    assert not with_spill.contains_key_color and with_spill.key_colored_fraction == 0.0
    assert np.abs(with_spill.alpha - alpha).sum() < 0.85 * np.abs(without.alpha - alpha).sum()


def test_spill_is_plausible_only_near_the_board() -> None:
    """near_board: 1 within the reach of a pixel showing the board, falling off beyond it."""
    size = 96
    band = np.ones((size, size), bool)
    background = np.zeros((size, size), bool)
    background[:, :4] = True
    image = np.full((size, size, 3), 120, np.uint8)
    plate = np.broadcast_to(np.asarray(BOARD_GREEN, np.float32), (size, size, 3))
    fg = np.full((size, size, 3), 120.0, np.float32)
    near = spill_field(image, plate, fg, band, block=4, background=background, reach=16.0, falloff=3.0).near_board
    assert near[:, :16].min() == pytest.approx(1.0)
    assert near[:, 60:].max() < 0.01
    assert (np.diff(near[0, 16:60]) <= 1e-6).all()  # fades with distance
