"""The DiffuMatting sampler: green-canvas generation plus a coarse alpha, on diffusers.

Per batch of plan rows, :meth:`DiffuMattingSampler.sample`:

0. reads each row's own inputs (the ControlNet conditioning image, resized to the render size);
   a row whose image is missing or unreadable becomes a failed sample and leaves the batch;
1. draws each row's initial noise from its own ``torch.Generator`` seeded with ``row.seed`` (on
   CPU, float32, so a row's noise never depends on the batch, its position or the device), and
   optionally shifts it towards the green canvas latent (``canvas.py``);
2. runs a composed ``StableDiffusionPipeline`` (``StableDiffusionControlNetPipeline`` with a
   ControlNet) with ``output_type="latent"`` (the rows' prompts and negative prompts, the chosen
   scheduler, steps, guidance, size, conditioning images and scale; the same per-row generators go
   to stochastic schedulers);
3. decodes the whole batch in one VAE pass that also feeds the matting head (``head.py``);
4. runs the safety checker when enabled, and turns each sample into a :class:`Generated`, with
   ``error`` set for a non-finite (NaN/inf) or flagged sample while the others succeed.

The safety checker is **off by default**: the factory draws isolated objects on a green canvas
and its output is meant to be filtered and reviewed downstream; ``model.safety_checker: true``
turns it on for models that ship one (a model without one is then an error, not a silent skip).
Flagged samples get ``error = "flagged by the safety checker"`` and are recorded as failed.

Speed: bf16 on CUDA (float32 on CPU), PyTorch SDPA attention (diffusers' default processor),
channels_last UNet, VAE and ControlNet on CUDA, one batched VAE decode, optional ``torch.compile``
of the UNet and ControlNet (fixed size and batch: compiled once), batch size from the settings or
:func:`auto_batch_size` (free GPU memory), halved automatically on out-of-memory. LoRAs arrive
fused into the weights (``sources.apply_loras``), so they cost nothing per step.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from factory.errors import InputError, RunError
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sampler.attention import AttentionCapture, background_mask, token_weights
from factory.sampler.noise_shift import canvas_latent_mean, shift_noise
from factory.sampler.components import ModelComponents, place, quiet_transformers
from factory.sampler.head import decode
from factory.sampler.schedulers import make_scheduler
from factory.sampler.sizes import render_size
from factory.sampler.sources import load_components, model_identity

log = logging.getLogger(__name__)


_TRUNCATION_NOTICES = (
    "can only handle sequences up to",  # diffusers' encode_prompt, every batch with a long prompt
    "Token indices sequence length is longer than",  # transformers' tokenizer, once per process
)


class _TruncationNoticeFilter(logging.Filter):
    """Drops the libraries' notices that a prompt is longer than CLIP's 77 tokens (one of them
    lists the cut words of every prompt in the batch): the sampler records each row's token count
    (``prompt_tokens``) and ``generate`` warns once, in its summary, with the count of cut prompts."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in _TRUNCATION_NOTICES)


_TRUNCATION_NOTICE = _TruncationNoticeFilter()
_TOKENIZER_LOGGER = "transformers.tokenization_utils_base"

NAN_ERROR = "non-finite values (NaN/inf) in the generated sample"
NSFW_ERROR = "flagged by the safety checker"
NO_HEAD = "none: the model has no matting head; the alpha comes from the matting stage (GreenPost) alone"


@dataclass
class Generated:
    """One sample. ``image`` uint8 (H, W, 3); ``coarse_alpha`` float32 (H, W) in [0, 1] or None.

    ``coarse_alpha`` is the matting head's output, None when the model has no head. ``error`` marks
    a failed sample (its arrays are then zeros). ``seconds`` is the batch time / batch size.
    ``background_mask`` float32 (H, W) in [0, 1], 1 = background, from the canvas token's
    cross-attention; only with ``capture=True`` and when the prompt contains the canvas token.
    """

    image: np.ndarray
    coarse_alpha: np.ndarray | None
    error: str | None = None
    seconds: float = 0.0
    prompt_tokens: int | None = None  # the prompt's CLIP tokens before the text encoder cuts it
    background_mask: np.ndarray | None = None


# ------------------------------------------------------------------------------ settings


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    return _DTYPES[dtype]


#: GPU memory per 512x512 image in a batch (bf16, guidance, VAE decode included): conservative.
GPU_BYTES_PER_512_IMAGE = 3e9
MAX_AUTO_BATCH = 32


