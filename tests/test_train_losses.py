"""The training losses on hand-made tensors: zero for a perfect prediction, hand-computed values
for known errors, and the pieces they are made of (one-step estimate, Sobel features, band)."""

from __future__ import annotations

import math

import pytest
import torch

from factory.train import losses


def test_noise_loss_is_zero_when_perfect_and_the_mean_square_otherwise() -> None:
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert losses.noise_loss(target, target).item() == 0.0
    assert losses.noise_loss(target + 0.5, target).item() == pytest.approx(0.25)
    wrong = target.clone()
    wrong[0, 0, 0, 0] += 2.0  # one element off by 2: 4 / (2*4*8*8)
    assert losses.noise_loss(wrong, target).item() == pytest.approx(4.0 / 512)


def test_one_step_estimate_recovers_z0_from_the_true_noise() -> None:
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    abar = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 500, 999])
    a = abar[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    assert torch.allclose(losses.one_step_estimate(z_t, eps, abar, t, "epsilon"), z0, atol=1e-4)
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    assert torch.allclose(losses.one_step_estimate(z_t, v, abar, t, "v_prediction"), z0, atol=1e-5)


def test_attention_loss_perfect_known_error_layers_and_valid_mask() -> None:
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])  # M: object everywhere but the top-left pixel
    background = 1.0 - mask  # [[1, 0], [0, 0]]
    # A map of the right pattern at any scale is perfect under max normalisation ...
    assert losses.attention_loss([0.3 * background[:, 0]], background, (2, 2), norm="max").item() == pytest.approx(0.0, abs=1e-9)
    # ... but not for the raw probabilities: (0.3 - 1)^2 / 4 pixels.
    assert losses.attention_loss([0.3 * background[:, 0]], background, (2, 2), norm="none").item() == pytest.approx(0.49 / 4)
    # Two layers at two resolutions, averaged: a perfect 2x2 map (error 0) and a 1x1 map of 0.5
    # resized to 2x2 (error (0.5^2 + 3 * 0.5^2) / 4 = 0.25): mean 0.125.
    maps = [background[:, 0].clone(), torch.full((1, 1, 1), 0.5)]
    assert losses.attention_loss(maps, background, (2, 2), norm="none").item() == pytest.approx(0.125)
    # The target is area-averaged to the map size: a 4x4 mask to 2x2.
    big = background.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert losses.attention_loss([background[:, 0]], big, (2, 2), norm="none").item() == pytest.approx(0.0)
    # Samples whose prompt lacks the token are left out; none valid gives a graph-connected 0.
    wrong = torch.ones(1, 2, 2)
    batch = [torch.cat([background[:, 0], wrong])]
    target = torch.cat([background, background])
    assert losses.attention_loss(batch, target, (2, 2), norm="none", valid=torch.tensor([True, False])).item() == pytest.approx(0.0)
    assert losses.attention_loss(batch, target, (2, 2), norm="none").item() == pytest.approx(0.75 / 2)
    m = torch.rand(1, 2, 2, requires_grad=True)
    zero = losses.attention_loss([m], background, (2, 2), valid=torch.tensor([False]))
    zero.backward()
    assert zero.item() == 0.0 and m.grad is not None


def test_sobel_features_of_a_ramp() -> None:
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4) * 0.5  # slope 0.5 along x
    g = losses.sobel_features(ramp)[0, 0]
    # interior: the slope; borders (replicate padding): half of it; no y component.
    assert torch.allclose(g, torch.tensor([0.25, 0.5, 0.5, 0.25]).expand(4, 4))
    assert losses.sobel_features(torch.full((1, 3, 5, 5), 7.0)).abs().max().item() == 0.0


def test_transition_band_covers_soft_pixels_and_hard_edges() -> None:
    hard = torch.zeros(1, 1, 8, 8)
    hard[..., 2:6, 2:6] = 1.0
    band = losses.transition_band(hard, radius=0)
    assert band[0, 0, 0, 0] == 0 and band[0, 0, 3, 3] == 0  # far outside, deep inside
    assert band[0, 0, 2, 2] == 1 and band[0, 0, 1, 2] == 1  # both sides of the edge
    soft = torch.zeros(1, 1, 8, 8)
    soft[..., 0, 7] = 0.4  # one isolated soft pixel
    assert losses.transition_band(soft, radius=0).sum().item() == 1.0
    assert losses.transition_band(soft, radius=1).sum().item() == 4.0  # dilated, clipped at the corner
    big = torch.zeros(1, 1, 16, 16)
    big[..., 6:10, 6:10] = 1.0  # band (radius 0): rows/cols 5..10 minus the 7..8 core
    small = losses.band_to(losses.transition_band(big, radius=0), (8, 8))[0, 0]
    assert small.shape == (8, 8)
    assert small[1, 1] == 0 and small[2, 2] == 1 and small[0, 0] == 0  # a cell is in when any pixel is


def test_detail_loss_perfect_known_error_and_gate() -> None:
    target = torch.zeros(2, 2, 4, 4)
    band = torch.ones(2, 1, 4, 4)
    assert losses.detail_loss(target, target, band).item() == 0.0
    pred = target.clone()
    pred[0, 0] = torch.arange(4.0).view(1, 4) * 0.5  # sample 0, channel 0: the ramp above
    # sum of |G| over the band: 4 rows * (0.25 + 0.5 + 0.5 + 0.25) = 6; / (C=2 * 16 band pixels)
    assert losses.detail_loss(pred[:1], target[:1], band[:1]).item() == pytest.approx(6 / 32)
    # averaged with sample 1 (error 0) ...
    assert losses.detail_loss(pred, target, band).item() == pytest.approx(6 / 64)
    # ... unless sample 1 is gated out (its timestep is too high).
    assert losses.detail_loss(pred, target, band, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(6 / 32)
    # outside the band nothing counts: a band on the right half sees 4 rows * (0.5 + 0.25) = 3 over 2 * 8
    right = torch.zeros(1, 1, 4, 4)
    right[..., 2:] = 1
    assert losses.detail_loss(pred[:1], target[:1], right).item() == pytest.approx(3 / 16)
    empty = losses.detail_loss(pred[:1].requires_grad_(), target[:1], torch.zeros(1, 1, 4, 4))
    assert empty.item() == 0.0 and empty.requires_grad


def test_latent_loss_dice_plus_l1() -> None:
    soft = torch.tensor([[[[0.2, 0.7], [1.0, 0.0]]]])
    assert losses.latent_loss(soft, soft).item() == pytest.approx(0.0, abs=1e-7)  # perfect, even when soft
    zeros, ones = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    # Dice = 1 - (0 + 1) / (0 + 4 + 1) = 0.8; L1 = 1.
    assert losses.latent_loss(zeros, ones).item() == pytest.approx(1.8)
    half = torch.full((1, 1, 2, 2), 0.5)
    # Dice = 1 - (2 * 2 + 1) / (1 + 4 + 1) = 1/6; L1 = 0.5.
    assert losses.latent_loss(half, ones).item() == pytest.approx(1 / 6 + 0.5)
    assert losses.dice_loss(zeros, zeros).item() == 0.0  # empty vs empty is perfect


def test_total_loss_weights_each_term() -> None:
    terms = {"noise": torch.tensor(1.0), "green": torch.tensor(2.0), "detail": torch.tensor(3.0), "latent": torch.tensor(4.0)}
    total = losses.total_loss(terms, {"green": 0.1, "object": 9.0, "detail": 0.01, "latent": 1.0})
    assert total.item() == pytest.approx(1.0 + 0.2 + 0.03 + 4.0)
    assert not math.isnan(total.item())
