"""Model sources: what ``--model`` / ``model.source`` may name, its identity, and its loader.

Kinds (resolved by :func:`resolve_source`, in this order):

- ``tiny`` or ``tiny:SEED``: the random test model built in code (``tiny.py``);
- ``toy``: the small trained model shipped in the package (``factory/toy/model``, a DiffuMatting
  checkpoint with its base embedded; ``docs/toy-model.md``), loaded as any checkpoint;
- an existing folder with ``diffumatting.json``: a DiffuMatting checkpoint (``checkpoint.py``);
- an existing folder with ``model_index.json``: a local diffusers Stable Diffusion folder;
- an existing file ``*.safetensors`` (or a pickle ``.ckpt``/``.bin``/``.pt``/``.pth`` with
  ``allow_pickle``): a single-file checkpoint in the original (CompVis/A1111) layout;
- ``owner/name`` that is not a local path: a hub id, used from the local cache only (``hub.py``).

Identities (:func:`model_identity`) are cheap: no weights are loaded and no torch is imported;
folders and files are fingerprinted by ``fingerprint.py``. Format::

    <kind>:<ref>[#<fingerprint>][ (base=<identity>)][ +lora:<path>@<scale>#<fp>]...[ +controlnet:...]

with ``tiny:v<version>:seed=<seed>`` for the tiny model and ``hub:<id>@<commit>`` for a hub id
(the cached snapshot's commit). Loaders are one function per kind,
``load_<kind>(source, model, torch_dtype) -> ModelComponents``, registered in :data:`LOADERS`;
LoRAs (:func:`apply_loras`) and a ControlNet (:func:`load_controlnet`) are applied on top.

Single files need the diffusers configs of their architecture (component configs, tokenizer,
scheduler), which the file does not hold. Offline they come from, in order: the file's own folder
when it has a ``model_index.json`` (a file inside a diffusers folder or snapshot), else the local hub
cache of the repo diffusers associates with the file's architecture (SD1.x:
``stable-diffusion-v1-5/stable-diffusion-v1-5``; only its ``*.json``/``*.txt`` files are needed).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.errors import InputError
from factory.manifest import ControlNetSpec, LoraSpec, ModelSpec
from factory.sampler.fingerprint import fingerprint
from factory.sampler.hub import cached_snapshot, not_cached, require_snapshot

if TYPE_CHECKING:  # torch and the components stay unimported until something is loaded
    import torch

    from factory.sampler.components import ModelComponents

TINY, TOY, DIFFUMATTING, DIFFUSERS, SINGLE_FILE, HUB = "tiny", "toy", "diffumatting", "diffusers", "single_file", "hub"
PICKLE_FILE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_TINY_RE = re.compile(r"^tiny(?::(\d+))?$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
log = logging.getLogger(__name__)

#: Single-file architectures (diffusers' ``infer_diffusers_model_type``) that the sampler runs.
SINGLE_FILE_TYPES = ("v1", "v2")
#: Files of a hub repo a single-file checkpoint needs for its configs.
CONFIG_INCLUDE = " --include '*.json' --include '*.txt'"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: ``kind``, ``ref`` (absolute path, hub id or ``tiny``), tiny ``seed``."""

    kind: str
    ref: str
    seed: int = 0

    @property
    def path(self) -> Path:
        return Path(self.ref)


