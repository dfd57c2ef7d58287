"""What runs on the Ray workers: the sampler actor (GPU loop, sampling only) and the finishing task.

The sampler actor loads the model once and then only samples. Each ``sample`` call returns two
objects: a small *status* (per-batch timing, worker name, a batch-wide error if the sampler raised)
that the driver fetches, and the *payload* (the generated images and coarse alphas) that stays in
Ray's object store and goes straight to a finishing task. The driver never holds raw arrays.

Neither the actor nor the task retries by itself: actors are created with ``max_restarts=0`` and
``max_task_retries=0``; the driver (:mod:`factory.distribute.executor`) replaces a dead actor and
re-submits its batches, a bounded number of times, so that a batch that kills its worker every
time ends as failed rows instead of a crash loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from factory.errors import FactoryError
from factory.feedback import plural
from factory.plan import PlanRow
from factory.worker import iter_finished, load_work_sampler, set_sampler_threads


class SamplerWorker:
    """One per GPU (or CPU sampler slot). Holds the model; ``sample`` is all it does."""

    def __init__(self, spec: Any, slot: int, threads: int) -> None:
        self.slot = slot
        self.error: str | None = None
        self.exit_code = 1
        self.sampler: Any = None
        self.batches = 0
        self.device = "cpu"
        self.batch_size = spec.sampler.batch_size
        ctx = ray.get_runtime_context()
        self.node = ctx.get_node_id()[:8]
        self.name = f"w{slot}@{self.node}"
        try:
            if ray.get_gpu_ids():
                self.device = "cuda"
            elif spec.device and not spec.device.startswith("cuda"):
                self.device = spec.device
            self.sampler = load_work_sampler(spec, self.device)
            set_sampler_threads(self.sampler, self.device, threads)  # one on CPU, as with --no-ray
            self.batch_size = spec.batch_size_for(self.sampler)
        except Exception as exc:  # noqa: BLE001 - reported by info(); the driver decides
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, FactoryError) else str(exc)
            self.exit_code = getattr(exc, "exit_code", 1)

    def info(self) -> dict[str, Any]:
        """Ready check: name, device, batch size, or the error that stopped the model loading."""
        return {
            "name": self.name,
            "device": self.device,
            "batch_size": self.batch_size,
            "pid": os.getpid(),
            "node": self.node,
            "error": self.error,
            "exit_code": self.exit_code,
            "notes": list(getattr(self.sampler, "metadata", {}).get("notes", [])) if self.sampler is not None else [],
        }

    def sample(self, rows: Sequence[PlanRow]) -> tuple[dict[str, Any], Any]:
        """Sample one batch: ``(status, generated)``; a batch-wide exception goes in the status."""
        self.batches += 1
        start = time.perf_counter()
        if self.sampler is None:
            return {"error": f"sampler not loaded: {self.error}", "seconds": 0.0, "worker": self.name}, None
        try:
            generated = self.sampler.sample(list(rows))
            if len(generated) != len(rows):
                raise RuntimeError(f"sampler returned {plural(len(generated), 'sample')} for {plural(len(rows), 'row')}")
        except Exception as exc:  # noqa: BLE001 - the batch's rows are recorded failed with it
            status = {"error": f"sampling failed: {type(exc).__name__}: {exc}", "seconds": time.perf_counter() - start}
            return {**status, "worker": self.name}, None
        return {"error": None, "seconds": time.perf_counter() - start, "worker": self.name}, generated


def finish_batch(
    rows: Sequence[PlanRow], generated: Any, finish: Any, worker: str, write_to: str | None = None
) -> Iterator[Any]:
    """The CPU stage of one batch (matte, score, encode): a Ray task beside the sampler actors.

    ``generated`` arrives as the sampler actor's payload ObjectRef, resolved by Ray on this worker.
    A streaming generator task: each sample goes back to the driver as soon as it is finished (its
    progress bar moves per sample; the driver still commits the batch as one). With ``write_to``
    (the run directory, ``--writes workers``) each sample's files are written here first (temp
    name, fsync, rename) and only its index row goes back to the driver.
    """
    for result in iter_finished(rows, generated, finish, worker):
        if write_to is not None:
            from pathlib import Path

            from factory.store.samples import write_sample_files

            (result,) = write_sample_files(Path(write_to), [result])
        yield result


def warm_up() -> int:
    """Import the finishing stack (GreenPost, GSG, PNG encoders; numba kernels) in a CPU worker
    while the sampler actors load their models, so the first batches are not finished late."""
    import factory.finish  # noqa: F401

    return os.getpid()


SamplerActor = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=1)(SamplerWorker)
#: A finishing task whose worker process dies (OOM, segfault in a native library) is retried by Ray.
FINISH_TASK_RETRIES = 2
finish_task = ray.remote(max_retries=FINISH_TASK_RETRIES, num_returns="streaming")(finish_batch)
warm_up_task = ray.remote(max_retries=0)(warm_up)
