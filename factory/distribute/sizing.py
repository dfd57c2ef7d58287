"""Sizing a Ray instance for `factory generate`: sampler actors and finishing slots.

One sampler actor per GPU (``--gpus`` caps the GPUs, ``--workers`` the actors; more actors than
GPUs share them); with no GPU, ``--workers`` (default 2) CPU sampler actors. The CPUs not reserved
by sampler actors run the finishing tasks (matting, scoring, PNG encoding); at least one CPU is
always left to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from factory.errors import InputError, RunError
from factory.feedback import plural
from factory.worker import CPU_SAMPLER_THREADS

#: Default number of CPU sampler actors on a machine without GPU.
DEFAULT_CPU_WORKERS = 2


@dataclass(frozen=True)
class WorkerPlan:
    """How many sampler actors, with which resources, and how many CPUs are left for finishing."""

    workers: int
    gpus_per_worker: float  # 0 for CPU sampler actors
    cpus_per_worker: float  # Ray's (logical) CPU reservation of one sampler actor
    threads_per_worker: int  # torch threads inside one sampler actor
    finish_slots: int  # finishing tasks that can run at once (one CPU each)
    total_cpus: float
    total_gpus: float

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def describe(self) -> str:
        kind = "GPU" if self.on_gpu else "CPU"
        share = f", {self.gpus_per_worker:g} GPU each" if self.on_gpu and self.gpus_per_worker != 1 else ""
        return (
            f"{self.workers} {kind} sampler worker{'s' if self.workers != 1 else ''}{share}, "
            f"{self.finish_slots} finishing slot{'s' if self.finish_slots != 1 else ''} "
            f"({plural(self.total_cpus, 'CPU')}, {plural(self.total_gpus, 'GPU')})"
        )


def plan_workers(resources: dict[str, float], gpus: int | None, workers: int | None) -> WorkerPlan:
    """Sampler actors and finishing slots for a cluster with ``resources`` (``ray.cluster_resources()``)."""
    total_cpus = float(resources.get("CPU", 0.0))
    total_gpus = float(resources.get("GPU", 0.0))
    if total_cpus < 1:
        raise RunError(f"the Ray cluster has {plural(total_cpus, 'CPU')}; factory needs at least one for finishing samples")
    if gpus is not None and gpus > total_gpus:
        raise InputError(f"--gpus {gpus}: the Ray cluster has {plural(total_gpus, 'GPU')}")
    use_gpus = total_gpus if gpus is None else float(gpus)
    if use_gpus >= 1:
        n = workers or int(use_gpus)
        gpus_per = 1.0 if n <= use_gpus else use_gpus / n
        # One CPU per GPU actor drives the sampling loop (tokenizer, host-side decode).
        cpus_per = 1.0 if total_cpus - n >= 1 else max(0.01, (total_cpus - 1) / n)
        threads = 1
    else:
        n = workers or DEFAULT_CPU_WORKERS
        gpus_per = 0.0
        # A CPU sampler uses a fixed thread count (factory.worker.CPU_SAMPLER_THREADS: the same
        # bytes in every mode); more CPUs go to more workers (--workers) and to finishing.
        threads = CPU_SAMPLER_THREADS
        # Ray's CPU counts are logical: keep at least one CPU for finishing tasks.
        cpus_per = min(float(threads), max(0.01, (total_cpus - 1) / n))
    cpus_per = round(cpus_per, 4)
    finish_slots = max(1, int(total_cpus - n * cpus_per + 1e-6))
    return WorkerPlan(
        workers=n,
        gpus_per_worker=round(gpus_per, 4),
        cpus_per_worker=cpus_per,
        threads_per_worker=threads,
        finish_slots=finish_slots,
        total_cpus=total_cpus,
        total_gpus=total_gpus,
    )