def resolve_source(source: str) -> ModelSource:
    """Classify a ``--model`` value. One-line ``InputError`` when it names nothing usable."""
    source = source.strip()
    m = _TINY_RE.match(source)
    if m:
        return ModelSource(TINY, TINY, int(m.group(1) or 0))
    if source == TOY:
        from factory.toy import MODEL_DIR

        if not (MODEL_DIR / "diffumatting.json").is_file():
            raise InputError(f"toy: the packaged toy model is missing from this installation (no {MODEL_DIR})")
        return ModelSource(TOY, str(MODEL_DIR))
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if (path / "diffumatting.json").is_file():
                return ModelSource(DIFFUMATTING, str(path))
            if (path / "model_index.json").is_file():
                return ModelSource(DIFFUSERS, str(path))
            raise InputError(f"{path}: not a model folder (no model_index.json or diffumatting.json)")
        if path.suffix.lower() == ".safetensors" or path.suffix.lower() in PICKLE_FILE_SUFFIXES:
            return ModelSource(SINGLE_FILE, str(path))
        raise InputError(f"{path}: not a model file (expected .safetensors, or a folder)")
    if source.startswith((".", "/", "~")) or source.lower().endswith((".safetensors", *PICKLE_FILE_SUFFIXES)):
        raise InputError(f"{source}: model path not found")
    if _HUB_RE.match(source):
        return ModelSource(HUB, source)
    raise InputError(f"{source}: not 'tiny', 'toy', an existing model path, or a hub id (owner/name)")


# ------------------------------------------------------------------------------ identities


def source_identity(src: ModelSource, allow_pickle: bool = False) -> str:
    """The identity of one source (no LoRAs, no ControlNet). Cheap: see ``fingerprint.py``."""
    if src.kind == TINY:
        from factory.sampler.tiny import TINY_VERSION

        return f"tiny:v{TINY_VERSION}:seed={src.seed}"
    if src.kind == TOY:
        from factory.toy import TOY_VERSION

        return f"toy:v{TOY_VERSION}#{fingerprint(src.path)}"
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
        return source_identity(ModelSource(TINY, TINY, int(base.get("seed", 0))))
    ref = base.get("id") if kind == HUB else base.get("path")
    if not ref:
        raise InputError(f"checkpoint base {base} names no path or id")
    return source_identity(ModelSource(kind, str(ref)), allow_pickle)


def _hub_identity(src: ModelSource, what: str = "model", instead: str = "pass a local folder with --model") -> str:
    """``hub:<id>@<commit>``: the cached snapshot's commit names the files exactly (no hashing).

    One-line ``InputError`` when the id is not in the local cache (the factory never downloads).
    """
    commit, _ = require_snapshot(src.ref, what, instead=instead)
    return f"hub:{src.ref}@{commit}"


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
        ident = _hub_identity(ModelSource(HUB, cn.model), "ControlNet", "set model.controlnet.model to a local folder")
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


