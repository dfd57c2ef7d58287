"""Cross-attention capture: output unchanged, maps right, training mode keeps gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler import AttentionCapture, average_maps, background_mask, load_sampler, token_weights, word_positions

SETTINGS = SamplerSettings(steps=2, width=64, height=64, guidance=5.0, batch_size=3)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _rows() -> list[PlanRow]:
    prompts = ["a red apple on a plain green background", "a photo of a chair, isolated", "a green cup on green"]
    return [
        PlanRow(index=i, key=f"t-{i}", class_name=c, category="object", prompt=p, negative_prompt="", seed=50 + i, attributes={})
        for i, (p, c) in enumerate(zip(prompts, ["apple", "chair", "cup"]))
    ]


def test_word_positions(tiny) -> None:
    tok = tiny["tokenizer"]
    assert len(tok("green", add_special_tokens=False).input_ids) == 1  # "green" is one token
    assert word_positions(tok, "a green apple on green", ["green"]) == [2, 5]
    assert word_positions(tok, "a greenish apple", ["green"]) == []  # whole words only
    pos = word_positions(tok, "a giraffe", ["giraffe"])  # several BPE pieces
    assert len(pos) > 1 and pos[0] == 2
    w = token_weights(tok, ["a green apple on green", "a cat"], [[["green"], ["apple"]], [["green"], ["cat"]]])
    assert w.shape == (2, 2, 77)
    assert torch.allclose(w.sum(-1), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


def test_capture_leaves_unet_output_unchanged(tiny) -> None:
    unet, tok = tiny["unet"], tiny["tokenizer"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 32, 32, generator=g)
    ctx = torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        ref = unet(x, 500, encoder_hidden_states=ctx).sample
        cap = AttentionCapture(unet).install()
        try:
            weights = token_weights(tok, ["a green apple", "green"], [[["green"], ["apple"]], [["green"], ["apple"]]])
            with cap.recording(weights, latent_hw=(32, 32)):
                out = unet(x, 500, encoder_hidden_states=ctx).sample  # batch 4 = CFG halves of 2
            maps = cap.maps()
        finally:
            cap.remove()
        after = unet(x, 500, encoder_hidden_states=ctx).sample
    assert torch.equal(out, ref) and torch.equal(after, ref)
    assert set(maps) == set(cap.layer_names) and len(maps) == 4
    shapes = {tuple(m.shape) for m in maps.values()}
    assert shapes == {(2, 2, 32, 32), (2, 2, 16, 16)}
    # the second prompt has no "apple": its map is exactly zero; probabilities are in [0, 1]
    for m in maps.values():
        assert torch.all(m[1, 1] == 0) and m.min() >= 0 and m.max() <= 1
    avg = average_maps(maps, (64, 64))
    assert avg.shape == (2, 2, 64, 64)


def test_capture_leaves_sampler_output_unchanged() -> None:
    rows = _rows()
    plain = load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings()).sample(rows)
    captured = load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings(), capture=True).sample(rows)
    for a, b in zip(plain, captured):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.coarse_alpha, b.coarse_alpha)
        assert a.background_mask is None
    for i in (0, 2):  # prompts with "green"
        m = captured[i].background_mask
        assert m is not None and m.shape == (64, 64) and m.dtype == np.float32
        assert m.min() == 0.0 and m.max() == 1.0
    assert captured[1].background_mask is None  # no "green" in the prompt


def test_training_mode_keeps_the_graph(tiny) -> None:
    unet, tok = tiny["unet"], tiny["tokenizer"]
    cap = AttentionCapture(unet, accumulate=False, keep_graph=True).install()
    try:
        x = torch.randn(2, 4, 32, 32)
        ctx = torch.randn(2, 77, 32)
        weights = token_weights(tok, ["a green apple", "a cat on green"], [[["green"]], [["green"]]])
        cap.begin(weights, latent_hw=(32, 32))
        unet(x, 100, encoder_hidden_states=ctx)
        calls = cap.calls()
        assert all(len(v) == 1 for v in calls.values())
        green = average_maps(cap.maps(), (32, 32))[:, 0]
        target = torch.zeros_like(green)  # e.g. 1 - M
        loss = torch.nn.functional.mse_loss(green, target)
        loss.backward()
        grads = [p.grad for n, p in unet.named_parameters() if "attn2.to_q" in n or "attn2.to_k" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        cap.reset()
        assert cap.calls() == {}
    finally:
        cap.remove()
        unet.zero_grad(set_to_none=True)


def test_background_mask_normalises_per_sample() -> None:
    m = torch.stack([torch.linspace(0, 2, 16).view(4, 4), torch.full((4, 4), 3.0)])
    bg = background_mask(m)
    assert bg[0].min() == 0 and bg[0].max() == 1
    assert torch.all(bg[1] == 0)
