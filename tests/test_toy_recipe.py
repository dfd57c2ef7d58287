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


def test_template_captions_put_each_world_caption_in_a_gom_template(tmp_path: Path) -> None:
    from factory.toy import recipe
    from factory.toy.dataset import write_toy_set

    write_toy_set(tmp_path / "data", n=12, seed=0, size=32)
    first = recipe.template_captions(tmp_path / "data", tmp_path / "a.jsonl").read_bytes()
    assert recipe.template_captions(tmp_path / "data", tmp_path / "b.jsonl").read_bytes() == first  # seeded
    rows = [json.loads(line) for line in first.decode().splitlines()]
    metas = {m["key"]: m for m in (json.loads(p.read_text()) for p in sorted((tmp_path / "data").glob("toy-*.json")) if p.name != "toy.json")}
    assert [r["key"] for r in rows] == sorted(metas)
    openings = set()
    for r in rows:
        phrase = metas[r["key"]]["caption"].split(" ", 1)[1]
        assert phrase in r["caption"] and "green" in r["caption"].split() and "{" not in r["caption"]
        assert r["class_name"] == metas[r["key"]]["class_name"]
        openings.add(r["caption"].split(phrase)[0])
    assert len(openings) > 1  # more than one template used
