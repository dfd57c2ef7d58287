"""The full Stable Diffusion 1.5 architecture with random weights, built in code.

For speed work only (benchmarks): it costs exactly what the real model costs, and needs no
download. UNet (320, 640, 1280, 1280), 2 layers per block, cross-attention 768, 8 heads; SD's VAE
(128, 256, 512, 512); a 12-layer, 768-wide CLIP text encoder. The tokenizer is the tiny model's
byte-level one (SD's vocabulary size is kept, so the embedding costs what SD's costs).
"""

from __future__ import annotations

from typing import Any

import torch

SD15_VOCAB_SIZE = 49408


def build_sd15_modules(tokenizer: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(unet, vae, text_encoder)`` with random weights, on the current default device (float32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=SD15_VOCAB_SIZE,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return unet, vae, text_encoder
