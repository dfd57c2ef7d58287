"""The toy recipe end to end on a few world images: both training stages, then packaging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def row(i: int, prompt: str) -> PlanRow:
    return PlanRow(
        index=i, key=f"toy-{i:08d}", class_name="object", category="toy", prompt=prompt,
        negative_prompt="blurry", seed=100 + i, attributes={},
    )  # fmt: skip


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
