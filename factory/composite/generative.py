"""Generative harmonisation (the IMPRINT application): a diffusers inpainting model repaints only a
ring around the pasted object and under its shadow (contact shadows, reflections, light spill),
conditioned on a prompt; the renderer then composites the original foreground with its alpha again
over the repainted background, so the object's pixels and its alpha stay exact.

Any Stable Diffusion 1.5 inpainting checkpoint (a diffusers folder whose UNet takes 9 input
channels) works; ``tiny`` builds a tiny random one in code, for tests and demos only (its
repainting is coloured noise, not photographic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from factory.errors import InputError

TINY = "tiny"
_PIPES: dict[tuple[str, str], Any] = {}


def public_model(model: str | None) -> str | None:
    """The model as a dataset's files record it (recipes, ``composite.json``, the card): a local
    folder by its name, as ``factory export`` names a run's model; ``tiny`` as it is."""
    return model if model is None else Path(model).name or model


def check_inpainting_model(model: str) -> None:
    """Fail early (one line, exit 2) unless ``model`` is an inpainting model: a diffusers folder with
    ``model_index.json`` and a UNet of 9 input channels."""
    if model == TINY:
        return
    root = Path(model)
    if not (root / "model_index.json").is_file():
        raise InputError(f"--generative {model}: not a diffusers model folder (no model_index.json)")
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--generative {model}: no readable unet/config.json ({exc})") from exc
    if unet.get("in_channels") != 9:
        raise InputError(
            f"--generative {model}: not an inpainting model (its UNet takes {unet.get('in_channels')} input channels, "
            "an inpainting UNet 9)"
        )


def build_tiny_inpaint_pipeline(seed: int = 0) -> Any:
    """A tiny randomly initialised SD1.5-shaped inpainting pipeline (UNet of 9 input channels), for
    tests. Its images are not photographic."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    from factory.sampler.tiny import build_tiny_components, tiny_scheduler_config, tiny_unet_config

    parts = build_tiny_components(seed)
    parts.pop("head")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        parts["unet"] = UNet2DConditionModel(**tiny_unet_config(in_channels=9)).eval()
    parts["scheduler"] = DDIMScheduler(**tiny_scheduler_config())
    return StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_pipeline(model: str, device: str | None = None) -> Any:
    """The inpainting pipeline (loaded once per process), on ``device`` (default: CUDA if any)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hit = _PIPES.get((model, device))
    if hit is not None:
        return hit
    check_inpainting_model(model)
    if model == TINY:
        pipe = build_tiny_inpaint_pipeline()
    else:
        from diffusers import StableDiffusionInpaintPipeline

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            pipe = StableDiffusionInpaintPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                                  requires_safety_checker=False, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"--generative {model}: cannot load the inpainting model ({exc})") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    _PIPES[(model, device)] = pipe
    return pipe


def _box(mask: np.ndarray, multiple: int = 8, pad: int = 8) -> tuple[int, int, int, int]:
    """The ring's box grown by ``pad``, sides rounded up to ``multiple`` (inside the frame when it can)."""
    ys, xs = np.nonzero(mask)
    H, W = mask.shape
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, H)
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, W)
    h = min(-(-(y1 - y0) // multiple) * multiple, H // multiple * multiple)
    w = min(-(-(x1 - x0) // multiple) * multiple, W // multiple * multiple)
    y0, x0 = min(y0, H - h), min(x0, W - w)
    return y0, y0 + h, x0, x0 + w


def make_repaint(pipe: Any) -> Any:
    """``repaint(image, mask, generative) -> image``: the pipeline run on the ring's box; pixels
    outside the mask are returned unchanged. On the CPU torch runs with a fixed thread count
    (:data:`factory.worker.CPU_SAMPLER_THREADS`, as generate's sampler), so a repaint gives the same
    bytes in this process and in a Ray painter actor."""
    import torch

    from factory.worker import CPU_SAMPLER_THREADS

    on_cpu = str(getattr(pipe, "device", "cpu")).startswith("cpu")

    def repaint(image: np.ndarray, mask: np.ndarray, gen: dict[str, Any]) -> np.ndarray:
        if not mask.any():
            return image
        y0, y1, x0, x1 = _box(mask)
        crop = Image.fromarray(image[y0:y1, x0:x1])
        m = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8))
        generator = torch.Generator("cpu").manual_seed(int(gen["seed"]))
        threads = torch.get_num_threads()
        if on_cpu:
            torch.set_num_threads(CPU_SAMPLER_THREADS)
        try:
            result = pipe(prompt=gen["prompt"], image=crop, mask_image=m, height=y1 - y0, width=x1 - x0,
                          num_inference_steps=int(gen["steps"]), generator=generator, output_type="np").images[0]
        finally:
            torch.set_num_threads(threads)
        painted = np.clip(np.rint(np.asarray(result) * 255.0), 0, 255).astype(np.uint8)
        out = image.copy()
        box = out[y0:y1, x0:x1]
        box[mask[y0:y1, x0:x1]] = painted[mask[y0:y1, x0:x1]]
        return out

    return repaint
