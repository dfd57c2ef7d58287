"""The packaged toy model: `--model toy` loads offline from the package and draws on CPU; the
recipe trains end to end on a few world images; the shipped weights are the recorded ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.toy import MODEL_DIR, TOY_SAMPLE_SIZE

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: sha256 of every file of the shipped model (docs/toy-model.md lists the same).
SHIPPED = {
    "diffumatting.json": "b9fab4fce4516f30ae1e46a242b64ab634f658ff80e2b26fcc97cec4705d860d",
    "matting_head.safetensors": "938ebfc2a6c21e302eab95c39ffb4b9b477054937d54513d09c86cf17d558759",
    "model_index.json": "d34ebfa1831c9990a5ed7986d550296516da01394d6eb9a128d444557a84d513",
    "scheduler/scheduler_config.json": "28d1a009dfa466938be057413130d37105fb555c44c7c403af4cbdb4c3194f5c",
    "text_encoder/config.json": "77e4fa8f7d61fdda59d732a60a81d8e4b94300a1f704e1b0d276f7d67dc3c4c8",
    "text_encoder/model.safetensors": "c106347d1ada3410ec941809f1e6bc239ce7bc67ad324d3c21d41ce85e16082f",
    "tokenizer/tokenizer.json": "10b5bd20cb494482a4f75b41f8ca9a38ed3deacd2b0530eddf9489cb2618b973",
    "tokenizer/tokenizer_config.json": "6ab119a1c448a3e6f3e2a4cfc4567e99f4a3f515aa8605098e271a709b20ada4",
    "unet/config.json": "cf6723a38a55cb67cd1d0da82bf011c7eecf4eefbfe55d9e2fe7ffba72e59e6d",
    "unet/diffusion_pytorch_model.safetensors": "1cf594929665353306be34b622aa659525a72ce1b94e07dd3169a6fd9a62bf89",
    "vae/config.json": "8db2dba4f0a945de381ddd1af7e3779242c334f1a7194a13649ab0e1f4cbe768",
    "vae/diffusion_pytorch_model.safetensors": "2bcb96b3a1ea6c331d5914e68022022d63c5f187f53a1632b442dae57585962e",
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
    assert model_identity(ModelSpec(source="toy")).startswith("toy:v2#")


def test_toy_loads_offline_and_draws_on_cpu_at_its_native_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from factory.sampler import load_sampler

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = SamplerSettings(steps=12, width=512, height=512, guidance=3.0, batch_size=2, scheduler="dpmpp")
    s = load_sampler(ModelSpec(source="toy"), settings, CanvasSettings(), device="cpu")
    assert (s.width, s.height) == (TOY_SAMPLE_SIZE, TOY_SAMPLE_SIZE)
    assert s.has_head and "procedural world" in " ".join(s.metadata["notes"])
    # generate's summary prints the notes (a Ray worker's warning would stay in its log)
    assert "toy renders at most 64x64 px: drawing 64x64 instead of 512x512" in s.metadata["notes"]
    out = s.sample([row(0, "a red star, on a green background"), row(1, "a blue glass sphere, on a green background")])
    for g in out:
        assert g.error is None and g.image.shape == (64, 64, 3)
        assert g.coarse_alpha is not None and g.coarse_alpha.shape == (64, 64)
        rgb = g.image.astype(int)
        green = (rgb[..., 1] > rgb[..., 0] + 40) & (rgb[..., 1] > rgb[..., 2] + 40)
        assert green.mean() > 0.3  # the trained weights draw on a green canvas (random ones do not)



def test_toy_keeps_its_canvas_green_on_the_readme_manifest() -> None:
    """The README's first command (its 16 samples): the GOM manifest's prompts, negative prompt, steps and guidance give
    green canvases (GSG above the filter's default on most samples; random weights score ~0.2)."""
    import statistics

    from factory.manifest import load_manifest
    from factory.plan import build_rows
    from factory.sampler import load_sampler
    from factory.score import gsg

    manifest = load_manifest(REPO / "manifests" / "gom.yaml")
    settings = manifest.sampler.model_copy(update={"width": 64, "height": 64, "batch_size": 8})
    s = load_sampler(ModelSpec(source="toy"), settings, manifest.canvas, device="cpu")
    scores = [gsg(g.image, reference=tuple(manifest.canvas.color)).score for i in (0, 8) for g in s.sample(build_rows(manifest, 16)[i : i + 8])]
    assert statistics.median(scores) > manifest.filter.min_gsg, scores
