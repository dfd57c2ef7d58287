"""Initial-noise shift towards the green canvas (training-free chroma background, after TKG-DM).

Our definition. Let ``mu_k`` be the per-channel mean of the green canvas latent: a flat image of
``canvas.color`` encoded once by the VAE (the posterior mean, times the VAE's scaling factor;
only the central half of the latent is averaged, away from the encoder's zero-padded border).
The sampler draws each sample's initial noise ``x`` (unit variance, before the scheduler's
``init_noise_sigma``) from its own generator, then with strength ``s = canvas.noise_shift``::

    x'[k] = x[k] + s * (mu_k - mean_hw(x[k]))       for every latent channel k

i.e. each channel's spatial mean moves a fraction ``s`` of the way from its own value (about 0)
to the canvas latent's mean, and everything else about the noise (its per-pixel pattern, its
variance around the mean) is kept. ``s = 0`` leaves the noise untouched; ``s = 1`` gives each
channel exactly the canvas latent's mean. Diffusion models keep the initial noise's low-frequency
mean through sampling, so the image drifts towards the canvas colour. The shift is global; TKG-DM
additionally blends shifted and unshifted noise with a centred Gaussian mask to spare the object,
which we do not do (the green canvas model is trained to keep the object's colours). Useful
strengths on base SD1.5 are small (about 0.1 to 0.3); TKG-DM's own shift is about 0.07 of the
positive-value ratio, roughly 0.2 standard deviations.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def canvas_latent_mean(vae: nn.Module, color: tuple[int, int, int], size: int = 256) -> torch.Tensor:
    """Per-channel mean (C,) of the scaled VAE latent of a flat ``color`` image, float32 on CPU."""
    param = next(vae.parameters())
    rgb = torch.tensor(color, dtype=torch.float32) / 127.5 - 1.0
    image = rgb.view(1, 3, 1, 1).expand(1, 3, size, size).to(param.device, param.dtype)
    latent = vae.encode(image).latent_dist.mean.float()
    h, w = latent.shape[-2:]
    core = latent[..., h // 4 : h - h // 4, w // 4 : w - w // 4]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((core.mean(dim=(0, 2, 3)) - shift) * vae.config.scaling_factor).cpu()


def shift_noise(noise: torch.Tensor, target: torch.Tensor, strength: float) -> torch.Tensor:
    """Move each channel's spatial mean of ``noise`` (B, C, H, W) a fraction ``strength`` to ``target`` (C,)."""
    if strength <= 0.0:
        return noise
    mean = noise.mean(dim=(2, 3), keepdim=True)
    return noise + strength * (target.to(noise).view(1, -1, 1, 1) - mean)
