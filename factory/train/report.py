"""Experiment trackers for training logs: TensorBoard, Weights & Biases, or none (``report_to``).

``log.jsonl`` is always written; a tracker receives the same per-step records as scalars
(``train/loss``, ``train/noise``, ..., ``train/lr``), and the validation samples as images. Only the
main process reports. TensorBoard event files go to ``OUT/logs`` (``tensorboard --logdir OUT/logs``);
on resume, events of the steps that are redone are purged. W&B runs as its own settings say
(``WANDB_MODE=offline`` keeps it on this machine), with its files under ``OUT/logs`` and one run id
per run folder, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from factory.errors import InputError
from factory.train.run_folder import TB_DIR

log = logging.getLogger(__name__)

REPORT_TO = ("tensorboard", "wandb", "none")
WANDB_PROJECT = "factory-train"
#: Record fields that are not scalars to plot.
_NOT_SCALARS = {"step", "stage"}


def check_available(report_to: str) -> None:
    """One-line ``InputError`` when the tracker's package is not installed (checked before training)."""
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--report_to tensorboard needs the tensorboard package: pip install tensorboard (or --report_to none)")
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise InputError("--report_to wandb needs the wandb package: pip install wandb (or --report_to tensorboard|none)")


class Reporter:
    """The no-op tracker (``report_to: none``); the base of the others."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        pass

    def close(self) -> None:
        pass


def scalars(record: dict[str, Any]) -> dict[str, float]:
    return {f"train/{k}": float(v) for k, v in record.items() if k not in _NOT_SCALARS and isinstance(v, (int, float))}


class TensorBoardReporter(Reporter):
    def __init__(self, out: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at and after it that an earlier, interrupted session wrote
        self.writer = SummaryWriter(log_dir=str(out / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for name, image in images.items():
            self.writer.add_image(f"validation/{name}", image, step, dataformats="HWC" if image.ndim == 3 else "HW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import wandb

        from factory.feedback import QUIET, verbosity

        run_id = hashlib.sha256(str(out).encode()).hexdigest()[:16]
        (out / TB_DIR).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        # -q: W&B's banner and run summary are not warnings; its own warnings still show
        settings = wandb.Settings(silent=True) if verbosity() <= QUIET else None
        self.run = wandb.init(
            project=WANDB_PROJECT, name=out.name, id=run_id, resume="allow", dir=str(out / TB_DIR), config=config, settings=settings
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.run.log({f"validation/{k}": self.wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporter(report_to: str, out: Path, config: dict[str, Any], start_step: int) -> Reporter:
    """The tracker ``report_to`` names, for the main process of a run in ``out``."""
    check_available(report_to)
    if report_to == "tensorboard":
        return TensorBoardReporter(out, start_step)
    if report_to == "wandb":
        return WandbReporter(out, config)
    return Reporter()
