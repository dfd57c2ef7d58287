"""The ``tiny`` model: a randomly initialised, Stable-Diffusion-1.5-shaped pipeline built in code.

It exists for tests and demos and needs no download. **Its weights are random: the images it
draws are coloured noise-like patterns, not photographs, and its coarse alpha is meaningless.**
Everything else is real: a CLIP byte-level BPE tokenizer, a CLIP text encoder, a UNet with
cross-attention, a KL VAE and a matting head, wired exactly as for SD1.5, so every code path of
the sampler (prompts, guidance, schedulers, capture, head, checkpoints) runs on CPU in well under
a second per batch.

Shapes (SD1.5 in brackets): text encoder hidden 32, 2 layers [768, 12]; UNet blocks (32, 64),
one layer per block, cross-attention at both resolutions of the up/down path's top level and in
the mid block, cross_attention_dim 32 [(320, 640, 1280, 1280), 2, 768]; VAE blocks (32, 64), so
the latent is image/2 [image/8]; native size 64x64 px [512].

The same seed always gives the same weights (built under a forked, seeded torch RNG, so the
global RNG is untouched). Heavy imports happen inside the builders, so the constants here can be
read without importing torch (model identities).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: Bump when the tiny architecture or tokenizer changes: it is part of the tiny model's identity.
TINY_VERSION = 1
#: Native image size (px) of the tiny model; the sampler renders tiny at most this large.
TINY_SAMPLE_SIZE = 64
TINY_NOTE = "tiny: randomly initialised test model; its images are non-photographic"

#: Words merged into single tokens (first wins on conflicts, so "green" comes first).
TINY_WORDS = (
    "green", "screen", "background", "canvas", "plain", "solid", "uniform", "chroma", "key",
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "for",
    "photo", "photograph", "picture", "studio", "isolated", "object", "product", "shot",
    "portrait", "person", "man", "woman", "child", "people", "face", "hair",
    "high", "quality", "detailed", "sharp", "focus", "lighting", "soft", "light",
    "blurry", "low", "bad", "shadow", "shadows", "text", "watermark", "cropped", "deformed",
    "white", "black", "red", "blue", "yellow", "gray", "brown",
    "apple", "chair", "cat", "dog", "car", "cup", "lamp", "bottle", "plant", "toy",
)  # fmt: skip


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Byte-pair merge ``word`` with ``ranks`` the way CLIP's BPE does (lowest rank first)."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        first, second = parts[i], parts[i + 1]
        merged: list[str] = []
        j = 0
        while j < len(parts):
            if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return tuple(parts)


def tiny_vocab_and_merges(words: tuple[str, ...] = TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary: 256 byte symbols, the same with ``</w>``, word merges, specials.

    Merges are added word by word after simulating BPE with the merges so far, so that every
    word in ``words`` becomes exactly one token (checked by the tests for "green").
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        chars = (*word[:-1], word[-1] + "</w>")
        parts = _bpe(chars, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = _bpe(chars, ranks)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_tiny_tokenizer() -> Any:
    """A CLIP tokenizer (77 tokens) that tokenises any text without unknown tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def tiny_scheduler_config() -> dict[str, Any]:
    """SD1.5's noise schedule; the sampler picks the scheduler class from the manifest."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def tiny_unet_config(in_channels: int = 4) -> dict[str, Any]:
    """The tiny UNet's shape: 4 latent input channels for generation, 9 for inpainting
    (latents, mask and masked-image latents)."""
    return {
        "sample_size": TINY_SAMPLE_SIZE // 2,
        "in_channels": in_channels,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 2,
        "norm_num_groups": 32,
    }


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """The tiny model's parts: ``unet, vae, text_encoder, tokenizer, scheduler, head``.

    Deterministic given ``seed``. Images are non-photographic (random weights).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from factory.sampler.head import MattingHead

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config(in_channels=4))
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=TINY_SAMPLE_SIZE,
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
        head = MattingHead(in_channels=vae.config.block_out_channels[0], hidden_channels=16)
    for module in (unet, vae, text_encoder, head):
        module.eval()
    scheduler = DDIMScheduler(**tiny_scheduler_config())
    log.info(TINY_NOTE)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "head": head,
    }


def build_tiny_pipeline(seed: int = 0) -> Any:
    """The tiny model as a plain ``StableDiffusionPipeline`` (no head, no safety checker).

    Handy for saving a diffusers folder in tests (``pipe.save_pretrained(path)``). Images are
    non-photographic (random weights).
    """
    from factory.sampler.components import quiet_transformers

    with quiet_transformers():
        from diffusers import StableDiffusionPipeline

    parts = build_tiny_components(seed)
    parts.pop("head")
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
