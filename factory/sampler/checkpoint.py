"""The DiffuMatting checkpoint folder: what ``factory train`` writes and ``--model`` loads.

Layout (format version 2): a diffusers Stable Diffusion pipeline folder, as
``StableDiffusionPipeline.save_pretrained`` writes it, plus two files diffusers ignores::

    CKPT/
      model_index.json             # the pipeline (StableDiffusionPipeline, no safety checker)
      unet/ vae/ text_encoder/ tokenizer/ scheduler/
      diffumatting.json            # the descriptor below; its presence marks the folder
      matting_head.safetensors     # optional: the ConR head (self-describing, see head.py)

so ``StableDiffusionPipeline.from_pretrained(CKPT)`` loads it as is (without the head) and
``factory generate --model CKPT`` loads it with the head. ``diffumatting.json``::

    {
      "format": "diffumatting-checkpoint",
      "format_version": 2,
      "created_by": "factory 0.1.0",
      "created_at": "2025-01-01T00:00:00Z",
      "unet": "unet",
      "head": {"file": "matting_head.safetensors", "in_channels": 128, "hidden_channels": 64,
               "kernel_size": 3, "features": "vae.decoder.conv_out:input"}   # or null
      "base": {"kind": "embedded", "path": "."},   # the other parts are in this folder
      "embedded_from": {"kind": "tiny", "seed": 0} | {"kind": "diffusers", "path": ...} | ...,
      "base_identity": "...",        # model identity of the base when saved (informative)
      "training": {...}              # free-form: steps, losses, data, manifest... (informative)
    }

Version 1 checkpoints (still read) held only ``unet/`` and the head, with ``base`` either
embedded in ``base/`` (``{"kind": "embedded", "path": "base"}``) or a reference to the base model
(``{"kind": "tiny", "seed": 0}``, ``{"kind": "diffusers", "path": ...}``, ``{"kind": "hub",
"id": ...}``, ``{"kind": "single_file", "path": ...}``), which loading then needs, with a
one-line error naming it when it is missing. Version 2 always holds every part (diffusers needs
them), and components with LoRAs fused in are saved as fused (recorded under ``"loras"``). Only
safetensors are written and read.

Saving is atomic: everything is written to a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from factory import __version__
from factory.errors import InputError
from factory.fsutil import link_tree, replace_dir, temp_dir_for
from factory.sampler.components import ModelComponents, load_base_folder, place
from factory.sampler.head import HEAD_FEATURES, MattingHead, load_head, save_head

CHECKPOINT_FILE = "diffumatting.json"
CHECKPOINT_FORMAT = "diffumatting-checkpoint"
CHECKPOINT_VERSION = 2
UNET_DIR = "unet"
MATTING_HEAD_FILE = "matting_head.safetensors"
BASE_DIR = "base"  # version 1: the embedded parts
MODEL_INDEX = "model_index.json"
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
BASE_KINDS = ("embedded", "tiny", "diffusers", "hub", "single_file")

#: Loads the non-UNet parts of a referenced base ``{"kind": ..., ...}`` (supplied by sources.py).
BaseResolver = Callable[[dict[str, Any], torch.dtype], ModelComponents]


def is_diffumatting_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a ``diffumatting.json``."""
    return (Path(path) / CHECKPOINT_FILE).is_file()


def has_pipeline_layout(path: str | Path) -> bool:
    """True when ``path`` is a diffusers pipeline folder (a version-2 checkpoint is one)."""
    path = Path(path)
    return (path / MODEL_INDEX).is_file() and all((path / p).is_dir() for p in (UNET_DIR, *PIPELINE_PARTS))


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's descriptor, validated. One-line ``InputError`` on any problem."""
    path = Path(path)
    file = path / CHECKPOINT_FILE
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{file}: not a readable DiffuMatting checkpoint descriptor ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{file}: not a DiffuMatting checkpoint descriptor (format must be {CHECKPOINT_FORMAT!r})")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version < 1 or version > CHECKPOINT_VERSION:
        raise InputError(f"{file}: unsupported checkpoint format_version {version!r} (this factory reads 1..{CHECKPOINT_VERSION})")
    base = cfg.get("base")
    if not isinstance(base, dict) or base.get("kind") not in BASE_KINDS:
        raise InputError(f"{file}: 'base' must be an object with kind one of {', '.join(BASE_KINDS)}")
    if not (path / cfg.get("unet", UNET_DIR) / "config.json").is_file():
        raise InputError(f"{path}: checkpoint has no {cfg.get('unet', UNET_DIR)}/config.json")
    head = cfg.get("head")
    if head is not None and not (path / head.get("file", MATTING_HEAD_FILE)).is_file():
        raise InputError(f"{path}: descriptor lists a matting head but {head.get('file', MATTING_HEAD_FILE)} is missing")
    return cfg


