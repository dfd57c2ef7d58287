"""LoRAs (``--lora PATH[:SCALE]``, ``model.loras``) on the tiny model: built in code, fused at their scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from factory.errors import InputError
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler import build_tiny_components, load_components, load_sampler, model_identity

SETTINGS = SamplerSettings(steps=2, width=64, height=64, guidance=5.0, batch_size=2, scheduler="ddim")
ROWS = [
    PlanRow(index=i, key=f"l-{i}", class_name="cat", category="fur", prompt=p, negative_prompt="blurry", seed=21 + i, attributes={})
    for i, p in enumerate(["a photo of a cat on a plain green background", "a toy car on green"])
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def make_lora(path: Path, seed: int = 1) -> Path:
    """A rank-4 LoRA with random non-zero weights on the tiny UNet's attention projections and the
    text encoder's, saved with diffusers' own ``save_lora_weights`` (safetensors)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    parts = build_tiny_components(seed=0)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    text_cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts["unet"].add_adapter(unet_cfg)
        # peft directly, not transformers' ``add_adapter``: that one refuses peft releases older than
        # the minimum its own version names, a check unrelated to what this fixture builds.
        inject_adapter_in_model(text_cfg, parts["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        weight_name=path.name,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(parts["unet"])),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(parts["text_encoder"])),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=text_cfg.to_dict(),
    )
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


def _draw(model: ModelSpec) -> tuple[object, list[np.ndarray]]:
    s = load_sampler(model, SETTINGS, CanvasSettings())
    return s, [g.image for g in s.sample(ROWS)]


@pytest.fixture(scope="module")
def base_images() -> list[np.ndarray]:
    return _draw(ModelSpec(source="tiny"))[1]


def test_lora_changes_images_and_scale_zero_gives_the_base(lora: Path, base_images) -> None:
    sampler, images = _draw(ModelSpec(source="tiny", loras=[{"path": str(lora), "scale": 1.0}]))
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() > 1.0 for a, b in zip(images, base_images))
    assert f"+lora:{lora}@1#" in sampler.identity
    assert sampler.metadata["loras"] == [{"path": str(lora), "scale": 1.0}]
    # Fused: the UNet is a plain UNet again (no LoRA layers left, default attention processors).
    unet = sampler.components.unet
    assert not any("lora" in k for k in unet.state_dict())
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())

    zero, zero_images = _draw(ModelSpec(source="tiny", loras=[{"path": str(lora), "scale": 0.0}]))
    assert "@0#" in zero.identity and zero.identity != sampler.identity
    for a, b in zip(zero_images, base_images):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_loras_stack_with_their_scales(lora: Path) -> None:
    once = load_components(ModelSpec(source="tiny", loras=[{"path": str(lora), "scale": 1.0}]))
    halves = load_components(ModelSpec(source="tiny", loras=[{"path": str(lora), "scale": 0.5}] * 2))
    base = build_tiny_components(seed=0)
    for name in ("unet", "text_encoder"):
        a, b, c = (getattr(x, name).state_dict() if not isinstance(x, dict) else x[name].state_dict() for x in (once, halves, base))
        changed = [k for k in a if not torch.equal(a[k], c[k])]
        assert changed, name  # both the UNet and the text encoder got the LoRA
        for k in changed:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_bad_loras_are_one_line_input_errors(tmp_path: Path, lora: Path) -> None:
    from safetensors.torch import save_file

    pickled = tmp_path / "style.bin"
    pickled.write_bytes(b"not even a pickle")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.ones(4, 8), "lora_unet_nothing_here.lora_up.weight": torch.ones(8, 4)}, str(foreign))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    for path, msg in [(pickled, "allow_pickle"), (foreign, "LoRA"), (junk, "cannot load the LoRA"), (tmp_path / "nope.safetensors", "not found")]:
        with pytest.raises(InputError, match=msg) as err:
            load_components(ModelSpec(source="tiny", loras=[{"path": str(path)}]))
        assert "\n" not in str(err.value), path
    with pytest.raises(InputError, match="not found"):
        model_identity(ModelSpec(source="tiny", loras=[{"path": str(tmp_path / "nope.safetensors")}]))


def test_checkpoint_of_a_lora_model_embeds_the_fused_base(lora: Path, tmp_path: Path) -> None:
    from factory.sampler import build_tiny_pipeline, save_checkpoint
    from factory.sampler.checkpoint import read_checkpoint_config

    folder = tmp_path / "tiny-sd"
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    model = ModelSpec(source=str(folder), loras=[{"path": str(lora), "scale": 0.7}])
    comps = load_components(model)
    # The LoRA changed the text encoder too: a reference to the folder's own would lose it.
    ckpt = save_checkpoint(tmp_path / "ckpt", comps, head=None)
    cfg = read_checkpoint_config(ckpt)
    assert cfg["base"]["kind"] == "embedded" and cfg["embedded_from"] == {"kind": "diffusers", "path": str(folder)}
    assert cfg["loras"] == [{"path": str(lora), "scale": 0.7}]
    _, fused = _draw(model)
    _, reloaded = _draw(ModelSpec(source=str(ckpt)))
    for a, b in zip(fused, reloaded):
        assert np.array_equal(a, b)
