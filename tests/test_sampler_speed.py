"""The sampler's GPU speed paths, exercised on CPU as far as they go: bf16, channels_last, SDPA,
the torch.compile guard, automatic batch sizes and halving on out-of-memory."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from factory.errors import RunError
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler import auto_batch_size, build_tiny_components, load_sampler

SETTINGS = SamplerSettings(steps=2, width=64, height=64, guidance=5.0, batch_size=4, scheduler="ddim")
ROWS = [
    PlanRow(index=i, key=f"f-{i}", class_name="lamp", category="object", prompt=f"a lamp number {i} on a plain green background",
            negative_prompt="", seed=300 + i, attributes={})
    for i in range(4)
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def fp32():
    return load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings(), device="cpu")


def test_bf16_runs_and_keeps_the_head_in_float32(fp32) -> None:
    bf16 = load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings(), device="cpu", dtype="bf16")
    assert bf16.metadata["dtype"] == "bfloat16" and bf16.components.unet.dtype == torch.bfloat16
    assert next(bf16.head.parameters()).dtype == torch.float32
    out, ref = bf16.sample(ROWS[:2]), fp32.sample(ROWS[:2])
    for g, r in zip(out, ref):
        assert g.error is None and g.image.dtype == np.uint8 and g.coarse_alpha.dtype == np.float32
        # bf16 rounding moves pixels a little, not the picture.
        assert np.abs(g.image.astype(int) - r.image.astype(int)).mean() < 12


def test_default_attention_is_sdpa(fp32) -> None:
    assert {type(p).__name__ for p in fp32.components.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert {type(p).__name__ for p in fp32.components.vae.attn_processors.values()} == {"AttnProcessor2_0"}


def test_channels_last_gives_the_same_unet_output() -> None:
    unet = build_tiny_components(seed=0)["unet"]
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(x, 10, ctx).sample
        unet.to(memory_format=torch.channels_last)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        last = unet(x.to(memory_format=torch.channels_last), 10, ctx).sample
    torch.testing.assert_close(last, plain, atol=1e-4, rtol=1e-4)


def test_compile_is_cuda_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        s = load_sampler(ModelSpec(source="tiny"), SETTINGS, CanvasSettings(), device="cpu", compile=True)
    assert s.metadata["compile"] is False and "only used on CUDA" in caplog.text
    assert not hasattr(s.components.unet, "_compiled_call_impl") or s.components.unet._compiled_call_impl is None


def test_auto_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_batch_size(SamplerSettings(width=64, height=64), "cpu") == 4
    assert auto_batch_size(SamplerSettings(width=512, height=512), "cpu") == 2
    assert 1 <= auto_batch_size(SamplerSettings(), None) <= 4  # no GPU here
    free = {"bytes": 80e9}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free["bytes"]), int(80e9)))
    assert auto_batch_size(SamplerSettings(width=512, height=512), "cuda") == 21  # 0.8 * 80 GB / 3 GB
    assert auto_batch_size(SamplerSettings(width=1024, height=1024), "cuda") == 5
    assert auto_batch_size(SamplerSettings(width=256, height=256), "cuda:0") == 32  # capped
    free["bytes"] = 1e9
    assert auto_batch_size(SamplerSettings(width=512, height=512), "cuda") == 1  # never 0


def test_out_of_memory_halves_the_batch(fp32, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ref = fp32.sample(ROWS)
    real = fp32._sample_batch
    sizes = []

    def small_gpu(rows):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rows)

    monkeypatch.setattr(fp32, "_sample_batch", small_gpu)
    try:
        with caplog.at_level(logging.WARNING):
            out = fp32.sample(ROWS)
        assert sizes == [4, 2, 1, 1, 2, 1, 1] and fp32.batch_size == 1
        assert "out of GPU memory at batch 4" in caplog.text
        for g, r in zip(out, ref):
            assert np.abs(g.image.astype(int) - r.image.astype(int)).max() <= 1

        def no_gpu(rows):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(fp32, "_sample_batch", no_gpu)
        with pytest.raises(RunError, match="out of GPU memory for one 64x64 sample"):
            fp32.sample(ROWS[:1])
    finally:
        fp32.batch_size = SETTINGS.batch_size
