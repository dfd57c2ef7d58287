"""The DiffuMatting sampler: Stable Diffusion on a green canvas, with a matting head.

Modules: ``pipeline`` (the sampler, ``auto_batch_size``), ``sources`` (model sources and
identities, LoRAs, ControlNet), ``hub`` (the local Hugging Face cache), ``tiny`` (the random test
model), ``head`` (the ConR matting head and the single decode pass), ``attention`` (cross-attention
capture), ``checkpoint`` (the DiffuMatting checkpoint format), ``noise_shift`` (the initial-noise shift),
``schedulers``, ``components``, ``fingerprint``.

The names below are imported lazily (PEP 562): ``from factory.sampler import model_identity`` in
the generation driver costs no torch import (about 400 MB of resident memory), while the first
name that needs torch imports it. diffusers loads with the first model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the submodule that defines it
_EXPORTS = {
    "AttentionCapture": "attention",
    "average_maps": "attention",
    "background_mask": "attention",
    "token_weights": "attention",
    "word_positions": "attention",
    "is_diffumatting_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ModelComponents": "components",
    "MattingHead": "head",
    "decode": "head",
    "load_head": "head",
    "save_head": "head",
    "DiffuMattingSampler": "pipeline",
    "Generated": "pipeline",
    "auto_batch_size": "pipeline",
    "load_sampler": "pipeline",
    "load_components": "sources",
    "model_identity": "sources",
    "resolve_source": "sources",
    "build_tiny_components": "tiny",
    "build_tiny_pipeline": "tiny",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from factory.sampler.attention import AttentionCapture, average_maps, background_mask, token_weights, word_positions  # noqa: F401
    from factory.sampler.checkpoint import is_diffumatting_checkpoint, load_checkpoint, save_checkpoint  # noqa: F401
    from factory.sampler.components import ModelComponents  # noqa: F401
    from factory.sampler.head import MattingHead, decode, load_head, save_head  # noqa: F401
    from factory.sampler.pipeline import DiffuMattingSampler, Generated, auto_batch_size, load_sampler  # noqa: F401
    from factory.sampler.sources import load_components, model_identity, resolve_source  # noqa: F401
    from factory.sampler.tiny import build_tiny_components, build_tiny_pipeline  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'factory.sampler' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"factory.sampler.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
