"""Benchmark of the toy model, measured as the DiffuMatting paper measures (CPU figures).

    python bench/toy.py --n 256 --work WORK [--reference CKPT --ablation "without L_g=CKPT" ...] [--yield-n 64] [--sheet docs/toy-contact-sheet.png]

1. **Generated samples** of each model with the README's manifest (``manifests/gom.yaml``: its
   prompts, negative prompt, DPM-Solver++ 30 steps, guidance 7.5, rendered at the toy's 64 px):
   GSG median and the share above the manifest's ``min_gsg`` (0.8); the matting head's coarse alpha
   against GreenPost's alpha on the same image (mean absolute difference); boundary detail as the
   share of fractional GreenPost alpha (0.02 < a < 0.98) among the object's pixels (a > 0.02) and
   as the edge energy: the mean Sobel magnitude of the grey image over the object's boundary band
   (GreenPost alpha fractional, dilated by 2 px), in grey levels per pixel.
   Models: the shipped ``toy``; with ``--work`` (the recipe's work folder), the **untrained** model
   (the recipe's base: trained VAE, random UNet and head); each ``--ablation LABEL=CKPT``, a
   checkpoint of the same recipe run with one loss switched off (``lambda_green: 0`` is the
   paper's green-control ablation, ``lambda_detail: 0`` the detail one), against ``--reference``,
   the shipped run's checkpoint at the same step. Every model renders at 64 px.
2. **Head on held-out renders**: world seed 1 (the model trained on seed 0), composites on
   studio greens, encoded by the VAE and decoded with the head: SAD (/1000) and MSE of the coarse
   alpha against the exact alpha, next to GreenPost's alpha on the same composites.
3. **Filter yield**: ``factory generate --manifest manifests/gom.yaml --n YIELD_N --model toy``
   (in-process) then ``factory filter`` with the manifest's defaults: kept / done.

Prints a JSON summary (``--json`` writes it) and, with ``--sheet``, a contact sheet of the shipped
model's first samples (image over GreenPost alpha).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from factory.manifest import ModelSpec, load_manifest  # noqa: E402
from factory.matte.pipeline import greenpost  # noqa: E402
from factory.metrics import mse, sad  # noqa: E402
from factory.plan import build_rows  # noqa: E402
from factory.score import gsg  # noqa: E402

MANIFEST = REPO / "manifests" / "gom.yaml"


def untrained_model(work: Path, dest: Path) -> Path:
    """The recipe's base (trained VAE, random UNet) with a random head, as a toy-native checkpoint."""
    import torch

    from factory.sampler import MattingHead, load_components, save_checkpoint

    comps = load_components(ModelSpec(source=str(work / "base")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        comps.head = MattingHead.for_vae(comps.vae)
    comps.base = {"kind": "embedded", "path": ".", "origin": {"kind": "toy"}}
    return save_checkpoint(dest, comps)


def generated(model: str, n: int, batch: int = 8, keep: int = 0) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray]]]:
    from factory.sampler import load_sampler

    manifest = load_manifest(MANIFEST)
    rows = build_rows(manifest, n)
    settings = manifest.sampler.model_copy(update={"width": 64, "height": 64})  # the toy's size, for every model compared
    sampler = load_sampler(ModelSpec(source=model), settings, manifest.canvas, device="cpu")
    reference = tuple(manifest.canvas.color)
    scores, head_gap, fractional, energy, shown = [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        for g in sampler.sample(rows[i : i + batch]):
            if g.error is not None:
                continue
            scores.append(gsg(g.image, reference=reference).score)
            gp = greenpost(g.image, g.coarse_alpha).alpha
            obj = gp > 0.02
            fractional.append(float(((gp > 0.02) & (gp < 0.98)).sum() / max(obj.sum(), 1)))
            energy.append(edge_energy(g.image, gp))
            if g.coarse_alpha is not None:
                head_gap.append(float(np.abs(g.coarse_alpha - gp).mean()))
            if len(shown) < keep:
                shown.append((g.image, gp))
    seconds = time.perf_counter() - t0
    min_gsg = manifest.filter.min_gsg
    return {
        "samples": len(scores),
        "gsg_median": round(statistics.median(scores), 4),
        "gsg_mean": round(statistics.fmean(scores), 4),
        f"share_gsg_above_{min_gsg}": round(float(np.mean(np.array(scores) > min_gsg)), 4),
        "head_vs_greenpost_mad": round(statistics.fmean(head_gap), 4) if head_gap else None,
        "fractional_alpha_share": round(statistics.fmean(fractional), 4),
        "edge_energy": round(statistics.fmean(e for e in energy if e is not None), 3) if any(e is not None for e in energy) else None,
        "seconds_per_image": round(seconds / max(len(scores), 1), 3),
    }, shown


def edge_energy(image: np.ndarray, alpha: np.ndarray) -> float | None:
    """Mean Sobel gradient magnitude (grey levels per pixel) of ``image`` over the boundary band:
    pixels of fractional ``alpha`` dilated by 2 px. None when the image has no boundary."""
    from scipy import ndimage

    band = ndimage.binary_dilation((alpha > 0.02) & (alpha < 0.98), iterations=2)
    if not band.any():
        return None
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    magnitude = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1)) / 8.0
    return float(magnitude[band].mean())


