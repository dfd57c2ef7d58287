"""Model sources: classification, identities (cheap, stable, content-sensitive), pickle refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from factory.errors import InputError
from factory.manifest import ModelSpec
from factory.sampler import build_tiny_pipeline, load_components, model_identity, resolve_source
from factory.sampler.fingerprint import fingerprint
from factory.sampler.sources import DIFFUMATTING, DIFFUSERS, HUB, SINGLE_FILE, TINY


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


def test_resolve_source_kinds(tmp_path: Path, tiny_folder: Path) -> None:
    assert resolve_source("tiny").kind == TINY and resolve_source("tiny").seed == 0
    assert resolve_source("tiny:7").seed == 7
    assert resolve_source(str(tiny_folder)).kind == DIFFUSERS
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "diffumatting.json").write_text("{}")
    assert resolve_source(str(tmp_path / "ck")).kind == DIFFUMATTING
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert resolve_source(str(tmp_path / "m.safetensors")).kind == SINGLE_FILE
    assert resolve_source("stable-diffusion-v1-5/stable-diffusion-v1-5").kind == HUB
    (tmp_path / "empty").mkdir()
    for bad, msg in [
        (str(tmp_path / "empty"), "not a model folder"),
        (str(tmp_path / "missing"), "not found"),
        ("./missing/model.safetensors", "not found"),
        ("just-a-word", "not 'tiny'"),
    ]:
        with pytest.raises(InputError, match=msg) as err:
            resolve_source(bad)
        assert "\n" not in str(err.value)


def test_identity_is_stable_and_follows_the_weights(tmp_path: Path, tiny_folder: Path) -> None:
    assert model_identity(ModelSpec(source="tiny")) == model_identity(ModelSpec(source="tiny")) == "tiny:v1:seed=0"
    assert model_identity(ModelSpec(source="tiny:1")) != model_identity(ModelSpec(source="tiny"))
    folder = tmp_path / "sd"
    shutil.copytree(tiny_folder, folder)
    first = model_identity(ModelSpec(source=str(folder)))
    assert first.startswith(f"diffusers:{folder.resolve()}#")
    assert model_identity(ModelSpec(source=str(folder))) == first
    assert fingerprint(folder) == fingerprint(tiny_folder)  # a copy keeps its content fingerprint
    # "Retrain": same names and shapes (same safetensors header), different values.
    pipe = build_tiny_pipeline(seed=0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(1e-3)
    pipe.unet.save_pretrained(folder / "unet")
    assert model_identity(ModelSpec(source=str(folder))) != first
    assert "+safety_checker" in model_identity(ModelSpec(source=str(folder), safety_checker=True))


def test_pickle_weights_need_opt_in(tmp_path: Path, tiny_folder: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    unet = folder / "unet"
    state = {k: v for k, v in build_tiny_pipeline(seed=0).unet.state_dict().items()}
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="allow_pickle") as err:
        load_components(ModelSpec(source=str(folder)))
    assert "\n" not in str(err.value)
    comps = load_components(ModelSpec(source=str(folder), allow_pickle=True))
    assert comps.kind == DIFFUSERS
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(InputError, match="allow_pickle"):
        model_identity(ModelSpec(source=str(tmp_path / "model.ckpt")))


def test_not_yet_supported_sources_say_so(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        load_components(ModelSpec(source="org/some-model"))
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    assert "+lora:" in model_identity(ModelSpec(source="tiny", loras=[{"path": str(lora), "scale": 0.5}]))
    with pytest.raises(InputError, match="LoRA"):
        model_identity(ModelSpec(source="tiny", loras=[{"path": str(tmp_path / "nope.safetensors")}]))
