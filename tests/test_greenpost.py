"""GreenPost on fixtures with known alpha: soft edges and strands on a shaded board, spill-free
foreground, the key-colour flag, the coarse alpha, input checks, the two tests that keep mixed
pixels of non-green objects from being taken for solid (board mix ratio, object-hue key), and the
second plate (faint hair taken off the board, the shadow hidden behind the band)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy import ndimage
from matte_fixtures import BOARD_GREEN, composite, flat, ring_with_disc, shaded_board, soft_disc, strands, textured_blob

from factory.errors import InputError
from factory.matte import GreenPostSettings, MatteResult, greenpost
from factory.matte.canvas import background_plate, board_without_object, estimate_canvas_color, key_excess
from factory.matte.key import color_difference_key, hsv_threshold_key, local_difference_key, object_hue_key
from factory.matte.refine import projected_alpha, shading_invariant_alpha
from factory.matte.shadow import hidden_shadow
from factory.matte.trimap import _disc_offsets, board_mix_ratio, deeper_than
from factory.metrics import evaluate_pair


def sad_whole(alpha: np.ndarray, truth: np.ndarray) -> float:
    return evaluate_pair(alpha, truth)["sad_whole"]


@pytest.fixture(scope="module")
def hair() -> tuple[np.ndarray, np.ndarray]:
    alpha = strands(seed=1)
    return composite(alpha, (200, 80, 45), shaded_board(alpha)), alpha  # red-brown hair


@pytest.fixture(scope="module")
def disc() -> tuple[np.ndarray, np.ndarray]:
    alpha = soft_disc()
    return composite(alpha, (150, 150, 150), shaded_board(alpha)), alpha


def test_result_types(disc) -> None:
    image, _ = disc
    r = greenpost(image)
    assert isinstance(r, MatteResult)
    assert r.alpha.dtype == np.float32 and r.alpha.shape == image.shape[:2]
    assert r.fg.dtype == np.uint8 and r.fg.shape == image.shape
    assert 0.0 <= r.alpha.min() and r.alpha.max() <= 1.0
    assert 0.0 < r.unknown_fraction < 0.5
    assert set(r.timings) >= {"canvas", "alpha", "foreground"}


def test_hair_strands_far_better_than_plain_keys(hair) -> None:
    image, truth = hair
    key = estimate_canvas_color(image).color
    ours = sad_whole(greenpost(image).alpha, truth)
    color_difference = sad_whole(color_difference_key(image, key), truth)
    hsv = sad_whole(hsv_threshold_key(image, key), truth)
    # About 1.5 px of strands in 128 px rows: their total alpha is ~1.5 (SAD units of 1000 px).
    assert ours < 0.15
    assert ours < 0.25 * color_difference
    assert ours < 0.5 * hsv
    fractional = (truth > 0.05) & (truth < 0.95)
    assert np.abs(greenpost(image).alpha - truth)[fractional].mean() < 0.12


def test_soft_edge_is_recovered(disc) -> None:
    image, truth = disc
    alpha = greenpost(image).alpha
    assert evaluate_pair(alpha, truth)["mad"] < 0.01
    ramp = (truth > 0.1) & (truth < 0.9)
    assert np.abs(alpha - truth)[ramp].mean() < 0.1
    # The board's shadow right next to the disc must not come out as foreground.
    assert alpha[truth == 0].max() < 0.2


def test_plate_follows_gradient_vignette_and_shadow(disc) -> None:
    image, truth = disc
    key = estimate_canvas_color(image).color
    plate = background_plate(image, key)
    board = shaded_board(truth)
    visible = truth == 0
    assert np.abs(plate - board).mean(axis=-1)[visible].mean() < 4.0
    # A flat key colour would be off by far more on this board.
    assert np.abs(np.asarray(key) - board).mean(axis=-1)[visible].mean() > 8.0


def test_foreground_has_no_green_fringe(hair) -> None:
    image, truth = hair
    r = greenpost(image)
    edge = (truth > 0.1) & (truth < 0.9)
    green = lambda x: np.maximum(key_excess(x, BOARD_GREEN), 0)[edge].mean()  # noqa: E731
    assert green(image) > 20  # the raw edge pixels are green
    assert green(r.fg) < 2
    # ... and the recovered colour is the hair's, not grey or green.
    assert np.abs(r.fg[edge & (truth > 0.5)].astype(float) - (200, 80, 45)).mean() < 25


def test_key_colored_object_is_flagged() -> None:
    alpha = soft_disc()
    board = shaded_board(alpha)
    leaf = greenpost(composite(alpha, (120, 200, 40), board))  # a yellow-green object
    brick = greenpost(composite(alpha, (190, 70, 50), board))
    assert leaf.contains_key_color and leaf.key_colored_fraction > 0.05
    assert not brick.contains_key_color


@pytest.mark.parametrize("inner", [(120, 200, 30), (20, 120, 40), (20, 240, 20)])
def test_key_colored_disc_inside_a_ring_is_flagged_where_it_is(inner) -> None:
    """The issue's fixtures: a red ring on pure green with an opaque inner disc of a green (the last
    one's chroma points exactly the board's way). The matte makes the disc (partly) transparent; the
    flag fires, with the fraction and the region: the disc."""
    image, disc = ring_with_disc(inner)
    r = greenpost(image)
    assert r.contains_key_color
    assert r.key_colored is not None and r.key_colored.shape == disc.shape
    assert r.key_colored_fraction == pytest.approx(r.key_colored.mean())
    assert r.key_colored[disc].mean() > 0.8  # the disc is found ...
    assert not r.key_colored[~ndimage.binary_dilation(disc, np.ones((3, 3)), iterations=3)].any()  # ... and nothing else


def test_a_hole_that_shows_the_board_is_not_key_colored() -> None:
    for board in (None, shaded_board(soft_disc(160, radius=52))):
        r = greenpost(ring_with_disc(None, board=board)[0])
        assert not r.contains_key_color and r.key_colored_fraction == 0.0


@pytest.mark.parametrize("kind", ["hair", "foliage"])
def test_green_tinted_but_not_key_colored_objects_are_not_flagged(kind) -> None:
    """Olive hair and foliage are greenish (G above R and B) but keyed as opaque: not the hard case."""
    if kind == "hair":
        alpha = strands(size=160, n=18, seed=2)
        image = composite(alpha, (120, 135, 80), shaded_board(alpha))
    else:
        image, _ = textured_blob((95, 115, 70))
    r = greenpost(image)
    assert not r.contains_key_color and r.key_colored_fraction < 0.002


@pytest.mark.parametrize("color", [(200, 30, 30), (128, 128, 128)])
def test_an_image_without_a_green_board_is_reported(color) -> None:
    r = greenpost(flat(color))
    assert r.no_board and not r.contains_key_color
    assert not r.alpha.any() and np.array_equal(r.fg, flat(color))
    assert not greenpost(composite(soft_disc(), (190, 70, 50), shaded_board(soft_disc()))).no_board


def test_the_no_board_report_says_why() -> None:
    red = greenpost(flat((200, 30, 30)))
    assert red.no_board_reason == "the image's main colour #c81e1e is not a green"
    given = greenpost(flat((200, 30, 30)), settings=GreenPostSettings(key_color=(0, 255, 0)))
    assert given.no_board and given.no_board_reason.startswith("only 0.0 % of the image is board")
    assert greenpost(composite(soft_disc(), (190, 70, 50), shaded_board(soft_disc()))).no_board_reason == ""


def test_coarse_alpha_keeps_a_green_object_solid() -> None:
    alpha = soft_disc()
    image = composite(alpha, (120, 200, 40), shaded_board(alpha))
    without = greenpost(image).alpha
    with_coarse = greenpost(image, coarse_alpha=alpha).alpha
    inside = alpha >= 1.0
    assert with_coarse[inside].mean() > 0.93
    assert with_coarse[inside].mean() > without[inside].mean() + 0.03
    assert greenpost(image, coarse_alpha=(alpha * 255).astype(np.uint8)).alpha[inside].mean() > 0.93


def test_given_key_color_skips_the_estimate(disc) -> None:
    image, _ = disc
    r = greenpost(image, settings=GreenPostSettings(key_color=(10, 200, 30)))
    assert r.canvas_color == (10, 200, 30)


def test_pure_and_picklable(disc) -> None:
    image, _ = disc
    before = image.copy()
    a, b = greenpost(image), greenpost(image)
    assert np.array_equal(a.alpha, b.alpha) and np.array_equal(a.fg, b.fg)
    assert np.array_equal(image, before)
    settings = GreenPostSettings(laplacian_weight=0.3)
    assert pickle.loads(pickle.dumps(settings)) == settings


@pytest.mark.parametrize(
    "bad",
    [
        dict(foreground="magic"),
        dict(clip_black=0.5, clip_white=0.4),
        dict(key_color=(0, 300, 0)),
        dict(shading_mix=1.5),
        dict(chroma="4:1:1"),
        dict(refit_min_alpha=0.0),
        dict(plate_object_alpha=1.0),
        dict(shadow_floor=0.0),
        dict(spill_falloff=0.0),
        dict(spill_reach=-1.0),
    ],
)
def test_bad_settings(bad: dict) -> None:
    with pytest.raises(InputError):
        GreenPostSettings(**bad)


def test_laplacian_option_runs(hair) -> None:
    image, truth = hair
    r = greenpost(image, settings=GreenPostSettings(laplacian_weight=0.3, foreground="ml"))
    assert sad_whole(r.alpha, truth) < 0.2


@pytest.mark.parametrize(
    "bad",
    [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3), np.float32)],
)
def test_rejects_non_rgb8(bad: np.ndarray) -> None:
    with pytest.raises(InputError):
        greenpost(bad)


def test_rejects_mismatched_coarse_alpha(disc) -> None:
    image, _ = disc
    with pytest.raises(InputError, match="coarse alpha"):
        greenpost(image, coarse_alpha=np.zeros((10, 10), np.float32))


def test_board_mix_ratio_finds_pixels_mixed_with_the_board() -> None:
    board = np.array(BOARD_GREEN, dtype=np.float32)
    pink, grey = np.array((230, 80, 140), np.float32), np.array((120, 120, 120), np.float32)
    image = np.broadcast_to(board, (40, 60, 3)).copy()
    image[:, :20] = pink  # opaque pink
    image[:, 20:40] = 0.4 * pink + 0.6 * board  # the same pink at 40 % over the board
    image[:, 40:] = grey  # another opaque material next to it
    ratio = board_mix_ratio(image - board, np.ones((40, 60), bool))
    assert np.allclose(ratio[:, 21:32], 0.4, atol=0.02)  # within reach of the opaque pink
    assert ratio[:, :20].min() > 0.99 and ratio[:, 40:].min() > 0.99


def test_board_mix_ratio_matches_its_definition_pixel_by_pixel() -> None:
    """Random offsets and scattered candidates (some on the image's border, whose neighbours beyond
    it count as the board): the shifted-view computation against a plain loop over the definition."""
    rng = np.random.default_rng(3)
    # Mixes of three materials with the board (each offset a fraction of its material's), noisy.
    materials = np.array([(150.0, -120.0, 60.0), (40.0, -160.0, -30.0), (-20.0, -90.0, 120.0)])
    share = rng.uniform(0.05, 1.0, (23, 31, 1))
    offset = share * materials[rng.integers(0, 3, (23, 31))] + rng.normal(0.0, 3.0, (23, 31, 3))
    offset = offset.astype(np.float32)
    candidates = rng.random((23, 31)) < 0.3
    candidates[0, 0] = candidates[-1, 5] = candidates[7, -1] = True
    candidates[:3, 10:] = False  # the bounding box does not have to start at row 0
    ratio = board_mix_ratio(offset, candidates, radius=6, step=2)
    expected = np.ones((23, 31), np.float32)
    for y, x in zip(*np.nonzero(candidates)):
        p = offset[y, x].astype(np.float64)
        for dy, dx in zip(*_disc_offsets(6, 2)):
            qy, qx = y + dy, x + dx
            if not (0 <= qy < 23 and 0 <= qx < 31):
                continue
            q = offset[qy, qx].astype(np.float64)
            if q @ q < 20.0**2:
                continue
            t = (p @ q) / (q @ q)
            off_ray2 = p @ p - (p @ q) ** 2 / (q @ q)
            if t > 0 and off_ray2 <= 5.0**2 + 0.05**2 * (p @ p):
                expected[y, x] = min(expected[y, x], t)
    decided = np.abs(ratio - expected) < 1e-4
    assert decided.all(), np.argwhere(~decided)[:5]
    assert (ratio[~candidates] == 1.0).all() and (expected[candidates] < 0.9).sum() > 50
    assert (board_mix_ratio(offset, np.zeros((23, 31), bool)) == 1.0).all()


def test_board_mix_ratio_compiles_without_a_disk_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba refuses ``cache=True`` when no cache directory is writable (a read-only install, no
    home): the kernel is then compiled without it and gives the same ratios."""
    import numba

    from factory.matte import trimap

    offset = np.zeros((12, 16, 3), np.float32)
    offset[:, :8] = (150.0, -120.0, 60.0)
    offset[:, 8:] = (60.0, -48.0, 24.0)  # the same material at 40 %
    expected = board_mix_ratio(offset, np.ones((12, 16), bool), radius=4, step=2)
    real_njit = numba.njit

    def njit_without_cache(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit_without_cache)
    trimap._mix_ratio_kernel.cache_clear()
    try:
        ratio = board_mix_ratio(offset, np.ones((12, 16), bool), radius=4, step=2)
    finally:
        trimap._mix_ratio_kernel.cache_clear()
    assert np.array_equal(ratio, expected)
    assert np.allclose(ratio[:, 9:12], 0.4, atol=1e-4)


