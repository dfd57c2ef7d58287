"""``factory train``: settings, data, the run folder, then the loop in one or many processes.

:func:`run_train` is what the CLI calls. It merges the settings (defaults < ``--config`` YAML <
options; on ``--resume`` the run's saved settings replace the defaults), indexes the data and
assigns prompts (errors surface before any model is loaded), checks the run folder, writes
``OUT/train.json``, and runs the loop: in this process (one device), in every process of a
torchrun/accelerate launch, or on ``--workers N`` Ray Train workers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from factory import __version__
from factory.errors import FactoryError, InputError, RunError
from factory.feedback import plural
from factory.fsutil import atomic_write_text, check_writable_dir, read_json_object, refuse_dangling_link
from factory.train import run_folder
from factory.train.config import TrainConfig, make_config, read_config_file, resume_config
from factory.train.data import assign_prompts, data_summary, read_captions, scan_sources


@dataclass
class TrainOptions:
    """What the command line gives. ``overrides``: settings given explicitly (TrainConfig fields)."""

    out: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    config_file: Path | None = None
    resume: bool = False
    resume_from: str | None = None
    """``latest`` (like ``resume``, but a folder with no run starts one) or a checkpoint of the run
    (its path, or its name under ``OUT/checkpoints``): later checkpoints are deleted."""
    stop_at: int | None = None
    workers: int = 1
    address: str | None = None
    progress: bool = True
    threads: int = 0


@dataclass
class TrainSummary:
    out: Path
    start_step: int
    step: int
    steps: int
    checkpoint: str | None
    last: dict[str, Any]
    seconds: float
    samples: int
    engine: str
    world: int
    is_main: bool = True
    notes: list[str] = field(default_factory=list)
    report_to: str = "none"

    @property
    def stopped(self) -> bool:
        return self.step < self.steps

    def lines(self) -> list[str]:
        if not self.is_main:
            return []
        done = self.step - self.start_step
        lines = [
            f"trained {plural(done, 'step')} ({self.start_step} -> {self.step} of {self.steps}) on {plural(self.samples, 'sample')}, "
            f"{plural(self.world, 'process', 'processes')} ({self.engine}), {self.seconds:.1f} s"
        ]
        if self.last:
            terms = ", ".join(f"{k} {self.last[k]:.4g}" for k in ("loss", "noise", "green", "object", "detail", "latent") if k in self.last)
            lines.append(f"last step: {terms}")
        if self.checkpoint:
            lines.append(f"checkpoint: {self.checkpoint}")
            lines.append(f"model: {self.out} (use with factory generate --model {self.out}; also a diffusers pipeline folder)")
        if self.report_to == "tensorboard":
            lines.append(f"logs: {self.out / run_folder.TB_DIR} (tensorboard --logdir {self.out / run_folder.TB_DIR})")
        elif self.report_to == "wandb":
            lines.append(f"logs: the W&B run {self.out.name!r} (files in {self.out / run_folder.TB_DIR / 'wandb'})")
        if self.stopped:
            lines.append(f"stopped at step {self.step}; continue with: factory train --out {self.out} --resume")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines


def _abs_if_path(value: str) -> str:
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def _abs_pattern(value: str) -> str:
    """A data source made absolute (existing paths, and patterns relative to the current folder)."""
    p = Path(value).expanduser()
    if p.exists():
        return str(p.resolve())
    if any(c in value for c in "{*?[") and not p.is_absolute():
        return str(Path.cwd() / p)
    return value


def normalise(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    if "data" in out and out["data"] is not None:
        out["data"] = [_abs_pattern(str(d)) for d in out["data"]]
    if out.get("model"):
        out["model"] = _abs_if_path(str(out["model"]))
    if out.get("captions"):
        out["captions"] = str(Path(out["captions"]).expanduser().resolve())
    return out


def native_resolution(model: str) -> int:
    """The training size a model was made for: 64 for the tiny model (and checkpoints made from
    it), else the UNet's ``sample_size`` times the VAE's scale (512 for SD1.5), read from the
    configs without loading weights; 512 when they cannot be read."""
    from factory.sampler.checkpoint import read_checkpoint_config
    from factory.sampler.sources import DIFFUMATTING, DIFFUSERS, TINY, TOY, resolve_source
    from factory.sampler.tiny import TINY_SAMPLE_SIZE

    src = resolve_source(model)
    if src.kind == TINY:
        return TINY_SAMPLE_SIZE
    unet_dir = vae_dir = None
    if src.kind in (DIFFUMATTING, TOY):
        desc = read_checkpoint_config(src.path)
        base = desc["base"]
        origin = desc.get("embedded_from") if base["kind"] == "embedded" else base
        if (origin or {}).get("kind") == TINY:
            return TINY_SAMPLE_SIZE
        unet_dir = src.path / desc.get("unet", "unet")
        if base["kind"] == "embedded":
            vae_dir = src.path / base.get("path", "base") / "vae"
        elif base["kind"] == DIFFUSERS:
            vae_dir = Path(base["path"]) / "vae"
    elif src.kind == DIFFUSERS:
        unet_dir, vae_dir = src.path / "unet", src.path / "vae"
    try:
        sample = int(json.loads((unet_dir / "config.json").read_text(encoding="utf-8"))["sample_size"])  # type: ignore[operator]
    except (OSError, ValueError, KeyError, TypeError):
        return 512
    try:
        blocks = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))["block_out_channels"]  # type: ignore[operator]
        scale = 2 ** (len(blocks) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        scale = 8
    return sample * scale


def check_out_outside_data(out: Path, data: list[str]) -> None:
    """The run folder may not lie in a --data folder: a folder is scanned recursively, so the run's
    validation images (NN.png + NN.alpha.png) would be trained on next time, and a resume would
    find its data changed."""
    where = out.expanduser().resolve()
    for source in data:
        folder = Path(source).expanduser()
        if folder.is_dir() and where.is_relative_to(folder.resolve()):
            raise InputError(f"--out {where}: inside the training data {source}; choose a folder outside it")


def prepare(opts: TrainOptions) -> tuple[TrainConfig, list[Any], dict[str, Any], dict[str, Any] | None, list[str]]:
    """Settings, records with prompts, data summary, the saved run (when resuming one), notes."""
    out = opts.out
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if opts.config_file is not None:
        values.update(read_config_file(opts.config_file))
        sources = {k: str(opts.config_file) for k in values}
    given = {k: v for k, v in opts.overrides.items() if v is not None}
    values.update(given)
    sources.update({k: "command line" for k in given})
    values = normalise(values)
    saved = None
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    restart = False
    resume = opts.resume or opts.resume_from is not None
    notes: list[str] = []
    if resume and not run_folder.is_run_folder(out):
        if opts.resume_from != "latest":
            flag = "--resume" if opts.resume_from is None else "--resume_from_checkpoint"
            raise InputError(f"{out}: holds no training run to resume (no {run_folder.TRAIN_FILE} or checkpoints); run without {flag} to start one")
        notes.append(f"no training run in {out} to resume: started a new one")
        resume = False
    later: list[Path] = []
    resumed: Path | None = None
    if resume and opts.resume_from not in (None, "latest"):
        resumed, later = _named_checkpoint(out, opts.resume_from)
    newest = run_folder.latest_checkpoint(out)
    if newest is not None:
        if not resume:
            raise InputError(f"{out}: already holds a training run; pass --resume to continue it, or choose another --out")
        resumed = resumed or newest[1]
        saved = saved_run(out)
        cfg = resume_config(saved["config"], values, str(out), sources)
    elif run_folder.is_run_folder(out):
        # A run that never completed a checkpoint: nothing to resume exactly, so it starts over
        # (with --resume, from its saved settings under the ones given now).
        previous: dict[str, Any] = {}
        if resume:
            with contextlib.suppress(InputError):
                previous = saved_run(out)["config"]
        cfg = make_config({**previous, **values}, sources=sources)
        restart = True
    else:
        if out.is_dir() and any(out.iterdir()):
            raise InputError(f"{out}: is not empty and is not a training run; choose an empty or new --out")
        cfg = make_config(values, sources=sources)
    if cfg.resolution is None:
        cfg = cfg.model_copy(update={"resolution": native_resolution(cfg.model)})
    if opts.stop_at is not None and opts.stop_at < 1:
        raise InputError(f"--stop-at must be a positive step, got {opts.stop_at}")
    check_out_outside_data(out, cfg.data)
    from factory.train.report import check_available

    check_available(cfg.report_to)
    records = scan_sources(cfg.data)
    captions = read_captions(cfg.captions) if cfg.captions else None
    assign_prompts(records, captions, cfg.prompt_template, cfg.canvas_token, cfg.default_caption)
    summary = data_summary(records)
    if saved is not None and saved.get("data", {}).get("digest") not in (None, summary["digest"]):
        raise InputError(
            f"{out}: the training data changed since the run started ({plural(saved['data'].get('samples') or 0, 'sample')} then, "
            f"{summary['samples']} now, or other files/captions); resume needs the same data"
        )
    check_writable_dir(out)  # before any model is loaded: an unusable --out is one line, not a late OSError
    if resumed is not None:  # before anything is deleted, or linked from it into new checkpoints
        run_folder.verify_checkpoint(out, resumed)
    if restart:
        run_folder.clear_run(out)
    for p in later:  # resume from an earlier checkpoint: the later ones belong to the abandoned path
        shutil.rmtree(p)
    if later:
        found = run_folder.latest_checkpoint(out)
        if found is not None:
            run_folder.publish(out, found[1])
        notes.append(f"resumed from an earlier checkpoint: deleted the later {', '.join(p.name for p in later)}")
    return cfg, records, summary, saved, notes


def saved_run(out: Path) -> dict[str, Any]:
    """A run folder's ``train.json``: its settings (``config``), data summary, history. One-line
    error if it is damaged (not an object, no ``config``, a part of the wrong shape)."""
    path = out / run_folder.TRAIN_FILE
    saved = read_json_object(path, "training run file", required=("config",), hint="cannot resume")
    for key, shape in (("config", dict), ("data", dict), ("history", list)):
        if key in saved and not isinstance(saved[key], shape):
            raise InputError(f"{path}: damaged training run file: its {key!r} is not a JSON {'object' if shape is dict else 'array'}; cannot resume")
    return saved


def _named_checkpoint(out: Path, value: str) -> tuple[Path, list[Path]]:
    """The checkpoint of the run ``value`` names, and the run's checkpoints after it (deleted to
    resume from it)."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        path = out / run_folder.CHECKPOINTS_DIR / value
    path = path.resolve()
    found = dict((p.resolve(), s) for s, p in run_folder.list_checkpoints(out))
    if path not in found:
        names = ", ".join(p.name for _, p in run_folder.list_checkpoints(out)) or "none"
        raise InputError(f"--resume_from_checkpoint {value}: not a complete checkpoint of the run in {out} (its checkpoints: {names})")
    return path, [p for s, p in run_folder.list_checkpoints(out, complete=False) if s > found[path]]


