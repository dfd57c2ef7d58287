"""The tiny model and the single decode pass with the matting head."""

from __future__ import annotations

import pytest
import torch

from factory.sampler import build_tiny_components, decode
from factory.sampler.tiny import TINY_WORDS, build_tiny_tokenizer


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tokenizer_merges_words_and_covers_any_text() -> None:
    tok = build_tiny_tokenizer()
    for word in TINY_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("Ünïcode & émoji 🍏 green-screen!").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    padded = tok(["green", "a b c"], padding="max_length", max_length=77, truncation=True).input_ids
    assert all(len(p) == 77 for p in padded)


def test_same_seed_same_weights(tiny) -> None:
    again = build_tiny_components(seed=0)
    other = build_tiny_components(seed=1)
    for name in ("unet", "vae", "text_encoder", "head"):
        a, b, c = (x[name].state_dict() for x in (tiny, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1), name
    state = torch.random.get_rng_state()
    build_tiny_components(seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_decode_with_head_is_one_unchanged_pass(tiny) -> None:
    vae, head = tiny["vae"], tiny["head"]
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1)) * vae.config.scaling_factor
    calls = []
    handle = vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            plain = decode(vae, z)
            both = decode(vae, z, head)
    finally:
        handle.remove()
    assert len(calls) == 2  # one decoder pass each
    assert plain.alpha is None and torch.equal(plain.image, both.image)
    assert both.alpha.shape == (2, 1, 64, 64) and 0 <= both.alpha.min() and both.alpha.max() <= 1
    vae.enable_slicing()  # sliced decode calls the head per slice; same result
    try:
        with torch.no_grad():
            sliced = decode(vae, z, head)
    finally:
        vae.disable_slicing()
    torch.testing.assert_close(sliced.alpha, both.alpha, atol=1e-5, rtol=0)


def test_head_trains_through_decode(tiny) -> None:
    vae, head = tiny["vae"], tiny["head"]
    z = torch.randn(1, 4, 32, 32)
    alpha = decode(vae, z, head).alpha
    alpha.mean().backward()
    assert head.conv1.weight.grad is not None and head.conv1.weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)
    vae.zero_grad(set_to_none=True)