def load_tiny(src: ModelSource, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    from factory.sampler.components import NO_SAFETY_CHECKER_FIX, ModelComponents, place
    from factory.sampler.tiny import TINY_NOTE, TINY_SAMPLE_SIZE, build_tiny_components

    if model.safety_checker:
        raise InputError(f"the tiny model has no safety checker; {NO_SAFETY_CHECKER_FIX}")
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


def load_diffusers(src: ModelSource, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    from factory.sampler.components import load_diffusers_folder

    return load_diffusers_folder(src.path, allow_pickle=model.allow_pickle, safety_checker=model.safety_checker, torch_dtype=torch_dtype)


def load_diffumatting(src: ModelSource, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    from factory.sampler.checkpoint import load_checkpoint
    from factory.sampler.components import NO_SAFETY_CHECKER_FIX

    def resolve(base: dict[str, Any], dtype: torch.dtype) -> ModelComponents:
        ref = base.get("id") if base["kind"] == HUB else base.get("path")
        kind_src = ModelSource(base["kind"], str(ref))
        if base["kind"] != HUB and not kind_src.path.exists():
            raise InputError(f"{ref}: base model not found; put it back there or retrain")
        return LOADERS[base["kind"]](kind_src, model, dtype)

    comps = load_checkpoint(src.path, torch_dtype=torch_dtype, resolve_base=resolve)
    if model.safety_checker and comps.safety_checker is None:
        raise InputError(f"{src.ref}: the checkpoint's base has no safety checker; {NO_SAFETY_CHECKER_FIX}")
    return comps


def load_toy(src: ModelSource, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    """The packaged toy model: a DiffuMatting checkpoint (its native size and note come with it)."""
    comps = load_diffumatting(src, model, torch_dtype)
    comps.ref = TOY
    return comps


class _LazyCheckpoint(Mapping):
    """A safetensors file as a read-only mapping that reads a tensor only when asked for it.

    Enough for diffusers' ``infer_diffusers_model_type`` (key tests and a few shapes) without
    reading gigabytes.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._fh = safe_open(str(path), framework="pt")
        self._keys = set(self._fh.keys())

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._fh.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


def single_file_type(path: Path) -> str:
    """diffusers' name for a single file's architecture (``v1``, ``v2``, ``xl_base``, ``controlnet``...)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        if path.suffix.lower() == ".safetensors":
            checkpoint: Any = _LazyCheckpoint(path)
        else:  # a pickle, opted in: read whole here, and again by from_single_file
            from diffusers.models.model_loading_utils import load_state_dict

            checkpoint = load_state_dict(str(path))
            while "state_dict" in checkpoint:
                checkpoint = checkpoint["state_dict"]
    except Exception as exc:  # safetensors and torch raise their own error types
        raise InputError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from exc
    return str(infer_diffusers_model_type(checkpoint))


def single_file_config(path: Path, kind: str, marker: str, what: str) -> Path:
    """The folder of diffusers configs for the single file ``path`` (see the module docstring).

    ``marker``: the file that makes a folder a config folder (``model_index.json`` for a pipeline,
    ``config.json`` for a ControlNet); ``kind``: the file's architecture (:func:`single_file_type`).
    """
    if (path.parent / marker).is_file():
        return path.parent
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]
    found = cached_snapshot(repo)
    if found is None or not (found[1] / marker).is_file():
        instead = f"put {path.name} in a folder with the diffusers configs ({marker} and its component folders)"
        raise InputError(f"{path}: a single-file {what} needs the diffusers configs of its architecture; {not_cached(repo, 'config repo', CONFIG_INCLUDE, instead)}")
    return found[1]


def load_single_file(src: ModelSource, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    """A single-file SD1.x/2.x checkpoint via ``StableDiffusionPipeline.from_single_file``, offline.

    safetensors unless ``allow_pickle``; configs from :func:`single_file_config`; the safety checker
    (only when asked for) from the config folder, which must then hold its weights.
    """
    from factory.sampler.components import ModelComponents, quiet_diffusers, quiet_transformers

    path = src.path
    _check_pickle(path, model.allow_pickle, "checkpoint")
    kind = single_file_type(path)
    if kind not in SINGLE_FILE_TYPES:
        raise InputError(f"{path}: a {kind!r} checkpoint; the sampler runs Stable Diffusion 1.x/2.x single files (v1, v2)")
    config = single_file_config(path, kind, "model_index.json", "checkpoint")
    kwargs: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    with quiet_transformers(), quiet_diffusers():
        from diffusers import StableDiffusionPipeline

        if model.safety_checker:
            kwargs = _single_file_safety_checker(config, model, torch_dtype)
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config), local_files_only=True, torch_dtype=torch_dtype, **kwargs
            )
        except InputError:
            raise
        except Exception as exc:  # diffusers raises ValueError, OSError, KeyError, its own errors...
            raise InputError(f"{path}: cannot load the single-file checkpoint with the configs in {config} ({_first_line(exc)})") from exc
    return ModelComponents(
        kind=SINGLE_FILE,
        ref=str(path),
        unet=pipe.unet.eval(),
        vae=pipe.vae.eval(),
        text_encoder=pipe.text_encoder.eval(),
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        safety_checker=pipe.safety_checker if model.safety_checker else None,
        feature_extractor=pipe.feature_extractor if model.safety_checker else None,
        base={"kind": SINGLE_FILE, "path": str(path)},
        notes=[] if config == path.parent else [f"single file: configs (tokenizer, scheduler, component configs) from {config}"],
    )


def _single_file_safety_checker(config: Path, model: ModelSpec, torch_dtype: torch.dtype) -> dict[str, Any]:
    """Pipeline kwargs with the safety checker and feature extractor of the config folder."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from factory.sampler.components import NO_SAFETY_CHECKER_FIX, check_flat_weights, choose_variant

    folder = config / "safety_checker"
    if not folder.is_dir() or not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
        raise InputError(f"{config}: no safety checker weights for this single file; {NO_SAFETY_CHECKER_FIX}")
    check_flat_weights(folder, model.allow_pickle)
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(
            str(folder),
            local_files_only=True,
            use_safetensors=None if model.allow_pickle else True,
            variant=choose_variant([folder], model.allow_pickle),
            dtype=torch_dtype,
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: cannot load the safety checker ({_first_line(exc)})") from exc
    return {"safety_checker": checker, "requires_safety_checker": False}  # feature_extractor: from the config folder


def load_hub(src: ModelSource, model: ModelSpec, torch_dtype: torch.dtype) -> ModelComponents:
    """A hub id from the local cache only: its cached snapshot is a diffusers folder."""
    from factory.sampler.components import load_diffusers_folder

    commit, snapshot = require_snapshot(src.ref)
    if not (snapshot / "model_index.json").is_file():
        raise InputError(
            f"hub model '{src.ref}' (cached at {snapshot}) is not a diffusers pipeline (no model_index.json); "
            "for a repo holding one checkpoint file, pass that file's path"
        )
    try:
        comps = load_diffusers_folder(snapshot, allow_pickle=model.allow_pickle, safety_checker=model.safety_checker, torch_dtype=torch_dtype)
    except InputError as exc:
        raise InputError(f"hub model '{src.ref}' (cached snapshot {commit[:12]}): {exc}; if files are missing, run `hf download {src.ref}`") from exc
    comps.kind, comps.ref = HUB, src.ref
    comps.base = {"kind": HUB, "id": src.ref}
    return comps


# ------------------------------------------------------------------------------ LoRAs


def _check_pickle(path: Path, allow_pickle: bool, what: str) -> None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return
    if suffix in PICKLE_FILE_SUFFIXES:
        if not allow_pickle:
            raise InputError(
                f"{path}: a pickle {what}, which can run code when loaded; convert it to safetensors or set model.allow_pickle: true"
            )
        return
    raise InputError(f"{path}: not a {what} file (expected .safetensors)")


def apply_loras(comps: ModelComponents, loras: list[LoraSpec], model: ModelSpec) -> None:
    """Load each LoRA at its scale into the UNet and text encoder, then fuse them into the weights.

    Composes diffusers: ``load_lora_weights`` (one adapter per file; diffusers, kohya and A1111
    key layouts), ``set_adapters`` with the scales, ``fuse_lora``, then ``unload_lora_weights``.
    The modules are plain again afterwards, with the LoRAs merged into their weights: no LoRA cost
    per step, and capture, ``torch.compile``, training and ``save_checkpoint`` see an ordinary UNet.
    safetensors only unless ``allow_pickle``. Records the LoRAs in ``comps.loras``.
    """
    if not loras:
        return
    from factory.sampler.components import quiet_diffusers, quiet_transformers

    files = []
    for lora in loras:
        path = Path(lora.path).expanduser().resolve()
        if not path.is_file():
            raise InputError(f"{lora.path}: LoRA file not found")
        _check_pickle(path, model.allow_pickle, "LoRA")
        files.append(path)
    with quiet_transformers(), quiet_diffusers(), warnings.catch_warnings():
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            unet=comps.unet,
            scheduler=comps.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        names = []
        warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters", category=UserWarning)
        for i, (lora, path) in enumerate(zip(loras, files)):
            name = f"lora{i}"
            try:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, local_files_only=True)
            except Exception as exc:  # ValueError, RuntimeError (shapes), safetensors errors...
                pipe.unload_lora_weights()
                raise InputError(f"{path}: cannot load the LoRA into this model ({_first_line(exc)})") from exc
            present = {n for adapters in pipe.get_list_adapters().values() for n in adapters}
            if name not in present:
                pipe.unload_lora_weights()
                raise InputError(f"{path}: none of the LoRA's weights match this model's UNet or text encoder")
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[float(lora.scale) for lora in loras])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    comps.loras = [*comps.loras, *({"path": str(p), "scale": float(lora.scale)} for p, lora in zip(files, loras))]
    log.info("fused %d LoRA(s) into %s", len(files), comps.ref)


# ------------------------------------------------------------------------------ ControlNet


def _controlnet_folder(spec: ControlNetSpec, model: ModelSpec) -> tuple[str, Path, Path | None]:
    """``(label, config folder, single file or None)`` of ``spec.model``."""
    ref = Path(spec.model).expanduser()
    if ref.is_dir():
        if not (ref / "config.json").is_file():
            raise InputError(f"{ref}: not a diffusers ControlNet folder (no config.json)")
        return str(ref.resolve()), ref.resolve(), None
    if ref.is_file():
        path = ref.resolve()
        _check_pickle(path, model.allow_pickle, "ControlNet checkpoint")
        if (path.parent / "config.json").is_file():
            return str(path), path.parent, path
        kind = single_file_type(path)
        if kind != "controlnet":
            raise InputError(f"{path}: not an SD1.x/2.x ControlNet checkpoint (diffusers reads it as {kind!r})")
        return str(path), single_file_config(path, kind, "config.json", "ControlNet"), path
    if _HUB_RE.match(spec.model) and not spec.model.startswith((".", "/", "~")):
        _, snapshot = require_snapshot(spec.model, "ControlNet", instead="set model.controlnet.model to a local folder")
        if not (snapshot / "config.json").is_file():
            raise InputError(f"ControlNet '{spec.model}' (cached at {snapshot}) is not a diffusers ControlNet (no config.json)")
        return spec.model, snapshot, None
    raise InputError(f"{spec.model}: ControlNet model not found")


def load_controlnet(comps: ModelComponents, spec: ControlNetSpec, model: ModelSpec, torch_dtype: torch.dtype) -> None:
    """Load the ControlNet ``spec.model`` into ``comps.controlnet`` (and its scale).

    ``spec.model``: a local diffusers ControlNet folder (``config.json`` + weights), a single
    ``.safetensors`` file (diffusers or original layout; configs as for single-file models), or a
    hub id from the local cache. It must fit the base UNet (same cross-attention width and block
    channels, and a conditioning embedding that downsamples like the VAE).
    """
    from factory.sampler.components import check_flat_weights, choose_variant, quiet_diffusers, quiet_transformers

    label, folder, single = _controlnet_folder(spec, model)
    with quiet_transformers(), quiet_diffusers():
        from diffusers import ControlNetModel

        try:
            if single is not None:
                cn = ControlNetModel.from_single_file(str(single), config=str(folder), local_files_only=True, torch_dtype=torch_dtype)
            else:
                check_flat_weights(folder, model.allow_pickle)
                cn = ControlNetModel.from_pretrained(
                    str(folder),
                    local_files_only=True,
                    use_safetensors=None if model.allow_pickle else True,
                    variant=choose_variant([folder], model.allow_pickle),
                    torch_dtype=torch_dtype,
                )
        except InputError:
            raise
        except Exception as exc:  # OSError, ValueError, size mismatches...
            raise InputError(f"{label}: cannot load the ControlNet ({_first_line(exc)})") from exc
    ucfg, ccfg = comps.unet.config, cn.config
    if ccfg.cross_attention_dim != ucfg.cross_attention_dim or tuple(ccfg.block_out_channels) != tuple(ucfg.block_out_channels):
        raise InputError(
            f"{label}: the ControlNet does not fit the base model (cross_attention_dim {ccfg.cross_attention_dim} "
            f"vs {ucfg.cross_attention_dim}, block_out_channels {list(ccfg.block_out_channels)} vs {list(ucfg.block_out_channels)})"
        )
    vae_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    cn_scale = 2 ** (len(ccfg.conditioning_embedding_out_channels) - 1)
    if cn_scale != vae_scale:
        raise InputError(f"{label}: the ControlNet's conditioning embedding downsamples by {cn_scale}, the base VAE by {vae_scale}")
    comps.controlnet = cn.eval()
    comps.controlnet_scale = float(spec.scale)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


LOADERS = {
    TINY: load_tiny,
    TOY: load_toy,
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
