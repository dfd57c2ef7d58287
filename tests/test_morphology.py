"""The fast distance tests and fills GreenPost uses give exactly what the scipy formulations they
replace give (masks and grids drawn at random, including empty, full and one-pixel cases)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from factory.matte.fill import push_pull, tile_sums, tile_sums_at, tiles_at, tiles_to_pixels, upsample2
from factory.matte.morphology import depth_at, square_opening, within_distance


def _masks(seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        if i % 3 == 0:  # a disc: long runs, the case of an object
            yy, xx = np.mgrid[:h, :w]
            yield rng, np.hypot(yy - h / 2, xx - w / 2) < rng.uniform(1, 30)
        else:
            yield rng, rng.uniform(size=(h, w)) < rng.uniform(0.0, 1.0)


@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 3.7, 6.0, 10.0])
def test_within_distance_is_the_distance_transform_threshold(radius: float) -> None:
    for _, mask in _masks(1):
        expected = ndimage.distance_transform_edt(~mask) <= radius if mask.any() else np.zeros_like(mask)
        assert np.array_equal(within_distance(mask, radius), expected)


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_square_opening_is_binary_opening(size: int) -> None:
    for _, mask in _masks(2):
        assert np.array_equal(square_opening(mask, size), ndimage.binary_opening(mask, np.ones((size, size), bool)))
    with pytest.raises(ValueError):
        square_opening(np.ones((4, 4), bool), 4)


@pytest.mark.parametrize("cap", [1.0, 2.5, 6.0])
def test_depth_at_matches_the_distance_transform_up_to_the_cap(cap: float) -> None:
    for _, mask in _masks(3):
        if mask.all():
            continue  # no outside pixel: the transform has no meaning
        ys, xs = np.nonzero(mask)
        full = ndimage.distance_transform_edt(mask)[ys, xs]
        got = depth_at(mask, ys, xs, cap)
        assert np.array_equal(got[full <= cap], full[full <= cap])
        assert np.isinf(got[full > cap]).all()


def _push_pull_reference(values: np.ndarray, weights: np.ndarray, min_weight: float) -> np.ndarray:
    """push_pull written plainly (full 3 x 3 filters, then decimation; no in-place arithmetic)."""
    values, weights = values.astype(np.float32), weights.astype(np.float32)
    num = values * weights[..., None]
    if min(weights.shape) <= 2 or weights.sum() == 0:
        return push_pull(values, weights, min_weight)
    num_s = ndimage.uniform_filter(num, size=(3, 3, 1), mode="nearest")[::2, ::2]
    den_s = ndimage.uniform_filter(weights, size=3, mode="nearest")[::2, ::2]
    coarse = _push_pull_reference(num_s / np.maximum(den_s, 1e-12)[..., None], den_s, min_weight)
    up = upsample2(coarse)[: values.shape[0], : values.shape[1]]
    t = np.clip(weights / min_weight, 0.0, 1.0)[..., None]
    return t * (num / np.maximum(weights, 1e-12)[..., None]) + (1.0 - t) * up


def test_push_pull_and_tile_lookups_are_bit_identical_to_their_plain_forms() -> None:
    rng = np.random.default_rng(4)
    for h, w in [(37, 53), (64, 64), (5, 90)]:
        values = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
        for weights in (rng.uniform(size=(h, w)) < 0.3, rng.uniform(size=(h, w)) * (rng.uniform(size=(h, w)) < 0.5)):
            for min_weight in (0.5, 1.0):
                weights = weights.astype(np.float32)
                assert np.array_equal(push_pull(values, weights, min_weight), _push_pull_reference(values, weights, min_weight))
        grid = rng.uniform(0, 1, (h // 4 + 1, w // 4 + 1, 2)).astype(np.float32)
        full = tiles_to_pixels(grid, 4, (h, w))
        ys, xs = rng.integers(0, h, 50), rng.integers(0, w, 50)
        assert np.array_equal(tiles_at(grid, 4, (h, w), ys, xs), full[ys, xs])
        # the sparse tile sums equal the dense ones with zero weight off the given pixels
        at = rng.uniform(size=(h, w)) < 0.3
        weights = np.where(at, rng.uniform(size=(h, w)), 0.0)
        py, px = np.nonzero(at)
        dense_num, dense_den = tile_sums(values, weights, 4)
        num, den = tile_sums_at(values[py, px], weights[py, px], py, px, 4, (h, w))
        assert np.allclose(num, dense_num, rtol=1e-12, atol=1e-9) and np.allclose(den, dense_den, rtol=1e-12, atol=1e-12)


def test_despill_equals_its_plain_form_for_few_and_many_green_pixels() -> None:
    """despill looks up the depth only where there is key excess (few pixels: by offsets; many:
    the whole transform); either way it equals the plain formula over the whole image."""
    from factory.matte.foreground import despill

    rng = np.random.default_rng(5)
    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    alpha = np.clip(20.5 - np.hypot(yy - 30, xx - 40), 0.0, 1.0).astype(np.float32)
    for green_share in (0.02, 0.9):
        fg = rng.uniform(0, 200, (h, w, 3)).astype(np.float32)
        green = rng.uniform(size=(h, w)) < green_share
        fg[green, 1] = fg[green].max(axis=-1) + 30
        depth = ndimage.distance_transform_edt(alpha >= 0.999)
        weight = np.clip(1.0 - depth / 6.0, 0.0, 1.0)
        expected = fg.copy()
        expected[..., 1] -= weight * np.maximum(fg[..., 1] - np.maximum(fg[..., 0], fg[..., 2]), 0.0)
        assert np.array_equal(despill(fg, alpha, (0, 255, 0), 6.0), expected)