@pytest.mark.parametrize("depth", [0.5, 1.0, 1.3, 2.0, 3.5])
def test_deeper_than_is_the_distance_transform(depth: float) -> None:
    rng = np.random.default_rng(int(depth * 10))
    mask = ndimage.uniform_filter(rng.random((50, 70)), 5) > 0.5
    assert mask.any() and not mask.all()
    assert (deeper_than(mask, depth) == (ndimage.distance_transform_edt(mask) > depth)).all()


def test_object_hue_key_ignores_the_foreground_brightness() -> None:
    board = np.full((1, 1, 3), BOARD_GREEN, np.float32)
    guess = np.full((1, 1, 3), (200, 80, 40), np.float32)  # the core's red-brown
    pixel = 0.5 * (0.6 * guess) + 0.5 * board  # a darker strand of that hue, half covering
    assert abs(float(object_hue_key(pixel, board, guess)[0, 0]) - 0.5) < 0.02
    assert float(local_difference_key(pixel, board, BOARD_GREEN)[0, 0]) > 0.6  # the plain key over-rates it


def test_half_transparent_pink_is_not_taken_for_solid() -> None:
    """The colour-difference key calls pink at 45 % coverage opaque; GreenPost must not, as long as
    solid pink lies within reach of the board-mix test (``mix_radius``, 12 px; the ring is 10 px)."""
    solid = soft_disc(radius=20.0, softness=2.0)
    ring = soft_disc(radius=30.0, softness=2.0)
    alpha = np.maximum(solid, 0.45 * ring)
    image = composite(alpha, (255, 60, 170), shaded_board(alpha, shadow=0.0))
    key = estimate_canvas_color(image).color
    band = (alpha > 0.4) & (alpha < 0.5)
    assert color_difference_key(image, key)[band].mean() > 0.95
    assert np.abs(greenpost(image).alpha[band] - 0.45).mean() < 0.05


