"""Chroma subsampling: detection on real JPEG encodes (Pillow/libjpeg) of every layout, restoration
of a thin strand's colour, and GreenPost's alpha on a 4:2:0 image with and without restoration."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matte_fixtures import composite, shaded_board, strands
from PIL import Image

from factory.matte import GreenPostSettings, greenpost
from factory.matte.chroma import ChromaLayout, detect_chroma_layout, restore_chroma, simulate_subsampling, to_rgb, to_ycc
from factory.metrics import evaluate_pair

# Pillow's JPEG "subsampling": 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0.
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def jpeg(image: np.ndarray, layout: str, quality: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=SUBSAMPLING[layout])
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def hair_on_green() -> tuple[np.ndarray, np.ndarray]:
    alpha = strands(size=160, n=18, seed=3)
    return composite(alpha, (215, 170, 90), shaded_board(alpha), noise=1.0), alpha  # blonde strands


@pytest.mark.parametrize("layout", ["4:4:4", "4:2:2", "4:2:0"])
def test_detects_the_layout_of_a_jpeg(hair_on_green, layout: str) -> None:
    image, _ = hair_on_green
    found = detect_chroma_layout(jpeg(image, layout))
    assert found.name == layout
    assert (found.offset_y, found.offset_x) == (0, 0)


def test_detects_the_cell_offset_of_a_cropped_jpeg(hair_on_green) -> None:
    image, _ = hair_on_green
    cropped = jpeg(image, "4:2:0")[1:, 1:]  # cells now start at pixel 1 along both axes
    found = detect_chroma_layout(cropped)
    assert found.name == "4:2:0" and (found.offset_y, found.offset_x) == (1, 1)


def test_lossless_and_flat_images_are_not_taken_for_subsampled(hair_on_green) -> None:
    image, _ = hair_on_green
    assert not detect_chroma_layout(image).subsampled  # never went through JPEG
    flat = np.full((64, 64, 3), (40, 190, 60), np.uint8)
    assert not detect_chroma_layout(flat).subsampled  # no signal: the safe answer
    assert np.array_equal(restore_chroma(image, ChromaLayout(False, False)), image)


def test_simulated_subsampling_is_a_smoothing_that_keeps_flat_planes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 10, (10, 12)).astype(np.float32)
    layout = ChromaLayout(vertical=True, horizontal=True)
    y = simulate_subsampling(x, layout)
    assert np.allclose(simulate_subsampling(np.full((6, 8), 7.0, np.float32), layout), 7.0)
    assert y.shape == x.shape and np.abs(y).mean() < 0.7 * np.abs(x).mean()  # white noise is averaged down
    odd = simulate_subsampling(x[:9, :11], ChromaLayout(vertical=True, horizontal=True, offset_y=1, offset_x=1))
    assert odd.shape == (9, 11)


def test_restoration_brings_back_the_strand_colour(hair_on_green) -> None:
    image, alpha = hair_on_green
    decoded = jpeg(image, "4:2:0", quality=95)
    restored = restore_chroma(decoded, detect_chroma_layout(decoded))
    strand = (alpha > 0.1) & (alpha < 0.9)
    truth = to_ycc(image)[..., 1:][strand]
    before = np.abs(to_ycc(decoded)[..., 1:][strand] - truth).mean()
    after = np.abs(to_ycc(restored)[..., 1:][strand] - truth).mean()
    assert after < 0.4 * before  # about 11 -> 2 levels
    # Luma is left alone (up to the rounding of the round trip through RGB).
    assert np.abs(to_ycc(restored)[..., 0] - to_ycc(decoded)[..., 0]).max() < 1.5


def test_greenpost_restores_chroma_of_a_420_jpeg(hair_on_green) -> None:
    image, alpha = hair_on_green
    decoded = jpeg(image, "4:2:0", quality=95)
    auto = greenpost(decoded)
    off = greenpost(decoded, settings=GreenPostSettings(chroma="off"))
    forced = greenpost(decoded, settings=GreenPostSettings(chroma="4:2:0"))
    assert auto.chroma == "4:2:0" and off.chroma == "4:4:4"
    assert np.array_equal(auto.alpha, forced.alpha)
    sad_auto = evaluate_pair(auto.alpha, alpha)["sad_whole"]
    sad_off = evaluate_pair(off.alpha, alpha)["sad_whole"]
    assert sad_auto < 0.3 * sad_off  # about 1.0 -> 0.16 (0.09 on the image before JPEG)
    # A lossless image is matted as it is.
    assert greenpost(image).chroma == "4:4:4"


def _low_contrast_texture() -> np.ndarray:
    """A photo-like texture with little colour contrast, blurred more along columns than rows: the
    chroma signal along the columns is a few window pairs, along the rows about a thousand."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    chroma = ndimage.gaussian_filter(rng.normal(0, 1, (128, 128, 2)), (2.5, 1.0, 0))
    chroma *= 8.0 / chroma.std()
    luma = 128 + 20 * ndimage.gaussian_filter(rng.normal(0, 1, (128, 128)), 2)
    ycc = np.stack([luma, chroma[..., 0], chroma[..., 1]], -1).astype(np.float32)
    return to_rgb(ycc)


def test_pillow_default_420_with_little_vertical_signal_is_not_read_as_422() -> None:
    """Pillow's default JPEG (4:2:0) of an image whose columns carry little colour signal: the
    vertical axis alone has too few loud window pairs, yet it is subsampled (it was reported as 4:2:2)."""
    image = _low_contrast_texture()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)  # Pillow's default subsampling: 4:2:0
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert detect_chroma_layout(decoded).name == "4:2:0"
    # The same image saved 4:2:2 and 4:4:4 keeps its layout: the second axis needs evidence.
    assert detect_chroma_layout(jpeg(image, "4:2:2")).name == "4:2:2"
    assert detect_chroma_layout(jpeg(image, "4:4:4")).name == "4:4:4"
