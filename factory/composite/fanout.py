"""A composite's parts on Ray, laid out as ``generate`` lays out its work.

- Every part (placement, compositing, PNG encoding, writing, committing) is a CPU task, at most
  ``--workers`` at a time.
- With ``--generative``, long-lived painter actors hold the inpainting model, loaded once per
  actor, and only repaint rings, as generate's sampler actors only sample: one per GPU
  (``factory.distribute.sizing.plan_workers``, the same sizing), or on a machine without GPU CPU
  actors that take no GPU. A part's task sends each ring to one actor (parts are spread over the
  actors round-robin) and gets the repainted pixels back; the rest of the part stays on the CPU.

The painter runs the same ``make_repaint`` as the in-process run, with torch's thread count fixed
on the CPU (``factory.worker.CPU_SAMPLER_THREADS``), so both write the same bytes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray

from factory.composite.part import PartJob, render_part
from factory.errors import FactoryError, RunError
from factory.ray_session import start_ray

#: A painter process that dies (OOM, a native crash) is restarted, reloading its model, and the
#: repaint it was running is sent again; a part's task whose process dies is run again.
RESTARTS = 2


class Painter:
    """One per GPU (or CPU painter slot): holds the inpainting model; ``paint`` is all it does."""

    def __init__(self, model: str, device: str | None) -> None:
        from factory.composite.generative import load_pipeline, make_repaint

        self.error: str | None = None
        self.device = "cuda" if ray.get_gpu_ids() else (device if device and not device.startswith("cuda") else "cpu")
        self.repaint: Any = None
        self.repaints = 0
        try:
            self.repaint = make_repaint(load_pipeline(model, self.device))
        except Exception as exc:  # noqa: BLE001 - reported by info(); the driver stops the run
            self.error = str(exc) if isinstance(exc, FactoryError) else f"{type(exc).__name__}: {exc}"

    def info(self) -> dict[str, Any]:
        """Ready check: the device and process, or the error that stopped the model loading; and
        how many rings this actor has repainted."""
        return {"device": self.device, "pid": os.getpid(), "error": self.error, "repaints": self.repaints}

    def paint(self, image: np.ndarray, mask: np.ndarray, gen: dict[str, Any]) -> np.ndarray:
        self.repaints += 1
        return self.repaint(image, mask, gen)


PainterActor = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS, max_concurrency=1)(Painter)


@dataclass(frozen=True)
class RemoteRepaint:
    """``render``'s ``repaint`` inside a part's task: the ring goes to a painter actor."""

    actor: Any  # a PainterActor handle (picklable)

    def __call__(self, image: np.ndarray, mask: np.ndarray, gen: dict[str, Any]) -> np.ndarray:
        return ray.get(self.actor.paint.remote(image, mask, gen))


part_task = ray.remote(num_cpus=1, max_retries=RESTARTS)(render_part)


def start_painters(model: str, device: str | None) -> list[Any]:
    """The painter actors, sized like generate's sampler actors, each with its model loaded."""
    from factory.distribute.sizing import plan_workers

    plan = plan_workers(ray.cluster_resources(), None, None)
    actors = [PainterActor.options(num_gpus=plan.gpus_per_worker, num_cpus=plan.cpus_per_worker).remote(model, device)
              for _ in range(plan.workers)]
    for info in ray.get([a.info.remote() for a in actors]):
        if info["error"]:
            raise RunError(f"--generative {model}: the painter could not load the model: {info['error']}")
    return actors


def run_parts_on_ray(
    jobs: list[PartJob], workers: int, address: str | None, ray_tmp: Path | None = None
) -> Iterator[dict[str, Any]]:
    """Run the parts as Ray tasks (painters too with --generative); yields records as parts finish.
    Ray's session files go to ``ray_tmp`` or the temp dir, not into the dataset folder."""
    session = start_ray(Path(tempfile.gettempdir()) / "factory-composite", address, ray_tmp, None, workers)
    actors: list[Any] = []
    try:
        s = jobs[0].settings
        if s.generative:
            actors = start_painters(s.generative, jobs[0].device)
            jobs = [replace(j, painter=RemoteRepaint(actors[j.number % len(actors)])) for j in jobs]
        queue, pending = list(jobs), []
        while queue or pending:
            while queue and len(pending) < workers:
                pending.append(part_task.remote(queue.pop(0)))
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, (FactoryError, OSError)):  # OSError: a full disk, said as in-process
                    raise cause from None
                raise RunError(f"a composite part failed on Ray: {' '.join(str(cause or exc).split())[:300]}") from exc
    finally:
        for actor in actors:
            ray.kill(actor)
        session.shutdown()
