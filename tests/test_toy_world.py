"""The toy world: exact fractional alpha, an exact composite, determinism, and the set's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factory.imageio import read_alpha, read_rgb
from factory.toy.world import CLASS_NAMES, SUPERSAMPLE, Painter, render_sample
from tests.conftest import fail_mkdir_under


def test_alpha_is_the_mean_coverage_of_the_sub_pixels() -> None:
    p = Painter(8 * SUPERSAMPLE)
    mask = np.zeros((p.n, p.n), np.float32)
    mask[:, :1] = 1.0  # one sub-pixel column of the first pixel column
    mask[:, SUPERSAMPLE : 2 * SUPERSAMPLE] = 1.0  # the whole second column
    p.over(mask, np.array([1.0, 0.0, 0.0]), 0.5)
    fg, alpha = p.downsample(SUPERSAMPLE, np.zeros(3, np.float32))
    assert alpha[:, 0] == pytest.approx(0.5 / SUPERSAMPLE)
    assert alpha[:, 1] == pytest.approx(0.5)
    assert (alpha[:, 2:] == 0).all()
    assert fg[0, 0] == pytest.approx([1.0, 0.0, 0.0])  # un-premultiplied: the layer's own colour


@pytest.mark.parametrize("index", range(len(CLASS_NAMES)))
def test_composite_is_alpha_fg_plus_one_minus_alpha_canvas(index: int) -> None:
    s = render_sample(5, index, 48)
    a = s.alpha.astype(np.float64)[..., None] / 255.0
    expected = a * s.fg + (1.0 - a) * s.canvas
    assert np.abs(s.image - expected).max() <= 0.5 + 1e-9
    assert s.class_name == CLASS_NAMES[index] and s.caption.endswith(s.class_name)
    assert s.alpha.max() > 0 and s.alpha[0].max() < 255  # an object, not cut by the top border


def test_thin_and_transparent_classes_have_fractional_alpha_hard_ones_little() -> None:
    def soft_share(name: str) -> float:
        a = np.concatenate([render_sample(2, i, 64, class_name=name).alpha.ravel() for i in range(3)])
        return float(((a > 0) & (a < 255)).sum() / max((a > 0).sum(), 1))

    for name in ("fur tuft", "seed head", "glass sphere", "smoke puff", "net disc"):
        assert soft_share(name) > 0.5, name
    for name in ("star", "cube", "ring"):
        assert soft_share(name) < 0.25, name


def test_render_is_deterministic_and_seeded() -> None:
    a, b, c = render_sample(1, 7), render_sample(1, 7), render_sample(2, 7)
    assert a.image.tobytes() == b.image.tobytes() and a.alpha.tobytes() == b.alpha.tobytes() and a.caption == b.caption
    assert a.image.tobytes() != c.image.tobytes()


def test_toy_data_writes_the_train_layout_resumes_to_the_same_bytes(cli, tmp_path: Path) -> None:
    from factory.train.data import assign_prompts, scan_sources

    out, again = tmp_path / "w", tmp_path / "w2"
    res = cli(["toy-data", "--n", "4", "--out", out, "--seed", "3", "--size", "32"])
    assert res.code == 0, res.err
    (out / "toy-000002.json").unlink()
    (out / "toy-000002.png").write_bytes(b"partial")
    assert cli(["toy-data", "--n", "4", "--out", out, "--seed", "3", "--size", "32"]).code == 0
    assert cli(["toy-data", "--n", "4", "--out", again, "--seed", "3", "--size", "32"]).code == 0
    for f in sorted(again.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    s = render_sample(3, 2, 32)
    image, alpha = read_rgb(out / "toy-000002.png"), read_alpha(out / "toy-000002.alpha.png")
    fg = read_rgb(out / "toy-000002.fg.png")
    assert (image == s.image).all() and (np.rint(alpha * 255) == s.alpha).all() and (fg == s.fg).all()
    records = scan_sources([str(out)])
    assign_prompts(records, None, "{caption}, on a green background", "green", None)
    assert [r.key for r in records] == [f"toy-{i:06d}" for i in range(4)]
    assert records[2].prompt == f"{s.caption}, on a green background"
    assert json.loads((out / "toy-000002.json").read_text())["class_name"] == s.class_name


def test_toy_data_refuses_other_folders_in_one_line(cli, tmp_path: Path) -> None:
    out = tmp_path / "w"
    assert cli(["toy-data", "--n", "1", "--out", out]).code == 0
    res = cli(["toy-data", "--n", "1", "--out", out, "--seed", "9"])
    assert res.code == 2 and "other settings" in res.err and len(res.err.strip().splitlines()) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    res = cli(["toy-data", "--n", "1", "--out", tmp_path / "other"])
    assert res.code == 2 and "not empty" in res.err
    assert cli(["toy-data", "--n", "1", "--out", out, "--size", "36"]).code == 2


def test_toy_data_out_that_cannot_be_a_folder_is_one_line(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    (tmp_path / "afile").write_text("x")
    res = cli(["toy-data", "--n", "2", "--out", tmp_path / "afile" / "sub"])
    assert res.code == 2 and res.err.count("\n") == 1 and "afile/sub: output folder is not writable" in res.err, res.err
    fail_mkdir_under(monkeypatch, tmp_path / "ro", errno.EROFS)
    res = cli(["toy-data", "--n", "2", "--out", tmp_path / "ro" / "x"])
    assert res.code == 2 and res.err.count("\n") == 1 and "Read-only file system" in res.err, res.err
    assert (tmp_path / "afile").read_text() == "x"


def test_toy_data_negative_seed_is_refused_before_anything_is_written(cli, tmp_path: Path) -> None:
    from factory.errors import InputError
    from factory.toy.dataset import write_toy_set

    out = tmp_path / "td"
    res = cli(["toy-data", "--n", "2", "--seed", "-5", "--out", out])
    assert res.code == 2 and res.err.count("\n") == 1 and "--seed" in res.err, res.err
    assert not out.exists()
    with pytest.raises(InputError, match="--seed"):
        write_toy_set(out, n=2, seed=-5)
    assert not out.exists()
    assert cli(["toy-data", "--n", "2", "--seed", "0", "--out", out]).code == 0


@pytest.mark.parametrize("text", ["[]", '"toy"', "3", "null"])
def test_toy_data_settings_file_of_the_wrong_shape_is_damaged_in_one_line(cli, tmp_path: Path, text: str) -> None:
    out = tmp_path / "w"
    assert cli(["toy-data", "--n", "1", "--out", out]).code == 0
    (out / "toy.json").write_text(text)
    res = cli(["toy-data", "--n", "1", "--out", out])
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "toy.json: damaged" in res.err and "where a JSON object is expected" in res.err
    assert (out / "toy.json").read_text() == text


def test_toy_data_resume_renders_again_a_truncated_or_missing_file(cli, tmp_path: Path) -> None:
    out = tmp_path / "w"
    args = ["toy-data", "--n", "4", "--out", out, "--size", "32"]
    assert cli(args).code == 0
    whole = {f.name: f.read_bytes() for f in out.iterdir()}
    (out / "toy-000001.png").write_bytes(whole["toy-000001.png"][:100])
    (out / "toy-000002.alpha.png").unlink()
    (out / "toy-000003.fg.png").write_bytes(whole["toy-000003.fg.png"][:-12])  # IEND cut off
    res = cli(args)
    assert res.code == 0 and "3 samples written, 1 already there" in res.out, res.out
    assert {f.name: f.read_bytes() for f in out.iterdir()} == whole


def test_toy_data_help_gives_the_size_range_it_enforces(cli, tmp_path) -> None:
    text = " ".join(cli(["toy-data", "--help"]).out.split())
    assert "16..1024" in text
    res = cli(["toy-data", "--out", tmp_path / "t", "--n", "1", "--size", "1032"])
    assert res.code == 2 and "between 16 and 1024" in res.err, res.err
