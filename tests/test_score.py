"""GSG: pure green near 1, non-green low, shadowed green in between, monotone in the distance."""

from __future__ import annotations

import numpy as np
import pytest
from matte_fixtures import composite, flat, shaded_board, soft_disc

from factory.errors import InputError
from factory.score import REFERENCE_GREEN, gsg


def with_object(canvas: np.ndarray) -> np.ndarray:
    alpha = soft_disc(canvas.shape[0], radius=canvas.shape[0] / 4)
    return composite(alpha, (190, 70, 50), canvas.astype(np.float64), noise=0.0)


def test_flat_pure_green_scores_near_one() -> None:
    r = gsg(with_object(flat(REFERENCE_GREEN)))
    assert r.canvas_color == REFERENCE_GREEN
    assert r.distance == 0.0 and r.score == 1.0
    assert r.uniformity > 0.99 and 0.6 < r.coverage < 0.9


@pytest.mark.parametrize("color", [(128, 128, 128), (235, 235, 235), (20, 40, 210), (200, 40, 40)])
def test_non_green_canvas_scores_low(color) -> None:
    r = gsg(with_object(flat(color)))
    assert r.score < 0.1
    assert r.distance > 200


def test_shadowed_green_in_between() -> None:
    pure = gsg(with_object(flat(REFERENCE_GREEN)))
    alpha = soft_disc(96, radius=24)
    board = shaded_board(alpha, REFERENCE_GREEN, gradient=0.25, vignette=0.35, shadow=0.5)
    shadowed = gsg(composite(alpha, (190, 70, 50), board, noise=0.0))
    assert 0.3 < shadowed.score < 0.95
    assert shadowed.score < pure.score
    assert shadowed.uniformity < pure.uniformity - 0.1


def test_monotone_in_the_canvas_distance_from_green() -> None:
    # Darker and greyer versions of the reference, each farther from it than the last.
    colors = [(0, 255, 0), (0, 235, 10), (10, 210, 20), (30, 180, 50), (60, 160, 70), (90, 140, 100), (120, 130, 120)]
    results = [gsg(with_object(flat(c))) for c in colors]
    distances = [r.distance for r in results]
    scores = [r.score for r in results]
    assert distances == sorted(distances) and len(set(distances)) == len(distances)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    for r, c in zip(results, colors):
        assert r.distance == pytest.approx(float(np.linalg.norm(np.subtract(c, REFERENCE_GREEN))), abs=1.0)
        assert r.score == pytest.approx(np.exp(-0.5 * (r.distance / 100) ** 2))


def test_the_object_does_not_take_over() -> None:
    # An object covering 60 % of the frame, but not the border: the canvas is still the canvas.
    alpha = soft_disc(96, radius=36)
    r = gsg(composite(alpha, (190, 70, 50), flat((10, 220, 30)).astype(np.float64), noise=0.0))
    assert r.canvas_color == (10, 220, 30)


def test_reference_and_background_mask() -> None:
    img = flat((0, 177, 64))
    assert gsg(img, reference=(0, 177, 64)).score == 1.0
    assert gsg(img).score < 0.7  # the default reference is pure green
    img[:, :60] = (150, 40, 40)  # the object fills most of the frame and two borders
    background = np.zeros(img.shape[:2], np.float32)
    background[:, 60:] = 1.0
    assert gsg(img, reference=(0, 177, 64)).canvas_color == (150, 40, 40)  # unmasked, the dominant colour wins
    assert gsg(img, reference=(0, 177, 64), mask=background).canvas_color == (0, 177, 64)
    assert gsg(img, reference=(0, 177, 64), mask=(background * 255).astype(np.uint8)).score == 1.0


def test_bad_inputs() -> None:
    with pytest.raises(InputError):
        gsg(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError):
        gsg(flat(REFERENCE_GREEN), reference=(0, 300, 0))
    with pytest.raises(InputError):
        gsg(flat(REFERENCE_GREEN), mask=np.ones((3, 3)))
