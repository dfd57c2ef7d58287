"""Manifest loading and validation: every bad input is one line naming the file and key, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.errors import InputError
from factory.manifest import load_manifest
from tests.conftest import SMALL_MANIFEST, write_manifest

REPO = Path(__file__).resolve().parent.parent


def test_small_manifest_loads(small_manifest: Path) -> None:
    m = load_manifest(small_manifest)
    assert m.name == "small"
    assert m.kind == "classes"
    assert [c.class_name for c in m.prompts.classes] == ["red fox", "wine glass", "fern", "owl"]
    assert m.prompts.classes[3].prompt_phrase == "snowy owl"
    assert m.sampler.steps == 2 and m.sampler.scheduler == "ddim"
    assert m.canvas.color == (0, 255, 0)


def test_fingerprint_ignores_filter_export_and_batch_size(tmp_path: Path) -> None:
    a = load_manifest(write_manifest(tmp_path, SMALL_MANIFEST, "a.yaml"))
    b_text = SMALL_MANIFEST + "filter: {min_gsg: 0.5}\nexport: {maxcount: 10}\n"
    b_text = b_text.replace("scheduler: ddim}", "scheduler: ddim, batch_size: 8}")
    b = load_manifest(write_manifest(tmp_path, b_text, "b.yaml"))
    c = load_manifest(write_manifest(tmp_path, SMALL_MANIFEST.replace("seed: 7", "seed: 8"), "c.yaml"))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


BAD = {
    "not_yaml": ("name: x\nprompts: [unclosed\n", "not valid YAML"),
    "not_mapping": ("- a\n- b\n", "must be a YAML mapping"),
    "unknown_top_key": (SMALL_MANIFEST + "colour: green\n", "colour: unknown key"),
    "unknown_nested_key": (SMALL_MANIFEST.replace("steps: 2", "stepz: 2"), "sampler.stepz: unknown key"),
    "wrong_type": (SMALL_MANIFEST.replace("steps: 2", "steps: many"), "sampler.steps"),
    "empty_classes": (
        "name: e\nprompts:\n  classes: []\n  templates: ['{phrase}']\n",
        "the class list is empty",
    ),
    "duplicate_classes": (
        "name: d\nprompts:\n  classes: [{class_name: fox}, {class_name: Fox}]\n  templates: ['{phrase}']\n",
        "duplicate class 'Fox'",
    ),
    "slot_without_values": (SMALL_MANIFEST.replace("{view}\"", "{lighting}\""), "template slot '{lighting}' has no values"),
    "empty_slot": (SMALL_MANIFEST.replace("view: [front view, side view, top view]", "view: []"), "slot 'view' has no values"),
    "bad_name": (SMALL_MANIFEST.replace("name: small", "name: My Set"), "name: must be lowercase"),
    "missing_templates": ("name: t\nprompts:\n  classes: [{class_name: fox}]\n", "prompts.templates: required key is missing"),
    "width_not_multiple_of_8": (SMALL_MANIFEST.replace("width: 64", "width: 65"), "multiple of 8"),
    # A blank class name or phrase would give the prompt "an on green" (the article takes the next word).
    "blank_class_name": (
        "name: b\nprompts:\n  classes: [{class_name: fox}, {class_name: '   '}]\n  templates: ['{a} {phrase} on green']\n",
        "prompts.classes.1.class_name: is blank",
    ),
    "blank_phrase": (
        "name: b\nprompts:\n  classes: [{class_name: fox, phrase: ' '}]\n  templates: ['{a} {phrase}']\n",
        "prompts.classes.0.phrase: is blank",
    ),
    "blank_template": (
        "name: b\nprompts:\n  classes: [{class_name: fox}]\n  templates: ['{a} {phrase}', '  ']\n",
        "prompts.templates.1: is blank",
    ),
    "empty_file": ("", "the file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_one_line_error(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    path = write_manifest(tmp_path, text, f"{case}.yaml")
    with pytest.raises(InputError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_missing_class_list(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "name: x\nprompts:\n  classes: nope.csv\n  templates: ['{phrase}']\n")
    with pytest.raises(InputError, match="class list .*nope.csv not found"):
        load_manifest(path)


def test_grid_axis_errors(tmp_path: Path) -> None:
    text = "name: g\nprompts:\n  grid:\n    axes: {age: [a, b]}\n    cells: [age, gender]\n  templates: ['{age}']\n"
    with pytest.raises(InputError, match="axis 'gender' is not defined"):
        load_manifest(write_manifest(tmp_path, text))


def test_shipped_manifests_load() -> None:
    gom = load_manifest(REPO / "manifests" / "gom.yaml")
    assert gom.kind == "classes"
    assert len(gom.prompts.classes) == 500
    assert len({c.category for c in gom.prompts.classes}) >= 8
    portrait = load_manifest(REPO / "manifests" / "portrait.yaml")
    assert portrait.kind == "grid"
    grid = portrait.prompts.grid
    assert set(grid.cells) >= {"age_group", "gender", "ethnicity"}
    assert {"nationality", "hair_style", "clothing"} <= set(grid.cells) | set(grid.extra)
    assert portrait.negative_prompt and gom.negative_prompt


def test_class_list_csv_from_a_spreadsheet_and_stray_quotes(tmp_path: Path) -> None:
    """A UTF-8 BOM (Excel's "CSV UTF-8") is not part of the first column's name; a quote left open
    swallowed every later row into one class name, silently: it is an error naming the line."""
    path = write_manifest(tmp_path, "name: x\nprompts:\n  classes: c.csv\n  templates: ['{a} {phrase}']\n")
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes("\ufeffclass_name,phrase\nfox,red fox\nowl,\n".encode())
    assert [c.class_name for c in load_manifest(path).prompts.classes] == ["fox", "owl"]
    for text, line in (
        ('class_name,phrase\nfox,"red fox\nowl,snowy owl\nbee,a bee\n', 2),  # never closed
        ('class_name,phrase\nfox,"red fox\nowl,snowy" owl\nbee,a bee\n', 2),  # closed on a later line
    ):
        csv_path.write_text(text)
        with pytest.raises(InputError, match=f"c.csv: line {line}: .*quote") as info:
            load_manifest(path)
        assert "\n" not in str(info.value)
