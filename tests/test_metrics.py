"""Composition-1k metrics on tiny arrays, against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from factory.errors import InputError
from factory.metrics import (
    as_matte,
    conn,
    connectivity_levels,
    evaluate_pair,
    grad,
    gradient_magnitude,
    mad,
    mse,
    sad,
    unknown_region,
    whole_image_sad,
)

PRED = np.array([[0.0, 0.5, 1.0], [0.2, 0.8, 1.0]])
GT = np.array([[0.0, 1.0, 1.0], [0.0, 0.5, 0.5]])
TRIMAP = np.array([[0, 128, 255], [128, 128, 255]], dtype=np.uint8)  # unknown: (0,1) (1,0) (1,1)


def test_sad_mse_on_the_unknown_region() -> None:
    # |diff| on unknown pixels: 0.5, 0.2, 0.3 -> 1.0; squared: 0.25 + 0.04 + 0.09 = 0.38 over 3 pixels
    assert sad(PRED, GT, TRIMAP) == pytest.approx(1.0 / 1000)
    assert mse(PRED, GT, TRIMAP) == pytest.approx(0.38 / 3)


def test_whole_image_sad_and_mad() -> None:
    # |diff| everywhere: 0, 0.5, 0, 0.2, 0.3, 0.5 -> 1.5 over 6 pixels
    assert whole_image_sad(PRED, GT) == pytest.approx(1.5 / 1000)
    assert mad(PRED, GT) == pytest.approx(0.25)
    assert sad(PRED, GT) == pytest.approx(1.5 / 1000)  # no trimap: the whole image


def test_uint8_and_uint16_inputs_are_scaled() -> None:
    p8, g8 = np.array([[255, 0]], np.uint8), np.array([[0, 0]], np.uint8)
    assert sad(p8, g8) == pytest.approx(1 / 1000)
    assert sad(np.array([[65535, 0]], np.uint16), g8) == pytest.approx(1 / 1000)
    assert as_matte(np.array([[51]], np.uint8))[0, 0] == pytest.approx(0.2)


def test_trimap_conventions() -> None:
    assert unknown_region(TRIMAP, (2, 3)).sum() == 3
    assert unknown_region(np.array([[0.0, 0.5, 1.0]]), (1, 3)).tolist() == [[False, True, False]]
    assert unknown_region(None, (2, 2)).all()
    with pytest.raises(InputError):
        unknown_region(TRIMAP, (3, 3))


def _matlab_kernel_response_to_unit_ramp(sigma: float = 1.4) -> float:
    """gaussgradient.m written out as loops: the x-derivative of a ramp rising 1 per pixel is
    sum(hx .* column offset), hx = gauss(row) * dgauss(col) / sqrt(sum(hx^2))."""
    half = int(np.ceil(sigma * np.sqrt(-2 * np.log(np.sqrt(2 * np.pi) * sigma * 0.01))))
    assert half == 4  # size 9 for sigma 1.4
    gauss = lambda x: np.exp(-x * x / (2 * sigma * sigma)) / (sigma * np.sqrt(2 * np.pi))  # noqa: E731
    dgauss = lambda x: -x * gauss(x) / sigma**2  # noqa: E731
    num, norm = 0.0, 0.0
    for i in range(-half, half + 1):
        for j in range(-half, half + 1):
            h = gauss(i) * dgauss(j)
            num += h * j
            norm += h * h
    return abs(num) / np.sqrt(norm)


def test_grad_on_a_ramp_against_a_flat_prediction() -> None:
    width = 21
    gt = np.tile(np.arange(width, dtype=np.float64) / (width - 1), (9, 1))  # 0..1 ramp, already [0, 1]
    pred = np.full_like(gt, 0.3)  # constant: no gradient after min-max normalisation
    trimap = np.zeros(gt.shape, np.uint8)
    trimap[3:6, 6:15] = 128  # away from the borders (replicate padding bends the ramp there)
    slope = _matlab_kernel_response_to_unit_ramp() / (width - 1)
    assert gradient_magnitude(gt)[4, 10] == pytest.approx(slope, rel=1e-9)
    assert grad(pred, gt, trimap) == pytest.approx(27 * slope**2 / 1000, rel=1e-9)
    assert grad(gt, gt, trimap) == 0.0
    # Min-max normalisation: a ramp from 0.2 to 0.6 has the same gradient as 0..1.
    assert grad(0.2 + 0.4 * gt, gt, trimap) == pytest.approx(0.0, abs=1e-20)


def test_conn_by_hand_1d() -> None:
    pred = np.array([[1.0, 0.5, 0.5, 0.0]])
    gt = np.array([[1.0, 1.0, 0.5, 0.0]])
    # t <= 0.5: component {0,1,2}; pixel 3 leaves at 0.1 -> l=0. t = 0.6: only pixel 0 is in both
    # -> l = 0.5 for pixels 1 and 2. Pixel 0 never leaves -> l = 1.
    assert connectivity_levels(pred, gt).tolist() == [[1.0, 0.5, 0.5, 0.0]]
    # d_pred = 0 everywhere -> phi 1; d_gt = [0, 0.5, 0, 0] -> phi [1, 0.5, 1, 1]
    assert conn(pred, gt) == pytest.approx(0.5 / 1000)
    assert conn(pred, gt, np.array([[255, 0, 128, 128]], np.uint8)) == 0.0


def test_conn_uses_4_connectivity() -> None:
    pred = np.array([[1.0, 0.0], [0.0, 1.0]])
    gt = np.array([[1.0, 0.0], [0.0, 0.9]])
    # Diagonal pixels are two components; the tie goes to the first (top-left), so (1,1) has l = 0:
    # d_pred = 1 -> phi 0, d_gt = 0.9 -> phi 0.1. (With 8-connectivity l would be 0.9 and Conn 0.)
    assert connectivity_levels(pred, gt)[1, 1] == 0.0
    assert conn(pred, gt) == pytest.approx(0.1 / 1000)


def test_conn_threshold_tolerance_for_8_bit_values() -> None:
    # 51/255 is exactly 0.2: it reaches the 0.2 threshold, so the level is 0.2, not 0.1.
    pred = np.array([[255, 51]], np.uint8)
    assert connectivity_levels(as_matte(pred), as_matte(pred))[0, 1] == pytest.approx(0.2)


def test_theta_cuts_small_differences() -> None:
    pred = np.array([[1.0, 0.6]])
    gt = np.array([[1.0, 0.7]])
    # both leave at t = 0.7 -> l = 0.6; d_pred = 0 -> phi 1; d_gt = 0.1 < 0.15 -> phi 1
    assert conn(pred, gt) == 0.0


def test_evaluate_pair_matches_the_single_metrics() -> None:
    rng = np.random.default_rng(0)
    gt = np.clip(rng.normal(0.5, 0.4, (24, 30)), 0, 1)
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    trimap = np.where(gt > 0.9, 255, np.where(gt < 0.1, 0, 128)).astype(np.uint8)
    out = evaluate_pair(pred, gt, trimap)
    assert out == pytest.approx(
        {
            "sad": sad(pred, gt, trimap),
            "mse": mse(pred, gt, trimap),
            "grad": grad(pred, gt, trimap),
            "conn": conn(pred, gt, trimap),
            "sad_whole": whole_image_sad(pred, gt),
            "mad": mad(pred, gt),
        }
    )
    assert evaluate_pair(gt, gt, trimap) == {k: 0.0 for k in out}


def test_shape_mismatch_is_an_input_error() -> None:
    with pytest.raises(InputError, match="shape"):
        sad(np.zeros((2, 2)), np.zeros((3, 3)))
