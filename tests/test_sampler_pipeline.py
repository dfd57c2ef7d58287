"""The sampler on the tiny model: determinism, head, head-less models, failures, settings (CPU, fast)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.errors import InputError
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler import build_tiny_pipeline, load_sampler
from factory.sampler.noise_shift import shift_noise
from factory.sampler.pipeline import NAN_ERROR, NO_HEAD, render_size
from factory.sampler.schedulers import SCHEDULERS

SETTINGS = SamplerSettings(steps=2, width=64, height=64, guidance=5.0, batch_size=4)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def make_row(i: int, prompt: str = "a photo of a red apple on a plain green background", seed: int | None = None) -> PlanRow:
    return PlanRow(
        index=i,
        key=f"test-{i:08d}-apple",
        class_name="apple",
        category="object",
        prompt=prompt,
        negative_prompt="blurry, low quality",
        seed=seed if seed is not None else 1000 + 7 * i,
        attributes={"class_name": "apple"},
    )


ROWS = [
    make_row(0),
    make_row(1, "a green chair on a plain green background"),
    make_row(2, "a photo of a cat, isolated"),
    make_row(3, "a lamp on a solid green canvas"),
    make_row(4, "a toy car"),
]


@pytest.fixture(scope="module")
def sampler():
    return load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings())


def test_tiny_sampler_produces_images_and_alpha(sampler) -> None:
    out = sampler.sample(ROWS[:3])
    assert len(out) == 3
    assert sampler.has_head and sampler.identity.startswith("tiny")
    assert "non-photographic" in " ".join(sampler.metadata["notes"])
    for g in out:
        assert g.error is None
        assert g.image.shape == (64, 64, 3) and g.image.dtype == np.uint8
        assert g.coarse_alpha is not None and g.coarse_alpha.shape == (64, 64) and g.coarse_alpha.dtype == np.float32
        assert 0.0 <= g.coarse_alpha.min() <= g.coarse_alpha.max() <= 1.0
        assert g.seconds > 0
    assert not np.array_equal(out[0].image, out[1].image)  # different seeds and prompts


def test_same_row_same_image_whatever_the_batch(sampler) -> None:
    batch = sampler.sample(ROWS[:4])  # one batch of 4
    sampler.batch_size = 1
    try:
        singles = [sampler.sample([row])[0] for row in (ROWS[2], ROWS[0])]
        reordered = sampler.sample([ROWS[4], ROWS[2]])  # row 2 at another position, other neighbours
    finally:
        sampler.batch_size = SETTINGS.batch_size
    sampler.batch_size = 2
    try:
        pair = sampler.sample([ROWS[3], ROWS[2]])  # batch of 2, row 2 second
    finally:
        sampler.batch_size = SETTINGS.batch_size
    for other, ref in ((singles[0], batch[2]), (singles[1], batch[0]), (reordered[1], batch[2]), (pair[1], batch[2])):
        assert np.abs(other.image.astype(int) - ref.image.astype(int)).max() <= 1
        np.testing.assert_allclose(other.coarse_alpha, ref.coarse_alpha, atol=1e-4)


def test_headless_model_gives_no_coarse_alpha(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-diffusers"
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    s = load_sampler(ModelSpec(source=str(folder)), SETTINGS, CanvasSettings())
    assert not s.has_head and s.metadata["coarse_alpha"] == NO_HEAD
    (g,) = s.sample([ROWS[0]])
    assert g.error is None and g.coarse_alpha is None and g.image.shape == (64, 64, 3)


def test_non_finite_sample_fails_alone(sampler, monkeypatch: pytest.MonkeyPatch) -> None:
    good = sampler.sample(ROWS[:3])
    original = sampler.initial_noise

    def poisoned(rows):
        noise, gens = original(rows)
        noise[1, :, 3, 3] = float("nan")
        return noise, gens

    monkeypatch.setattr(sampler, "initial_noise", poisoned)
    out = sampler.sample(ROWS[:3])
    assert out[1].error == NAN_ERROR
    assert out[1].image.shape == (64, 64, 3)
    for i in (0, 2):
        assert out[i].error is None
        assert np.abs(out[i].image.astype(int) - good[i].image.astype(int)).max() <= 1


def test_tiny_renders_at_its_native_size() -> None:
    assert render_size(512, 512, (64, 64)) == (64, 64)
    assert render_size(512, 768, (64, 64)) == (40, 64)
    assert render_size(48, 32, (64, 64)) == (48, 32)
    assert render_size(768, 512, None) == (768, 512)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs(name: str, sampler) -> None:
    s = load_sampler(ModelSpec(source="tiny"), SETTINGS.model_copy(update={"scheduler": name, "batch_size": 1}), CanvasSettings())
    assert s.metadata["scheduler_class"] == SCHEDULERS[name][0]
    (g,) = s.sample([ROWS[0]])
    assert g.error is None


def test_noise_shift_moves_channel_means_only() -> None:
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0.5, -1.0, 0.25, 2.0])
    full = shift_noise(noise, target, 1.0)
    torch.testing.assert_close(full.mean(dim=(2, 3)), target.expand(2, 4), atol=1e-5, rtol=0)
    half = shift_noise(noise, target, 0.5)
    torch.testing.assert_close(half - half.mean(dim=(2, 3), keepdim=True), noise - noise.mean(dim=(2, 3), keepdim=True), atol=1e-5, rtol=0)
    assert shift_noise(noise, target, 0.0) is noise


def test_noise_shift_changes_images_deterministically(sampler) -> None:
    shifted = load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings(noise_shift=0.5))
    assert shifted.metadata["canvas_latent_mean"] is not None
    a, b = shifted.sample(ROWS[:1]), shifted.sample(ROWS[:1])
    assert np.array_equal(a[0].image, b[0].image)
    assert not np.array_equal(a[0].image, sampler.sample(ROWS[:1])[0].image)


def test_user_errors_are_one_line_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dtype"):
        load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings(), dtype="fp8")
    with pytest.raises(InputError, match=r"no safety checker; turn the safety checker off \(no --safety-checker, or model.safety_checker: false\)"):
        load_sampler(ModelSpec(source="tiny", safety_checker=True), SETTINGS, CanvasSettings())
    with pytest.raises(InputError, match="not found"):
        load_sampler(ModelSpec(source=str(tmp_path / "nope")), SETTINGS, CanvasSettings())


def _folder_with_safety_checker(folder: Path) -> None:
    """The tiny model saved with a tiny safety checker that flags everything."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    cfg = CLIPConfig(text_config={**small, "vocab_size": 100}, vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # every image is over the threshold
    extractor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    parts = build_tiny_pipeline(seed=0).components
    parts.update(safety_checker=checker, feature_extractor=extractor)
    StableDiffusionPipeline(**parts).save_pretrained(folder)