def save_checkpoint(
    path: str | Path,
    components: ModelComponents,
    *,
    head: MattingHead | None | bool = True,
    training: dict[str, Any] | None = None,
    base_identity: str | None = None,
    overwrite: bool = False,
    parts_from: str | Path | None = None,
) -> Path:
    """Write ``components`` (and a head) as a DiffuMatting checkpoint folder at ``path`` (v2).

    ``head``: True (default) saves ``components.head`` if there is one, a ``MattingHead`` saves
    that one, None/False saves none. ``training`` is stored as is (must be JSON-serialisable).
    ``parts_from``: a version-2 checkpoint whose VAE, text encoder, tokenizer and scheduler are
    those of ``components`` (an earlier checkpoint of the same training run): they are hard-linked
    from it instead of written again. An existing checkpoint at ``path`` is replaced only with
    ``overwrite``; any other existing, non-empty path is an error.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        if not (overwrite and is_diffumatting_checkpoint(path)):
            what = "a checkpoint (pass overwrite)" if is_diffumatting_checkpoint(path) else "not an empty folder"
            raise InputError(f"{path}: exists and is {what}")
    the_head = components.head if head is True else (head if isinstance(head, MattingHead) else None)
    base = dict(components.base)
    if not base or base.get("kind") not in BASE_KINDS:
        raise ValueError(f"components.base must describe the base model, got {base!r}")
    cfg: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "created_by": f"factory {__version__}",
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "unet": UNET_DIR,
        "head": None if the_head is None else {"file": MATTING_HEAD_FILE, **the_head.config, "features": HEAD_FEATURES},
        "base": {"kind": "embedded", "path": "."},
        "embedded_from": base.get("origin") if base["kind"] == "embedded" else base,
        "base_identity": base_identity,
        "training": training or {},
    }
    if components.loras:  # fused into the saved weights; recorded for provenance
        cfg["loras"] = list(components.loras)
    reuse = Path(parts_from) if parts_from is not None else None
    if reuse is not None and not has_pipeline_layout(reuse):
        reuse = None
    tmp = temp_dir_for(path)
    try:
        if reuse is None:
            pipeline_of(components).save_pretrained(tmp, safe_serialization=True)
        else:
            components.unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
            for part in PIPELINE_PARTS:
                link_tree(reuse / part, tmp / part)
            shutil.copyfile(reuse / MODEL_INDEX, tmp / MODEL_INDEX)
        if the_head is not None:
            save_head(the_head, tmp / MATTING_HEAD_FILE)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def pipeline_of(components: ModelComponents) -> Any:
    """A ``StableDiffusionPipeline`` over the components' modules (no safety checker, no head)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=components.unet,
        scheduler=components.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def load_checkpoint(
    path: str | Path,
    *,
    torch_dtype: torch.dtype = torch.float32,
    resolve_base: BaseResolver | None = None,
) -> ModelComponents:
    """Load a DiffuMatting checkpoint: its UNet and head over its base's other parts.

    Embedded and ``tiny`` bases load here; other references need ``resolve_base`` (sources.py
    passes its loader), and a missing base gives a one-line ``InputError`` naming it.
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    cfg = read_checkpoint_config(path)
    base = cfg["base"]
    origin = dict(cfg.get("embedded_from") or {}) if base["kind"] == "embedded" else dict(base)
    notes: list[str] = []
    if base["kind"] == "embedded":
        base_path = path / base.get("path", BASE_DIR)
        parts = load_base_folder(base_path, torch_dtype)
        loaded_base = {"kind": "embedded", "path": str(base_path), "origin": origin}
    elif base["kind"] == "tiny":
        from factory.sampler.tiny import build_tiny_components

        parts = build_tiny_components(int(base.get("seed", 0)))
        loaded_base = dict(base)
    else:
        if resolve_base is None:
            raise InputError(f"{path}: its base model ({base}) can only be loaded through factory.sampler.sources")
        try:
            loaded = resolve_base(base, torch_dtype)
        except InputError as exc:
            raise InputError(f"{path}: checkpoint base model is not available: {exc}") from exc
        parts = {k: getattr(loaded, k) for k in ("vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor")}
        loaded_base, notes = dict(base), list(loaded.notes)
    native_size = None
    if origin.get("kind") == "tiny":
        from factory.sampler.tiny import TINY_NOTE, TINY_SAMPLE_SIZE

        notes, native_size = [TINY_NOTE], (TINY_SAMPLE_SIZE, TINY_SAMPLE_SIZE)
    elif origin.get("kind") == "toy":  # the packaged toy model, or a model fine-tuned from it
        from factory.toy import TOY_NOTE, TOY_SAMPLE_SIZE

        notes, native_size = [TOY_NOTE], (TOY_SAMPLE_SIZE, TOY_SAMPLE_SIZE)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path / cfg.get("unet", UNET_DIR), use_safetensors=True, local_files_only=True, torch_dtype=torch_dtype
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load the checkpoint's UNet ({str(exc).splitlines()[0]})") from exc
    head = None
    if cfg.get("head") is not None:
        head = place(load_head(path / cfg["head"].get("file", MATTING_HEAD_FILE)), dtype=torch_dtype)
        expected = int(parts["vae"].config.block_out_channels[0])
        if head.in_channels != expected:
            raise InputError(f"{path}: matting head expects {head.in_channels} feature channels, the VAE gives {expected}")
    return ModelComponents(
        kind="diffumatting",
        ref=str(path),
        unet=unet.eval(),
        vae=parts["vae"].eval(),
        text_encoder=parts["text_encoder"].eval(),
        tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"],
        head=head,
        safety_checker=parts.get("safety_checker"),
        feature_extractor=parts.get("feature_extractor"),
        base=loaded_base,
        native_size=native_size,
        notes=notes,
    )
