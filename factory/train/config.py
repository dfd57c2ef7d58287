"""Training settings: :class:`TrainConfig`, every field with its documented default.

Sources, later ones winning: the defaults below, a YAML file (``--config``), then the command
line's options. On ``--resume`` the run's saved settings (``OUT/train.json``) replace the defaults
and the YAML/CLI values may change only what does not change the arithmetic of the steps already
taken (:data:`RESUME_MUTABLE`); anything else is a one-line error, because resume is exact.

Defaults are for a real SD1.5 run on one GPU, following the paper where it says something
(learning rate 2e-6, batch 2, generator first and then generator + head); loss weights and the
other details are our own choices, documented in ``docs/train.md``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.errors import InputError

#: lr schedules of diffusers' ``get_scheduler`` that need no extra arguments.
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

DEFAULT_VALIDATION_PROMPTS = [
    "a red apple on a green background",
    "a fluffy white cat with long fur on a green background",
    "a glass wine bottle, studio photo, on a green background",
    "portrait of a woman with curly hair on a green background",
]


class TrainConfig(BaseModel):
    """All settings of ``factory train`` (see ``docs/train.md`` for the formulas they feed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---------------------------------------------------------------- model and data
    model: str = "tiny"
    """Base model: ``tiny``, a diffusers SD1.5 folder, a DiffuMatting checkpoint (continue
    training, its head included), or what else ``factory generate --model`` accepts."""
    data: list[str] = []
    """Matting sets: folders (image/ + alpha/ [+ fg/], or KEY.png + KEY.alpha.png [+ KEY.fg.png,
    KEY.json]) or WebDataset shards (a .tar, a brace pattern, or a folder of .tar)."""
    captions: str | None = None
    """Captions file: .jsonl (``{"key", "caption"[, "class_name"]}`` per line), .json (key ->
    caption) or .tsv/.txt (``KEY<TAB>caption``). Wins over the samples' own metadata."""
    default_caption: str | None = None
    """Caption for samples with none (no captions entry, no JSON prompt/caption/class name);
    None makes a missing caption an error."""
    prompt_template: str = "{caption}, on a green background"
    """Applied to captions that do not already contain ``canvas_token`` as a word."""
    canvas_token: str = "green"
    """The prompt word whose cross-attention L_g ties to the background (1 - M)."""
    proportion_empty_prompts: float = Field(0.0, ge=0.0, le=1.0)
    """Share of samples trained with the empty prompt (diffusers' name), drawn per sample from
    the seed: it teaches the unconditional prediction that classifier-free guidance subtracts.
    SD1.5 already has one (0 when fine-tuning it); a model trained from scratch needs ~0.1."""

    # ---------------------------------------------------------------- augmentation / canvas
    resolution: int | None = Field(None, ge=16, le=2048)
    """Square training size in pixels (a multiple of 8; SD1.5 needs a multiple of 64). None = the
    model's native size: 512 for SD1.5 models, 64 for the tiny test model (fixed at the start)."""
    square: Literal["pad", "crop"] = "pad"
    """Non-square samples: ``pad`` onto a square canvas (alpha 0, so nothing is cut; the object
    lands at a random offset) or ``crop`` a random square."""
    crop_scale: tuple[float, float] = (0.85, 1.0)
    """Random square crop of this share (uniform) of the square's side, then resize."""
    flip: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of a horizontal flip (image, alpha and foreground together)."""
    green_hue: tuple[float, float] = (100.0, 140.0)
    """Canvas colour range (HSV): hue in degrees (pure green is 120) ..."""
    green_saturation: tuple[float, float] = (0.6, 1.0)
    """... saturation ..."""
    green_value: tuple[float, float] = (0.55, 1.0)
    """... and value, each drawn uniformly per sample."""
    data_workers: int = Field(2, ge=0, le=64)
    """DataLoader worker processes per trainer (0 = load in the training process)."""

    # ---------------------------------------------------------------- schedule
    steps: int = Field(10000, ge=1)
    """Optimizer steps in total (all stages)."""
    stage: Literal["generator", "joint", "both"] = "both"
    """``generator``: UNet with L_noise + L_g (+ L_obj) + L_detail. ``joint``: UNet and matting
    head with all terms. ``both``: generator for ``generator_steps``, then joint (the paper)."""
    generator_steps: int | None = Field(None, ge=0)
    """With ``stage: both``, steps of the generator stage; None = half of ``steps``."""
    batch_size: int = Field(2, ge=1)
    """Samples per device per micro-batch (the paper: 2)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step. Effective batch = batch_size x devices x this."""

    # ---------------------------------------------------------------- optimizer
    lr: float = Field(2e-6, gt=0)
    """UNet learning rate (the paper: 2e-6)."""
    head_lr: float = Field(1e-4, gt=0)
    """Matting head learning rate (our choice: the head starts from random weights)."""
    lr_scheduler: Literal[LR_SCHEDULES] = "constant_with_warmup"  # type: ignore[valid-type]
    """diffusers ``get_scheduler`` name."""
    lr_warmup_steps: int = Field(100, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping of the trainable parameters' global norm (0 = off)."""
    use_8bit_adam: bool = False
    """bitsandbytes AdamW8bit (CUDA only; ``pip install bitsandbytes``)."""
    ema: bool = False
    """Keep an exponential moving average of the UNet and head; checkpoints then hold the EMA."""
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    """EMA decay, reached after warm-up: ``min(ema_decay, (1 + n) / (10 + n))`` at update n."""

    # ---------------------------------------------------------------- precision / memory
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """``bf16``/``fp16``: autocast in that type, the frozen VAE and text encoder stored in it,
    trainable weights kept in float32 (``fp16`` adds dynamic loss scaling); ``no``: float32;
    ``auto``: bf16 on CUDA, float32 on CPU."""
    gradient_checkpointing: bool = True
    """Recompute UNet activations in the backward pass (less memory, ~30 % slower)."""

    # ---------------------------------------------------------------- losses (docs/train.md)
    lambda_green: float = Field(0.1, ge=0)
    """Weight of L_g: "green" token attention vs the background 1 - M."""
    lambda_object: float = Field(0.0, ge=0)
    """Weight of L_obj: object tokens' attention vs M (the other direction of L_g); 0 = off."""
    lambda_detail: float = Field(0.1, ge=0)
    """Weight of L_detail: Sobel features of the one-step estimate vs the ground truth, in the band."""
    lambda_latent: float = Field(1.0, ge=0)
    """Weight of L_latent = Dice + L1 of the head's coarse alpha vs M (joint stage only)."""
    attention_norm: Literal["max", "none"] = "max"
    """Each attention map divided by its spatial max before L_g/L_obj (``none``: raw softmax
    probabilities, the article's literal reading)."""
    detail_space: Literal["latent", "image"] = "latent"
    """L_detail on the latents (decode-free, default) or on the decoded grey image."""
    detail_band: int = Field(8, ge=0)
    """Transition band: pixels with 0 < alpha < 1 (or on the 0.5 edge), dilated by this many
    pixels at the training resolution."""
    detail_max_timestep: int = Field(500, ge=0)
    """L_detail only for samples with t <= this (the one-step estimate is noise above)."""
    latent_source: Literal["gt", "pred"] = "gt"
    """What the head sees in training: decoder features of the ground-truth latent (``gt``, the
    head alone learns from L_latent) or of the one-step estimate (``pred``, L_latent also trains
    the UNet through the frozen decoder; costs a decoder backward)."""

    # ---------------------------------------------------------------- checkpoints / logs
    checkpoint_every: int = Field(500, ge=1)
    """Save a checkpoint (and validation samples) every this many steps, and at the end."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk (the oldest are deleted; validation images are kept)."""
    validation_prompts: list[str] = DEFAULT_VALIDATION_PROMPTS
    """Prompts drawn with the sampler at every checkpoint (image + coarse alpha); [] = none."""
    validation_steps: int = Field(25, ge=1)
    validation_guidance: float = 7.5
    validation_seed: int = 0

    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Experiment tracker fed with each step's losses and the validation samples (``OUT/logs``);
    ``log.jsonl`` is written in any case."""

    # ---------------------------------------------------------------- run
    seed: int = 0
    """Seeds the data order, augmentation, noise, timesteps and a new head's weights."""
    device: str | None = None
    """torch device; None = CUDA when available, else CPU."""

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v

    @field_validator("crop_scale", "green_saturation", "green_value")
    @classmethod
    def _unit_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"must be a range 0 <= low <= high <= 1, got {list(v)}")
        return v

    @field_validator("green_hue")
    @classmethod
    def _hue_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 <= v[0] <= v[1] <= 360.0):
            raise ValueError(f"must be a range of degrees 0 <= low <= high <= 360, got {list(v)}")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{caption}" not in v:
            raise ValueError("must contain {caption}")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.generator_steps is not None and self.generator_steps > self.steps:
            raise ValueError(f"generator_steps ({self.generator_steps}) is more than steps ({self.steps})")
        if self.crop_scale[0] <= 0:
            raise ValueError("crop_scale must be above 0")
        return self

    # ---------------------------------------------------------------- derived

    def stage_at(self, step: int) -> str:
        """The stage of the step that follows ``step`` completed steps: generator or joint."""
        if self.stage != "both":
            return self.stage
        return "generator" if step < self.generator_boundary else "joint"

    @property
    def generator_boundary(self) -> int:
        """First step of the joint stage with ``stage: both`` (``steps`` for generator only)."""
        if self.stage == "generator":
            return self.steps
        if self.stage == "joint":
            return 0
        return self.generator_steps if self.generator_steps is not None else self.steps // 2

    def math_fingerprint(self) -> str:
        """Hash of the fields that decide what the steps compute (not in RESUME_MUTABLE)."""
        data = {k: v for k, v in self.model_dump(mode="json").items() if k not in RESUME_MUTABLE}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