def heldout_head(model: str, n: int) -> dict[str, Any]:
    """Coarse alpha of the head (encode + decode) vs the exact alpha of held-out world renders."""
    import torch

    from factory.sampler import load_components
    from factory.sampler.head import decode
    from factory.toy.world import render_sample

    comps = load_components(ModelSpec(source=model))
    if comps.head is None:
        return {"skipped": "the model has no matting head"}
    vae, head = comps.vae.eval(), comps.head.eval()
    head_sad, head_mse, gp_sad, gp_mse = [], [], [], []
    green = np.array([12, 240, 12], np.float64)  # a studio green like the training canvases
    for i in range(n):
        s = render_sample(1, i)
        a = s.alpha.astype(np.float64)[..., None] / 255.0
        image = np.rint(a * s.fg + (1 - a) * green).astype(np.uint8)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            coarse = decode(vae, z, head).alpha[0, 0].numpy()
        truth = s.alpha.astype(np.float32) / 255.0
        head_sad.append(sad(coarse, truth))  # whole image, / 1000 (Composition-1k units; 64-px images)
        head_mse.append(mse(coarse, truth))
        gp = greenpost(image).alpha
        gp_sad.append(sad(gp, truth))
        gp_mse.append(mse(gp, truth))
    return {
        "renders": n,
        "head_sad": round(statistics.fmean(head_sad), 3),
        "head_mse": round(statistics.fmean(head_mse), 5),
        "greenpost_sad": round(statistics.fmean(gp_sad), 3),
        "greenpost_mse": round(statistics.fmean(gp_mse), 5),
    }


def filter_yield(n: int) -> dict[str, Any]:
    """The README's path: generate with the toy model, then filter with the manifest's defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cli = [sys.executable, str(REPO / "cli.py")]
        gen = subprocess.run([*cli, "generate", "--manifest", str(MANIFEST), "--n", str(n), "--model", "toy", "--out", str(run), "--no-ray", "--device", "cpu"],
                             capture_output=True, text=True)  # fmt: skip
        if gen.returncode:
            return {"error": gen.stderr.strip().splitlines()[-1:]}
        res = subprocess.run([*cli, "filter", "--run", str(run), "--dry-run"], capture_output=True, text=True)
        m = re.search(r"kept (\d+) of (\d+) done", res.stdout)
        if not m:
            return {"error": (res.stderr or res.stdout).strip().splitlines()[-1:]}
        kept, done = int(m.group(1)), int(m.group(2))
        return {"generated": n, "done": done, "kept": kept, "yield": round(kept / max(done, 1), 4), "filter": res.stdout.splitlines()[1]}


def contact_sheet(shown: list[tuple[np.ndarray, np.ndarray]], path: Path, columns: int = 8, scale: int = 2) -> None:
    from PIL import Image

    tiles = []
    for image, alpha in shown:
        a = np.repeat(np.rint(alpha * 255).astype(np.uint8)[..., None], 3, axis=2)
        tiles.append(np.concatenate([image, a], axis=0))
    rows = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles) - columns + 1, columns)]
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="generated samples per model")
    ap.add_argument("--work", type=Path, default=None, help="the recipe's work folder (for the untrained model)")
    ap.add_argument("--ablation", action="append", default=[], metavar="LABEL=CKPT",
                    help="a checkpoint of the recipe run with a loss switched off (repeatable)")
    ap.add_argument("--reference", type=Path, default=None, help="the shipped recipe's checkpoint at the ablations' step")
    ap.add_argument("--heldout", type=int, default=128, help="held-out world renders for the head (0: skip)")
    ap.add_argument("--yield-n", type=int, default=64, help="samples for the filter yield (0: skip)")
    ap.add_argument("--sheet", type=Path, default=None, help="write a contact sheet of the toy model's samples")
    ap.add_argument("--skip-shipped", action="store_true", help="leave the shipped model's samples out (split runs)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {args.threads}",
        "load_average_start": [round(v, 2) for v in __import__("os").getloadavg()],
        "manifest": str(MANIFEST.relative_to(REPO)),
        "models": {},
    }
    if not args.skip_shipped:
        stats, shown = generated("toy", args.n, keep=32 if args.sheet else 0)
        out["models"]["toy (shipped)"] = stats
        print(json.dumps({"toy": stats}), flush=True)
        if args.sheet:
            contact_sheet(shown, args.sheet)
    compared = [("recipe, at the ablations' step", args.reference)] if args.reference else []
    compared += [(label, Path(path)) for label, _, path in (a.partition("=") for a in args.ablation)]
    for label, path in compared:
        out["models"][label] = generated(str(path), args.n)[0]
        print(json.dumps({label: out["models"][label]}), flush=True)
    if args.work is not None:
        with tempfile.TemporaryDirectory() as tmp:
            model = untrained_model(args.work, Path(tmp) / "untrained")
            out["models"]["untrained"] = generated(str(model), args.n)[0]
        print(json.dumps(out["models"]["untrained"]), flush=True)
    if args.heldout:
        out["heldout_head"] = heldout_head("toy", args.heldout)
        print(json.dumps(out["heldout_head"]), flush=True)
    if args.yield_n:
        out["filter_yield"] = filter_yield(args.yield_n)
    out["load_average_end"] = [round(v, 2) for v in __import__("os").getloadavg()]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
