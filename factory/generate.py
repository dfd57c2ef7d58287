"""`factory generate`: plan -> sample -> matte -> score -> store, resumable.

The driver (this module) is the single writer of the run store; the worker side (loading a
sampler, finishing a batch) is :mod:`factory.worker`. Work goes to an *executor*, which
yields finished samples in batches as they complete:

- :class:`LocalExecutor` samples and finishes in this process (``--no-ray``; debugging, tests);
- ``factory.distribute.RayExecutor`` fans out over Ray sampler actors (one per GPU) and CPU tasks.

Every yielded batch is committed to the store at once, so an interrupted run loses at most the
samples in flight, and re-running the same command resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from factory.errors import InputError, Interrupted
from factory.manifest import Manifest, ModelSpec, SamplerSettings, load_manifest, with_overrides
from factory.plan import PlanRow, check_n
from factory.sample import SampleResult
from factory.store import RunStore, remember_latest_run

if TYPE_CHECKING:  # the worker side imports the matting stack (numba, seconds): not before it is needed
    from factory.worker import WorkSpec


@dataclass(frozen=True)
class GenerateOptions:
    """What the CLI passes; ``None`` means the manifest's setting or an automatic choice."""

    manifest: Path
    n: int
    out: Path | None = None
    model: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    allow_pickle: bool = False
    safety_checker: bool = False
    batch_size: int | None = None
    workers: int | None = None
    gpus: int | None = None
    address: str | None = None
    ray_tmp: Path | None = None
    use_ray: bool = True
    restart: bool = False
    device: str | None = None
    compile: bool = False
    seed: int | None = None
    progress: bool = True
    # sampler settings over the manifest's; recorded in the run's manifest and its fingerprint
    steps: int | None = None
    guidance: float | None = None
    size: str | None = None  # "512" or "WIDTHxHEIGHT"
    scheduler: str | None = None
    negative_prompt: str | None = None


class Executor(Protocol):
    def run(self, rows: Sequence[PlanRow]) -> Iterator[list[SampleResult]]: ...

    def close(self) -> None: ...


@dataclass
class GenerateSummary:
    run: Path
    planned: int
    skipped: int = 0  # done before this invocation
    done: int = 0  # done by this invocation
    failed: int = 0
    damaged: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"run: {self.run}",
            f"samples: {self.planned} planned, {self.skipped + self.done} done "
            f"({self.done} now, {self.skipped} before), {self.failed} failed",
        ]
        if self.done:
            out.append(f"time: {self.seconds:.1f} s, {self.images_per_s:.2f} images/s")
        if self.damaged:
            out.append(f"redone: {self.damaged} samples whose files were missing or damaged")
        out.extend(self.notes)
        return out


class LocalExecutor:
    """Everything in this process: one sampler, batches in plan order."""

    def __init__(self, spec: WorkSpec) -> None:
        from factory.worker import load_work_sampler

        self.spec = spec
        self.sampler = load_work_sampler(spec, spec.device)
        self.batch_size = spec.batch_size_for(self.sampler)

    def run(self, rows: Sequence[PlanRow]) -> Iterator[list[SampleResult]]:
        from factory.worker import process_batch

        size = self.batch_size
        for start in range(0, len(rows), size):
            yield process_batch(self.sampler, rows[start : start + size], self.spec.finish, worker="local")

    def close(self) -> None:
        self.sampler = None


# ------------------------------------------------------------------------------ the driver


def parse_image_size(value: str) -> tuple[int, int]:
    """``512`` -> (512, 512); ``768x512`` -> (768, 512) (width x height)."""
    width, sep, height = value.strip().lower().partition("x")
    try:
        size = (int(width), int(height) if sep else int(width))
    except ValueError:
        raise InputError(f"--size {value}: give SIZE or WIDTHxHEIGHT in pixels, e.g. 512 or 768x512") from None
    return size


def sampler_overrides(manifest: Manifest, opts: GenerateOptions) -> SamplerSettings:
    """The manifest's sampler settings with ``--steps``, ``--guidance``, ``--size``, ``--scheduler``,
    validated by the manifest's own model (same limits, one-line errors naming the option)."""
    width, height = parse_image_size(opts.size) if opts.size is not None else (None, None)
    overrides = {"steps": opts.steps, "guidance": opts.guidance, "width": width, "height": height, "scheduler": opts.scheduler}
    try:
        return with_overrides(manifest.sampler, overrides)
    except InputError as exc:
        message = str(exc)
        if message.startswith(("--width", "--height")):
            message = f"--size {opts.size}: {message.split(': ', 1)[-1]}"
        raise InputError(message) from None


