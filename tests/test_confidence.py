"""The matte confidence (factory.matte.confidence): high on a clean composite, lower with green
spill left on the object's rim, zero without a board or with the key colour inside the object; and
the finishing stage storing it for the index and the sample's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matte_fixtures import composite, ring_with_disc, shaded_board, soft_disc, strands
from scipy import ndimage

from factory.finish import CONFIDENCE_FIELDS, FinishSettings, finish_sample
from factory.matte import GreenPostSettings, greenpost
from factory.matte.confidence import matte_confidence
from factory.plan import PlanRow
from factory.store.layout import RESULT_NAMES


def spilled(alpha: np.ndarray, color, board: np.ndarray, strength: float = 0.5, width: float = 4.0) -> np.ndarray:
    """The composite with green spill: board light added to the object's colour, strongest on the
    rim and fading over ``width`` px into the object."""
    depth = ndimage.distance_transform_edt(alpha >= 0.5)
    w = strength * np.exp(-depth / width)[..., None] * (alpha > 0)[..., None]
    return composite(alpha, np.minimum(np.asarray(color, np.float64) + w * board, 255.0), board)


def trust(image: np.ndarray, settings: GreenPostSettings | None = None):
    return matte_confidence(image, greenpost(image, settings=settings))


@pytest.mark.parametrize("shape", ["disc", "hair"])
def test_confidence_is_high_on_a_clean_composite_and_lower_with_spill(shape) -> None:
    alpha = soft_disc() if shape == "disc" else strands(seed=1)
    board, colour = shaded_board(alpha), (190, 70, 50)
    clean, spill = trust(composite(alpha, colour, board)), trust(spilled(alpha, colour, board))
    assert clean.confidence > 0.55 and clean.residual < 4.0 and clean.key_colored_fraction == 0.0
    assert spill.ambiguous_fraction > clean.ambiguous_fraction + 0.1  # the rim is off the board->object line
    assert spill.confidence < clean.confidence - 0.1


def test_confidence_is_zero_with_a_wrong_board_colour_or_the_key_colour_inside() -> None:
    alpha = soft_disc()
    image = composite(alpha, (190, 70, 50), shaded_board(alpha))
    wrong = trust(image, GreenPostSettings(key_color=(40, 120, 230)))  # a blue key for a green board
    assert wrong.confidence == 0.0
    keyed = trust(ring_with_disc((120, 200, 30))[0])
    assert keyed.confidence == 0.0 and keyed.key_colored_fraction > 0.05


def test_finish_stores_the_confidence_in_the_index_fields_and_the_json() -> None:
    alpha = soft_disc()
    image = composite(alpha, (190, 70, 50), shaded_board(alpha))
    row = PlanRow(index=0, key="k-0", class_name="disc", category="object", prompt="p", negative_prompt="", seed=1, attributes={})
    res = finish_sample(row, image, None, FinishSettings(model="m", canvas_color=(40, 190, 60)))
    assert res.status == "done", res.error
    assert set(CONFIDENCE_FIELDS) <= set(RESULT_NAMES)
    assert res.fields["no_board"] is False and 0.5 < res.fields["matte_confidence"] <= 1.0
    assert res.fields["matte_residual"] == pytest.approx(trust(image).residual)
    scores = json.loads(res.files[".json"])["scores"]
    assert scores["matte_confidence"] == res.fields["matte_confidence"]


def test_card_lines_show_the_confidence_distribution() -> None:
    from factory.export.card import confidence_lines

    lines = confidence_lines(np.array([0.1, 0.45, 0.65, 0.9, 0.95, np.nan]))
    assert "median 0.650" in lines[0] and "2 of 5 below 0.5" in lines[0]
    assert lines[-1].split("|")[2:-1] == [" 0 ", " 1 ", " 0 ", " 0 ", " 1 ", " 0 ", " 1 ", " 0 ", " 0 ", " 2 "]
    assert confidence_lines(np.zeros(0)) == []  # a run made before the confidence was recorded
