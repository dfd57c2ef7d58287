"""GSG: pure green scores near 1, non-green low, shadowed green in between, monotone in distance."""

from __future__ import annotations

import numpy as np
import pytest

from factory.score import REFERENCE_GREEN, gsg


def canvas(color: tuple[int, int, int], size: int = 128) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[...] = color
    return img


def with_object(img: np.ndarray, color: tuple[int, int, int] = (200, 60, 40)) -> np.ndarray:
    out = img.copy()
    h, w = out.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    out[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2] = color
    return out


def test_pure_green_scores_near_one() -> None:
    res = gsg(with_object(canvas(REFERENCE_GREEN)))
    assert res.score > 0.98 and res.distance < 2
    assert res.canvas_color == REFERENCE_GREEN
    assert 0.0 <= res.uniformity <= 1.0


def test_non_green_scores_low() -> None:
    for color in [(128, 128, 128), (240, 240, 240), (30, 60, 200)]:
        assert gsg(with_object(canvas(color))).score < 0.1


def test_shadowed_green_in_between() -> None:
    img = canvas(REFERENCE_GREEN).astype(np.float64)
    ramp = np.linspace(0.55, 0.8, img.shape[1])[None, :, None]  # a shadow falling across the board
    shadowed = with_object(np.clip(img * ramp, 0, 255).astype(np.uint8))
    score = gsg(shadowed).score
    assert 0.1 < score < 0.95
    assert gsg(shadowed).uniformity < gsg(with_object(canvas(REFERENCE_GREEN))).uniformity


def test_monotone_in_distance_from_green() -> None:
    # canvases moving away from pure green: darker, then towards grey
    colors = [(0, 255, 0), (0, 230, 0), (0, 200, 20), (40, 170, 60), (80, 150, 90), (120, 130, 120)]
    results = [gsg(with_object(canvas(c))) for c in colors]
    distances = [r.distance for r in results]
    scores = [r.score for r in results]
    assert distances == sorted(distances)
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_reference_is_a_parameter() -> None:
    chroma = (0, 177, 64)
    img = with_object(canvas(chroma))
    assert gsg(img, reference=chroma).score > 0.98
    assert gsg(img).score < gsg(img, reference=chroma).score


def test_background_mask_restricts_pixels() -> None:
    img = canvas(REFERENCE_GREEN)
    img[:, :80] = (150, 40, 40)  # a large object covering most of the frame
    mask = np.zeros(img.shape[:2], np.float32)
    mask[:, 80:] = 1.0
    assert gsg(img).score < 0.1  # the dominant colour is the object
    assert gsg(img, mask=mask).score == pytest.approx(1.0, abs=0.02)