def test_shading_invariant_alpha_ignores_the_strand_brightness() -> None:
    """A strand brighter or darker than the core colour it was given: the projection on F - B
    misreads the brightness as coverage, the two-colour least squares does not, and the default
    un-mixing (half of each) lies between."""
    board = np.full((1, 3, 3), BOARD_GREEN, np.float32)
    guess = np.full((1, 3, 3), (200, 150, 80), np.float32)  # the core's blonde
    k = np.array([0.6, 1.0, 1.3], np.float32)[None, :, None]  # shadowed, as the core, highlighted
    pixel = 0.4 * (k * guess) + 0.6 * board  # each at 40 % coverage
    zero = np.zeros((1, 3), np.float32)
    got = shading_invariant_alpha(pixel, board, guess, zero)[0]
    assert np.allclose(got, 0.4, atol=0.01)
    projected = projected_alpha(pixel, board, guess, zero, sharpness=0.0, min_contrast=0.0)[0]
    assert abs(projected[1] - 0.4) < 0.01 and abs(projected[0] - 0.4) > 0.05 and abs(projected[2] - 0.4) > 0.05
    both = projected_alpha(pixel, board, guess, zero, sharpness=0.0, min_contrast=0.0, shading_mix=0.5)[0]
    assert np.all(np.abs(both - 0.4) < np.abs(projected - 0.4) + 1e-6)
    # a foreground of the board's own colour direction: nothing to solve, the fallback is returned
    dark_board = np.full((1, 1, 3), 0.5 * np.array(BOARD_GREEN, np.float32), np.float32)
    same = shading_invariant_alpha(board[:, :1], board[:, :1], dark_board, np.full((1, 1), 0.25, np.float32))
    assert abs(float(same[0, 0]) - 0.25) < 1e-6


