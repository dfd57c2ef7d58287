"""The DiffuMatting checkpoint folder: save -> load round trips, heads, bases, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.errors import InputError
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler import (
    MattingHead,
    build_tiny_pipeline,
    is_diffumatting_checkpoint,
    load_components,
    load_head,
    load_sampler,
    model_identity,
    save_checkpoint,
    save_head,
)
from factory.sampler.checkpoint import CHECKPOINT_FILE, read_checkpoint_config
from factory.sampler.components import ModelComponents, save_base_folder
from factory.sampler.head import HEAD_FEATURES
from factory.sampler.pipeline import NO_HEAD

SETTINGS = SamplerSettings(steps=2, width=64, height=64, guidance=5.0, batch_size=2)
ROWS = [
    PlanRow(index=i, key=f"c-{i}", class_name="cup", category="object", prompt=p, negative_prompt="", seed=9 + i, attributes={})
    for i, p in enumerate(["a red cup on a plain green background", "a blue lamp on green"])
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _sample(source: str | Path):
    s = load_sampler(ModelSpec(source=str(source)), SETTINGS, CanvasSettings())
    return s, s.sample(ROWS)


def test_round_trip_gives_identical_images_and_uses_the_head(tmp_path: Path) -> None:
    comps = load_components(ModelSpec(source="tiny"))
    ckpt = save_checkpoint(tmp_path / "ckpt", comps, training={"steps": 0})
    assert is_diffumatting_checkpoint(ckpt)
    cfg = read_checkpoint_config(ckpt)
    assert cfg["format_version"] == 2 and (ckpt / "model_index.json").is_file()
    assert cfg["base"] == {"kind": "embedded", "path": "."} and cfg["embedded_from"]["kind"] == "tiny"
    assert cfg["head"]["in_channels"] == 32 and cfg["training"] == {"steps": 0}
    tiny, ref = _sample("tiny")
    loaded, out = _sample(ckpt)
    assert loaded.has_head and loaded.identity.startswith("diffumatting:")
    assert "non-photographic" in " ".join(loaded.metadata["notes"])  # still the tiny model
    for a, b in zip(ref, out):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.coarse_alpha, b.coarse_alpha)

    # A different (e.g. trained) head changes the alpha and nothing else: the head is used.
    with torch.no_grad():
        comps.head.conv2.bias.fill_(6.0)
    ckpt2 = save_checkpoint(tmp_path / "ckpt2", comps)
    _, out2 = _sample(ckpt2)
    for a, b in zip(ref, out2):
        assert np.array_equal(a.image, b.image)
        assert b.coarse_alpha.mean() > 0.95 > a.coarse_alpha.mean()


def test_checkpoint_without_head(tmp_path: Path) -> None:
    comps = load_components(ModelSpec(source="tiny"))
    ckpt = save_checkpoint(tmp_path / "nohead", comps, head=None)
    s, out = _sample(ckpt)
    assert not s.has_head and s.metadata["coarse_alpha"] == NO_HEAD
    assert all(g.coarse_alpha is None and g.error is None for g in out)


def write_v1_checkpoint(path: Path, comps: ModelComponents, base: dict | None = None) -> Path:
    """A checkpoint in the version-1 layout (unet/, the head, and base/ or a base reference), as
    factory wrote them before checkpoints became diffusers pipeline folders."""
    path.mkdir(parents=True)
    comps.unet.save_pretrained(path / "unet", safe_serialization=True)
    head = None
    if comps.head is not None:
        save_head(comps.head, path / "matting_head.safetensors")
        head = {"file": "matting_head.safetensors", **comps.head.config, "features": HEAD_FEATURES}
    desc = {"format": "diffumatting-checkpoint", "format_version": 1, "created_by": "factory 0.1.0", "unet": "unet", "head": head,
            "base_identity": None, "training": {}}  # fmt: skip
    if base is None:
        save_base_folder(comps, path / "base")
        desc.update(base={"kind": "embedded", "path": "base"}, embedded_from=comps.base)
    else:
        desc["base"] = base
    (path / CHECKPOINT_FILE).write_text(json.dumps(desc, indent=2))
    return path


def test_version_1_checkpoints_still_load(tmp_path: Path) -> None:
    base = tmp_path / "base-sd"
    build_tiny_pipeline(seed=0).save_pretrained(base)
    comps = load_components(ModelSpec(source=str(base)))
    comps.head = MattingHead.for_vae(comps.vae, hidden_channels=8)
    ckpt = write_v1_checkpoint(tmp_path / "ref", comps, base={"kind": "diffusers", "path": str(base)})
    ident = model_identity(ModelSpec(source=str(ckpt)))
    assert "(base=diffusers:" in ident
    s, out = _sample(ckpt)
    assert s.has_head and all(g.error is None for g in out)
    # saving again from the loaded v1 checkpoint writes a v2 one that stands alone
    again = save_checkpoint(tmp_path / "ref2", load_components(ModelSpec(source=str(ckpt))))
    cfg = read_checkpoint_config(again)
    assert cfg["format_version"] == 2 and cfg["embedded_from"] == {"kind": "diffusers", "path": str(base)}
    shutil.rmtree(base)
    with pytest.raises(InputError, match="base model") as err:
        load_sampler(ModelSpec(source=str(ckpt)), SETTINGS, CanvasSettings())
    assert "\n" not in str(err.value)
    _, out2 = _sample(again)
    for a, b in zip(out, out2):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.coarse_alpha, b.coarse_alpha)
    # an embedded v1 base (base/) loads too, and gives the tiny model's images; so does a v1 training
    # run folder, whose descriptor's paths lead into its checkpoint
    from factory.train.run_folder import publish

    tiny = load_components(ModelSpec(source="tiny"))
    run = tmp_path / "run"
    embedded = write_v1_checkpoint(run / "checkpoints" / "step-00000001", tiny)
    publish(run, embedded)
    desc = json.loads((run / CHECKPOINT_FILE).read_text())
    assert desc["unet"] == "checkpoints/step-00000001/unet" and desc["base"]["path"] == "checkpoints/step-00000001/base"
    _, ref = _sample("tiny")
    for source in (embedded, run):
        _, got = _sample(source)
        for a, b in zip(ref, got):
            assert np.array_equal(a.image, b.image) and np.array_equal(a.coarse_alpha, b.coarse_alpha)


def test_checkpoint_of_a_checkpoint_embeds_again(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path / "a", load_components(ModelSpec(source="tiny")))
    second = save_checkpoint(tmp_path / "b", load_components(ModelSpec(source=str(first))))
    cfg = read_checkpoint_config(second)
    assert cfg["base"]["kind"] == "embedded" and cfg["embedded_from"]["kind"] == "tiny"
    shutil.rmtree(first)  # b stands alone
    _, out = _sample(second)
    assert all(g.error is None for g in out)


def test_save_refuses_to_clobber(tmp_path: Path) -> None:
    comps = load_components(ModelSpec(source="tiny"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        save_checkpoint(tmp_path / "busy", comps)
    ckpt = save_checkpoint(tmp_path / "c", comps)
    with pytest.raises(InputError, match="overwrite"):
        save_checkpoint(ckpt, comps)
    save_checkpoint(ckpt, comps, head=None, overwrite=True)
    assert read_checkpoint_config(ckpt)["head"] is None and not (ckpt / "matting_head.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_broken_checkpoints_give_one_line_errors(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "c", load_components(ModelSpec(source="tiny")))
    cfg_path = ckpt / CHECKPOINT_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(InputError, match="format_version"):
        load_sampler(ModelSpec(source=str(ckpt)), SETTINGS, CanvasSettings())
    cfg_path.write_text(json.dumps(cfg))
    (ckpt / "matting_head.safetensors").unlink()
    with pytest.raises(InputError, match="matting head"):
        load_sampler(ModelSpec(source=str(ckpt)), SETTINGS, CanvasSettings())


def test_head_file_round_trip(tmp_path: Path) -> None:
    head = MattingHead(in_channels=8, hidden_channels=4)
    save_head(head, tmp_path / "h.safetensors")
    back = load_head(tmp_path / "h.safetensors")
    assert back.config == head.config
    x = torch.randn(1, 8, 5, 7)
    torch.testing.assert_close(back(x), head(x))
    assert back(x).shape == (1, 1, 5, 7)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError):
        load_head(tmp_path / "bad.safetensors")
