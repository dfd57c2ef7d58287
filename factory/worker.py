"""The worker side of generation: what a sampler worker loads, and how it turns a batch of plan
rows into finished samples. Used by the in-process executor (``--no-ray``) and by the Ray actors
and tasks of :mod:`factory.distribute` alike, so both modes run the same code."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from factory.finish import FinishSettings, failed_result, finish_sample
from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
from factory.plan import PlanRow
from factory.sample import SampleResult

#: Rows per sampler call when neither the command, the manifest nor the sampler says.
DEFAULT_BATCH_SIZE = 2
#: torch's intra-op threads while a sampler runs on the CPU, in every mode (``--no-ray`` and Ray
#: alike): a CPU convolution or reduction splits its sums across threads, so another thread count
#: changes the last bits of an image (measured: 1 and 2 threads gave other PNGs for the same row).
#: One fixed count makes a plan row give the same bytes whichever mode or machine draws it.
CPU_SAMPLER_THREADS = 1


@dataclass(frozen=True)
class WorkSpec:
    """What a sampler worker needs to load its model and finish samples (picklable).

    ``sampler.batch_size`` (the command's ``--batch-size`` or the manifest's) fixes the rows per
    sampler call; None lets each sampler choose (fitted to its GPU's memory).
    ``sampler_factory``: a callable or ``"module:function"`` used instead of ``load_sampler``, with
    the same arguments; a seam for fault-injection tests (picklable), never set by the CLI.
    """

    model: ModelSpec
    sampler: SamplerSettings
    canvas: CanvasSettings
    finish: FinishSettings
    device: str | None = None
    compile: bool = False
    sampler_factory: Any = None

    def batch_size_for(self, sampler: Any) -> int:
        """Rows per sampler call: the settings', else the sampler's own choice, else the default."""
        return int(self.sampler.batch_size or getattr(sampler, "batch_size", None) or DEFAULT_BATCH_SIZE)


def load_work_sampler(spec: WorkSpec, device: str | None) -> Any:
    """The sampler a worker uses: ``load_sampler``, or the test seam ``spec.sampler_factory``."""
    if callable(spec.sampler_factory):
        make_sampler = spec.sampler_factory
    elif spec.sampler_factory:
        module, _, name = spec.sampler_factory.partition(":")
        make_sampler = getattr(importlib.import_module(module), name)
    else:
        from factory.sampler import load_sampler as make_sampler
    return make_sampler(spec.model, spec.sampler, spec.canvas, device=device, compile=spec.compile)


def set_sampler_threads(sampler: Any, device: str | None, threads: int | None = None) -> str:
    """Fix torch's thread count for sampling: :data:`CPU_SAMPLER_THREADS` on the CPU, ``threads``
    (the CPU work around GPU kernels, which does not change an image) on a GPU. Returns the device."""
    import torch

    where = str(getattr(sampler, "device", None) or device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.startswith("cpu"):
        torch.set_num_threads(CPU_SAMPLER_THREADS)
    elif threads:
        torch.set_num_threads(max(1, threads))
    return where


#: Called with each sample as soon as it is finished (the driver's progress bar), before the batch
#: it belongs to is committed.
OnResult = Callable[[SampleResult], None]


def process_batch(
    sampler: Any, rows: Sequence[PlanRow], finish: FinishSettings, worker: str = "", on_result: OnResult | None = None
) -> list[SampleResult]:
    """Sample a batch, then finish each sample. A batch-wide exception fails every row with it.
    ``on_result`` sees each sample as soon as it is finished (the batch is returned at the end)."""
    try:
        generated = sampler.sample(rows)
    except Exception as exc:  # noqa: BLE001 - recorded per row; the run goes on
        failed = [failed_result(r, f"sampling failed: {type(exc).__name__}: {exc}", finish, worker=worker) for r in rows]
        for result in failed:
            if on_result is not None:
                on_result(result)
        return failed
    return finish_generated(rows, generated, finish, worker, on_result)


def finish_generated(
    rows: Sequence[PlanRow], generated: Sequence[Any], finish: FinishSettings, worker: str = "", on_result: OnResult | None = None
) -> list[SampleResult]:
    """Finish what a sampler drew for ``rows`` (one result per row, failed ones included);
    ``on_result`` sees each one as soon as it is finished."""
    results = []
    for result in iter_finished(rows, generated, finish, worker):
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results


def iter_finished(rows: Sequence[PlanRow], generated: Sequence[Any], finish: FinishSettings, worker: str = "") -> Iterator[SampleResult]:
    """Finish what a sampler drew for ``rows``, yielding each sample as soon as it is finished.

    With one BLAS/OpenMP thread, as in a Ray finishing task (its environment says so), so that the
    driver of a ``--no-ray`` run finishes a sample to the same bytes (K-Means and the matting
    solvers sum in another order on more threads)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        for row, gen in zip(rows, generated, strict=True):
            if gen.error:
                result = failed_result(row, gen.error, finish, worker=worker, t_sample_s=gen.seconds)
            else:
                result = finish_sample(row, gen.image, gen.coarse_alpha, finish, t_sample_s=gen.seconds, worker=worker)
            tokens = getattr(gen, "prompt_tokens", None)
            if tokens is not None:
                result.fields["prompt_tokens"] = int(tokens)
            yield result
