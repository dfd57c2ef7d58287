"""The packaged toy model: `--model toy` loads offline from the package and draws on CPU; the
recipe trains end to end on a few world images; the shipped weights are the recorded ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.toy import MODEL_DIR, TOY_SAMPLE_SIZE

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: sha256 of every file of the shipped model (docs/toy-model.md lists the same).
SHIPPED = {
    "diffumatting.json": "ac07344f62d9b87f36d6239d1c1cb0966a4db890dcc4bb11bd404937489e09c9",
    "matting_head.safetensors": "e4df471b800fc29e58b05d1365eb46328f8ef9ab075131b828650552b525b7d5",
    "model_index.json": "d34ebfa1831c9990a5ed7986d550296516da01394d6eb9a128d444557a84d513",
    "scheduler/scheduler_config.json": "28d1a009dfa466938be057413130d37105fb555c44c7c403af4cbdb4c3194f5c",
    "text_encoder/config.json": "77e4fa8f7d61fdda59d732a60a81d8e4b94300a1f704e1b0d276f7d67dc3c4c8",
    "text_encoder/model.safetensors": "c106347d1ada3410ec941809f1e6bc239ce7bc67ad324d3c21d41ce85e16082f",
    "tokenizer/tokenizer.json": "10b5bd20cb494482a4f75b41f8ca9a38ed3deacd2b0530eddf9489cb2618b973",
    "tokenizer/tokenizer_config.json": "6ab119a1c448a3e6f3e2a4cfc4567e99f4a3f515aa8605098e271a709b20ada4",
    "unet/config.json": "cf6723a38a55cb67cd1d0da82bf011c7eecf4eefbfe55d9e2fe7ffba72e59e6d",
    "unet/diffusion_pytorch_model.safetensors": "128e3add561ce1e137edc3e6498228853b8ba8d9a512375abe2f06f0004a1d4f",
    "vae/config.json": "00a88cd52b86ca838eaa1fcfed0ab117ed103536c1cdd42d02159b1456c262e9",
    "vae/diffusion_pytorch_model.safetensors": "01afa0699518ca2d5efedb5c544a33a330ff4e4df3ba8ec47d7f9fca379c18e7",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row(i: int, prompt: str) -> PlanRow:
    return PlanRow(
        index=i, key=f"toy-{i:08d}", class_name="object", category="toy", prompt=prompt,
        negative_prompt="blurry", seed=100 + i, attributes={},
    )  # fmt: skip


def test_shipped_weights_are_the_recorded_ones_and_small() -> None:
    files = {str(p.relative_to(MODEL_DIR)): sha256(p) for p in sorted(MODEL_DIR.rglob("*")) if p.is_file()}
    assert files == SHIPPED
    texts = [p.read_text() for p in MODEL_DIR.rglob("*.json")]
    assert not [t for t in texts if "_name_or_path" in t or "/tmp/" in t or str(Path.home()) in t]
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert size < 20e6


def test_toy_resolves_to_the_package_and_names_itself() -> None:
    from factory.sampler import model_identity, resolve_source

    src = resolve_source("toy")
    assert src.kind == "toy" and src.path == MODEL_DIR
    assert model_identity(ModelSpec(source="toy")).startswith("toy:v1#")


def test_toy_loads_offline_and_draws_on_cpu_at_its_native_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from factory.sampler import load_sampler

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = SamplerSettings(steps=12, width=512, height=512, guidance=3.0, batch_size=2, scheduler="dpmpp")
    s = load_sampler(ModelSpec(source="toy"), settings, CanvasSettings(), device="cpu")
    assert (s.width, s.height) == (TOY_SAMPLE_SIZE, TOY_SAMPLE_SIZE)
    assert s.has_head and "procedural world" in " ".join(s.metadata["notes"])
    out = s.sample([row(0, "a red star, on a green background"), row(1, "a blue glass sphere, on a green background")])
    for g in out:
        assert g.error is None and g.image.shape == (64, 64, 3)
        assert g.coarse_alpha is not None and g.coarse_alpha.shape == (64, 64)
        rgb = g.image.astype(int)
        green = (rgb[..., 1] > rgb[..., 0] + 40) & (rgb[..., 1] > rgb[..., 2] + 40)
        assert green.mean() > 0.3  # the trained weights draw on a green canvas (random ones do not)

