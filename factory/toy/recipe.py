"""The toy model's training recipe, one reproducible command::

    python -m factory.toy.recipe --out WORK [--package]

1. **world**: ``N_TRAIN`` samples of the toy world (seed ``WORLD_SEED``) in ``WORK/data``;
2. **base**: an SD1.5-shaped model built in code (the tiny model's tokenizer and text encoder,
   a small KL VAE with 4 latent channels and factor 4, a small UNet with cross-attention) whose
   VAE alone is then trained on the world's images (reconstruction + a small KL term) and frozen,
   written as a diffusers folder ``WORK/base``;
3. **captions**: each world caption ("a red fur tuft") put into one of the project's GOM prompt
   templates (``prompts/templates/objects.yaml``: view, lighting, "isolated on a pure green
   background, ..."), seeded per sample, in ``WORK/captions.jsonl``: the README's manifest then
   speaks the model's language except for its object names;
4. **train**: ``factory train`` itself on ``WORK/data`` from ``WORK/base`` with :data:`TRAIN`
   (generator stage, then generator + matting head), into ``WORK/run``;
5. **package** (``--package``): the run's last checkpoint re-saved with its base embedded and the
   machine paths left out, into the package's ``factory/toy/model`` (what ``--model toy`` loads).

Every step is seeded and skipped when its output is already complete, so an interrupted recipe
resumes (``factory train --resume`` for step 3). Wall times go to ``WORK/recipe.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from factory.fsutil import atomic_write_text
from factory.toy import MODEL_DIR

#: The prompt templates of the README's manifest (the recipe runs from a checkout of the repository).
TEMPLATES = Path(__file__).resolve().parents[2] / "prompts" / "templates" / "objects.yaml"

WORLD_SEED = 0
N_TRAIN = 2000
SIZE = 64
SEED = 0

#: The base model's shapes (SD1.5's in docs/toy-model.md).
VAE = {
    "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": SIZE,
}
UNET = {
    "sample_size": SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
#: VAE pre-training: reconstruction (L1 + MSE) + KL_WEIGHT * KL, Adam, on random VAE_CROP-px crops
#: (the VAE is convolutional: crops teach it the same at a quarter of the cost).
VAE_STEPS = 1500
#: Then VAE_OBJECT_STEPS more with the object's pixels weighted 1 + VAE_OBJECT_WEIGHT * alpha
#: (a fresh optimizer and generator): the first phase alone leaves objects washed out in green.
VAE_OBJECT_STEPS = 500
VAE_OBJECT_WEIGHT = 4.0
VAE_BATCH = 12
VAE_CROP = 32
VAE_LR = 1e-3
#: Each phase's learning rate falls from VAE_LR to VAE_LR * VAE_LR_FLOOR along a cosine.
VAE_LR_FLOOR = 0.05
KL_WEIGHT = 1e-6

#: ``factory train`` settings (``WORK/train.yaml``); model and data are filled in.
TRAIN: dict[str, Any] = {
    "resolution": SIZE,
    "steps": 6000,
    "stage": "both",
    "generator_steps": 4500,
    "batch_size": 8,
    "lr": 5e-4,
    "head_lr": 1e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 200,
    "weight_decay": 0.0,
    "ema": True,
    "ema_decay": 0.999,
    "gradient_checkpointing": False,
    "data_workers": 0,
    # studio greens close to the reference (0, 255, 0), as the paper's pure-green canvases: the
    # canvas the model learns to draw (the world's own, wider greens stay in its composites)
    "green_hue": (116.0, 124.0),
    "green_saturation": (0.95, 1.0),
    "green_value": (0.92, 1.0),
    # the model learns from scratch: 10 % empty prompts give classifier-free guidance its
    # unconditional branch (SD1.5 was trained so)
    "proportion_empty_prompts": 0.1,
    "lambda_green": 0.1,
    "lambda_detail": 0.1,
    "lambda_latent": 1.0,
    "checkpoint_every": 500,
    "keep_checkpoints": 20,  # all of them: the ablations compare at equal steps
    "validation_prompts": [
        "a red fur tuft, front view, isolated on a pure green background, soft studio lighting, highly detailed fine edges, sharp focus",
        "product photo of a blue glass sphere, side view, centered on a plain uniform green backdrop, rim lighting, crisp fine details, sharp focus",
        "macro photograph of a yellow star, top-down view, isolated on an evenly lit pure green background, softbox key light, fine texture, sharp focus",
        "photo of a white seed head in the center of the frame, eye-level view, simple pure green background, high-key lighting, detailed outline, sharp focus, 8k",
    ],
    "validation_steps": 20,
    "validation_guidance": 3.0,
    "seed": SEED,
    "device": "cpu",
    "report_to": "none",
}


def build_base(seed: int = SEED) -> dict[str, Any]:
    """The untrained base: tiny tokenizer and text encoder, a new VAE and UNet (seeded)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from factory.sampler.tiny import build_tiny_components, tiny_scheduler_config

    tiny = build_tiny_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, **VAE)
        unet = UNet2DConditionModel(**UNET)
    return {
        "vae": vae, "unet": unet, "text_encoder": tiny["text_encoder"], "tokenizer": tiny["tokenizer"],
        "scheduler": DDIMScheduler(**tiny_scheduler_config()),
    }  # fmt: skip


