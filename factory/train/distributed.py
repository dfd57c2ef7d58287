"""Data-parallel training: one process per device, the same loop in each (``loop.train_worker``,
handed in by the caller).

Engines:

- **Ray Train** (``factory train --workers N``, optionally ``--address`` to join a multi-node Ray
  cluster): a ``TorchTrainer`` starts N workers (one GPU each with ``use_gpu``, else CPU), sets up
  ``torch.distributed`` (NCCL on GPU, gloo on CPU) and calls the loop in each. This is the engine
  ``factory generate`` already uses, so one cluster serves both. ``--out`` must be on storage that
  every node sees (rank 0 writes the checkpoints; every rank reads them on resume).
- **torchrun / accelerate launch**: when ``factory train`` itself is started by a launcher that
  sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (``torchrun
  --nproc_per_node 8 $(which factory) train ...``, or ``accelerate launch`` with a multi-GPU
  config), each process joins that group (:func:`from_env`). No accelerate ``Accelerator`` is
  involved: mixed precision, DDP and checkpointing are the loop's own.

Semantics (:class:`Dist`): ``batch_size`` is per process; the gradient is the mean over all
processes (DDP); the data order gives every rank its own slice of the run's sample stream
(``data.StepBatches``); logged losses are averaged over ranks; rank 0 alone writes checkpoints,
logs and validation images, and every rank waits for it (barrier) after each checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from factory.errors import FactoryError, InputError, RunError
from factory.feedback import plural
from factory.sampler.pipeline import resolve_device


@dataclass
class Dist:
    """This process's place in the job. ``world == 1``: no process group, no collectives."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    engine: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average each value over the ranks (one all-reduce)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``module`` when distributed (gradients averaged over ranks), else itself."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    @property
    def _comm_device(self) -> torch.device:
        backend = torch.distributed.get_backend() if self.distributed else "gloo"
        return self.device if backend == "nccl" else torch.device("cpu")


def pick_device(device: str | None) -> torch.device:
    """The training device: the sampler's rule (None = CUDA when present, else CPU)."""
    return resolve_device(device)


def single(device: str | None) -> Dist:
    return Dist(device=pick_device(device))


def launched_by_env() -> bool:
    """True inside a torchrun / accelerate-launch process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def from_env(device: str | None) -> Dist:
    """Join the process group a launcher describes in the environment (``env://``)."""
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return Dist(rank=rank, world=world, device=dev, engine="env")


def from_ray() -> Dist:
    """Inside a Ray Train worker: the group is already set up by ``TorchTrainer``."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    dev = ray.train.torch.get_device()
    if isinstance(dev, list):
        dev = dev[0]
    return Dist(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=torch.device(dev), engine="ray")


def close(dist: Dist) -> None:
    if dist.engine == "env" and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------ Ray Train


def _ray_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker entry: rebuild the job and run the loop; user errors travel as text."""
    threads = int(cfg.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    dist = from_ray()
    try:
        cfg["worker"](cfg["job"], dist)
    except FactoryError as exc:
        raise RuntimeError(f"{FACTORY_ERROR_TAG}{type(exc).__name__}{FACTORY_ERROR_TAG}{exc}") from None


FACTORY_ERROR_TAG = "\x1ffactory-error\x1f"


def _error_from_ray(exc: BaseException) -> FactoryError:
    text = str(exc)
    if FACTORY_ERROR_TAG in text:
        _, kind, rest = text.split(FACTORY_ERROR_TAG, 2)
        message = rest.splitlines()[0] if rest else ""
        return InputError(message) if kind == "InputError" else RunError(message)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if ":" in ln and not ln.startswith("File ")), lines[-1] if lines else type(exc).__name__)
    return RunError(f"distributed training failed: {last[:300]}")


def run_ray(
    job: Any,
    worker: Callable[[Any, Dist], None],
    *,
    workers: int,
    use_gpu: bool,
    address: str | None,
    out: Path,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    threads: int = 0,
) -> None:
    """Run ``worker(job, dist)`` on ``workers`` Ray Train workers; raise a FactoryError on failure.

    Starts a local Ray instance (temporary files under ``OUT/.ray``) unless ``address`` names a
    cluster; ``on_progress`` receives each new line of ``OUT/log.jsonl`` while training runs.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from factory.ray_session import start_ray

    session = start_ray(out, address, out / ".ray", None, workers)
    try:
        avail = ray.cluster_resources()
        if use_gpu and avail.get("GPU", 0) < workers:
            raise InputError(f"--workers {workers} with GPUs, but the Ray cluster has {plural(float(avail.get('GPU', 0)), 'GPU')}")
        if not use_gpu and avail.get("CPU", 0) < workers:
            raise InputError(f"--workers {workers}, but the Ray cluster has {plural(float(avail.get('CPU', 0)), 'CPU')}")
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"job": job, "worker": worker, "threads": threads},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name="factory-train", storage_path=str((out / ".ray" / "results").resolve())),
        )
        box: dict[str, BaseException] = {}

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                box["error"] = exc

        thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
        thread.start()
        log = out / "log.jsonl"
        seen = log.stat().st_size if log.is_file() else 0
        while thread.is_alive():
            thread.join(timeout=1.0)
            seen = _tail(log, seen, on_progress)
        _tail(log, seen, on_progress)
        if "error" in box:
            err = box["error"]
            if isinstance(err, FactoryError):
                raise err
            raise _error_from_ray(err) from err
    finally:
        session.shutdown()


def _tail(path: Path, offset: int, fn: Callable[[dict[str, Any]], None] | None) -> int:
    if fn is None or not path.is_file():
        return offset
    size = path.stat().st_size
    if size < offset:  # rewritten (resume truncation)
        offset = 0
    if size == offset:
        return offset
    with path.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].splitlines():
        try:
            fn(json.loads(line))
        except ValueError:
            pass
    return offset + end

