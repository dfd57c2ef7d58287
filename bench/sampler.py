"""Benchmark of the DiffuMatting sampler against a plain diffusers ``StableDiffusionPipeline``.

Both run the same weights in one process: the full Stable Diffusion 1.5 architecture with random
weights (UNet (320, 640, 1280, 1280) x 2 layers, cross-attention 768, 8 heads; VAE (128, 256, 512,
512); CLIP ViT-L/14 text encoder; the tiny model's in-memory tokenizer, so nothing is downloaded),
the same scheduler (DPM-Solver++ 2M), steps (30), guidance (7.5), size (512x512) and dtype (bf16 on
CUDA), and the same prompts. Random weights cost exactly the FLOPs of the real ones; the images
are noise (and may be NaN in bf16: counted, never skipped).

Runs, in this order (ours runs on its own copy of the weights, because it changes modules in
place: channels_last, compile):

1. the plain pipeline at batch 1, then at each of ``--baseline-batches`` (up to the first
   out-of-memory): its best batch is the baseline;
2. our sampler (``DiffuMattingSampler``: per-row generators, one batched VAE decode feeding the
   matting head, bf16, channels_last, SDPA) at its automatic batch size (``auto_batch_size``), and
   at the baseline's best batch when that differs;
3. head to head: the plain pipeline at its best batch and ours at its batch, call for call in turn
   (``--rounds``), so both see the same machine state (a shared machine drifts between runs);
4. with ``--compile``, our sampler with ``torch.compile`` of the UNet (CUDA only).

images/s is the batch size over the median time of a call (after one warm-up call, which is also
where compilation happens and is reported apart), over at least 3 calls and ``--images`` images;
both return finished uint8 images on the host. The FLOP fraction is images/s x FLOP per image / the
device's peak (``--peak-tflops``, default 989: H100 SXM dense bf16). FLOP per image is counted with
``torch.utils.flop_counter`` on ``meta`` copies of the modules (shapes only): one UNet forward at
batch 2 (classifier-free guidance) times the steps, plus one VAE decode and the text encoder:
50.74 TFLOP for SD1.5 at 512x512 and 30 steps.

    python bench/sampler.py --compile --json bench/out/sampler.json      # on a GPU machine
    python bench/sampler.py --tiny                                       # CPU smoke test (tiny model)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from factory.manifest import CanvasSettings, SamplerSettings  # noqa: E402
from factory.plan import PlanRow  # noqa: E402
from factory.sampler import DiffuMattingSampler, MattingHead, ModelComponents, auto_batch_size  # noqa: E402
from factory.sampler.components import place, quiet_transformers  # noqa: E402
from factory.sampler.schedulers import make_scheduler  # noqa: E402
from factory.sampler.tiny import build_tiny_components, build_tiny_tokenizer, tiny_scheduler_config  # noqa: E402

PROMPT = "a photo of a {}, isolated on a plain green background, studio lighting, sharp focus, high quality"
NEGATIVE = "blurry, low quality, shadow, text, watermark, cropped"
OBJECTS = ("red apple", "wooden chair", "glass bottle", "house plant", "toy car", "ceramic cup", "desk lamp", "cat")


@dataclass
class Result:
    run: str
    batch: int
    images: int = 0
    seconds: float = 0.0  # median per call
    images_per_s: float = 0.0
    nonfinite: int = 0
    warmup_s: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the model


def build_sd15(device: torch.device, seed: int = 0) -> dict[str, Any]:
    """SD1.5's architecture with random weights, built directly on ``device`` (float32)."""
    from factory.sampler.sd15 import build_sd15_modules

    tokenizer = build_tiny_tokenizer()
    with torch.device(device):
        unet, vae, text_encoder = build_sd15_modules(tokenizer, seed)
        head = MattingHead.for_vae(vae)
    from diffusers import DDIMScheduler

    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**tiny_scheduler_config()),
        "head": head.eval(),
    }