def vae_images(data: Path, seed: int) -> Any:
    """The world's composites and the same objects on the recipe's studio greens: (N, 4, H, W), RGB
    in [-1, 1] and the alpha in [0, 1] as the fourth channel."""
    import colorsys

    import numpy as np
    import torch

    from factory.imageio import read_alpha, read_rgb

    rng = np.random.default_rng(seed)
    out = []
    for png in sorted(data.glob("toy-*.png")):
        if png.name.endswith((".alpha.png", ".fg.png")):
            continue
        key = png.name[: -len(".png")]
        alpha = read_alpha(data / f"{key}.alpha.png")[..., None]
        out.append(np.concatenate([read_rgb(png).astype(np.float32) / 255.0, alpha], axis=-1))
        fg = read_rgb(data / f"{key}.fg.png").astype(np.float32) / 255.0
        h = rng.uniform(*TRAIN["green_hue"]) / 360.0
        green = np.array(colorsys.hsv_to_rgb(h, rng.uniform(*TRAIN["green_saturation"]), rng.uniform(*TRAIN["green_value"])), np.float32)
        out.append(np.concatenate([alpha * fg + (1 - alpha) * green, alpha], axis=-1))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return torch.cat([x[:, :3] * 2.0 - 1.0, x[:, 3:]], dim=1)


