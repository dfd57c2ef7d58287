"""Test helper: write a diffusers Stable Diffusion pipeline as ONE file in the original (LDM) layout.

The original CompVis/A1111 single-file layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``) is the inverse of diffusers' own single-file converters
(``diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint``). diffusers ships
only that direction, so this module spells out the reverse, generically in the number of levels
and layers per block (the tiny model has 2 levels and 1 layer, SD1.5 4 and 2). The tests check
that every tensor comes back exactly through ``from_single_file``, which also checks this mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_prefixes(config: Any) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for a UNet2DConditionModel ``config``."""
    levels, lpb = len(config.block_out_channels), int(config.layers_per_block)
    out = dict(_UNET_FIXED)
    k = 1
    for b in range(levels):
        for j in range(lpb):
            out[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{k}.0"
            out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if b < levels - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    i = 0
    for b, kind in enumerate(config.up_block_types):
        has_attn = "CrossAttn" in kind
        for j in range(lpb + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == lpb and b < levels - 1:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if has_attn else 1}.conv"
            i += 1
    return out


def _rename(key: str, prefixes: dict[str, str]) -> tuple[str, str]:
    """Split ``key`` into (LDM prefix, rest) using the longest matching diffusers prefix."""
    for src in sorted(prefixes, key=len, reverse=True):
        if key.startswith(src + "."):
            return prefixes[src], key[len(src) + 1 :]
    raise KeyError(f"no LDM name for {key}")


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        ldm, rest = _rename(key, prefixes)
        if ".resnets." in key:
            for a, b in _UNET_RESNET:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
        out[f"model.diffusion_model.{ldm}.{rest}"] = value
    return out


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    prefixes = {}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        prefixes[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        prefixes[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for a, b in _VAE_FIXED.items():
            prefixes[f"{part}.{a}"] = f"{part}.{b}"
        for name in ("conv_in", "conv_out"):
            prefixes[f"{part}.{name}"] = f"{part}.{name}"
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        prefixes[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{n - 1 - i}.block"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    for name in ("quant_conv", "post_quant_conv"):
        prefixes[name] = name
    out = {}
    for key, value in vae.state_dict().items():
        ldm, rest = _rename(key, prefixes)
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        if ".attentions." in key:
            for a, b in _VAE_ATTN:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
            if value.ndim == 2:  # the original VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[f"first_stage_model.{ldm}.{rest}"] = value
    return out


def clip_to_ldm(text_encoder: Any) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"  # transformers >= 5.6 flattened it
        out[f"cond_stage_model.transformer.{key}"] = value
    return out


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one LDM-layout state dict."""
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_to_ldm(pipe.text_encoder)}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_single_file(pipe: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(pipeline_to_ldm(pipe), str(path))
    return path