def count_flops_per_image(parts: dict[str, Any], size: int, steps: int) -> float:
    """FLOP of one image: steps x UNet forward at batch 2 (guidance) + VAE decode + text encoder.

    Counted by ``torch.utils.flop_counter`` on copies of the modules on the ``meta`` device (shapes
    only: instant, and the same count whatever the device; on CPU the fused SDPA kernel would not
    be counted at all).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = type(parts["unet"]).from_config(parts["unet"].config)
        vae = type(parts["vae"]).from_config(parts["vae"].config)
        te = type(parts["text_encoder"])(parts["text_encoder"].config)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = torch.randn(2, unet.config.in_channels, size // scale, size // scale, device="meta")
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="meta")
    ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
    with torch.inference_mode():
        with FlopCounterMode(display=False) as unet_count:
            unet(latent, 500, context)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(latent[:1])
        with FlopCounterMode(display=False) as te_count:
            te(ids)
    return float(steps * unet_count.get_total_flops() + vae_count.get_total_flops() + te_count.get_total_flops())


# ------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_batches(fn: Any, batch: int, n_images: int, device: torch.device) -> tuple[float, int, int, float]:
    """Run ``fn(batch, call_index)`` once to warm up, then until ``n_images`` images (at least 3
    calls). Returns (median seconds per call, images, non-finite images, warm-up seconds): the
    median keeps a noisy shared machine's spikes out of the figure."""
    t0 = time.perf_counter()
    fn(batch, 0)
    sync(device)
    warmup = time.perf_counter() - t0
    calls = max(3, math.ceil(n_images / batch))
    nonfinite = 0
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        nonfinite += fn(batch, i + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), calls * batch, nonfinite, warmup


def rows_for(batch: int, call: int) -> list[PlanRow]:
    rows = []
    for j in range(batch):
        i = call * batch + j
        name = OBJECTS[i % len(OBJECTS)]
        rows.append(PlanRow(index=i, key=f"bench-{i:08d}", class_name=name, category="object", prompt=PROMPT.format(name),
                            negative_prompt=NEGATIVE, seed=1000 + i, attributes={}))  # fmt: skip
    return rows