def test_refit_follows_strands_lighter_than_the_core() -> None:
    """Strands that lighten towards their tips: the colour interpolated from the dark core is wrong
    out there; refitting it from the band's well-covered pixels brings alpha closer."""
    alpha = strands(size=160, n=18, seed=5)
    rows = np.mgrid[0:160, 0:160][0] / 160
    t = np.clip((rows - 0.3) / 0.4, 0.0, 1.0)[..., None]
    fg = (1 - t) * np.array([110.0, 60.0, 30.0]) + t * np.array([225.0, 185.0, 110.0])
    image = composite(alpha, fg, shaded_board(alpha))
    fractional = (alpha > 0.05) & (alpha < 0.95)
    refit = np.abs(greenpost(image).alpha - alpha)[fractional].mean()
    plain = np.abs(greenpost(image, settings=GreenPostSettings(refit_min_alpha=None)).alpha - alpha)[fractional].mean()
    assert refit < 0.9 * plain  # about 0.027 against 0.033


def test_refit_foreground_reads_the_colour_of_covered_band_pixels() -> None:
    from factory.matte.foreground import refit_foreground

    plate = np.full((40, 40, 3), (40.0, 190.0, 60.0), np.float32)
    core = np.zeros((40, 40), bool)
    core[:, :10] = True
    true_f = np.array([220.0, 180.0, 100.0])
    a = np.zeros((40, 40), np.float32)
    a[:, 10:20] = 0.8  # well covered strand pixels of another colour than the core
    image = a[..., None] * true_f + (1 - a[..., None]) * plate
    image[core] = (90.0, 50.0, 30.0)
    f = refit_foreground(image.astype(np.uint8), plate, a, core, min_alpha=0.6)
    assert np.abs(f[:, 12:18] - true_f).max() < 3.0  # read from the strand, not the core
    assert np.allclose(f[core], image[core].astype(np.uint8))


