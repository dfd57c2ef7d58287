"""The benchmarks' full-size SD1.5 architecture: the right shapes and sizes (built on the meta device)."""

from __future__ import annotations

import torch

from factory.sampler.sd15 import build_sd15_modules
from factory.sampler.tiny import build_tiny_tokenizer


def test_full_size_architecture() -> None:
    with torch.device("meta"):
        unet, vae, text_encoder = build_sd15_modules(build_tiny_tokenizer())
    n_unet = sum(p.numel() for p in unet.parameters())
    assert abs(n_unet / 1e6 - 859.5) < 1.0  # SD1.5's UNet
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512]
    assert text_encoder.config.hidden_size == 768 and text_encoder.config.num_hidden_layers == 12
