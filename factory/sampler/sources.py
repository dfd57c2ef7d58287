"""Model sources: what ``--model`` / ``model.source`` may name, its identity, and its loader.

Kinds (resolved by :func:`resolve_source`, in this order):

- ``tiny`` or ``tiny:SEED``: the random test model built in code (``tiny.py``);
- an existing folder with ``diffumatting.json``: a DiffuMatting checkpoint (``checkpoint.py``);
- an existing folder with ``model_index.json``: a local diffusers Stable Diffusion folder;
- an existing file ``*.safetensors`` (or a pickle ``.ckpt``/``.bin``/``.pt``/``.pth`` with
  ``allow_pickle``): a single-file checkpoint                             [phase 2];
- ``owner/name`` that is not a local path: a hub id, used from the local cache only  [phase 2].

Identities (:func:`model_identity`) are cheap: no weights are loaded and no torch is imported;
folders and files are fingerprinted by ``fingerprint.py``. Format::

    <kind>:<ref>[#<fingerprint>][ (base=<identity>)][ +lora:<path>@<scale>#<fp>]...[ +controlnet:...]

with ``tiny:v<version>:seed=<seed>`` for the tiny model. Loaders are one function per kind,
``load_<kind>(source, model, torch_dtype) -> ModelComponents``, registered in :data:`LOADERS`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.errors import InputError
from factory.manifest import ControlNetSpec, LoraSpec, ModelSpec
from factory.sampler.fingerprint import fingerprint

if TYPE_CHECKING:  # torch and the components stay unimported until something is loaded
    import torch

    from factory.sampler.components import ModelComponents

TINY, DIFFUMATTING, DIFFUSERS, SINGLE_FILE, HUB = "tiny", "diffumatting", "diffusers", "single_file", "hub"
PICKLE_FILE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_TINY_RE = re.compile(r"^tiny(?::(\d+))?$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A resolved model source: ``kind``, ``ref`` (absolute path, hub id or ``tiny``), tiny ``seed``."""

    kind: str
    ref: str
    seed: int = 0

    @property
    def path(self) -> Path:
        return Path(self.ref)


def resolve_source(source: str) -> Source:
    """Classify a ``--model`` value. One-line ``InputError`` when it names nothing usable."""
    source = source.strip()
    m = _TINY_RE.match(source)
    if m:
        return Source(TINY, TINY, int(m.group(1) or 0))
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if (path / "diffumatting.json").is_file():
                return Source(DIFFUMATTING, str(path))
            if (path / "model_index.json").is_file():
                return Source(DIFFUSERS, str(path))
            raise InputError(f"{path}: not a model folder (no model_index.json or diffumatting.json)")
        if path.suffix.lower() == ".safetensors" or path.suffix.lower() in PICKLE_FILE_SUFFIXES:
            return Source(SINGLE_FILE, str(path))
        raise InputError(f"{path}: not a model file (expected .safetensors, or a folder)")
    if source.startswith((".", "/", "~")) or source.lower().endswith((".safetensors", *PICKLE_FILE_SUFFIXES)):
        raise InputError(f"{source}: model path not found")
    if _HUB_RE.match(source):
        return Source(HUB, source)
    raise InputError(f"{source}: not 'tiny', an existing model path, or a hub id (owner/name)")


# ------------------------------------------------------------------------------ identities


def source_identity(src: Source, allow_pickle: bool = False) -> str:
    """The identity of one source (no LoRAs, no ControlNet). Cheap: see ``fingerprint.py``."""
    if src.kind == TINY:
        from factory.sampler.tiny import TINY_VERSION

        return f"tiny:v{TINY_VERSION}:seed={src.seed}"
    if src.kind == HUB:
        return _hub_identity(src)
    if src.kind == SINGLE_FILE and src.path.suffix.lower() in PICKLE_FILE_SUFFIXES and not allow_pickle:
        raise InputError(
            f"{src.ref}: a pickle checkpoint, which can run code when loaded; "
            "convert it to safetensors or set model.allow_pickle: true"
        )
    ident = f"{src.kind}:{src.ref}#{fingerprint(src.path)}"
    if src.kind == DIFFUMATTING:
        from factory.sampler.checkpoint import read_checkpoint_config  # json only, no weights

        base = read_checkpoint_config(src.path)["base"]
        if base["kind"] != "embedded":  # an embedded base is inside the fingerprinted folder
            ident += f" (base={base_identity(base, allow_pickle)})"
    return ident


def base_identity(base: dict[str, Any], allow_pickle: bool = False) -> str:
    """The identity of a checkpoint's referenced base (``{"kind": ..., ...}``)."""
    kind = base["kind"]
    if kind == TINY:
        return source_identity(Source(TINY, TINY, int(base.get("seed", 0))))
    ref = base.get("id") if kind == HUB else base.get("path")
    if not ref:
        raise InputError(f"checkpoint base {base} names no path or id")
    return source_identity(Source(kind, str(ref)), allow_pickle)


def _hub_identity(src: Source) -> str:
    """Phase 2: fingerprint the cached snapshot (its commit hash). For now: the id alone."""
    return f"hub:{src.ref}"


def _lora_identity(lora: LoraSpec) -> str:
    path = Path(lora.path).expanduser()
    if not path.is_file():
        raise InputError(f"{lora.path}: LoRA file not found")
    return f"+lora:{path.resolve()}@{lora.scale:g}#{fingerprint(path)}"