#: Fields a resumed run may change: they do not alter the steps already taken (``steps`` only
#: extends the run; with a decaying lr schedule the later steps then follow the new length).
RESUME_MUTABLE = frozenset(
    {
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "validation_prompts",
        "validation_steps",
        "validation_guidance",
        "validation_seed",
        "data_workers",
        "device",
        "report_to",
    }
)


def config_error(exc: ValidationError, where: str, sources: dict[str, str] | None = None) -> InputError:
    """One line naming the first offending setting and where it was given (``sources``: setting
    -> the file or option it came from; ``where`` otherwise)."""
    err = exc.errors()[0]
    parts = err.get("loc", ())
    loc = ".".join(str(p) for p in parts) or "settings"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    origin = (sources or {}).get(str(parts[0]), where) if parts else where
    return InputError(f"{origin}: {loc}: {msg}{more}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML file of TrainConfig fields (unknown keys are errors at validation)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the training config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: cannot read the training config (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a training config must be a mapping of settings")
    return data


def make_config(values: dict[str, Any], where: str = "training settings", sources: dict[str, str] | None = None) -> TrainConfig:
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise config_error(exc, where, sources) from exc


def resume_config(saved: dict[str, Any], overrides: dict[str, Any], where: str, sources: dict[str, str] | None = None) -> TrainConfig:
    """The saved config with ``overrides`` applied; overriding a math field with a new value is an error."""
    base = make_config(saved, f"{where} (saved settings)")
    changed = []
    for key, value in overrides.items():
        if key not in TrainConfig.model_fields:
            raise InputError(f"{(sources or {}).get(key, 'training settings')}: unknown training setting {key!r}")
        old = getattr(base, key)
        new = make_config({**base.model_dump(), key: value}, "settings", sources).__getattribute__(key)
        if new != old and key not in RESUME_MUTABLE:
            changed.append(f"{key} ({old!r} -> {new!r})")
    if changed:
        raise InputError(
            f"--resume: {', '.join(changed)} differ from the run in {where}; resume with the same settings, "
            "or start a new --out with --model pointing at this run to continue from its weights"
        )
    return make_config({**base.model_dump(), **overrides}, "settings", sources)