def test_canvas_split_by_lighting_still_beats_a_large_object() -> None:
    """A strong lighting gradient makes K-Means split the board into a lit and a shaded cluster,
    each smaller than a large object standing on the bottom edge; scored as one surface (and with
    the border weighing double), the board still wins. Scoring single clusters picked the object."""
    h = w = 160
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    board = np.array([50.0, 215.0, 90.0]) * (0.55 + 0.45 * xx / (w - 1))[..., None]
    obj = (yy > 0.4 * h) & (xx > 0.1 * w) & (xx < 0.9 * w)
    fg = np.array([190.0, 120.0, 60.0]) * (0.7 + 0.3 * yy / (h - 1))[..., None]
    image = np.where(obj[..., None], fg, board) + np.random.default_rng(0).normal(0, 2, (h, w, 3))
    found = estimate_canvas_color(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    r, g, b = found.color
    assert g > r + 80 and g > b + 60  # green, not the object's brown (170, 108, 54)
    assert found.border_coverage > 0.7


FIRST_PLATE_ONLY = dict(plate_object_alpha=None, shadow_floor=None)


def test_board_without_object_drops_far_hair_and_keeps_the_edge_blur() -> None:
    board = np.ones((40, 60), dtype=bool)
    core = np.zeros_like(board)
    core[:, :10] = True
    alpha = np.zeros(board.shape, dtype=np.float32)
    alpha[:, 10:13] = 0.3  # the solid edge's blur, next to the core
    alpha[:, 30:32] = 0.05  # a faint strand far out on the board
    alpha[:, 45:47] = 0.01  # noise under the threshold
    kept = board_without_object(board, alpha, core, min_alpha=0.02, core_gap=10.0)
    assert kept[:, 10:13].all() and kept[:, 45:47].all() and kept[:, 50:].all()
    assert not kept[:, 30:32].any()


def test_faint_hair_over_the_board_is_not_taken_for_the_board() -> None:
    """Thin strands and a faint veil spread wide around a small solid core: tiles full of faint
    hair pass the strict board test and, in the first plate, stand for the board. The second plate
    leaves out what the first alpha found there."""
    size = 128
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - 64, xx - 64)
    core = soft_disc(size, radius=16, softness=2.0, center=(64, 64))
    alpha = np.maximum(core, 0.6 * strands(size, n=40, seed=3) * (r > 26))
    speckle = ndimage.gaussian_filter(np.random.default_rng(0).random((size, size)), 1.0) > 0.5
    alpha = np.maximum(alpha, 0.08 * ((r > 30) & (r < 58) & speckle)).astype(np.float32)
    image = composite(alpha, (150, 110, 70), shaded_board(alpha, shadow=0.0))
    hair = (r > 30) & (r < 58)
    sad_new = np.abs(greenpost(image).alpha - alpha)[hair].sum()
    sad_old = np.abs(greenpost(image, settings=GreenPostSettings(**FIRST_PLATE_ONLY)).alpha - alpha)[hair].sum()
    assert sad_new < 0.85 * sad_old