def train_vae(vae: Any, images: Any, steps: int = VAE_STEPS, seed: int = SEED, log: Any = print, object_weight: float = 0.0) -> dict[str, float]:
    """Reconstruction training of ``vae`` on ``images``; sets ``scaling_factor`` to 1 / latent std."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=VAE_LR * VAE_LR_FLOOR)
    vae.train()
    t0 = time.perf_counter()
    loss_v = 0.0
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (VAE_BATCH,), generator=g)
        i, j = (int(v) for v in torch.randint(0, images.shape[-1] - VAE_CROP + 1, (2,), generator=g))
        crop = images[idx][..., i : i + VAE_CROP, j : j + VAE_CROP]
        x, w = crop[:, :3], 1.0 + object_weight * crop[:, 3:]
        if step % 2:
            x, w = x.flip(-1), w.flip(-1)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        err = rec - x
        loss = ((err.abs() + err.pow(2)) * w).mean() / w.mean() + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss_v:.4f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        sample = images[torch.randperm(images.shape[0], generator=g)[:64], :3]
        z = vae.encode(sample).latent_dist.mean
        rec = vae.decode(z).sample
        std = float(z.std())
        psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, sample)))
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"loss": loss_v, "latent_std": std, "psnr_db": psnr, "seconds": time.perf_counter() - t0}


def make_base(work: Path, log: Any = print, vae_steps: int = VAE_STEPS, object_steps: int = VAE_OBJECT_STEPS) -> dict[str, Any]:
    """``WORK/base``: the base with its VAE trained in two phases (each skipped when its output is
    there: ``WORK/vae-phase1`` after the first)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    base, phase1 = work / "base", work / "vae-phase1"
    if (base / "model_index.json").is_file():
        return json.loads((work / "vae.json").read_text())
    torch.manual_seed(SEED)
    parts = build_base(SEED)
    images = vae_images(work / "data", SEED)
    if (phase1 / "config.json").is_file():
        parts["vae"] = AutoencoderKL.from_pretrained(phase1)
        stats = {"phase1": json.loads((work / "vae-phase1.json").read_text())}
    else:
        stats = {"phase1": train_vae(parts["vae"], images, steps=vae_steps, log=log)}
        parts["vae"].save_pretrained(phase1, safe_serialization=True)
        (work / "vae-phase1.json").write_text(json.dumps(stats["phase1"], indent=2) + "\n")
    stats["phase2"] = train_vae(parts["vae"], images, steps=object_steps, seed=SEED + 1, log=log, object_weight=VAE_OBJECT_WEIGHT)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = work / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(base)
    (work / "vae.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def template_captions(data: Path, out: Path, templates: Path = TEMPLATES, seed: int = SEED) -> Path:
    """``out`` (JSON lines ``{"key", "caption", "class_name"}``): every world sample's caption as
    the object of one of ``templates``' prompts, with its slots (view, lighting), drawn per sample
    from (seed, key). Written atomically; the same inputs give the same bytes."""
    import hashlib

    import yaml

    from factory.toy.world import article

    spec = yaml.safe_load(templates.read_text())
    lines = []
    for meta_path in sorted(data.glob("toy-*.json")):
        meta = json.loads(meta_path.read_text())
        key, caption = meta["key"], meta["caption"]
        phrase = caption.split(" ", 1)[1] if caption.split(" ", 1)[0] in ("a", "an") else caption
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")
        template = spec["templates"][h % len(spec["templates"])]
        values = {"phrase": phrase}
        for n, (slot, options) in enumerate(sorted(spec.get("slots", {}).items())):
            values[slot] = options[(h >> (8 * (n + 1))) % len(options)]
        text = template.replace("{a} {phrase}", f"{article(phrase)} {{phrase}}").format(**values)
        lines.append(json.dumps({"key": key, "caption": " ".join(text.split()), "class_name": meta["class_name"]}))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def train_settings(work: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**TRAIN, "model": str(work / "base"), "data": [str(work / "data")], "captions": str(work / "captions.jsonl"), **(overrides or {})}


def package(run: Path, dest: Path = MODEL_DIR) -> Path:
    """The run's latest checkpoint (or the checkpoint ``run``) as a standalone model folder (base
    embedded, no machine paths)."""
    from factory.manifest import ModelSpec
    from factory.sampler import load_components, save_checkpoint
    from factory.train.run_folder import latest_checkpoint

    found = latest_checkpoint(run)
    if found is None and (run / "training_state").is_dir():  # a checkpoint folder itself
        found = (int(json.loads((run / "diffumatting.json").read_text())["training"]["step"]), run)
    if found is None:
        raise SystemExit(f"{run}: no checkpoint to package")
    step, ckpt = found
    comps = load_components(ModelSpec(source=str(ckpt)))
    desc = json.loads((ckpt / "diffumatting.json").read_text())
    training = desc.get("training", {})
    settings = {k: v for k, v in training.get("settings", {}).items() if k not in ("model", "data", "captions", "device")}
    info = {
        "recipe": "python -m factory.toy.recipe", "step": step, "steps": training.get("steps"),
        "head_trained": training.get("head_trained"), "losses": training.get("losses"),
        "loss_weights": training.get("loss_weights"), "settings": settings,
        "world": {"seed": WORLD_SEED, "n": N_TRAIN, "size": SIZE},
    }  # fmt: skip
    comps.base = {"kind": "embedded", "path": ".", "origin": {"kind": "toy"}}
    if dest.exists():
        shutil.rmtree(dest)
    save_checkpoint(dest, comps, head=True, training=info, base_identity="toy recipe base")
    drop_source_paths(dest)
    return dest


def drop_source_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` (the folder each part was loaded from: a path of the machine that
    packaged it) from the configs diffusers wrote, so the shipped model names no machine path."""
    for config in sorted(folder.glob("*/config.json")):
        lines = config.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.lstrip().startswith('"_name_or_path"')]
        if kept != lines:
            atomic_write_text(config, "".join(kept))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m factory.toy.recipe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder: data, base, run, recipe.json")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps (smoke runs)")
    ap.add_argument("--vae-steps", type=int, nargs=2, default=[VAE_STEPS, VAE_OBJECT_STEPS], help="VAE pre-training steps of both phases (smoke runs)")
    ap.add_argument("--n", type=int, default=N_TRAIN, help="world samples (default: the recipe's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a train setting (ablations)")
    ap.add_argument("--package", action="store_true", help="then write the last checkpoint into the package")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU more threads only contend)")
    args = ap.parse_args(argv)

    import torch

    from factory.toy.dataset import write_toy_set
    from factory.train import TrainOptions, run_train

    torch.set_num_threads(args.threads)
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch_threads": args.threads}

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {line}", flush=True)

    t = time.perf_counter()
    write_toy_set(work / "data", n=args.n, seed=WORLD_SEED, size=SIZE)
    record["world_seconds"] = round(time.perf_counter() - t, 1)
    log(f"world: {args.n} samples in {record['world_seconds']} s")
    t = time.perf_counter()
    record["vae"] = make_base(work, log, *args.vae_steps)
    record["base_seconds"] = round(time.perf_counter() - t, 1)
    log(f"base: vae {record['vae']}")
    template_captions(work / "data", work / "captions.jsonl")
    overrides: dict[str, Any] = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.steps:
        overrides["steps"] = args.steps
        overrides["generator_steps"] = min(TRAIN["generator_steps"], args.steps * 2 // 3)
    settings = train_settings(work, overrides)
    record["train_settings"] = settings
    t = time.perf_counter()

    def on_step(rec: dict[str, Any]) -> None:
        if rec.get("step", 0) % 25 == 0:
            terms = " ".join(f"{k} {rec[k]:.4f}" for k in ("loss", "noise", "green", "detail", "latent") if k in rec)
            log(f"train step {rec['step']} {rec.get('stage')} {terms} ({rec.get('seconds', 0):.2f} s/step)")

    run = work / "run"
    summary = run_train(
        TrainOptions(out=run, overrides=settings, resume=(run / "train.json").is_file(), progress=False, threads=args.threads), on_step=on_step
    )
    record["train_seconds"] = round(time.perf_counter() - t, 1)
    for line in summary.lines():
        log(line)
    if args.package:
        log(f"packaged: {package(run)}")
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (work / "recipe.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
