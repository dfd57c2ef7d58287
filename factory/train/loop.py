"""The training loop: stages, one optimizer step, checkpoints, exact resume, validation samples.

:func:`train_worker` runs in every training process (one, or one per device under Ray Train or
torchrun; see ``distributed.py``). What a step computes, for a micro-batch of composited samples
``x0`` with alpha ``M`` and prompts ``c`` (formulas in ``losses.py`` and ``docs/train.md``):

1. ``z0 = E(x0)`` (a posterior sample, times the VAE's scaling factor) and the prompt embeddings,
   both from frozen modules without gradient;
2. ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``;
3. one UNet call with the cross-attention capture on (maps of the canvas token and the object
   words, with their graph): ``L_noise``, ``L_g``, ``L_obj``;
4. ``z0_hat`` from the same call: ``L_detail`` (latent Sobel features, or the decoded grey image's);
5. joint stage only: the matting head on the VAE decoder's last features (of ``z0``, or of
   ``z0_hat`` with ``latent_source: pred``): ``L_latent``;
6. ``L = L_noise + l_g L_g + l_o L_obj + l_d L_detail + l_l L_latent``, backward, clip, AdamW,
   lr schedule, EMA.

Every random draw of a step (noise, timesteps, the VAE posterior sample) comes from a generator
seeded with (seed, step, micro-batch, rank), and every sample's augmentation from (seed,
position): together with the restored optimizer and lr-scheduler states this makes a resumed run
repeat an uninterrupted one. The frozen VAE and text encoder run in bf16 under mixed precision;
trainable weights (UNet, head) stay in float32 with bf16 autocast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factory.errors import FactoryError, InputError, Interrupted, RunError
from factory.train import losses, run_folder
from factory.train.config import TrainConfig
from factory.train.data import MattingDataset, Record, StepBatches, collate, make_loader
from factory.train.distributed import Dist

log = logging.getLogger(__name__)

TERMS = ("noise", "green", "object", "detail", "latent")


@dataclass
class TrainJob:
    """Everything a training process needs (picklable: shipped to Ray Train workers)."""

    config: dict[str, Any]
    records: list[Record]
    out: str
    resume: bool = False
    stop_at: int | None = None
    base_identity: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class WorkerResult:
    start_step: int
    step: int
    checkpoint: str | None
    last: dict[str, Any]
    stopped: bool
    notes: list[str]


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def resolve_amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``mixed_precision`` on ``device``, or None for float32."""
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' AdamW8bit when ``use_8bit_adam`` (imported only then)."""
    kwargs = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}
    if cfg.use_8bit_adam:
        if device.type != "cuda":
            raise InputError("use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers do not run on CPU)")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise InputError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or pip install 'factory[train8bit]')") from exc
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def decoder_features(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The VAE decoder's last feature map (the matting head's input) for scaled ``latents``."""
    from factory.sampler.head import tap_decoder_features

    cfg = vae.config
    z = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None):
        z = z + cfg.shift_factor
    feats: list[torch.Tensor] = []
    with tap_decoder_features(vae, feats.append):
        vae.decode(z.to(vae.dtype), return_dict=False)
    return feats[0] if len(feats) == 1 else torch.cat(feats)


def _next_batch(loader: Any) -> dict[str, Any]:
    """The next batch; a FactoryError raised in a loader worker comes back as its own one line."""
    try:
        return next(loader)
    except FactoryError as exc:
        tag = f"{type(exc).__module__}.{type(exc).__name__}: "
        message = str(exc)
        if tag in message:
            raise type(exc)(message.rsplit(tag, 1)[1]) from None
        raise


class Trainer:
    """One training process: models, optimizer, data, and the step/checkpoint/resume logic."""

    def __init__(
        self, job: TrainJob, dist: Dist, on_step: Callable[[dict[str, Any]], None] | None = None, components: Any | None = None
    ) -> None:
        """``components``: already loaded :class:`~factory.sampler.ModelComponents` to train instead
        of loading ``config.model`` (the benchmark's random SD1.5); checkpoints then record their
        ``base``."""
        self.job = job
        self.cfg = TrainConfig(**job.config)
        self.out = Path(job.out)
        self.dist = dist
        self.device = dist.device
        self.on_step = on_step
        self.notes: list[str] = list(job.notes)
        self.amp_dtype = resolve_amp(self.cfg, self.device)
        self.amp = self.amp_dtype is not None
        # fp16 needs loss scaling (its small gradients underflow); bf16 has float32's range
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.reporter: Any = None
        self._setup_models(components)
        self._setup_optimizer()
        self.step = 0
        self.last: dict[str, Any] = {}
        self.parts_from: Path | None = None  # a checkpoint whose frozen parts the next one links
        self.data = MattingDataset(job.records, self.cfg)

    # -------------------------------------------------------------- setup

    def _setup_models(self, comps: Any | None) -> None:
        from diffusers import DDPMScheduler

        from factory.manifest import ModelSpec
        from factory.sampler import AttentionCapture, MattingHead, load_components
        from factory.sampler.components import place

        cfg = self.cfg
        if comps is None:
            comps = load_components(ModelSpec(source=cfg.model))
        self.head_from_base = comps.kind == "diffumatting" and comps.head is not None
        if comps.head is None or not self.head_from_base:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(cfg.seed, 0x4EAD))
                comps.head = MattingHead.for_vae(comps.vae)
        self.components = comps
        self.embeds_base = comps.base.get("kind") in ("tiny", "embedded")
        # Frozen parts: bf16 under mixed precision, unless they get embedded in checkpoints.
        frozen_dtype = self.amp_dtype if self.amp_dtype is not None and not self.embeds_base else torch.float32
        for module in (comps.vae, comps.text_encoder):
            place(module, self.device, frozen_dtype)
            module.requires_grad_(False)
            module.eval()
        self.unet = place(comps.unet, self.device, torch.float32)
        self.head = place(comps.head, self.device, torch.float32)
        self.unet.requires_grad_(True).train()
        self.head.requires_grad_(True).train()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.latent_source == "pred" or cfg.detail_space == "image":  # the decoder runs under autograd
                comps.vae.enable_gradient_checkpointing()
        self.noise_scheduler = DDPMScheduler.from_config(comps.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.vae_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        self.latent_hw = (cfg.resolution // self.vae_scale, cfg.resolution // self.vae_scale)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.latent_hw[0] % unet_factor:
            raise InputError(
                f"resolution {cfg.resolution} gives a {self.latent_hw[0]}-pixel latent, which this UNet cannot halve "
                f"{len(self.unet.config.block_out_channels) - 1} times; use a multiple of {self.vae_scale * unet_factor}"
            )
        self.capture = None
        if cfg.lambda_green > 0 or cfg.lambda_object > 0:
            self.capture = AttentionCapture(self.unet, accumulate=False, keep_graph=True).install()
        self.unet_ddp = self.dist.wrap(self.unet)
        self.head_ddp = self.dist.wrap(self.head)
        self.ema = run_folder.EMA({"unet": self.unet, "head": self.head}, cfg.ema_decay) if cfg.ema else None

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        groups = [
            {"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": cfg.lr, "name": "unet"},
            {"params": [p for p in self.head.parameters() if p.requires_grad], "lr": cfg.head_lr, "name": "head"},
        ]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, cfg, self.device)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)

    # -------------------------------------------------------------- one step

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp)

    def compute_losses(self, batch: dict[str, Any], stage: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every loss term of ``stage`` for one micro-batch (graphs kept when grad is enabled).

        The attention capture stays enabled until :meth:`release` so that gradient checkpointing
        can recompute the maps in the backward pass.
        """
        from factory.sampler import token_weights

        cfg, dev = self.cfg, self.device
        comps = self.components
        x0 = batch["pixel_values"].to(dev, torch.float32)
        alpha = batch["alpha"].to(dev, torch.float32)
        prompts = list(batch["prompt"])
        b = x0.shape[0]
        vae = comps.vae
        with torch.no_grad(), self._autocast():
            posterior = vae.encode(x0.to(vae.dtype)).latent_dist
            eps_post = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32).to(dev)
            z0 = posterior.mean.float() + posterior.std.float() * eps_post
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            z0 = (z0 - shift) * vae.config.scaling_factor
            ids = comps.tokenizer(prompts, padding="max_length", max_length=comps.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            context = comps.text_encoder(ids.to(dev))[0]
        noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(dev)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(dev)
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(z0, noise, t)
        else:
            target = z0 if self.prediction_type == "sample" else noise

        weights = None
        if self.capture is not None:
            groups = [[cfg.canvas_token, list(words)] for words in batch["object_words"]]
            weights = token_weights(comps.tokenizer, prompts, groups)
            self.capture.begin(weights.to(dev), self.latent_hw)
        with self._autocast():
            pred = self.unet_ddp(z_t, t, context.float()).sample
        terms: dict[str, torch.Tensor] = {"noise": losses.noise_loss(pred, target)}
        if self.capture is not None and weights is not None:
            maps = [calls[0] for calls in self.capture.calls().values()]
            if cfg.lambda_green > 0:
                terms["green"] = losses.attention_loss([m[:, 0] for m in maps], 1.0 - alpha, self.latent_hw, norm=cfg.attention_norm, valid=weights[:, 0].sum(-1) > 0)
            if cfg.lambda_object > 0:
                terms["object"] = losses.attention_loss([m[:, 1] for m in maps], alpha, self.latent_hw, norm=cfg.attention_norm, valid=weights[:, 1].sum(-1) > 0)
        z0_hat = None
        decoded = None
        joint = stage == "joint" and cfg.lambda_latent > 0
        if cfg.lambda_detail > 0 or (joint and cfg.latent_source == "pred"):
            z0_hat = losses.one_step_estimate(z_t, pred, self.alphas_cumprod, t, self.prediction_type)
        if cfg.lambda_detail > 0:
            assert z0_hat is not None
            gate = (t <= cfg.detail_max_timestep).float()
            band = losses.transition_band(alpha, cfg.detail_band)
            if cfg.detail_space == "latent":
                terms["detail"] = losses.detail_loss(z0_hat, z0, losses.band_to(band, self.latent_hw), gate)
            elif gate.sum() > 0:
                decoded = self._decode_pred(z0_hat, with_head=joint and cfg.latent_source == "pred")
                terms["detail"] = losses.detail_loss(losses.grey(decoded.image), losses.grey(x0), band, gate)
            else:
                terms["detail"] = z0_hat.sum() * 0.0
        if joint:
            if cfg.latent_source == "gt":
                with torch.no_grad(), self._autocast():
                    feats = decoder_features(vae, z0)
                with torch.autocast(dev.type, enabled=False):  # the head is small: float32 keeps alpha exact
                    p = self.head_ddp(feats.float())
            else:
                assert z0_hat is not None
                if decoded is None or decoded.alpha is None:
                    decoded = self._decode_pred(z0_hat, with_head=True)
                p = decoded.alpha
            terms["latent"] = losses.latent_loss(p.float(), alpha)
        return terms

    def _decode_pred(self, z0_hat: torch.Tensor, with_head: bool) -> Any:
        from factory.sampler.head import decode

        with self._autocast():
            return decode(self.components.vae, z0_hat, self.head_ddp if with_head else None)

    def release(self) -> None:
        if self.capture is not None:
            self.capture.end()
            self.capture.reset()

    def weights(self) -> dict[str, float]:
        c = self.cfg
        return {"green": c.lambda_green, "object": c.lambda_object, "detail": c.lambda_detail, "latent": c.lambda_latent}

    def train_step(self, micro_batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its log record."""
        cfg = self.cfg
        step = self.step
        stage = cfg.stage_at(step)
        self.unet.train()
        self.head.train()
        sums: dict[str, float] = {}
        n = len(micro_batches)
        for micro, batch in enumerate(micro_batches):
            gen = torch.Generator("cpu").manual_seed(_mix(cfg.seed, step, micro, self.dist.rank, 0x57E9))
            sync = micro == n - 1
            with contextlib.ExitStack() as stack:
                if not sync:
                    for m in (self.unet_ddp, self.head_ddp):
                        if hasattr(m, "no_sync"):
                            stack.enter_context(m.no_sync())
                try:
                    terms = self.compute_losses(batch, stage, gen)
                    loss = losses.total_loss(terms, self.weights())
                    scaled = loss / n
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                finally:
                    self.release()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / n
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self.scaler is not None:  # skips the update when the scaled gradients overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
            sums["grad_scale"] = float(self.scaler.get_scale())
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        sums["grad_norm"] = float(grad_norm)
        values = self.dist.mean(sums)
        # with loss scaling an overflowing gradient only skips the update (and lowers the scale)
        checked = {k: v for k, v in values.items() if not (self.scaler is not None and k == "grad_norm")}
        if not all(math.isfinite(v) for v in checked.values()):
            bad = ", ".join(f"{k}={v}" for k, v in checked.items() if not math.isfinite(v))
            raise RunError(f"non-finite loss at step {self.step} ({bad}); lower the learning rate or resume from the last checkpoint")
        record = {"step": self.step, "stage": stage, "lr": lrs[0], "head_lr": lrs[1], **{k: round(v, 6) for k, v in values.items()}}
        return record

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], stage: str, seed: int = 1234) -> dict[str, float]:
        """The loss terms on ``batch`` with fixed noise and timesteps (no update); ``loss`` = total."""
        self.unet.eval()
        self.head.eval()
        gen = torch.Generator("cpu").manual_seed(seed)
        try:
            terms = self.compute_losses(batch, stage, gen)
        finally:
            self.release()
        out = {k: float(v) for k, v in terms.items()}
        out["loss"] = float(losses.total_loss(terms, self.weights()))
        return out

    # -------------------------------------------------------------- the loop

    def batches(self, end_step: int) -> Any:
        cfg = self.cfg
        sampler = StepBatches(
            len(self.data), seed=cfg.seed, start_step=self.step, end_step=end_step, batch=cfg.batch_size,
            accum=cfg.gradient_accumulation_steps, world=self.dist.world, rank=self.dist.rank,
        )  # fmt: skip
        return make_loader(self.data, sampler, cfg.data_workers)

    def run(self) -> WorkerResult:
        cfg = self.cfg
        start = self.step
        end = min(cfg.steps, self.job.stop_at) if self.job.stop_at is not None else cfg.steps
        last_ckpt = None
        saved_at = -1
        log_path = self.out / run_folder.LOG_FILE
        t_prev = time.perf_counter()
        data_wait = 0.0
        if self.dist.is_main and self.step < end:
            from factory.train.report import open_reporter

            self.reporter = open_reporter(cfg.report_to, self.out, cfg.model_dump(mode="json"), self.step)
        try:
            if self.step < end:
                loader = iter(self.batches(end))
                while self.step < end:
                    t0 = time.perf_counter()
                    micro = [_next_batch(loader) for _ in range(cfg.gradient_accumulation_steps)]
                    data_wait = time.perf_counter() - t0
                    record = self.train_step(micro)
                    now = time.perf_counter()
                    record["seconds"] = round(now - t_prev, 4)
                    record["data_seconds"] = round(data_wait, 4)
                    record["samples_per_s"] = round(cfg.batch_size * cfg.gradient_accumulation_steps * self.dist.world / max(now - t_prev, 1e-9), 3)
                    if self.device.type == "cuda":
                        record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
                    t_prev = now
                    self.last = record
                    if self.dist.is_main:
                        with log_path.open("a", encoding="utf-8") as fh:
                            fh.write(json.dumps(record) + "\n")
                        if self.reporter is not None:
                            self.reporter.log(record)
                        if self.on_step is not None:
                            self.on_step(record)
                    if self.step % cfg.checkpoint_every == 0 or self.step == end:
                        last_ckpt = self.save_checkpoint()
                        saved_at = self.step
                        t_prev = time.perf_counter()
        except KeyboardInterrupt as exc:
            if self.dist.is_main and self.step > start and saved_at != self.step:
                last_ckpt = self.save_checkpoint(validate=False)
            where = f"; step {self.step} is saved in {last_ckpt}" if last_ckpt else ""
            raise Interrupted(f"interrupted at step {self.step}{where}; resume with --resume") from exc
        finally:
            if self.reporter is not None:
                self.reporter.close()
                self.reporter = None
        stopped = self.step < cfg.steps
        return WorkerResult(start, self.step, str(last_ckpt) if last_ckpt else None, self.last, stopped, self.notes)

    # -------------------------------------------------------------- checkpoints

    @property
    def head_trained(self) -> bool:
        """The head has been trained in this run (a joint step is done) or came with the base model."""
        return self.head_from_base or (self.cfg.stage != "generator" and self.step > self.cfg.generator_boundary)

    def save_checkpoint(self, validate: bool = True) -> Path | None:
        """Rank 0 writes the checkpoint, its training state and the pointer; all ranks wait."""
        rng = self.dist.gather(run_folder.rng_state())
        ckpt = run_folder.checkpoint_dir(self.out, self.step)
        if self.dist.is_main:
            self._write_checkpoint(ckpt, rng)
            if validate and self.cfg.validation_prompts:
                try:
                    self.validate(ckpt)
                except Exception as exc:  # noqa: BLE001 - a failed preview must not stop a long run
                    message = f"validation samples at step {self.step} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    log.warning(message)
                    self.notes.append(message)
        self.dist.barrier()
        return ckpt

    def _write_checkpoint(self, ckpt: Path, rng: list[dict[str, Any]]) -> None:
        from factory.sampler import ModelComponents, save_checkpoint
        from factory.sampler.components import quiet_transformers

        cfg, comps = self.cfg, self.components
        training = {
            "step": self.step,
            "steps": cfg.steps,
            "stage": cfg.stage_at(max(self.step - 1, 0)),
            "head_trained": self.head_trained,
            "ema": cfg.ema,
            "losses": {k: self.last.get(k) for k in ("loss", *TERMS) if k in self.last},
            "loss_weights": {"noise": 1.0, **self.weights()},
            "base_model": cfg.model,
            "base_identity": self.job.base_identity,
            "settings": cfg.model_dump(mode="json"),
        }
        tensors: dict[str, dict[str, torch.Tensor]] = {run_folder.RAW_HEAD_FILE: self.head.state_dict()}
        if self.ema is not None:
            tensors[run_folder.RAW_UNET_FILE] = self.unet.state_dict()
            tensors[run_folder.EMA_HEAD_FILE] = dict(self.ema.shadow["head"])
        parts_from = self._intact_parts_source()
        vae, text_encoder = comps.vae, comps.text_encoder
        if parts_from is None and next(vae.parameters()).dtype != torch.float32:
            vae, text_encoder = self._float32_frozen_parts()
        view = ModelComponents(
            kind=comps.kind, ref=comps.ref, unet=self.unet, vae=vae, text_encoder=text_encoder, loras=comps.loras,
            tokenizer=comps.tokenizer, scheduler=comps.scheduler, head=self.head if self.head_trained else None, base=comps.base,
        )  # fmt: skip
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext(), quiet_transformers():
            # quiet: the "Writing model shards" bar and the lazy image-processor import's
            # "requires torchvision" notices
            save_checkpoint(ckpt, view, head=True, training=training, base_identity=self.job.base_identity, overwrite=True, parts_from=parts_from)
        self.parts_from = ckpt
        state = {
            "step": self.step,
            "stage": cfg.stage_at(max(self.step - 1, 0)),
            "positions_done": self.step * cfg.gradient_accumulation_steps * self.dist.world * cfg.batch_size,
            "world_size": self.dist.world,
            "settings_fingerprint": cfg.math_fingerprint(),
            "head_trained": self.head_trained,
            "ema_updates": self.ema.updates if self.ema is not None else None,
        }
        optim = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}
        if self.scaler is not None:
            optim["grad_scaler"] = self.scaler.state_dict()
        run_folder.write_state(ckpt, state, optim, rng, tensors)
        run_folder.publish(self.out, ckpt)
        run_folder.prune_checkpoints(self.out, cfg.keep_checkpoints, ckpt)

    def _intact_parts_source(self) -> Path | None:
        """The checkpoint whose frozen parts the next one links, when they read whole; None when
        there is none or one of its files is damaged (the parts are then written again from the
        models, so a damaged file never reaches a new checkpoint or the top of OUT)."""
        from factory.sampler.checkpoint import has_pipeline_layout

        source = self.parts_from
        if source is None or not has_pipeline_layout(source):  # a version-1 checkpoint has none to link
            return None
        problem = run_folder.carried_parts_problem(source)
        if problem is not None:
            message = f"{source}: {problem}; step {self.step} got its frozen parts written again instead of linked"
            log.warning(message)
            self.notes.append(message)
            return None
        return source

    def _float32_frozen_parts(self) -> tuple[Any, Any]:
        """The base model's VAE and text encoder in float32 on the CPU, for a checkpoint's pipeline
        files when training keeps them in bf16 (read once per run; later checkpoints link them)."""
        from factory.manifest import ModelSpec
        from factory.sampler import load_components

        fresh = load_components(ModelSpec(source=self.cfg.model))
        return fresh.vae, fresh.text_encoder

    def validate(self, ckpt: Path) -> Path:
        """Draw the validation prompts with the sampler from the saved checkpoint (image + alpha PNGs)."""
        from factory.imageio import encode_alpha_png, encode_png
        from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
        from factory.plan import PlanRow
        from factory.sampler import DiffuMattingSampler, load_components

        cfg = self.cfg
        folder = self.out / run_folder.VALIDATION_DIR / ckpt.name
        folder.mkdir(parents=True, exist_ok=True)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        comps = load_components(ModelSpec(source=str(ckpt)), torch_dtype=dtype)
        settings = SamplerSettings(
            steps=cfg.validation_steps, guidance=cfg.validation_guidance, width=cfg.resolution, height=cfg.resolution,
            scheduler="ddim", batch_size=min(4, len(cfg.validation_prompts)),
        )  # fmt: skip
        sampler = DiffuMattingSampler(comps, settings, CanvasSettings(), identity=f"validation:{ckpt.name}", device=self.device, dtype=dtype)
        rows = [
            PlanRow(index=i, key=f"val-{i:02d}", class_name="", category="", prompt=p, negative_prompt="", seed=cfg.validation_seed + i, attributes={})
            for i, p in enumerate(cfg.validation_prompts)
        ]
        from factory.fsutil import atomic_write_bytes, atomic_write_text

        listing = []
        shown: dict[str, np.ndarray] = {}
        for i, g in enumerate(sampler.sample(rows)):
            shown[f"{i:02d}"] = g.image
            if g.coarse_alpha is not None:
                shown[f"{i:02d}.alpha"] = g.coarse_alpha
            atomic_write_bytes(folder / f"{i:02d}.png", encode_png(g.image), fsync=False)
            entry = {"index": i, "prompt": rows[i].prompt, "seed": rows[i].seed, "image": f"{i:02d}.png", "error": g.error}
            if g.coarse_alpha is not None:
                atomic_write_bytes(folder / f"{i:02d}.alpha.png", encode_alpha_png(g.coarse_alpha), fsync=False)
                entry["alpha"] = f"{i:02d}.alpha.png"
            listing.append(entry)
        atomic_write_text(folder / "prompts.json", json.dumps({"step": self.step, "has_head": sampler.has_head, "samples": listing}, indent=1) + "\n")
        if self.reporter is not None:
            self.reporter.images(self.step, shown)
        del sampler, comps
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return folder

    # -------------------------------------------------------------- resume

    def resume_from(self, ckpt: Path) -> None:
        """Load weights, optimizer, lr scheduler, EMA and RNG from checkpoint ``ckpt``."""
        from diffusers import UNet2DConditionModel

        state = run_folder.read_state(ckpt)
        cfg = self.cfg
        if state.get("settings_fingerprint") != cfg.math_fingerprint():
            raise InputError(f"{ckpt}: its training settings differ from these (fingerprint {state.get('settings_fingerprint')}); resume with the run's own settings")
        if int(state.get("world_size", 1)) != self.dist.world:
            self.notes.append(
                f"resumed with {self.dist.world} processes instead of {state.get('world_size')}: the data order after step "
                f"{state['step']} differs from an uninterrupted run"
            )
        with torch.no_grad():
            if cfg.ema:
                raw_unet = run_folder.read_tensors(ckpt, run_folder.RAW_UNET_FILE)
            else:
                raw_unet = UNet2DConditionModel.from_pretrained(ckpt / "unet", use_safetensors=True, local_files_only=True).state_dict()
            self.unet.load_state_dict(raw_unet, strict=True)
            self.head.load_state_dict(run_folder.read_tensors(ckpt, run_folder.RAW_HEAD_FILE), strict=True)
            if self.ema is not None:
                self.ema.load("unet", UNet2DConditionModel.from_pretrained(ckpt / "unet", use_safetensors=True, local_files_only=True).state_dict())
                self.ema.load("head", run_folder.read_tensors(ckpt, run_folder.EMA_HEAD_FILE))
                self.ema.updates = int(state.get("ema_updates") or 0)
        optim = run_folder.read_optimizer(ckpt, self.device)
        self.optimizer.load_state_dict(optim["optimizer"])
        self.lr_scheduler.load_state_dict(optim["lr_scheduler"])
        if self.scaler is not None and "grad_scaler" in optim:
            self.scaler.load_state_dict(optim["grad_scaler"])
        self.parts_from = ckpt
        rng = run_folder.read_rng(ckpt)
        if self.dist.rank < len(rng):
            run_folder.set_rng_state(rng[self.dist.rank])
        self.step = int(state["step"])


def train_worker(job: TrainJob, dist: Dist, on_step: Callable[[dict[str, Any]], None] | None = None) -> WorkerResult:
    """The loop in one process: set up, resume if asked and possible, train, return the result."""
    out = Path(job.out)
    trainer = Trainer(job, dist, on_step)
    if job.resume:
        found = run_folder.latest_checkpoint(out)
        if found is not None:
            trainer.resume_from(found[1])
            if dist.is_main:
                run_folder.truncate_log(out / run_folder.LOG_FILE, trainer.step)
        dist.barrier()
    result = trainer.run()
    if trainer.capture is not None:
        trainer.capture.remove()
    return result


__all__ = ["TrainJob", "Trainer", "WorkerResult", "collate", "train_worker"]