def _hidden_shadow_case(darkening: float) -> tuple[np.ndarray, ...]:
    """Dense hair (alpha 0.2 to 0.8) in a ring, the board behind it (and only there) darkened."""
    rng = np.random.default_rng(1)
    ring = (soft_disc(radius=58.0, softness=1.0) > 0.5) & (soft_disc(radius=14.0, softness=1.0) < 0.5)
    alpha = np.where(ring, rng.uniform(0.2, 0.8, ring.shape), 0.0).astype(np.float32)
    lit = np.broadcast_to(np.asarray(BOARD_GREEN, dtype=np.float32), ring.shape + (3,)).copy()
    behind = np.where(soft_disc(radius=58.0, softness=1.0)[..., None] > 0.5, darkening, 1.0)
    fg = np.broadcast_to(np.asarray((130, 85, 55), dtype=np.float32), lit.shape)
    image = composite(alpha, fg, lit * behind, noise=1.0)
    return image, lit, fg, ring, alpha < 1e-6


def test_hidden_shadow_reads_the_darkening_behind_dense_hair() -> None:
    image, plate, fg, ring, board = _hidden_shadow_case(0.7)
    board &= soft_disc(radius=58.0, softness=1.0) < 0.5  # the board shows nowhere under the ring
    shade = hidden_shadow(image, plate, fg, ring, board, block=8, floor=0.5)
    inner = ndimage.binary_erosion(ring, iterations=14)
    assert abs(float(np.median(shade[inner])) - 0.7) < 0.03
    assert shade[:4, :4].min() > 0.95  # the visible board keeps the plate as it is
    # No shadow: no darkening is invented; beyond the floor: held at the floor.
    image, plate, fg, ring, board = _hidden_shadow_case(1.0)
    assert np.abs(hidden_shadow(image, plate, fg, ring, board)[inner] - 1.0).max() < 0.03
    image, plate, fg, ring, board = _hidden_shadow_case(0.4)
    board &= soft_disc(radius=58.0, softness=1.0) < 0.5
    assert np.allclose(hidden_shadow(image, plate, fg, ring, board, floor=0.6)[inner], 0.6)


def test_shadow_behind_dense_hair_does_not_make_it_opaque() -> None:
    """A solid disc ringed by dense hair (stripes of 30 % and 70 % coverage) with the board darkened
    only behind the object: the lit plate makes the ring look denser than it is."""
    yy, xx = np.mgrid[0:128, 0:128]
    solid, ring = soft_disc(radius=20.0, softness=2.0), soft_disc(radius=30.0, softness=2.0)
    stripes = np.where((np.arctan2(yy - 64, xx - 64) * 40 / np.pi).astype(int) % 2 == 0, 0.3, 0.7)
    alpha = np.maximum(solid, stripes * ring).astype(np.float32)
    board = shaded_board(alpha, shadow=0.0, gradient=0.1, vignette=0.1)
    hidden = ndimage.gaussian_filter((ring > 0).astype(np.float64), 2.0)
    image = composite(alpha, (120, 80, 50), board * (1 - 0.3 * hidden)[..., None])
    band = (ring > 0.99) & (solid < 0.01)
    err_new = np.abs(greenpost(image).alpha - alpha)[band].mean()
    err_old = np.abs(greenpost(image, settings=GreenPostSettings(shadow_floor=None)).alpha - alpha)[band].mean()
    assert err_new < 0.85 * err_old
