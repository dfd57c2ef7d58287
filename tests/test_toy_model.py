"""The packaged toy model: `--model toy` loads offline from the package and draws on CPU; the
recipe trains end to end on a few world images; the shipped weights are the recorded ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.toy import MODEL_DIR, TOY_SAMPLE_SIZE

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: sha256 of every file of the shipped model (docs/toy-model.md lists the same).
SHIPPED = {}


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


def test_recipe_trains_both_stages_on_a_few_world_images_and_packages(tmp_path: Path) -> None:
    from factory.sampler import load_sampler, resolve_source
    from factory.sampler.checkpoint import read_checkpoint_config
    from factory.toy import recipe

    work = tmp_path / "w"
    recipe.main([
        "--out", str(work), "--n", "4", "--vae-steps", "2", "2", "--steps", "2",
        "--set", "batch_size=2", "--set", "validation_prompts=[]",
    ])  # fmt: skip
    steps = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in steps] == [(1, "generator"), (2, "joint")]
    assert {"noise", "green", "detail", "latent"} <= set(steps[1])
    record = json.loads((work / "recipe.json").read_text())
    assert record["train_settings"]["steps"] == 2 and record["vae"]["phase2"]["latent_std"] > 0
    model = recipe.package(work / "run", tmp_path / "model")
    desc = read_checkpoint_config(model)
    assert desc["head"] is not None and desc["base"]["kind"] == "embedded"
    assert str(tmp_path) not in (model / "diffumatting.json").read_text()  # no machine paths
    assert resolve_source(str(model)).kind == "diffumatting"
    s = load_sampler(ModelSpec(source=str(model)), SamplerSettings(steps=2, width=128, height=128, batch_size=1), CanvasSettings(), device="cpu")
    assert (s.width, s.height) == (64, 64)
    assert np.isfinite(s.sample([row(0, "a red star")])[0].image).all()