def run_train(opts: TrainOptions, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainSummary:
    """Train as ``opts`` says; see the module docstring. FactoryErrors for everything user-fixable.

    Under torchrun/accelerate launch every process calls this: the process group is joined
    first, rank 0 alone checks the run folder, reads the data and writes ``train.json``, and the
    others receive its settings and sample list (or its error) by broadcast.
    """
    from factory.train import distributed

    refuse_dangling_link(opts.out.expanduser(), "another --out")  # resolving would follow it and create its target
    opts = TrainOptions(**{**opts.__dict__, "out": opts.out.expanduser().resolve()})
    if opts.workers < 1:
        raise InputError(f"--workers must be at least 1, got {opts.workers}")
    env = distributed.launched_by_env()
    if opts.workers > 1 and env:
        raise InputError("--workers starts Ray Train workers; do not combine it with torchrun/accelerate launch")
    engine = "ray" if opts.workers > 1 else ("torchrun" if env else "single")
    dist = distributed.from_env(_early_device(opts)) if env else None
    try:
        if dist is None or dist.is_main:
            try:
                plan: Any = ("ok", _prepare_run(opts, engine))
            except FactoryError as exc:
                plan = ("error", type(exc).__name__, str(exc))
        else:
            plan = None
        if dist is not None:
            plan = dist.broadcast(plan)
        if plan[0] == "error":
            raise (RunError if plan[1] == "RunError" else InputError)(plan[2])
        job, cfg, summary, start_step = plan[1]
        return _run(opts, job, cfg, summary, start_step, engine, dist, on_step)
    finally:
        if dist is not None:
            distributed.close(dist)


def _early_device(opts: TrainOptions) -> str | None:
    """The device setting, before the settings are merged (to join the process group first)."""
    if opts.overrides.get("device"):
        return str(opts.overrides["device"])
    if opts.config_file is not None:
        return read_config_file(opts.config_file).get("device")
    return None


def _prepare_run(opts: TrainOptions, engine: str) -> tuple[Any, TrainConfig, dict[str, Any], int]:
    """Settings, data and the run folder's ``train.json`` (rank 0 only); the job for the loop."""
    from factory.manifest import ModelSpec
    from factory.sampler import model_identity
    from factory.train.loop import TrainJob

    out = opts.out
    cfg, records, summary, saved, notes = prepare(opts)
    base_identity = model_identity(ModelSpec(source=cfg.model))
    start_step = 0
    if saved is not None:
        found = run_folder.latest_checkpoint(out)
        start_step = found[0] if found else 0
        if found is None:
            notes.append("no complete checkpoint to resume from: started from step 0")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    info = saved or {"format": run_folder.RUN_FORMAT, "version": 1, "created_at": now, "history": []}
    info.update({"factory": __version__, "config": cfg.model_dump(mode="json"), "data": summary, "base_identity": base_identity, "updated_at": now})
    info.setdefault("history", []).append({"started_at": now, "from_step": start_step, "stop_at": opts.stop_at, "engine": engine, "workers": opts.workers})
    atomic_write_text(out / run_folder.TRAIN_FILE, json.dumps(info, indent=2) + "\n")
    job = TrainJob(
        config=cfg.model_dump(mode="json"), records=records, out=str(out), resume=saved is not None,
        stop_at=opts.stop_at, base_identity=base_identity, notes=notes,
    )  # fmt: skip
    return job, cfg, summary, start_step


def _run(opts: TrainOptions, job: Any, cfg: TrainConfig, summary: dict[str, Any], start_step: int, engine: str, dist: Any, on_step: Any) -> TrainSummary:
    from factory.train import distributed
    from factory.train.loop import train_worker

    out = opts.out
    is_main = dist is None or dist.is_main
    t0 = time.perf_counter()
    with _progress(opts.progress and is_main, cfg, start_step, opts.stop_at) as show:

        def step_cb(rec: dict[str, Any]) -> None:
            show(rec)
            if on_step is not None:
                on_step(rec)

        if opts.workers > 1:
            use_gpu = cfg.device != "cpu" and _cluster_has_gpus(opts.address)
            distributed.run_ray(job, train_worker, workers=opts.workers, use_gpu=use_gpu, address=opts.address, out=out, on_progress=step_cb, threads=opts.threads)
            found = run_folder.latest_checkpoint(out)
            last = _last_log(out / run_folder.LOG_FILE)
            step = int(last.get("step", start_step)) if last else start_step
            result_ckpt = str(found[1]) if found else None
            world, worker_notes = opts.workers, []
        else:
            the_dist = dist if dist is not None else distributed.single(cfg.device)
            res = train_worker(job, the_dist, step_cb if is_main else None)
            step, result_ckpt, last, world, worker_notes = res.step, res.checkpoint, res.last, the_dist.world, res.notes
            start_step = res.start_step
    return TrainSummary(
        out=out, start_step=start_step, step=step, steps=cfg.steps, checkpoint=result_ckpt, last=last,
        seconds=time.perf_counter() - t0, samples=summary["samples"], engine=engine, world=world,
        is_main=is_main, notes=[*job.notes, *[n for n in worker_notes if n not in job.notes]], report_to=cfg.report_to,
    )  # fmt: skip


def _cluster_has_gpus(address: str | None) -> bool:
    if address:
        return True  # decided by the cluster; run_ray checks the count
    import torch

    return torch.cuda.is_available()


def _last_log(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}


class _progress:
    """A rich progress bar on stderr fed with each step's log record: on a terminal only and never
    with ``-q`` (as :func:`factory.feedback.rate_bar`); a no-op otherwise."""

    def __init__(self, enabled: bool, cfg: TrainConfig, start: int, stop_at: int | None) -> None:
        self.enabled = enabled
        self.total = min(cfg.steps, stop_at) if stop_at else cfg.steps
        self.start = start
        self.progress: Any = None

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        from factory.feedback import QUIET, stderr_console, verbosity

        console = stderr_console()
        if not (self.enabled and console.is_terminal and verbosity() > QUIET):
            return lambda rec: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stage]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} s/step"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total, completed=self.start, stage="-", loss="-", rate="-")

        def show(rec: dict[str, Any]) -> None:
            self.progress.update(
                self.task, completed=int(rec.get("step", 0)), stage=rec.get("stage", "-"),
                loss=f"{rec.get('loss', float('nan')):.4f}", rate=f"{rec.get('seconds', 0.0):.2f}",
            )  # fmt: skip

        return show

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
