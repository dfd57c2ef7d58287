"""Model sources: classification, identities (cheap, stable, content-sensitive), pickle refusal,
single files (original layout, configs offline), hub ids from the local cache, weight variants."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.errors import InputError
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler import build_tiny_pipeline, load_components, load_sampler, model_identity, resolve_source, save_checkpoint
from factory.sampler.checkpoint import read_checkpoint_config
from factory.sampler.components import choose_variant
from factory.sampler.fingerprint import fingerprint
from factory.sampler.sources import DIFFUMATTING, DIFFUSERS, HUB, SINGLE_FILE, TINY
from tests.ldm_layout import save_single_file


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
        ("just-a-word", "not 'tiny', 'toy'"),  # every name it takes, the packaged toy model too
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


def test_lora_identity_needs_the_file(tmp_path: Path) -> None:
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    assert "+lora:" in model_identity(ModelSpec(source="tiny", loras=[{"path": str(lora), "scale": 0.5}]))
    with pytest.raises(InputError, match="LoRA"):
        model_identity(ModelSpec(source="tiny", loras=[{"path": str(tmp_path / "nope.safetensors")}]))


# ------------------------------------------------------------------------------ phase 2 sources

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ROWS = [
    PlanRow(index=i, key=f"s-{i}", class_name="cup", category="object", prompt=p, negative_prompt="", seed=5 + i, attributes={})
    for i, p in enumerate(["a red cup on a plain green background", "a blue lamp on green"])
]
SETTINGS = SamplerSettings(steps=2, width=64, height=64, guidance=5.0, batch_size=2, scheduler="ddim")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home for this test (the real cache is never looked at)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cache_snapshot(hf_home: Path, repo_id: str, source: Path, commit: str = COMMIT, weights: bool = True) -> Path:
    """Put ``source``'s files in the cache the way huggingface_hub lays a repo out."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot, ignore=None if weights else shutil.ignore_patterns("*.safetensors", "*.bin"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _images(model: ModelSpec) -> list[np.ndarray]:
    return [g.image for g in load_sampler(model, SETTINGS, CanvasSettings()).sample(ROWS)]


@pytest.fixture(scope="module")
def reference_images(tiny_folder: Path) -> list[np.ndarray]:
    return _images(ModelSpec(source=str(tiny_folder)))


