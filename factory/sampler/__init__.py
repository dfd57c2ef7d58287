"""The DiffuMatting sampler: Stable Diffusion on a green canvas, with a matting head.

Modules: ``pipeline`` (the sampler, ``auto_batch_size``), ``sources`` (model sources and
identities, LoRAs, ControlNet), ``hub`` (the local Hugging Face cache), ``tiny`` (the random test
model), ``head`` (the ConR matting head and the single decode pass), ``attention`` (cross-attention
capture), ``checkpoint`` (the DiffuMatting checkpoint format), ``canvas`` (the initial-noise shift),
``schedulers``, ``components``, ``fingerprint``.

Importing this package imports torch but not diffusers (diffusers loads with the first model).
"""

from factory.sampler.attention import AttentionCapture, average_maps, background_mask, token_weights, word_positions
from factory.sampler.checkpoint import is_diffumatting_checkpoint, load_checkpoint, save_checkpoint
from factory.sampler.components import ModelComponents
from factory.sampler.head import MattingHead, decode, load_head, save_head
from factory.sampler.pipeline import DiffuMattingSampler, Generated, auto_batch_size, load_sampler
from factory.sampler.sources import load_components, model_identity, resolve_source
from factory.sampler.tiny import build_tiny_components, build_tiny_pipeline

__all__ = [
    "AttentionCapture",
    "DiffuMattingSampler",
    "Generated",
    "MattingHead",
    "ModelComponents",
    "auto_batch_size",
    "average_maps",
    "background_mask",
    "build_tiny_components",
    "build_tiny_pipeline",
    "decode",
    "is_diffumatting_checkpoint",
    "load_checkpoint",
    "load_components",
    "load_head",
    "load_sampler",
    "model_identity",
    "resolve_source",
    "save_checkpoint",
    "save_head",
    "token_weights",
    "word_positions",
]
