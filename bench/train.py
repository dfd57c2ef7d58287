"""Benchmark `factory train`'s step: seconds per optimizer step and peak memory, per batch size.

The model is the full Stable Diffusion 1.5 architecture with random weights, built in code (no
download): UNet (320, 640, 1280, 1280), 2 layers per block, cross-attention 768, 8 heads: 859.5 M
parameters; the SD KL VAE (128, 256, 512, 512); a CLIP ViT-L/14-sized text encoder (12 layers,
768 wide; the tiny byte-level tokenizer feeds it); the ConR matting head on 128 decoder channels.
Weights do not change the cost of a step, so random ones measure what a real SD1.5 run costs.

What one measured step is: ``Trainer.train_step`` of ``factory/train/loop.py`` on a batch of
synthetic soft-edged shapes composited on green at the given resolution, in the ``joint`` stage by
default (every loss: L_noise, L_g through the attention capture, L_detail, and L_latent with one
VAE decoder pass for the head), AdamW (or 8-bit AdamW), gradient clipping, lr schedule; the frozen
VAE encoder and text encoder run too. Defaults are the training defaults: bf16 autocast on CUDA,
gradient checkpointing on. ``--warmup`` steps are run first and not timed; the figures are the
median and mean of ``--steps`` timed steps (CUDA synchronised). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps (reset per batch size) and the reserved
peak; on CPU the process's peak resident set size so far (``ru_maxrss``; it only grows, so a
batch size's figure includes the earlier ones').

    python bench/train.py                                   # GPU: full SD1.5, 512x512, batch 1 2 4 8
    python bench/train.py --tiny --batch-sizes 1,2          # CPU smoke: the tiny model at 64x64
    python bench/train.py --batch-sizes 2 --no-gradient-checkpointing --json bench/out/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from factory.sampler import ModelComponents, MattingHead  # noqa: E402
from factory.train.config import TrainConfig  # noqa: E402
from factory.train.data import assign_prompts, scan_sources  # noqa: E402
from factory.train.distributed import Dist, pick_device  # noqa: E402
from factory.train.loop import Trainer, TrainJob  # noqa: E402
from tests.train_toy import make_toy_folder  # noqa: E402


def build_sd15_random(seed: int = 0) -> ModelComponents:
    """SD1.5-shaped components with random weights (see the module docstring)."""
    from diffusers import DDIMScheduler

    from factory.sampler.sd15 import build_sd15_modules
    from factory.sampler.tiny import build_tiny_tokenizer, tiny_scheduler_config

    tokenizer = build_tiny_tokenizer()
    unet, vae, text_encoder = build_sd15_modules(tokenizer, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = MattingHead.for_vae(vae)
    return ModelComponents(
        kind="bench",
        ref="random-sd15",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**tiny_scheduler_config()),
        head=head,
        base={"kind": "diffusers", "path": "random-sd15 (not saved)"},
    )


def build_tiny() -> ModelComponents:
    from factory.manifest import ModelSpec
    from factory.sampler import load_components

    return load_components(ModelSpec(source="tiny"))


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        }
    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def bench_batch(comps: ModelComponents, data: Path, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = TrainConfig(
        model="tiny",
        data=[str(data)],
        resolution=args.resolution,
        batch_size=batch,
        stage=args.stage,
        steps=10_000,
        gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision,
        use_8bit_adam=args.adam8bit,
        ema=args.ema,
        data_workers=args.data_workers,
        validation_prompts=[],
        lr_warmup_steps=0,
        seed=0,
    )
    records = scan_sources(cfg.data)
    assign_prompts(records, None, cfg.prompt_template, cfg.canvas_token, None)
    job = TrainJob(config=cfg.model_dump(mode="json"), records=records, out=str(data.parent / "out"))
    result: dict[str, Any] = {"batch_size": batch}
    trainer = None
    try:
        trainer = Trainer(job, Dist(device=device), components=comps)
        loader = iter(trainer.batches(args.warmup + args.steps))
        for _ in range(args.warmup):
            trainer.train_step([next(loader)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            micro = [next(loader)]
            t0 = time.perf_counter()
            rec = trainer.train_step(micro)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        result.update(
            {
                "s_per_step_median": round(med, 4),
                "s_per_step_mean": round(statistics.fmean(times), 4),
                "images_per_s": round(batch / med, 3),
                "last_loss": rec["loss"],
                **peak_memory(device),
            }
        )
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    finally:
        if trainer is not None and trainer.capture is not None:
            trainer.capture.remove()
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny test model at 64x64 (CPU smoke)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,2,4,8; --tiny: 1,2)")
    ap.add_argument("--resolution", type=int, default=None, help="default 512 (--tiny: 64)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--stage", choices=("generator", "joint"), default="joint")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), default="auto")
    ap.add_argument("--adam8bit", action="store_true", help="bitsandbytes AdamW8bit (CUDA)")
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--data-workers", type=int, default=None, help="default 4 on CUDA, 0 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,2,4,8")).split(",")]
    if args.data_workers is None:
        args.data_workers = 4 if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    comps = build_tiny() if args.tiny else build_sd15_random()
    build_s = time.perf_counter() - t0
    n_unet = sum(p.numel() for p in comps.unet.parameters())
    info = {
        "model": "tiny" if args.tiny else "SD1.5 architecture, random weights",
        "unet_params_m": round(n_unet / 1e6, 1),
        "resolution": args.resolution,
        "stage": args.stage,
        "gradient_checkpointing": args.gradient_checkpointing,
        "mixed_precision": args.mixed_precision,
        "optimizer": "AdamW8bit" if args.adam8bit else "AdamW",
        "ema": args.ema,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "torch": torch.__version__,
        "build_s": round(build_s, 1),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print(json.dumps(info), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = make_toy_folder(Path(tmp) / "data", n=16, size=args.resolution)
        for b in sizes:
            r = bench_batch(comps, data, b, args, device)
            results.append(r)
            print(json.dumps(r), flush=True)
    print()
    mem_col = "peak alloc GB" if device.type == "cuda" else "peak RSS GB"
    print(f"| batch | s/step (median) | images/s | {mem_col} |")
    print("|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['batch_size']} | {r['error']} | | |")
        else:
            mem = r.get("peak_allocated_gb", r.get("peak_rss_gb"))
            print(f"| {r['batch_size']} | {r['s_per_step_median']:.3f} | {r['images_per_s']:.2f} | {mem} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