def plain_caller(parts: dict[str, Any], args: argparse.Namespace) -> Any:
    """``call(batch, index) -> non-finite images`` with a plain ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=make_scheduler("dpmpp", parts["scheduler"].config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    @torch.inference_mode()
    def call(b: int, i: int) -> int:
        rows = rows_for(b, i)
        out = pipe(
            prompt=[r.prompt for r in rows],
            negative_prompt=[r.negative_prompt for r in rows],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows],
            output_type="np",
        ).images
        return int((~torch.isfinite(torch.from_numpy(out)).flatten(1).all(dim=1)).sum())

    return call


def ours_caller(parts: dict[str, Any], args: argparse.Namespace, device: torch.device, dtype: torch.dtype, batch: int | None, compile: bool) -> tuple[Any, Any]:
    """``(sampler, call(batch, index) -> failed images)`` with our sampler on ``parts``."""
    comps = ModelComponents(kind="bench", ref="sd15-random", base={"kind": "bench"}, **parts)
    settings = SamplerSettings(steps=args.steps, guidance=args.guidance, width=args.size, height=args.size, scheduler="dpmpp", batch_size=batch)
    sampler = DiffuMattingSampler(comps, settings, CanvasSettings(), identity="bench", device=device, dtype=dtype, compile=compile)

    def call(b: int, i: int) -> int:
        return sum(g.error is not None for g in sampler.sample(rows_for(b, i)))

    return sampler, call


def run_baseline(parts: dict[str, Any], args: argparse.Namespace, device: torch.device, batch: int) -> Result:
    res = Result("plain StableDiffusionPipeline", batch)
    try:
        res.seconds, res.images, res.nonfinite, res.warmup_s = time_batches(plain_caller(parts, args), batch, args.images, device)
        res.images_per_s = batch / res.seconds
    except Exception as exc:  # noqa: BLE001 - an OOM ends the batch search, anything else is reported
        res.error = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"
    finally:
        free_memory(device)
    return res


def run_ours(parts: dict[str, Any], args: argparse.Namespace, device: torch.device, dtype: torch.dtype, batch: int | None, compile: bool) -> Result:
    label = "DiffuMattingSampler" + (" + torch.compile" if compile else "") + (" (auto batch)" if batch is None else "")
    res = Result(label, 0)
    try:
        sampler, call = ours_caller(parts, args, device, dtype, batch, compile)
        size = res.batch = sampler.batch_size
        res.extra = {"compile": sampler.metadata["compile"], "channels_last": device.type == "cuda"}
        res.seconds, res.images, res.nonfinite, res.warmup_s = time_batches(call, size, args.images, device)
        if sampler.batch_size != size:  # halved on out-of-memory: time again at the size that fits
            size = sampler.batch_size
            res.seconds, res.images, res.nonfinite, res.warmup_s = time_batches(call, size, args.images, device)
        res.batch = size
        res.images_per_s = size / res.seconds
    except Exception as exc:  # noqa: BLE001
        res.error = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"
    finally:
        free_memory(device)
    return res


def head_to_head(plain: dict[str, Any], ours: dict[str, Any], args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                 plain_batch: int, ours_batch: int | None) -> list[Result]:  # fmt: skip
    """The plain pipeline at its best batch and ours, call for call in turn (``--rounds`` each after a
    warm-up): both see the same machine state, which sequential runs on a shared machine do not."""
    plain_call = plain_caller(plain, args)
    sampler, ours_call = ours_caller(ours, args, device, dtype, ours_batch, False)
    results = [Result("plain StableDiffusionPipeline (interleaved)", plain_batch), Result("DiffuMattingSampler (interleaved)", sampler.batch_size)]
    calls = [(plain_call, plain_batch), (ours_call, sampler.batch_size)]
    times: list[list[float]] = [[], []]
    try:
        for k in range(args.rounds + 1):
            for j, (fn, b) in enumerate(calls):
                t0 = time.perf_counter()
                bad = fn(b, 100 + k)
                sync(device)
                if k == 0:
                    results[j].warmup_s = time.perf_counter() - t0
                else:
                    times[j].append(time.perf_counter() - t0)
                    results[j].images += b
                    results[j].nonfinite += bad
        for r, t, (_, b) in zip(results, times, calls):
            r.seconds = statistics.median(t)
            r.images_per_s = b / r.seconds
    except Exception as exc:  # noqa: BLE001
        for r in results:
            r.error = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"
    finally:
        free_memory(device)
    return results


# ------------------------------------------------------------------------------ report


def markdown(results: list[Result], summary: dict[str, Any]) -> str:
    best = summary["baseline_best_images_per_s"]
    flop, peak = summary["flop_per_image"], summary["peak_flops"]
    lines = [
        f"device: {summary['device']}; dtype {summary['dtype']}; {summary['size']}x{summary['size']}, {summary['steps']} steps "
        f"(DPM-Solver++), guidance {summary['guidance']}; model {summary['model']}",
        f"FLOP per image: {flop / 1e12:.3g} TFLOP (counted); peak {peak / 1e12:.0f} TFLOP/s"
        + (" (a GPU's figure: the FLOP-limit column means nothing on CPU)" if summary["device"].startswith("CPU") else ""),
        "",
        "| run | batch | images/s | s/image | vs best plain | FLOP limit | warm-up s | non-finite |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.run} | {r.batch} | {r.error} | | | | | |")
            continue
        frac = r.images_per_s * flop / peak
        lines.append(
            f"| {r.run} | {r.batch} | {r.images_per_s:.3g} | {1 / r.images_per_s:.3g} | {r.images_per_s / best:.2f}x | "
            f"{100 * frac:.2g} % | {r.warmup_s:.1f} | {r.nonfinite}/{r.images} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny model, 4 steps, 64x64, batches 1,2,4")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU (both runs)")
    ap.add_argument("--steps", type=int, help="default 30 (tiny: 4)")
    ap.add_argument("--size", type=int, help="image side in px, default 512 (tiny: 64)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--baseline-batches", help="batch sizes tried for the plain pipeline, default 1,2,4,8,16,24 (tiny: 1,2,4)")
    ap.add_argument("--batch", type=int, help="our batch size (default: auto_batch_size)")
    ap.add_argument("--compile", action="store_true", help="also run ours with torch.compile of the UNet (CUDA only)")
    ap.add_argument("--images", type=int, help="images timed per run (at least 2 batches), default 48 (tiny: 8)")
    ap.add_argument("--rounds", type=int, help="interleaved plain/ours calls after the searches, default 5 (tiny: 8; 0: none)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak, dense bf16 TFLOP/s (H100 SXM: 989)")
    ap.add_argument("--flop-per-image", type=float, help="skip counting: FLOP per image (SD1.5 512px 30 steps: 50.7e12)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; with --tiny 1, steadier on a shared CPU)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    args.steps = args.steps or (4 if args.tiny else 30)
    args.size = args.size or (64 if args.tiny else 512)
    args.images = args.images or (8 if args.tiny else 48)
    args.rounds = (8 if args.tiny else 5) if args.rounds is None else args.rounds
    batches = [int(b) for b in (args.baseline_batches or ("1,2,4" if args.tiny else "1,2,4,8,16,24")).split(",")]
    if not args.tiny and device.type != "cuda":
        print("warning: the full SD1.5 model on CPU takes minutes per image; use --tiny for a smoke test", file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with quiet_transformers():
        parts = build_tiny_components(seed=0) if args.tiny else build_sd15(device)
    for name in ("unet", "vae", "text_encoder"):
        place(parts[name], device, dtype)
    place(parts["head"], device, torch.float32)
    flop = args.flop_per_image or count_flops_per_image(parts, args.size, args.steps)

    results: list[Result] = []
    for b in sorted(set(batches)):
        r = run_baseline(parts, args, device, b)
        results.append(r)
        print(f"plain pipeline, batch {b}: " + (r.error or f"{r.images_per_s:.3g} images/s"), file=sys.stderr)
        if r.error:
            break
    ok = [r for r in results if not r.error]
    if not ok:
        print("error: the plain pipeline ran at no batch size", file=sys.stderr)
        return 1
    best = max(ok, key=lambda r: r.images_per_s)
    # Ours gets its own copy of the weights: it changes modules in place (channels_last, compile),
    # which must not leak into the plain pipeline's runs.
    ours_parts = copy.deepcopy(parts)
    auto = args.batch or auto_batch_size(SamplerSettings(width=args.size, height=args.size), str(device))
    runs = [args.batch] + ([best.batch] if best.batch != auto else [])
    for batch in runs:
        r = run_ours(ours_parts, args, device, dtype, batch, False)
        if batch is not None and batch == best.batch and args.batch is None:
            r.run += " (plain's best batch)"
        results.append(r)
        print(f"{r.run}, batch {r.batch}: " + (r.error or f"{r.images_per_s:.3g} images/s"), file=sys.stderr)
    if args.rounds:
        pair = head_to_head(parts, ours_parts, args, device, dtype, best.batch, args.batch)
        results += pair
        print("interleaved: " + ", ".join(r.error or f"{r.images_per_s:.3g}" for r in pair) + " images/s", file=sys.stderr)
    if args.compile and device.type != "cuda":
        print("note: --compile is CUDA-only in the sampler; skipped on CPU", file=sys.stderr)
    elif args.compile:
        del ours_parts
        free_memory(device)
        r = run_ours(copy.deepcopy(parts), args, device, dtype, args.batch, True)
        results.append(r)
        print(f"{r.run}, batch {r.batch}: " + (r.error or f"{r.images_per_s:.3g} images/s"), file=sys.stderr)

    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "model": "tiny (random)" if args.tiny else "SD1.5 architecture (random weights)",
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "flop_per_image": flop,
        "peak_flops": args.peak_tflops * 1e12,
        "baseline_best_batch": best.batch,
        "baseline_best_images_per_s": best.images_per_s,
        "baseline_batch1_images_per_s": next((r.images_per_s for r in results if r.batch == 1 and r.run.startswith("plain") and not r.error), None),
        "torch": torch.__version__,
    }
    ours = [r for r in results if r.run.startswith("DiffuMatting") and not r.error]
    if ours:
        top = max(ours, key=lambda r: r.images_per_s)
        summary["ours_best"] = {"run": top.run, "batch": top.batch, "images_per_s": top.images_per_s,
                                "speedup_vs_best_plain": top.images_per_s / best.images_per_s,
                                "flop_fraction": top.images_per_s * flop / (args.peak_tflops * 1e12)}  # fmt: skip
    pair = [r for r in results if r.run.endswith("(interleaved)") and not r.error]
    if len(pair) == 2:
        summary["interleaved_speedup"] = pair[1].images_per_s / pair[0].images_per_s
    print(markdown(results, summary))
    if "interleaved_speedup" in summary:
        print(f"\nhead to head (interleaved calls): ours / plain at its best batch = {summary['interleaved_speedup']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
