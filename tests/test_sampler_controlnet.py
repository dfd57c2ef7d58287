"""ControlNet on the tiny model: a tiny ControlNet built in code, per-row conditioning images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factory.errors import InputError
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler import build_tiny_components, load_components, load_sampler, model_identity

SETTINGS = SamplerSettings(steps=2, width=64, height=64, guidance=5.0, batch_size=4, scheduler="ddim")
PROMPT = "a photo of a cup on a plain green background"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ControlNet (``ControlNetModel.from_unet`` of the tiny UNet, saved) and two PNGs."""
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("controlnet")
    unet = build_tiny_components(seed=0)["unet"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        # (16, 32): the conditioning embedding downsamples by 2, like the tiny VAE.
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        with torch.no_grad():  # its zero convolutions start at zero: give them weights, so it acts
            for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0.0, 1.0)
    cn.save_pretrained(root / "tiny-controlnet")
    # Two conditioning images, neither at the sampler's 64x64: they get resized.
    edges = np.zeros((48, 48, 3), np.uint8)
    edges[8:40, 20:28] = 255
    Image.fromarray(edges).save(root / "edges.png")
    blob = np.zeros((80, 80), np.uint8)
    blob[20:60, 20:60] = 200
    Image.fromarray(blob, "L").save(root / "blob.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {"cn": root / "tiny-controlnet", "edges": root / "edges.png", "blob": root / "blob.png", "corrupt": root / "corrupt.png", "root": root}


def row(i: int, image: Path | None, seed: int = 77) -> PlanRow:
    return PlanRow(
        index=i, key=f"cn-{i}", class_name="cup", category="object", prompt=PROMPT, negative_prompt="",
        seed=seed, attributes={}, control_image=None if image is None else str(image),
    )  # fmt: skip


def spec(assets: dict[str, Path], scale: float = 1.0, model: str | None = None) -> ModelSpec:
    images = [str(assets["edges"]), str(assets["blob"])]
    return ModelSpec(source="tiny", controlnet={"model": model or str(assets["cn"]), "images": images, "scale": scale})


@pytest.fixture(scope="module")
def sampler(assets):
    return load_sampler(spec(assets), SETTINGS, CanvasSettings())


def test_controlnet_conditions_each_row_and_stays_deterministic(sampler, assets) -> None:
    assert type(sampler.pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert "+controlnet:" in sampler.identity and sampler.metadata["controlnet"] == {"scale": 1.0}
    rows = [row(0, assets["edges"]), row(1, assets["blob"]), row(2, assets["root"] / "missing.png"), row(3, assets["corrupt"])]
    out = sampler.sample(rows)
    assert [g.error is None for g in out] == [True, True, False, False]
    assert "not found" in out[2].error and "unreadable" in out[3].error
    assert out[2].image.shape == (64, 64, 3) and out[2].coarse_alpha.shape == (64, 64)
    # Same seed and prompt, different conditioning image: different pictures.
    assert np.abs(out[0].image.astype(int) - out[1].image.astype(int)).mean() > 1.0
    # A row gives the same image alone, at another position, next to a failing row.
    sampler.batch_size = 1
    try:
        alone = sampler.sample([row(1, assets["blob"])])[0]
    finally:
        sampler.batch_size = SETTINGS.batch_size
    moved = sampler.sample([row(5, None), row(1, assets["blob"])])
    assert "no ControlNet conditioning image" in moved[0].error
    for other in (alone, moved[1]):
        assert np.abs(other.image.astype(int) - out[1].image.astype(int)).max() <= 1
        np.testing.assert_allclose(other.coarse_alpha, out[1].coarse_alpha, atol=1e-4)


def test_controlnet_scale_zero_gives_the_base_images(assets) -> None:
    base = load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings()).sample([row(0, None)])[0]
    zero = load_sampler(spec(assets, scale=0.0), SETTINGS, CanvasSettings()).sample([row(0, assets["edges"])])[0]
    assert zero.error is None and np.abs(zero.image.astype(int) - base.image.astype(int)).max() <= 1


def test_controlnet_sources(assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = load_components(spec(assets)).controlnet.state_dict()
    # The weights file alone, with its config.json beside it.
    single = load_components(spec(assets, model=str(assets["cn"] / "diffusion_pytorch_model.safetensors")))
    assert all(torch.equal(v, single.controlnet.state_dict()[k]) for k, v in ref.items())
    # A hub id, from the local cache only.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError, match="ControlNet 'someone/tiny-cn' is not in the local Hugging Face cache") as err:
        model_identity(spec(assets, model="someone/tiny-cn"))
    assert "\n" not in str(err.value)
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-cn"
    commit = "f" * 40
    shutil.copytree(assets["cn"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert f"+controlnet:hub:someone/tiny-cn@{commit}@1 " in model_identity(spec(assets, model="someone/tiny-cn"))
    hub = load_components(spec(assets, model="someone/tiny-cn"))
    assert all(torch.equal(v, hub.controlnet.state_dict()[k]) for k, v in ref.items())


def test_controlnet_that_does_not_fit_is_an_input_error(tmp_path: Path) -> None:
    from diffusers import ControlNetModel

    unet = build_tiny_components(seed=0)["unet"]
    ControlNetModel.from_unet(unet).save_pretrained(tmp_path / "cn8")  # default embedding: downsamples by 8
    (tmp_path / "c.png").write_bytes(b"")
    model = ModelSpec(source="tiny", controlnet={"model": str(tmp_path / "cn8"), "images": [str(tmp_path / "c.png")]})
    with pytest.raises(InputError, match="downsamples by 8, the base VAE by 2") as err:
        load_components(model)
    assert "\n" not in str(err.value)