@pytest.fixture(scope="module")
def single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline as one safetensors file in the original (LDM) layout, alone in a folder."""
    return save_single_file(build_tiny_pipeline(seed=0), tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")


def test_single_file_round_trips_with_configs_beside_it(tmp_path: Path, tiny_folder: Path, single_file: Path, reference_images, hf_home: Path) -> None:
    # A config-only diffusers folder (no weights) with the file in it, as in a hub snapshot.
    folder = tmp_path / "with-configs"
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    path = Path(shutil.copy(single_file, folder / "model.safetensors"))
    assert resolve_source(str(path)).kind == SINGLE_FILE
    comps = load_components(ModelSpec(source=str(path)))
    assert comps.kind == SINGLE_FILE and comps.base == {"kind": SINGLE_FILE, "path": str(path)} and comps.notes == []
    ref = build_tiny_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):  # every tensor back, exactly
        a, b = getattr(ref, name).state_dict(), getattr(comps, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ident = model_identity(ModelSpec(source=str(path)))
    assert ident == f"single_file:{path}#{fingerprint(path)}"
    for a, b in zip(_images(ModelSpec(source=str(path))), reference_images):
        assert np.array_equal(a, b)


def test_single_file_configs_from_the_hub_cache_or_a_one_line_error(single_file: Path, tiny_folder: Path, hf_home: Path) -> None:
    with pytest.raises(InputError, match=f"not in the local Hugging Face cache .*hf download {SD15} --include") as err:
        load_components(ModelSpec(source=str(single_file)))
    assert "\n" not in str(err.value) and str(hf_home) in str(err.value)
    snapshot = cache_snapshot(hf_home, SD15, tiny_folder, weights=False)  # `hf download ... --include '*.json' ...`
    comps = load_components(ModelSpec(source=str(single_file)))
    assert comps.kind == SINGLE_FILE and str(snapshot) in comps.notes[0]
    ref = build_tiny_pipeline(seed=0).unet.state_dict()
    assert all(torch.equal(v, comps.unet.state_dict()[k]) for k, v in ref.items())


def test_single_file_pickle_needs_opt_in(tmp_path: Path, single_file: Path, tiny_folder: Path) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    ckpt = folder / "model.ckpt"
    torch.save({"state_dict": load_file(str(single_file))}, ckpt)
    with pytest.raises(InputError, match="allow_pickle") as err:
        load_components(ModelSpec(source=str(ckpt)))
    assert "\n" not in str(err.value)
    comps = load_components(ModelSpec(source=str(ckpt), allow_pickle=True))
    assert comps.kind == SINGLE_FILE


def test_hub_id_from_the_local_cache(tiny_folder: Path, hf_home: Path, reference_images, tmp_path: Path) -> None:
    repo = "someone/tiny-sd"
    with pytest.raises(InputError, match=f"model '{repo}' is not in the local Hugging Face cache") as err:
        model_identity(ModelSpec(source=repo))
    msg = str(err.value)
    assert "\n" not in msg and f"hf download {repo}" in msg and "--model" in msg and str(hf_home / "hub") in msg
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        load_components(ModelSpec(source=repo))

    cache_snapshot(hf_home, repo, tiny_folder)
    assert model_identity(ModelSpec(source=repo)) == f"hub:{repo}@{COMMIT}"
    comps = load_components(ModelSpec(source=repo))
    assert comps.kind == HUB and comps.ref == repo and comps.base == {"kind": HUB, "id": repo}
    for a, b in zip(_images(ModelSpec(source=repo)), reference_images):
        assert np.array_equal(a, b)

    # A checkpoint trained on a hub base holds every part (it is a diffusers folder) and says where
    # they came from; a version-1 checkpoint that references the base by id finds it in the cache.
    ckpt = save_checkpoint(tmp_path / "ckpt", comps, head=None)
    cfg = read_checkpoint_config(ckpt)
    assert cfg["base"] == {"kind": "embedded", "path": "."} and cfg["embedded_from"] == {"kind": HUB, "id": repo}
    from tests.test_sampler_checkpoint import write_v1_checkpoint

    old = write_v1_checkpoint(tmp_path / "v1", comps, base={"kind": HUB, "id": repo})
    assert model_identity(ModelSpec(source=str(old))).endswith(f"(base=hub:{repo}@{COMMIT})")
    assert load_components(ModelSpec(source=str(old))).base == {"kind": HUB, "id": repo}


def test_hub_snapshot_that_is_not_a_pipeline(hf_home: Path, tmp_path: Path) -> None:
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    cache_snapshot(hf_home, "someone/a-controlnet", tmp_path / "cn")
    with pytest.raises(InputError, match="not a diffusers pipeline"):
        load_components(ModelSpec(source="someone/a-controlnet"))


def test_fp16_only_folder_loads_the_variant(tmp_path: Path) -> None:
    folder = tmp_path / "fp16-only"
    build_tiny_pipeline(seed=0).to(torch.float16).save_pretrained(folder, variant="fp16")
    assert not list(folder.glob("*/diffusion_pytorch_model.safetensors"))
    comps = load_components(ModelSpec(source=str(folder)))
    assert "'fp16' variant" in " ".join(comps.notes)
    assert comps.unet.dtype == torch.float32  # fp16 files, loaded in the dtype asked for
    ref = build_tiny_pipeline(seed=0).unet.state_dict()
    k = "conv_in.weight"
    assert torch.equal(comps.unet.state_dict()[k], ref[k].half().float())


def test_variant_choice(tmp_path: Path) -> None:
    def part(name: str, *files: str) -> Path:
        (tmp_path / name).mkdir(exist_ok=True)
        for f in files:
            (tmp_path / name / f).write_bytes(b"")
        return tmp_path / name

    full = part("full", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    half = part("half", "model.fp16.safetensors")
    sharded = part("sharded", "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors")
    ema = part("ema", "diffusion_pytorch_model.ema.safetensors")
    assert choose_variant([full]) is None
    assert choose_variant([full, half, sharded]) == "fp16"
    with pytest.raises(InputError, match="no weight variant shared") as err:
        choose_variant([half, ema])
    assert "\n" not in str(err.value)


def test_driver_imports_no_torch() -> None:
    """The generation driver needs only the model's identity: importing it must not pull in torch
    (about 180 MB more resident memory in the driver), while sampler names still resolve."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import factory.generate, factory.distribute\n"
        "from factory.sampler import model_identity\n"
        "assert 'torch' not in sys.modules, 'torch imported by the driver'\n"
        "import factory.sampler as s\n"
        "assert s.DiffuMattingSampler.__name__ == 'DiffuMattingSampler' and 'torch' in sys.modules\n"
        "assert sorted(dir(s)) and all(hasattr(s, n) for n in s.__all__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