def auto_batch_size(settings: SamplerSettings, device: str | None = None) -> int:
    """Images per sampler call when the manifest sets none (``settings.batch_size`` is not read).

    CPU: 4 up to 256x256 px, else 2 (a CPU is slow whatever the batch). CUDA: 80 % of the free
    memory of ``device`` (default: the current GPU) over about 3 GB per 512x512 image (scaled by
    the pixel count), 1 to 32. Measured when called: a sampler calls it with its model already on
    the GPU; before loading, the weights' 2 GB (SD1.5, bf16) are inside the 20 % margin. On
    out-of-memory the sampler halves the batch anyway.
    """
    dev = resolve_device(device)
    pixels = settings.width * settings.height
    if dev.type != "cuda":
        return 4 if pixels <= 256 * 256 else 2
    free, _total = torch.cuda.mem_get_info(dev)
    per_image = GPU_BYTES_PER_512_IMAGE * pixels / (512 * 512)
    return int(max(1, min(MAX_AUTO_BATCH, (free * 0.8) // per_image)))


def object_words(row: PlanRow) -> list[str]:
    """The words naming the row's object (its class name), for the object attention map."""
    return re.findall(r"[a-z0-9]+", row.class_name.lower())


# ------------------------------------------------------------------------------ the sampler


class DiffuMattingSampler:
    """Generates rows on the green canvas with an optional matting head. Build with :func:`load_sampler`."""

    def __init__(
        self,
        components: ModelComponents,
        settings: SamplerSettings,
        canvas: CanvasSettings,
        *,
        identity: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        capture: bool = False,
    ) -> None:
        self.components = components
        self.settings = settings
        self.canvas = canvas
        self.identity = identity
        self.device = torch.device(device)
        self.dtype = dtype
        self.head = components.head
        self.has_head = self.head is not None
        self.width, self.height = render_size(settings.width, settings.height, components.native_size)
        # In metadata["notes"] too: a Ray sampler worker's log stays in its session folder, and the
        # notes are what generate's summary prints.
        size_notes = []
        if (self.width, self.height) != (settings.width, settings.height):
            native = "x".join(map(str, components.native_size or ()))
            size_notes.append(
                f"{identity.split(':', 1)[0]} renders at most {native} px: drawing {self.width}x{self.height} "
                f"instead of {settings.width}x{settings.height}"
            )
            log.warning(size_notes[0])

        self.scheduler = make_scheduler(settings.scheduler, components.scheduler.config)
        self.pipe = self._build_pipeline(components, self.scheduler)
        for name, module in components.modules().items():
            place(module, self.device, torch.float32 if name == "head" else self.dtype).eval()
        if self.device.type == "cuda":  # GPU-only speed-ups, kept out of the CPU path
            for module in (components.unet, components.vae, components.controlnet):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self.vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.latent_hw = (self.height // self.vae_scale, self.width // self.vae_scale)
        self.latent_shape = (int(components.unet.config.in_channels), *self.latent_hw)

        self.capture: AttentionCapture | None = AttentionCapture(components.unet).install() if capture else None
        self.canvas_mean: torch.Tensor | None = None
        if canvas.noise_shift > 0:
            unit = 8 * self.vae_scale  # a canvas of up to 256 px is plenty for a flat colour
            size = max(unit, min(256, max(self.width, self.height)) // unit * unit)
            self.canvas_mean = canvas_latent_mean(components.vae, canvas.color, size)
        if compile and self.device.type != "cuda":
            log.warning("torch.compile is only used on CUDA; running the UNet eagerly on %s", self.device)
            compile = False
        if compile:  # fixed size and batch: compiled once, on the first batch
            components.unet.compile(dynamic=False)
            if components.controlnet is not None:
                components.controlnet.compile(dynamic=False)
        self.batch_size = settings.batch_size or auto_batch_size(
            settings.model_copy(update={"width": self.width, "height": self.height}), str(self.device)
        )
        self._control: dict[str, Any] = {}  # row key -> conditioning image, for the batch being drawn
        self.metadata: dict[str, Any] = {
            "identity": identity,
            "source_kind": components.kind,
            "source": components.ref,
            "has_head": self.has_head,
            "coarse_alpha": "matting head (ConR on the VAE decoder's last features)" if self.has_head else NO_HEAD,
            "scheduler": settings.scheduler,
            "scheduler_class": type(self.scheduler).__name__,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "width": self.width,
            "height": self.height,
            "requested_size": [settings.width, settings.height],
            "noise_shift": canvas.noise_shift,
            "canvas_latent_mean": None if self.canvas_mean is None else [round(float(v), 6) for v in self.canvas_mean],
            "safety_checker": components.safety_checker is not None,
            "capture": capture,
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "compile": compile,
            "batch_size": self.batch_size,
            "loras": list(components.loras),
            "controlnet": None if components.controlnet is None else {"scale": components.controlnet_scale},
            "notes": [*components.notes, *size_notes],
        }
        for note in components.notes:
            log.warning(note)

    # -------------------------------------------------------------- the composed pipeline

    def _build_pipeline(self, comps: ModelComponents, scheduler: Any) -> Any:
        """The diffusers pipeline the sampler drives (a ControlNet pipeline when there is one)."""
        with quiet_transformers():
            from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        parts: dict[str, Any] = dict(
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            unet=comps.unet,
            scheduler=scheduler,
            safety_checker=comps.safety_checker,
            feature_extractor=comps.feature_extractor,
            requires_safety_checker=False,
        )
        if comps.controlnet is not None:
            pipe = StableDiffusionControlNetPipeline(controlnet=comps.controlnet, **parts)
        else:
            pipe = StableDiffusionPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        for name in (type(pipe).__module__, _TOKENIZER_LOGGER):
            logging.getLogger(name).addFilter(_TRUNCATION_NOTICE)  # added once: the same object each time
        return pipe

    def _call_kwargs(self, rows: Sequence[PlanRow]) -> dict[str, Any]:
        """Extra pipeline arguments per batch: each row's conditioning image and the scale."""
        if self.components.controlnet is None:
            return {}
        return {"image": [self._control[r.key] for r in rows], "controlnet_conditioning_scale": self.components.controlnet_scale}

    def _prepare(self, row: PlanRow) -> str | None:
        """Per-row inputs read from disk before a batch (the ControlNet image); the error or None."""
        if self.components.controlnet is None:
            return None
        if not row.control_image:
            return "no ControlNet conditioning image for this row (model.controlnet.images)"
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(row.control_image) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            return f"ControlNet conditioning image not found: {row.control_image}"
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            return f"ControlNet conditioning image unreadable: {row.control_image} ({type(exc).__name__}: {exc})"
        if image.size != (self.width, self.height):  # the pipeline then resizes nothing
            image = image.resize((self.width, self.height), Image.Resampling.BICUBIC)
        self._control[row.key] = image
        return None

    def _failed(self, error: str) -> Generated:
        alpha = np.zeros((self.height, self.width), np.float32) if self.has_head else None
        return Generated(np.zeros((self.height, self.width, 3), np.uint8), alpha, error)

    # -------------------------------------------------------------- sampling

    def initial_noise(self, rows: Sequence[PlanRow]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each row's initial latents (shifted towards the canvas if enabled) and its generator."""
        gens = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in rows]
        noise = torch.stack([torch.randn(self.latent_shape, generator=g, dtype=torch.float32) for g in gens])
        if self.canvas_mean is not None:
            noise = shift_noise(noise, self.canvas_mean, self.canvas.noise_shift)
        return noise, gens

    def sample(self, rows: Sequence[PlanRow]) -> list[Generated]:
        """Generate ``rows`` in batches of ``batch_size``; one :class:`Generated` per row, in order.

        A row whose own inputs fail (a missing or unreadable ControlNet image) is a failed sample
        (``error`` set); the other rows are drawn as usual.
        """
        rows = list(rows)
        out: list[Generated] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            try:
                errors = [self._prepare(r) for r in chunk]
                for row, error in zip(chunk, errors):
                    if error is not None:
                        log.warning("sample %s failed: %s", row.key, error)
                drawn = iter(self._sample_chunk([r for r, e in zip(chunk, errors) if e is None]))
                out.extend(next(drawn) if e is None else self._failed(e) for e in errors)
            finally:
                self._control.clear()
        return out

    def _sample_chunk(self, rows: list[PlanRow]) -> list[Generated]:
        if not rows:
            return []
        try:
            return self._sample_batch(rows)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            if len(rows) == 1:
                raise RunError(f"out of GPU memory for one {self.width}x{self.height} sample; lower the resolution") from exc
            half = (len(rows) + 1) // 2
            log.warning("out of GPU memory at batch %d; retrying with %d", len(rows), half)
            self.batch_size = min(self.batch_size, half)
            return self._sample_chunk(rows[:half]) + self._sample_chunk(rows[half:])

    def _sample_batch(self, rows: list[PlanRow]) -> list[Generated]:
        t0 = time.perf_counter()
        noise, gens = self.initial_noise(rows)
        prompts = [r.prompt for r in rows]
        weights = bg = None
        if self.capture is not None:
            groups = [[[self.canvas.token], object_words(r)] for r in rows]
            weights = token_weights(self.components.tokenizer, prompts, groups)
            self.capture.begin(weights, self.latent_hw)
        try:
            with torch.inference_mode():
                latents = self.pipe(
                    prompt=prompts,
                    negative_prompt=[r.negative_prompt for r in rows],
                    latents=noise.to(self.device, self.dtype),
                    generator=gens,
                    num_inference_steps=self.settings.steps,
                    guidance_scale=self.settings.guidance,
                    height=self.height,
                    width=self.width,
                    output_type="latent",
                    return_dict=False,
                    **self._call_kwargs(rows),
                )[0]
                decoded = decode(self.components.vae, latents, self.head)
                flagged = self._safety_flags(decoded.image)
                if self.capture is not None:
                    bg = background_mask(self.capture.average((self.height, self.width))[:, 0]).cpu().numpy()
        finally:
            if self.capture is not None:
                self.capture.end()
                self.capture.reset()
        image = decoded.image.float()
        ok = torch.isfinite(image).flatten(1).all(dim=1)
        alpha = None
        if decoded.alpha is not None:
            ok &= torch.isfinite(decoded.alpha).flatten(1).all(dim=1)
            alpha = torch.nan_to_num(decoded.alpha.float(), 0.0, 0.0, 0.0).clamp(0, 1)[:, 0].cpu().numpy()
        pixels = ((torch.nan_to_num(image, 0.0, 0.0, 0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # also waits for the GPU: the timing is real
        seconds = (time.perf_counter() - t0) / len(rows)
        tokens = self._token_counts(prompts)
        errors = [None if good else NAN_ERROR for good in ok.cpu().tolist()]
        errors = [e or (NSFW_ERROR if f else None) for e, f in zip(errors, flagged)]
        out: list[Generated] = []
        for i, (row, error) in enumerate(zip(rows, errors)):
            if error is not None:
                log.warning("sample %s failed: %s", row.key, error)
                out.append(
                    Generated(np.zeros_like(pixels[i]), None if alpha is None else np.zeros_like(alpha[i]), error, seconds, tokens[i])
                )
                continue
            has_canvas_token = weights is not None and bool(weights[i, 0].sum() > 0)
            out.append(
                Generated(
                    image=pixels[i],
                    coarse_alpha=None if alpha is None else alpha[i],
                    seconds=seconds,
                    prompt_tokens=tokens[i],
                    background_mask=bg[i] if bg is not None and has_canvas_token else None,
                )
            )
        return out

    def _token_counts(self, prompts: list[str]) -> list[int | None]:
        """Each prompt's CLIP tokens, uncut (the pipeline cuts at the tokenizer's limit)."""
        tokenizer = getattr(self.components, "tokenizer", None)
        if tokenizer is None:
            return [None] * len(prompts)
        return [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]

    def _safety_flags(self, image: torch.Tensor) -> list[bool]:
        if self.pipe.safety_checker is None:
            return [False] * image.shape[0]
        _, flags = self.pipe.run_safety_checker(image, self.device, self.dtype)
        return [bool(f) for f in (flags or [False] * image.shape[0])]


def load_sampler(
    model: ModelSpec,
    settings: SamplerSettings,
    canvas: CanvasSettings,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    capture: bool = False,
) -> DiffuMattingSampler:
    """Load the model ``model`` names and build the sampler.

    ``device`` None: CUDA if available, else CPU. ``dtype`` None: bf16 on CUDA, fp32 on CPU.
    ``compile``: ``torch.compile`` the UNet (worth it on GPU for long runs). ``capture``: record
    cross-attention maps and return a coarse background mask per sample.
    """
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    identity = model_identity(model)
    components = load_components(model, torch_dtype=tdtype)
    return DiffuMattingSampler(components, settings, canvas, identity=identity, device=dev, dtype=tdtype, compile=compile, capture=capture)


__all__ = ["DiffuMattingSampler", "Generated", "auto_batch_size", "load_sampler", "model_identity"]
