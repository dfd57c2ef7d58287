"""Training data: the readers (folders, shards), captions, green compositing, aligned augmentation,
foreground estimation and the deterministic, resumable sample order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.errors import InputError
from factory.train.config import TrainConfig
from factory.train.data import (
    MattingDataset,
    StepBatches,
    assign_prompts,
    augment,
    composite,
    random_green,
    read_captions,
    scan_sources,
)
from tests.train_toy import make_toy_folder, make_toy_shards, toy_sample

CFG = TrainConfig(resolution=32, seed=3)


def _prompts(records, captions=None, default=None):
    assign_prompts(records, captions, CFG.prompt_template, "green", default)
    return {r.key: (r.prompt, r.object_words) for r in records}


def test_paired_flat_and_export_folders(tmp_path: Path) -> None:
    paired = make_toy_folder(tmp_path / "paired", n=3, layout="paired")
    recs = scan_sources([str(paired)])
    assert [r.key for r in recs] == ["toy-000", "toy-001", "toy-002"]
    assert all(r.image and r.fg for r in recs)
    assert _prompts(recs)["toy-001"] == ("blue square, on a green background", ("blue", "square"))
    flat = make_toy_folder(tmp_path / "flat", n=2, layout="flat", fg=False)
    recs = scan_sources([str(flat)])
    assert [r.fg for r in recs] == [None, None]
    # a prompt that already names the canvas is kept as it is
    assert _prompts(recs)["toy-000"] == ("a red disc on a plain green background", ("red", "disc"))
    export = tmp_path / "export"
    make_toy_folder(export / "train", n=2)
    assert len(scan_sources([str(export)])) == 2  # an export root reads its train split
    assert len(scan_sources([str(paired), str(flat)])) == 5


def test_webdataset_shards_by_file_folder_and_pattern(tmp_path: Path) -> None:
    shards = make_toy_shards(tmp_path / "wds", n=6, per_shard=4)
    assert len(shards) == 2
    assert len(scan_sources([str(tmp_path / "wds")])) == 6
    assert len(scan_sources([str(shards[1])])) == 2
    recs = scan_sources([str(tmp_path / "wds" / "train-{000000..000001}.tar")])
    assert [r.key for r in recs][:2] == ["shard-00000", "shard-00001"]
    _prompts(recs)
    assert recs[0].prompt.endswith("isolated on a pure green background")
    alpha, image, fg = MattingDataset(recs, CFG).load(recs[5])
    ref_image, ref_alpha, ref_fg, _ = toy_sample(5, 64, background=(0, 255, 0))
    assert np.array_equal(image, ref_image) and np.array_equal(fg, ref_fg)
    assert np.abs(alpha - ref_alpha).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(InputError, match="not found"):
        scan_sources([str(tmp_path / "wds" / "train-{000000..000003}.tar")])
    # an export folder also holds held-out shards: a folder source trains on train-* only
    shards[1].rename(tmp_path / "wds" / "val-000000.tar")
    assert len(scan_sources([str(tmp_path / "wds")])) == 4


def test_captions_precedence_and_missing_caption(tmp_path: Path) -> None:
    data = make_toy_folder(tmp_path / "d", n=2)
    (tmp_path / "c.jsonl").write_text(json.dumps({"key": "toy-000", "caption": "a shiny marble", "class_name": "marble"}) + "\n")
    (tmp_path / "c.tsv").write_text("toy-001\ta green frog\n")
    (tmp_path / "c.json").write_text(json.dumps({"toy-000": "a cup"}))
    recs = scan_sources([str(data)])
    got = _prompts(recs, read_captions(tmp_path / "c.jsonl"))
    assert got["toy-000"] == ("a shiny marble, on a green background", ("marble",))
    assert got["toy-001"][0] == "blue square, on a green background"  # falls back to the class name
    assert _prompts(recs, read_captions(tmp_path / "c.tsv"))["toy-001"][0] == "a green frog"
    assert _prompts(recs, read_captions(tmp_path / "c.json"))["toy-000"][0] == "a cup, on a green background"
    (data / "metadata.jsonl").write_bytes(b'{"key": "toy-000", "caption": "caf\xc3')  # torn in a character
    with pytest.raises(InputError, match="metadata.jsonl: cannot read"):
        scan_sources([str(data)])
    (data / "metadata.jsonl").unlink()
    bare = scan_sources([str(data)])
    with pytest.raises(InputError, match="toy-000.*no caption"):
        _prompts(bare)
    assert _prompts(bare, default="an object")["toy-000"][0] == "an object, on a green background"
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(InputError, match="bad.tsv:1"):
        read_captions(tmp_path / "bad.tsv")
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xd0\xcf")  # it was a UnicodeDecodeError
    with pytest.raises(InputError, match=r"binary.jsonl: cannot read the captions file \(not UTF-8 text"):
        read_captions(tmp_path / "binary.jsonl")


def test_augment_keeps_image_alpha_and_foreground_aligned() -> None:
    rng = np.random.default_rng(0)
    alpha = np.zeros((40, 60), np.float32)
    alpha[10:30, 35:60] = 1.0  # touches the right border
    alpha[5:8, 5:9] = 0.5
    code = np.repeat((alpha * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    flips = 0
    for seed in range(12):
        r = np.random.default_rng(seed)
        a, (img, fg) = augment(alpha, [code, code.copy()], size=32, square="pad", crop_scale=(0.7, 1.0), flip=0.5, rng=r)
        assert a.shape == (32, 32) and img.shape == (32, 32, 3)
        assert np.abs(img[..., 0] / 255.0 - a).max() < 0.01  # the same crop, resize and flip
        assert np.array_equal(img, fg)
        flips += int(a[:, 0].max() > 0.5)  # the touched border ends up left when flipped
    assert 0 < flips < 12
    # padding spares the border the object touches: with no crop it stays at the canvas border
    a, _ = augment(alpha, [code], size=30, square="pad", crop_scale=(1.0, 1.0), flip=0.0, rng=rng)
    assert a[:, -1].max() > 0.9 and a[:, 0].max() == 0.0
    a, _ = augment(alpha, [code], size=20, square="crop", crop_scale=(1.0, 1.0), flip=0.0, rng=rng)
    assert a.shape == (20, 20)


def test_green_canvas_range_and_composite() -> None:
    rng = np.random.default_rng(0)
    colours = np.stack([random_green(rng, (100, 140), (0.6, 1.0), (0.55, 1.0)) for _ in range(200)])
    assert (colours[:, 1] > colours[:, 0]).all() and (colours[:, 1] > colours[:, 2]).all()
    assert colours[:, 1].min() >= 0.55 - 1e-6 and colours.std(axis=0).max() > 0.05  # a range, not one green
    fg = np.full((2, 2, 3), 0.25, np.float32)
    alpha = np.array([[1.0, 0.0], [0.5, 0.0]], np.float32)
    out = composite(fg, alpha, np.array([0.0, 1.0, 0.0], np.float32))
    assert np.allclose(out[0, 0], 0.25) and np.allclose(out[0, 1], [0, 1, 0]) and np.allclose(out[1, 0], [0.125, 0.625, 0.125])


def test_dataset_items_are_seeded_by_position_and_estimate_missing_foregrounds(tmp_path: Path) -> None:
    recs = scan_sources([str(make_toy_folder(tmp_path / "nofg", n=2, fg=False))])
    _prompts(recs)
    ds = MattingDataset(recs, CFG)
    a, b, c = ds[(0, 5)], ds[(0, 5)], ds[(0, 6)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and not torch.equal(a["pixel_values"], c["pixel_values"])
    x, alpha = a["pixel_values"], a["alpha"][0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    solid, clear = alpha > 0.999, alpha < 0.001
    assert solid.any() and clear.any()
    # the background is one flat green; the object keeps its colour (red disc), estimated by pymatting
    bg = x[:, clear]
    assert (bg.std(dim=1) < 1e-5).all() and (bg[1] > bg[0]).all()
    obj = (x[:, solid] + 1) / 2
    assert (obj[0] > 0.6).all() and (obj[1] < 0.3).all()


def test_empty_prompts_are_drawn_per_position_and_leave_the_images_alone(tmp_path: Path) -> None:
    recs = scan_sources([str(make_toy_folder(tmp_path / "set", n=2))])
    _prompts(recs)
    plain = MattingDataset(recs, CFG)
    dropping = MattingDataset(recs, CFG.model_copy(update={"proportion_empty_prompts": 0.3}))
    items = [dropping[(p % 2, p)] for p in range(200)]
    empty = [i for i in items if i["prompt"] == ""]
    assert 35 <= len(empty) <= 85 and all(i["object_words"] == [] for i in empty)
    assert all(i["prompt"] == recs[i["position"] % 2].prompt for i in items if i["prompt"])
    assert [i["prompt"] for i in items] == [dropping[(p % 2, p)]["prompt"] for p in range(200)]  # seeded
    for p in (0, 1, 7):  # same augmentation and canvas whatever the proportion
        assert torch.equal(plain[(p % 2, p)]["pixel_values"], dropping[(p % 2, p)]["pixel_values"])
    assert all(plain[(p % 2, p)]["prompt"] for p in range(50))


def test_step_batches_partition_the_stream_and_resume_exactly() -> None:
    one = StepBatches(7, seed=1, start_step=0, end_step=6, batch=2, accum=2, world=1)
    full = [item for micro in one for item in micro]
    assert len(full) == 6 * 2 * 2 and [p for _, p in full] == list(range(24))
    first_epoch = [i for i, p in full if p < 7]
    assert sorted(first_epoch) == list(range(7))  # each epoch is a permutation
    tail = [item for micro in StepBatches(7, seed=1, start_step=3, end_step=6, batch=2, accum=2) for item in micro]
    assert tail == full[12:]
    ranks = [[item for micro in StepBatches(7, seed=1, start_step=0, end_step=6, batch=1, accum=2, world=2, rank=r) for item in micro] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1], key=lambda t: t[1]) == full  # two ranks of batch 1 = one of batch 2
    assert not set(ranks[0]) & set(ranks[1])


def test_an_unfinished_export_is_refused_as_training_data(tmp_path: Path) -> None:
    """A killed `factory export` leaves export.json at 'writing': its finished shards would pass for
    the whole set, by folder, by shard file and by pattern; a finished one trains."""
    import json

    shards = make_toy_shards(tmp_path / "wds", n=6, per_shard=4)
    marker = tmp_path / "wds" / "export.json"
    marker.write_text(json.dumps({"kind": "factory-export", "state": "writing"}))
    for source in (tmp_path / "wds", shards[0], tmp_path / "wds" / "train-{000000..000001}.tar"):
        with pytest.raises(InputError, match=r"an unfinished export \(export.json says 'writing'\); re-run its `factory export`"):
            scan_sources([str(source)])
    marker.write_text(json.dumps({"kind": "factory-export", "state": "complete"}))
    assert len(scan_sources([str(tmp_path / "wds")])) == 6