def test_safety_checker_is_off_by_default_and_flags_when_on(tmp_path: Path) -> None:
    folder = tmp_path / "with-checker"
    _folder_with_safety_checker(folder)
    off = load_sampler(ModelSpec(source=str(folder)), SETTINGS, CanvasSettings())
    assert off.metadata["safety_checker"] is False and off.pipe.safety_checker is None
    assert off.sample(ROWS[:1])[0].error is None
    on = load_sampler(ModelSpec(source=str(folder), safety_checker=True), SETTINGS, CanvasSettings())
    assert on.metadata["safety_checker"] is True
    out = on.sample(ROWS[:2])
    assert [g.error for g in out] == ["flagged by the safety checker"] * 2


def test_stochastic_scheduler_is_batch_independent() -> None:
    s = load_sampler(ModelSpec(source="tiny"), SETTINGS.model_copy(update={"scheduler": "euler_a", "batch_size": 3}), CanvasSettings())
    batch = s.sample(ROWS[:3])
    s.batch_size = 1
    single = s.sample([ROWS[1]])[0]
    assert np.abs(single.image.astype(int) - batch[1].image.astype(int)).max() <= 1


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_prompt_token_counts_are_reported_uncut(sampler) -> None:
    long_prompt = "a photo of a " + " ".join(["very"] * 90) + " red apple on a plain green background"
    seen = _Records()
    loggers = [logging.getLogger(type(sampler.pipe).__module__), logging.getLogger("transformers.tokenization_utils_base")]
    for logger in loggers:
        logger.addHandler(seen)
    try:
        short, long = sampler.sample([ROWS[4], make_row(9, long_prompt)])
    finally:
        for logger in loggers:
            logger.removeHandler(seen)
    # counted instead, and generate warns once with the number of cut prompts
    assert not [m for m in seen.messages if "77" in m or "maximum sequence length" in m], seen.messages
    tokenizer = sampler.components.tokenizer
    assert short.prompt_tokens == len(tokenizer(ROWS[4].prompt).input_ids) < 77
    assert long.prompt_tokens is not None and long.prompt_tokens > 90  # the encoder keeps only the first 77
