"""The DiffuMatting training losses, one small function each (formulas in ``docs/train.md``).

Notation: ``M`` is the ground-truth alpha in [0, 1] (B, 1, H, W), used as the object mask;
``z0`` the clean latent, ``z_t`` the noised one, ``eps`` the noise, ``abar_t`` the cumulative
noise-schedule product. Every function returns a scalar tensor that keeps its autograd graph,
including when its answer is 0 for lack of anything to compare (an all-zero term of the right
graph, so ``backward`` always works).

- :func:`noise_loss`: ``L_noise = mean (eps_theta - target)^2`` (target = eps, or v for
  v-prediction models).
- :func:`attention_loss`: ``L_g`` (the canvas token against ``1 - M``) and ``L_obj`` (object
  tokens against ``M``): every layer's map resized (bilinear) to one size, optionally divided by
  its spatial max, compared by mean squared error with the target resized (area) to that size,
  averaged over layers, then over the samples whose prompt holds the tokens.
- :func:`detail_loss`: ``L_detail = sum(W |G(z0_hat) - G(z0)|) / (C sum(W))`` per sample, with
  ``G(x) = |S_x * x| + |S_y * x|`` per channel (Sobel kernels divided by 8, replicate padding),
  ``W`` the transition band, averaged over the samples that count (timestep gate).
- :func:`latent_loss`: ``L_latent = Dice + L1`` between the head's ``M_cp`` and ``M``, with
  ``Dice = 1 - (2 sum(p m) + 1) / (sum(p^2) + sum(m^2) + 1)`` per sample (the squared form is 0
  for a perfect soft prediction) and ``L1 = mean |p - m|``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Horizontal Sobel kernel / 8: a ramp of slope 1 per pixel gives exactly 1.
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
SOBEL_Y = SOBEL_X.t().contiguous()
DICE_SMOOTH = 1.0
#: Alpha strictly between these is "unknown" (the transition band's core).
BAND_EPS = 1e-3


def _zero_like(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero scalar that depends on ``tensors`` (keeps ``backward`` valid)."""
    return sum((t.sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


def noise_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_noise``: mean squared error between the UNet's prediction and its target, in float32."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def one_step_estimate(
    z_t: torch.Tensor, model_output: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """``z0_hat`` from one UNet call: ``(z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` for epsilon
    models; ``sqrt(abar_t) z_t - sqrt(1 - abar_t) v`` for v-prediction; the output for ``sample``."""
    abar = alphas_cumprod.to(z_t.device, torch.float32)[timesteps].view(-1, *([1] * (z_t.ndim - 1)))
    z, out = z_t.float(), model_output.float()
    if prediction_type == "epsilon":
        return (z - (1.0 - abar).sqrt() * out) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * z - (1.0 - abar).sqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def attention_loss(
    maps: Sequence[torch.Tensor],
    target: torch.Tensor,
    size: tuple[int, int],
    *,
    norm: str = "max",
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean over layers and pixels of ``(A_l - target)^2`` at ``size``; averaged over ``valid`` samples.

    ``maps``: one (B, h_l, w_l) map per cross-attention layer (a token group's attention,
    averaged over heads and the group's tokens). ``target``: (B, 1, H, W) or (B, H, W) in [0, 1]
    (``1 - M`` for the canvas token, ``M`` for object tokens), resized to ``size`` by area
    averaging. ``norm="max"`` divides each layer's map by its spatial max (+eps) first, so only the
    map's pattern counts; ``"none"`` compares the raw probabilities. ``valid`` (B,) bool: samples
    whose prompt has the tokens (others are left out; none valid gives 0).
    """
    if not maps:
        raise ValueError("no attention maps")
    tgt = target.float()
    if tgt.ndim == 3:
        tgt = tgt[:, None]
    if tuple(tgt.shape[-2:]) != tuple(size):
        bigger = all(s >= d for s, d in zip(tgt.shape[-2:], size))
        tgt = F.adaptive_avg_pool2d(tgt, size) if bigger else F.interpolate(tgt, size=size, mode="bilinear", align_corners=False)
    tgt = tgt[:, 0]
    per_sample = None
    for m in maps:
        a = m.float()
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        if norm == "max":
            a = a / (a.flatten(1).amax(dim=1).view(-1, 1, 1) + eps)
        elif norm != "none":
            raise ValueError(f"unknown attention norm {norm!r}")
        err = (a - tgt).pow(2).flatten(1).mean(dim=1)
        per_sample = err if per_sample is None else per_sample + err
    assert per_sample is not None
    per_sample = per_sample / len(maps)
    if valid is None:
        return per_sample.mean()
    w = valid.to(per_sample.device, per_sample.dtype)
    if w.sum() == 0:
        return _zero_like(per_sample)
    return (per_sample * w).sum() / w.sum()


def sobel_features(x: torch.Tensor) -> torch.Tensor:
    """``|S_x * x| + |S_y * x|`` per channel of (B, C, H, W), replicate padding (flat borders give 0)."""
    c = x.shape[1]
    k = torch.stack([SOBEL_X, SOBEL_Y]).to(x.device, x.dtype)[:, None]  # (2, 1, 3, 3)
    k = k.repeat(c, 1, 1, 1)  # (2C, 1, 3, 3): channel i -> outputs 2i (x), 2i+1 (y)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return g.abs().unflatten(1, (c, 2)).sum(dim=2)


def transition_band(alpha: torch.Tensor, radius: int, eps: float = BAND_EPS) -> torch.Tensor:
    """The band around the object's boundary, (B, 1, H, W) in {0, 1}.

    Core: pixels with ``eps < alpha < 1 - eps`` (soft matte), plus the pixels whose 3x3
    neighbourhood crosses alpha = 0.5 (so hard masks have a band too); dilated by ``radius`` px
    (a (2r+1)^2 square).
    """
    a = alpha.float()
    unknown = (a > eps) & (a < 1.0 - eps)
    solid = (a >= 0.5).float()
    edge = F.max_pool2d(solid, 3, 1, 1) != -F.max_pool2d(-solid, 3, 1, 1)
    band = (unknown | edge).float()
    if radius > 0:
        band = F.max_pool2d(band, 2 * radius + 1, 1, radius)
    return band


def band_to(band: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The band at another (smaller) resolution: a cell is in it when any of its pixels is."""
    if tuple(band.shape[-2:]) == tuple(size):
        return band
    return F.adaptive_max_pool2d(band, size)


def detail_loss(pred: torch.Tensor, target: torch.Tensor, band: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``L_detail``: band-masked L1 between Sobel features of ``pred`` (z0_hat, or its decoded grey
    image) and ``target`` (z0, or the real grey image), (B, C, H, W) each.

    ``band`` (B, 1, H, W) at that resolution (see :func:`transition_band`, :func:`band_to`).
    Per sample ``sum(band * |G(pred) - G(target)|) / (C * sum(band))``; samples with an empty
    band or ``weight`` 0 are left out (``weight`` (B,): the timestep gate); the result is the
    weighted mean over the rest, 0 when none is left.
    """
    diff = (sobel_features(pred.float()) - sobel_features(target.float())).abs()
    b = band.float()
    area = b.flatten(1).sum(dim=1) * pred.shape[1]
    per_sample = (diff * b).flatten(1).sum(dim=1) / area.clamp_min(1.0)
    w = (area > 0).float() if weight is None else weight.to(per_sample.device, torch.float32) * (area > 0).float()
    if w.sum() == 0:
        return _zero_like(per_sample)
    return (per_sample * w).sum() / w.sum()


def grey(image: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of an RGB image in [-1, 1], mapped to [0, 1] (ITU-R BT.601 weights)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=image.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((image.float() + 1.0) * 0.5 * w).sum(dim=1, keepdim=True)


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - (2 sum(p m) + s) / (sum(p^2) + sum(m^2) + s)`` per sample, averaged."""
    p, m = pred.float().flatten(1), target.float().flatten(1)
    num = 2.0 * (p * m).sum(dim=1) + smooth
    den = p.pow(2).sum(dim=1) + m.pow(2).sum(dim=1) + smooth
    return (1.0 - num / den).mean()


def latent_loss(pred_alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_latent = Dice(M_cp, M) + mean |M_cp - M|`` (both (B, 1, H, W) in [0, 1])."""
    return dice_loss(pred_alpha, target) + F.l1_loss(pred_alpha.float(), target.float(), reduction="mean")


def total_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``L_noise + sum_k lambda_k L_k`` over the terms present (``noise`` has weight 1)."""
    total = terms["noise"]
    for name, value in terms.items():
        if name != "noise":
            total = total + float(weights[name]) * value
    return total
