"""The DiffuMatting matting head ("ConR") and the single decode pass that feeds it.

Our definition (the article only says "two 2-D convolutions with SiLU on the VAE decoder's
features"):

- **Input**: the VAE decoder's last feature map, taken as the *input of* ``decoder.conv_out``,
  i.e. after the final GroupNorm (``conv_norm_out``) and SiLU (``conv_act``). These are exactly
  the features the decoder's RGB projection sees, at full image resolution, with
  ``block_out_channels[0]`` channels (128 for SD1.5). They are normalised, which lets a freshly
  initialised head train stably (the raw up-block output of SD's VAE reaches magnitudes in the
  hundreds).
- **Head**: ``Conv2d(C, hidden, 3, padding=1) -> SiLU -> Conv2d(hidden, 1, 3, padding=1)``, then a
  sigmoid, so the coarse alpha ``M_cp`` is in [0, 1] at image resolution. ``hidden`` defaults to
  ``C // 2``.
- **One pass**: :func:`decode` registers a forward pre-hook on ``decoder.conv_out`` for the
  duration of one ``vae.decode`` call; the hook runs the head on the features it receives, so the
  image and the alpha come from the same decoder pass and the features are never kept. Sliced
  decoding (``vae.enable_slicing()``) calls the hook once per slice; the alphas are concatenated.
  Tiled decoding would hand the head tiles, so it is refused.
- The head runs in its own dtype (the sampler keeps it in float32 under a bf16 decoder: a bf16
  sigmoid would quantise alpha near 1 to steps of 1/256).
- Under autograd (training) nothing is detached: the alpha keeps its graph back into the head and,
  if the latents require grad, into the decoder and the latents.

Files: a head is saved as ``safetensors`` whose metadata holds ``format``, ``version`` and the
head's ``config`` (JSON), so a head file is self-describing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.errors import InputError

HEAD_FORMAT = "diffumatting-head"
HEAD_VERSION = 1
#: Where the head reads its input: the input of this decoder submodule.
HEAD_FEATURES = "vae.decoder.conv_out:input"


class MattingHead(nn.Module):
    """ConR: two 3x3 convolutions with a SiLU between them, then a sigmoid (see module docstring)."""

    def __init__(self, in_channels: int = 128, hidden_channels: int | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = hidden_channels or max(in_channels // 2, 1)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.hidden_channels, self.kernel_size = in_channels, hidden, kernel_size
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size, padding=kernel_size // 2)

    @classmethod
    def for_vae(cls, vae: nn.Module, hidden_channels: int | None = None) -> MattingHead:
        """A new head sized for ``vae``'s decoder (``block_out_channels[0]`` input channels)."""
        return cls(in_channels=int(vae.config.block_out_channels[0]), hidden_channels=hidden_channels)

    @property
    def config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "hidden_channels": self.hidden_channels, "kernel_size": self.kernel_size}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid alpha, (B, 1, H, W)."""
        return self.conv2(self.act(self.conv1(features)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Coarse alpha in [0, 1], (B, 1, H, W), from decoder features (B, C, H, W)."""
        return torch.sigmoid(self.logits(features))


# ------------------------------------------------------------------------------ files


def save_head(head: MattingHead, path: str | Path) -> None:
    """Write ``head`` as a self-describing safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    meta = {"format": HEAD_FORMAT, "version": str(HEAD_VERSION), "config": json.dumps(head.config), "features": HEAD_FEATURES}
    save_file(tensors, str(path), metadata=meta)


def load_head(path: str | Path) -> MattingHead:
    """Read a head written by :func:`save_head` (float32, CPU, eval mode)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: matting head file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != HEAD_FORMAT:
        raise InputError(f"{path}: not a DiffuMatting matting head (metadata format={meta.get('format')!r})")
    if int(meta.get("version", "0")) > HEAD_VERSION:
        raise InputError(f"{path}: matting head format version {meta['version']} is newer than this factory supports ({HEAD_VERSION})")
    try:
        head = MattingHead(**json.loads(meta["config"]))
        head.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: matting head weights do not match its config ({exc})") from exc
    return head.eval()


# ------------------------------------------------------------------------------ decoding


@dataclass
class Decoded:
    """One decode pass: ``image`` (B, 3, H, W) in about [-1, 1]; ``alpha`` (B, 1, H, W) or None."""

    image: torch.Tensor
    alpha: torch.Tensor | None


@contextmanager
def tap_decoder_features(vae: nn.Module, fn: Any) -> Iterator[None]:
    """Call ``fn(features)`` with the decoder's last feature map during ``vae.decode`` calls."""
    module = vae.decoder.conv_out

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        fn(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def decode(vae: nn.Module, latents: torch.Tensor, head: MattingHead | None = None) -> Decoded:
    """Decode pipeline-scaled latents to images, and run ``head`` in the same decoder pass.

    ``latents`` are as a diffusers pipeline returns them with ``output_type="latent"`` (multiplied
    by the VAE's scaling factor). Works with and without autograd.
    """
    if getattr(vae, "use_tiling", False):
        raise ValueError("tiled VAE decoding cannot feed the matting head; disable tiling")
    cfg = vae.config
    z = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None):
        z = z + cfg.shift_factor
    z = z.to(vae.dtype)
    if head is None:
        return Decoded(vae.decode(z, return_dict=False)[0], None)
    alphas: list[torch.Tensor] = []
    head_dtype = next(head.parameters()).dtype  # the sampler keeps the head in float32 even under bf16
    with tap_decoder_features(vae, lambda feats: alphas.append(head(feats.to(head_dtype)))):
        image = vae.decode(z, return_dict=False)[0]
    alpha = torch.cat(alphas) if len(alphas) > 1 else alphas[0]
    if alpha.shape[0] != image.shape[0] or alpha.shape[-2:] != image.shape[-2:]:
        raise RuntimeError(f"matting head output {tuple(alpha.shape)} does not match the image {tuple(image.shape)}")
    return Decoded(image, alpha)
