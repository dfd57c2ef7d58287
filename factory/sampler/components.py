"""The parts of a loaded model, and loading/saving them from/to diffusers folders.

:class:`ModelComponents` is what every model source produces (see ``sources.py``) and what the
sampler, ``save_checkpoint`` and training consume: the diffusers modules, the optional matting
head, and ``base``, a JSON-able description of where the non-UNet parts came from (written into
DiffuMatting checkpoints).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from factory.errors import InputError
from factory.fsutil import read_json_object
from factory.sampler.head import MattingHead

log = logging.getLogger(__name__)

#: Component folders of a diffusers Stable Diffusion folder that the sampler needs.
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@dataclass
class ModelComponents:
    """A loaded model. ``kind``/``ref``: the source kind and resolved path or id (for messages).

    ``base`` says how to get the VAE, text encoder, tokenizer and scheduler again, e.g.
    ``{"kind": "tiny", "seed": 0}``, ``{"kind": "diffusers", "path": "/abs/sd15"}``, or
    ``{"kind": "hub", "id": "org/name"}``; see ``checkpoint.py``. ``native_size`` (w, h) caps the
    render size (the tiny model); ``notes`` go into the sampler's metadata. ``controlnet_scale``
    is the ControlNet conditioning scale (with ``controlnet``); ``loras`` lists the LoRAs fused
    into the UNet/text encoder (``{"path", "scale"}``, for the record).
    """

    kind: str
    ref: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    head: MattingHead | None = None
    safety_checker: Any | None = None
    feature_extractor: Any | None = None
    controlnet: Any | None = None
    base: dict[str, Any] = field(default_factory=dict)
    native_size: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)
    controlnet_scale: float = 1.0
    loras: list[dict[str, Any]] = field(default_factory=list)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The torch modules present (for moving to a device or dtype)."""
        names = ("unet", "vae", "text_encoder", "head", "safety_checker", "controlnet")
        return {n: getattr(self, n) for n in names if isinstance(getattr(self, n), torch.nn.Module)}