def resolve_manifest(opts: GenerateOptions) -> Manifest:
    """The manifest with the command line's overrides applied: the manifest as run, whose
    fingerprint decides whether an existing run may be resumed."""
    manifest = load_manifest(opts.manifest)
    top: dict[str, Any] = {}
    sampler = sampler_overrides(manifest, opts)
    if sampler != manifest.sampler:
        top["sampler"] = sampler
    if opts.negative_prompt is not None:
        top["negative_prompt"] = opts.negative_prompt
    if opts.model is not None or opts.loras or opts.allow_pickle or opts.safety_checker:
        data = manifest.model.model_dump()
        if opts.model is not None:
            data["source"] = opts.model
        data["loras"] += [{"path": path, "scale": scale} for path, scale in opts.loras]
        data["allow_pickle"] = data["allow_pickle"] or opts.allow_pickle
        data["safety_checker"] = data["safety_checker"] or opts.safety_checker
        top["model"] = ModelSpec.model_validate(data)
    if opts.seed is not None:
        top["seed"] = opts.seed
    return manifest.model_copy(update=top) if top else manifest


def run_generate(opts: GenerateOptions, executor_factory: Any = None) -> GenerateSummary:
    """Run (or resume) a generation. ``executor_factory(spec, opts)`` is a seam for tests."""
    from factory.sampler import model_identity

    check_n(opts.n)  # before anything slow
    manifest = resolve_manifest(opts)
    identity = model_identity(manifest.model)
    out = opts.out or Path("runs") / manifest.name
    opts = dataclasses.replace(opts, out=out)  # executors put their temporary files under the run
    store = RunStore.prepare(out, manifest, opts.n, identity, restart=opts.restart)
    try:
        remember_latest_run(store.root)
        return _drive(store, manifest, identity, opts, executor_factory)
    finally:
        store.release_lock()


def _drive(store: RunStore, manifest: Manifest, identity: str, opts: GenerateOptions, executor_factory: Any) -> GenerateSummary:
    lean_allocator()
    state = store.resume()
    summary = GenerateSummary(run=store.root, planned=opts.n, skipped=state.done, damaged=state.damaged)
    rows = state.pending  # plan rows made on demand from plan.parquet
    if not rows:
        summary.notes.append("nothing to do: every planned sample is done")
        store.fold()
        return summary
    from factory.finish import FinishSettings
    from factory.worker import WorkSpec

    sampler = manifest.sampler
    if opts.batch_size:  # the sampler's own chunking follows --batch-size (it never changes an image)
        sampler = sampler.model_copy(update={"batch_size": opts.batch_size})
    spec = WorkSpec(
        model=manifest.model,
        sampler=sampler,
        canvas=manifest.canvas,
        finish=FinishSettings(
            model=identity,
            canvas_color=tuple(manifest.canvas.color),
            alpha_bits=manifest.export.alpha_bits,
            sampler={"steps": manifest.sampler.steps, "guidance": manifest.sampler.guidance, "scheduler": manifest.sampler.scheduler},
        ),
        device=opts.device,
        compile=opts.compile,
    )
    make_executor = executor_factory or _default_executor
    start = time.perf_counter()
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not opts.progress,
        transient=False,
    )
    executor = None
    try:
        # Ctrl-C anywhere from here (starting the workers, the loop, shutting them down) ends
        # as Interrupted with what is committed; executors defer it while they shut down.
        try:
            executor = make_executor(spec, opts)
            with progress:
                task = progress.add_task("generate", total=len(rows), failed=0, rate="-")
                for results in executor.run(rows):
                    store.save(results)
                    ok = sum(r.status == "done" for r in results)
                    summary.done += ok
                    summary.failed += len(results) - ok
                    elapsed = time.perf_counter() - start
                    progress.update(task, advance=len(results), failed=summary.failed, rate=f"{summary.done / elapsed:.2f}")
        finally:
            if executor is not None:
                executor.close()
                summary.notes.extend(executor_notes(executor))
    except KeyboardInterrupt as exc:
        summary.seconds = time.perf_counter() - start
        store.fold()
        raise Interrupted(
            f"interrupted; {summary.skipped + summary.done} samples are committed in {store.root}; "
            "re-run the same command to resume"
        ) from exc
    summary.seconds = time.perf_counter() - start
    store.fold()
    store.mark_updated(last_run={"done": summary.done, "failed": summary.failed, "seconds": round(summary.seconds, 2)})
    return summary


def lean_allocator() -> None:
    """Make the driver give freed memory back to the system.

    The driver lives for the whole run and does its Arrow work (resume, folds of the index) a step
    of rows at a time. Measured (BENCHMARKS.md, driver memory): Arrow's default allocator here
    (mimalloc) kept about 3x more resident after a resume and a fold than the system one, and glibc's
    adaptive mmap threshold let freed Parquet buffers pile up in its heap as the index grew; a fixed
    128 KiB threshold (glibc's default before adaptation) keeps big buffers in their own mappings.
    """
    pa.set_memory_pool(pa.system_memory_pool())
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def executor_notes(executor: Any) -> list[str]:
    """What the executor has to say in the summary (sizing, faults), if it says anything."""
    notes = getattr(executor, "summary_notes", None)
    return list(notes()) if callable(notes) else []


def _default_executor(spec: WorkSpec, opts: GenerateOptions) -> Executor:
    if not opts.use_ray:
        return LocalExecutor(spec)
    from factory.distribute import RayExecutor

    return RayExecutor(spec, opts)