def _controlnet_identity(cn: ControlNetSpec, allow_pickle: bool) -> str:
    ref = Path(cn.model).expanduser()
    if ref.exists():
        ident = f"{ref.resolve()}#{fingerprint(ref)}"
    elif _HUB_RE.match(cn.model):
        ident = _hub_identity(Source(HUB, cn.model))
    else:
        raise InputError(f"{cn.model}: ControlNet model not found")
    h = hashlib.blake2b(digest_size=8)
    for image in cn.images:  # the conditioning images decide the samples as much as the weights
        p = Path(image)
        h.update(str(p).encode() + b"\0" + (fingerprint(p).encode() if p.is_file() else b"missing"))
    return f"+controlnet:{ident}@{cn.scale:g} images#{h.hexdigest()}"


def model_identity(model: ModelSpec) -> str:
    """Stable string naming the model: kind, path/id, content fingerprint, LoRAs, ControlNet.

    Cheap and without loading weights: the run store compares it before any work. Copying a model
    folder keeps its identity; retraining it changes it.
    """
    src = resolve_source(model.source)
    parts = [source_identity(src, model.allow_pickle)]
    parts += [_lora_identity(lora) for lora in model.loras]
    if model.controlnet is not None:
        parts.append(_controlnet_identity(model.controlnet, model.allow_pickle))
    if model.safety_checker:
        parts.append("+safety_checker")
    return " ".join(parts)


# ------------------------------------------------------------------------------ loaders


def load_tiny(src: Source, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    from factory.sampler.components import ModelComponents, place
    from factory.sampler.tiny import TINY_NOTE, TINY_SAMPLE_SIZE, build_tiny_components

    if model.safety_checker:
        raise InputError("the tiny model has no safety checker; set model.safety_checker: false")
    parts = build_tiny_components(src.seed)
    comps = ModelComponents(
        kind=TINY,
        ref=f"tiny:{src.seed}",
        **parts,
        base={"kind": TINY, "seed": src.seed},
        native_size=(TINY_SAMPLE_SIZE, TINY_SAMPLE_SIZE),
        notes=[TINY_NOTE],
    )
    for module in comps.modules().values():
        place(module, dtype=torch_dtype)
    return comps


def load_diffusers(src: Source, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    from factory.sampler.components import load_diffusers_folder

    return load_diffusers_folder(src.path, allow_pickle=model.allow_pickle, safety_checker=model.safety_checker, torch_dtype=torch_dtype)


def load_diffumatting(src: Source, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    from factory.sampler.checkpoint import load_checkpoint

    def resolve(base: dict[str, Any], dtype: torch.dtype) -> ModelComponents:
        ref = base.get("id") if base["kind"] == HUB else base.get("path")
        kind_src = Source(base["kind"], str(ref))
        if base["kind"] != HUB and not kind_src.path.exists():
            raise InputError(f"{ref}: base model not found; put it back there or retrain")
        return LOADERS[base["kind"]](kind_src, model, dtype)

    comps = load_checkpoint(src.path, torch_dtype=torch_dtype, resolve_base=resolve)
    if model.safety_checker and comps.safety_checker is None:
        raise InputError(f"{src.ref}: the checkpoint's base has no safety checker; set model.safety_checker: false")
    return comps


def load_single_file(src: Source, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    """Phase 2: ``StableDiffusionPipeline.from_single_file`` (safetensors unless allow_pickle)."""
    raise InputError(f"{src.ref}: single-file checkpoints are not supported yet")


def load_hub(src: Source, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    """Phase 2: from the local hub cache only; offline and uncached gives a one-line error."""
    raise InputError(f"{src.ref}: hub ids are not supported yet; pass a local diffusers folder")


def apply_loras(comps: ModelComponents, loras: list[LoraSpec], model: ModelSpec) -> None:
    """Phase 2: load each LoRA (safetensors) into the UNet/text encoder at its scale."""
    if loras:
        raise InputError("LoRAs are not supported yet")


def load_controlnet(comps: ModelComponents, spec: ControlNetSpec, model: ModelSpec, torch_dtype: torch.dtype) -> None:
    """Phase 2: load the ControlNet into ``comps.controlnet``."""
    raise InputError("ControlNet is not supported yet")


LOADERS = {
    TINY: load_tiny,
    DIFFUMATTING: load_diffumatting,
    DIFFUSERS: load_diffusers,
    SINGLE_FILE: load_single_file,
    HUB: load_hub,
}


def load_components(model: ModelSpec, torch_dtype: torch.dtype | None = None) -> ModelComponents:
    """Load everything ``model`` names (on CPU, in ``torch_dtype``, default float32)."""
    import torch

    dtype = torch_dtype or torch.float32
    src = resolve_source(model.source)
    if src.kind == SINGLE_FILE and src.path.suffix.lower() in PICKLE_FILE_SUFFIXES and not model.allow_pickle:
        source_identity(src, model.allow_pickle)  # raises the pickle error
    comps = LOADERS[src.kind](src, model, dtype)
    apply_loras(comps, list(model.loras), model)
    if model.controlnet is not None:
        load_controlnet(comps, model.controlnet, model, dtype)
    return comps