def place(module: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move/cast a module, only as far as needed.

    diffusers' ``ModelMixin.to`` warns on every dtype cast, even for models with no float32-only
    modules; for those (all SD models) the plain ``nn.Module.to`` does the same work quietly.
    """
    param = next(module.parameters(), None)
    if param is None:
        return module
    need_dtype = dtype is not None and param.dtype != dtype
    need_device = device is not None and param.device != torch.device(device)
    if not (need_dtype or need_device):
        return module
    kwargs: dict[str, Any] = {}
    if need_device:
        kwargs["device"] = device
    if need_dtype:
        kwargs["dtype"] = dtype
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(**kwargs)
    return torch.nn.Module.to(module, **kwargs)


#: What every "this model has no safety checker" refusal tells the user to do.
NO_SAFETY_CHECKER_FIX = "turn the safety checker off (no --safety-checker, or model.safety_checker: false)"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' import-time warnings (e.g. the torchvision fallback notice) and its
    weight-loading progress bars."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings and progress bars (e.g. "no LoRA keys for the text encoder")."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        if bars:
            dlog.enable_progress_bar()


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse pickle-only weights unless ``allow_pickle`` (pickle files can run code when loaded)."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [p for p in sub.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
        if files and not allow_pickle and not any(p.suffix == ".safetensors" for p in files):
            raise InputError(
                f"{sub}: has only pickle weights ({files[0].name}), which can run code when loaded; "
                "convert them to safetensors, or opt in with model.allow_pickle: true"
            )


def check_flat_weights(folder: Path, allow_pickle: bool) -> None:
    """:func:`check_weights` for a one-model folder (weights at its top, e.g. a ControlNet)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise InputError(f"{folder}: no model weights (.safetensors) in it")
    if not allow_pickle and not any(p.suffix == ".safetensors" for p in files):
        raise InputError(
            f"{folder}: has only pickle weights ({files[0].name}), which can run code when loaded; "
            "convert them to safetensors, or opt in with model.allow_pickle: true"
        )


_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


def weight_variants(folder: Path, allow_pickle: bool = False) -> tuple[bool, set[str]]:
    """``(has plain weights, variants)`` of a model folder's weight files.

    ``diffusion_pytorch_model.safetensors`` and ``model-00001-of-00002.safetensors`` are plain;
    ``diffusion_pytorch_model.fp16.safetensors`` is the variant ``fp16``. Pickle files count only
    with ``allow_pickle``.
    """
    suffixes = WEIGHT_SUFFIXES if allow_pickle else (".safetensors",)
    plain, variants = False, set()
    for p in folder.iterdir() if folder.is_dir() else ():
        if not p.is_file() or p.suffix not in suffixes:
            continue
        stem = _SHARD_RE.sub("", p.name[: -len(p.suffix)])
        _, dot, variant = stem.rpartition(".")
        if dot:
            variants.add(variant)
        else:
            plain = True
    return plain, variants


def choose_variant(folders: Iterable[Path], allow_pickle: bool = False) -> str | None:
    """The weight ``variant`` to load a model made of ``folders`` with, or None for the plain files.

    Plain (full-precision) files are preferred. Only when some component has no plain file but a
    variant (an fp16-only download: ``*.fp16.safetensors``) is a variant chosen: the one every such
    component has, ``fp16`` first. diffusers then loads the variant where it exists and the plain
    file elsewhere. One-line ``InputError`` when no variant covers all the gaps.
    """
    gaps = []
    for folder in folders:
        plain, variants = weight_variants(folder, allow_pickle)
        if not plain and variants:
            gaps.append((folder, variants))
    if not gaps:
        return None
    common = set.intersection(*(v for _, v in gaps))
    if not common:
        listing = "; ".join(f"{f.name}: {', '.join(sorted(v))}" for f, v in gaps)
        raise InputError(f"{gaps[0][0].parent}: no full-precision weights and no weight variant shared by all components ({listing})")
    return "fp16" if "fp16" in common else sorted(common)[0]


def read_model_index(folder: Path) -> dict[str, Any]:
    """The folder's ``model_index.json``, checked to be a Stable Diffusion pipeline."""
    index_path = folder / "model_index.json"
    index = read_json_object(index_path, "diffusers model index", hint=f"{folder} is not a diffusers model folder")
    missing = [c for c in REQUIRED if not isinstance(index.get(c), list) or index[c][0] is None]
    if missing:
        raise InputError(
            f"{folder}: a {index.get('_class_name', 'pipeline')} without {', '.join(missing)}; "
            "a Stable Diffusion 1.x/2.x pipeline folder is needed"
        )
    return index


def load_diffusers_folder(
    folder: str | Path,
    *,
    allow_pickle: bool = False,
    safety_checker: bool = False,
    torch_dtype: torch.dtype = torch.float32,
) -> ModelComponents:
    """Load a local diffusers Stable Diffusion folder (``model_index.json``), offline.

    Only safetensors weights are read unless ``allow_pickle``. The safety checker is loaded only
    when asked for and present. A folder with only variant weights (``*.fp16.safetensors``) is
    loaded with that variant (see :func:`choose_variant`), noted in ``notes``.
    """
    folder = Path(folder)
    index = read_model_index(folder)
    check_weights(folder, allow_pickle)
    has_checker = isinstance(index.get("safety_checker"), list) and index["safety_checker"][0] is not None
    if safety_checker and not has_checker:
        raise InputError(f"{folder}: the model has no safety checker; {NO_SAFETY_CHECKER_FIX}")
    kwargs: dict[str, Any] = {}
    if not (safety_checker and has_checker):
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    parts = ["unet", "vae", "text_encoder"] + (["safety_checker"] if safety_checker else [])
    variant = choose_variant([folder / p for p in parts], allow_pickle)
    notes = []
    if variant is not None:
        notes.append(f"weights: the {variant!r} variant files (the folder has no full-precision files for some components)")
        log.info("%s: loading the %r weight variant", folder, variant)
        kwargs["variant"] = variant
    with quiet_transformers(), quiet_diffusers():
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=None if allow_pickle else True,
                torch_dtype=torch_dtype,
                **kwargs,
            )
        except (OSError, ValueError, EnvironmentError) as exc:
            raise InputError(f"{folder}: cannot load the diffusers model ({_first_line(exc)})") from exc
    return ModelComponents(
        kind="diffusers",
        ref=str(folder),
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        safety_checker=pipe.safety_checker if safety_checker else None,
        feature_extractor=pipe.feature_extractor if safety_checker else None,
        base={"kind": "diffusers", "path": str(folder)},
        notes=notes,
    )


# ------------------------------------------------------------------------------ base folders
# A "base folder" holds the non-UNet parts (vae/, text_encoder/, tokenizer/, scheduler/) in
# diffusers/transformers' own save formats; DiffuMatting checkpoints embed one as base/.

BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def save_base_folder(components: ModelComponents, folder: Path) -> None:
    """Write the VAE, text encoder, tokenizer and scheduler of ``components`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    components.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    components.tokenizer.save_pretrained(folder / "tokenizer")
    components.scheduler.save_pretrained(folder / "scheduler")


def load_base_folder(folder: Path, torch_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Read a base folder written by :func:`save_base_folder` (safetensors only)."""
    missing = [p for p in BASE_PARTS if not (folder / p).is_dir()]
    if missing:
        raise InputError(f"{folder}: incomplete base model folder (missing {', '.join(missing)})")
    with quiet_transformers():
        import diffusers
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDIMScheduler"))
            offline = {"use_safetensors": True, "local_files_only": True}
            return {
                "vae": AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch_dtype, **offline),
                "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch_dtype, **offline),
                "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
                "scheduler": sched_cls.from_config(sched_cfg),
            }
        except (OSError, ValueError, AttributeError) as exc:
            raise InputError(f"{folder}: cannot load the base model ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
