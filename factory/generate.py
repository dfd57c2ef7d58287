"""`factory generate`: plan -> sample -> matte -> score -> store, resumable.

The driver (this module) is the single writer of the run store; the worker side (loading a
sampler, finishing a batch) is :mod:`factory.worker`. Work goes to an *executor*, which
yields finished samples in batches as they complete:

- :class:`LocalExecutor` samples and finishes in this process (``--no-ray``; debugging, tests);
- ``factory.distribute.RayExecutor`` fans out over Ray sampler actors (one per GPU) and CPU tasks.

Every yielded batch is committed to the store at once, so an interrupted run loses at most the
samples in flight, and re-running the same command resumes. Executors also hand each sample to an
``on_result`` callback as soon as it is finished, before its batch is committed: the progress bar
moves per sample while the store still commits a batch as one journal chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from factory.errors import InputError, Interrupted, RunError, work_finished
from factory.feedback import Feedback, human_bytes, plural
from factory.fsutil import check_utf8_path
from factory.manifest import Manifest, ModelSpec, SamplerSettings, load_manifest, with_overrides
from factory.plan import PlanRow, check_n
from factory.ray_session import cluster_endpoint
from factory.sample import PROMPT_TOKEN_LIMIT, STATUS_DONE, SampleResult
from factory.store import RUN_FILE, RunStore, latest_run_pointer, remember_latest_run, restore_latest_run
from factory.store.run import run_mismatch
from factory.store.segments import DamagedIndex

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
    writes: str = "auto"  # who writes the sample files: auto, workers or driver (factory.distribute.writes)
    # sampler settings over the manifest's; recorded in the run's manifest and its fingerprint
    steps: int | None = None
    guidance: float | None = None
    size: str | None = None  # "512" or "WIDTHxHEIGHT"
    scheduler: str | None = None
    negative_prompt: str | None = None
    shrink: bool = False  # allow a smaller --n than the run's (its samples beyond leave the plan)


class Executor(Protocol):
    def run(self, rows: Sequence[PlanRow], on_result: Callable[[SampleResult], None] | None = None) -> Iterator[list[SampleResult]]:
        """Yield finished samples a batch at a time (each batch is committed as one); call
        ``on_result`` with each sample as soon as it is finished, before its batch is yielded."""
        ...

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
            out.append(f"redone: {plural(self.damaged, 'sample')} whose files were missing or damaged")
        out.extend(self.notes)
        return out


class LocalExecutor:
    """Everything in this process: one sampler, batches in plan order."""

    def __init__(self, spec: WorkSpec) -> None:
        from factory.worker import load_work_sampler, set_sampler_threads

        self.spec = spec
        self.sampler = load_work_sampler(spec, spec.device)
        set_sampler_threads(self.sampler, spec.device)  # as a Ray sampler worker: the same bytes
        self.batch_size = spec.batch_size_for(self.sampler)

    def run(self, rows: Sequence[PlanRow], on_result: Callable[[SampleResult], None] | None = None) -> Iterator[list[SampleResult]]:
        from factory.worker import process_batch

        size = self.batch_size
        for start in range(0, len(rows), size):
            yield process_batch(self.sampler, rows[start : start + size], self.spec.finish, worker="local", on_result=on_result)

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
        paths = [os.path.normpath(str(lora["path"])) for lora in data["loras"]]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise InputError(f"--lora {twice[0]}: given twice (it would be fused twice); give each LoRA once, with its scale")
        data["allow_pickle"] = data["allow_pickle"] or opts.allow_pickle
        data["safety_checker"] = data["safety_checker"] or opts.safety_checker
        top["model"] = ModelSpec.model_validate(data)
    if opts.seed is not None:
        top["seed"] = opts.seed
    return manifest.model_copy(update=top) if top else manifest


def run_generate(opts: GenerateOptions, executor_factory: Any = None) -> GenerateSummary:
    """Run (or resume) a generation. ``executor_factory(spec, opts)`` is a seam for tests.

    Bad arguments are refused before anything heavy (Ray, torch, the matting stack) is imported;
    from then on a status line says what is happening until the progress bar takes over.
    """
    from factory.sampler import model_identity  # identities are cheap: no torch
    from factory.sampler.devices import check_device_name

    check_n(opts.n)  # before anything slow
    if opts.writes not in ("auto", "workers", "driver"):
        raise InputError(f"--writes {opts.writes}: choose one of auto, workers, driver")
    if opts.device is not None:
        check_device_name(opts.device)
    if opts.address:
        cluster_endpoint(opts.address)  # a malformed address is refused now, an unreachable one when Ray starts
    manifest = resolve_manifest(opts)
    with Feedback("generate", enabled=opts.progress) as fb:
        fb.status("checking the model")
        identity = model_identity(manifest.model)
        out = opts.out or Path("runs") / manifest.name
        check_utf8_path(out, "--out")
        opts = dataclasses.replace(opts, out=out)  # executors put their temporary files under the run
        done = 0 if opts.restart else check_resize(out, opts.n, opts.shrink, manifest)
        check_disk_space(out, manifest, opts.n - done)
        # Nothing here costs N: plan rows are a pure function of the manifest and their index, and
        # plan.parquet is written in the background once the run has resumed (RunStore.start_plan_writer).
        fb.status(f"planning {plural(opts.n, 'sample')}")
        store = RunStore.prepare(out, manifest, opts.n, identity, restart=opts.restart, write_plan=False)
        previous_latest = latest_run_pointer()
        try:
            remember_latest_run(store.root)
            summary = _drive(store, manifest, identity, opts, executor_factory, fb)
            work_finished()  # committed, workers stopped: a SIGTERM now leaves the exit code at 0
            return summary
        except BaseException:
            if not store.has_commits():  # nothing made (the model did not load): not the latest run
                restore_latest_run(previous_latest)
            raise
        finally:
            store.release_lock()


def _work_spec(manifest: Manifest, identity: str, opts: GenerateOptions) -> Any:
    """What every worker needs to make samples (imports the worker side: torch, the matting stack)."""
    from factory.finish import FinishSettings
    from factory.worker import WorkSpec

    sampler = manifest.sampler
    if opts.batch_size:  # the sampler's own chunking follows --batch-size (it never changes an image)
        sampler = sampler.model_copy(update={"batch_size": opts.batch_size})
    return WorkSpec(
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


def _drive(
    store: RunStore, manifest: Manifest, identity: str, opts: GenerateOptions, executor_factory: Any, fb: Feedback
) -> GenerateSummary:
    lean_allocator()
    fb.status(f"checking the run ({plural(opts.n, 'planned sample')})")
    # a rebuild a stopped run began is finished first: its samples are not uncommitted ones
    rebuilt = store.rebuild_index() if store.rebuild_pending() else None
    try:
        state = store.resume()
    except DamagedIndex:  # rebuilt from the plan, the readable index files and the samples' JSON
        rebuilt = store.rebuild_index()
        state = store.resume()
    store.start_plan_writer()  # plan.parquet beside the run: rows are made from the manifest meanwhile
    summary = GenerateSummary(run=store.root, planned=opts.n, skipped=state.done, damaged=state.damaged)
    if state.left_alone_line():
        summary.notes.append(state.left_alone_line())
    if rebuilt:
        summary.notes.append(rebuilt)
        fb.warn(rebuilt)
    rows = state.pending  # plan rows made on demand from plan.parquet
    if not rows:
        summary.notes.append("nothing to do: every planned sample is done")
        wait_for_plan(store)
        fold_or_rebuild(store, summary)
        return summary
    make_executor = executor_factory or _default_executor
    start = time.perf_counter()
    tokens = PromptTokens()
    executor = None
    try:
        # Ctrl-C anywhere from here (loading the sampling code, starting the workers, the loop,
        # shutting them down) ends as Interrupted with what is committed; executors defer it
        # while they shut down.
        try:
            fb.status("loading the sampling code (torch, diffusers, the matting stack)")
            spec = _work_spec(manifest, identity, opts)
            fb.status("starting Ray" if opts.use_ray else "loading the model")
            executor = make_executor(spec, opts)
            workers = getattr(getattr(executor, "plan", None), "workers", 1)
            fb.status(f"loading the model on {plural(workers, 'worker')} and warming up (the first batch)")
            bar = SampleBar(fb, len(rows))
            for results in run_executor(executor, rows, bar.finished):
                store.save(results)
                ok = sum(r.status == "done" for r in results)
                summary.done += ok
                summary.failed += len(results) - ok
                for line in tokens.check(results):
                    fb.warn(line)
                bar.committed(results)
        finally:
            if executor is not None:
                executor.close()
                summary.notes.extend(executor_notes(executor))
    except KeyboardInterrupt as exc:
        summary.seconds = time.perf_counter() - start
        store.finish_plan_writer(wait=False)
        store.fold()
        raise Interrupted(
            f"interrupted; {plural(summary.skipped + summary.done, 'sample')} committed in {store.root}; "
            "re-run the same command to resume"
        ) from exc
    summary.seconds = time.perf_counter() - start
    summary.notes.extend(tokens.notes())
    replaced = store.replace_damaged_plan(getattr(rows.reader, "damaged", []))
    if replaced:
        summary.notes.append(replaced)
        fb.warn(replaced)
    wait_for_plan(store)
    fold_or_rebuild(store, summary)
    store.mark_updated(last_run={"done": summary.done, "failed": summary.failed, "seconds": round(summary.seconds, 2)})
    return summary


def run_executor(executor: Executor, rows: Sequence[PlanRow], on_result: Callable[[SampleResult], None]) -> Iterator[list[SampleResult]]:
    """``executor.run(rows, on_result=...)``, or ``executor.run(rows)`` for an executor that only
    yields batches (its bar then moves a batch at a time)."""
    if "on_result" in inspect.signature(executor.run).parameters:
        return executor.run(rows, on_result=on_result)
    return executor.run(rows)


class SampleBar:
    """The run's progress bar: one step per finished sample, with img/s (since the first sample,
    so model loading and warm-up do not count) and the ETA.

    A sample moves the bar when the executor reports it finished (``finished``); a sample that
    reaches the store without that report (a batch failed as a whole, or collected after Ctrl-C)
    moves it when its batch is committed (``committed``), so each sample counts once."""

    def __init__(self, fb: Feedback, total: int) -> None:
        self.fb, self.total = fb, total
        self.task: Any = None
        self.first: tuple[float, int] | None = None  # when the first samples came, and how many were done
        self.done = 0
        self.failed = 0
        self.unsaved: set[str] = set()  # keys shown on the bar whose batch is not committed yet

    def finished(self, result: SampleResult) -> None:
        self.unsaved.add(result.key)
        self._step([result])

    def committed(self, results: Sequence[SampleResult]) -> None:
        unseen = [r for r in results if r.key not in self.unsaved]
        self.unsaved.difference_update(r.key for r in results)
        if unseen or self.task is None:
            self._step(unseen)

    def _step(self, results: Sequence[SampleResult]) -> None:
        if self.task is None:
            self.task = self.fb.bar(self.total, "generate", extra="")
        ok = sum(r.status == STATUS_DONE for r in results)
        self.done += ok
        self.failed += len(results) - ok
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.done)
        since, before = self.first
        rate = f"{(self.done - before) / (now - since):.2f} img/s" if self.done > before and now > since else ""
        self.fb.advance(self.task, len(results), extra=f"{self.failed} failed  {rate}" if self.failed else rate)


class PromptTokens:
    """Prompts longer than CLIP's limit: a warning on the console for the first few, a count after."""

    SHOWN = 3

    def __init__(self) -> None:
        self.cut: dict[str, int] = {}  # prompt -> tokens
        self.samples = 0

    def check(self, results: Sequence[SampleResult]) -> list[str]:
        lines = []
        for r in results:
            count = r.fields.get("prompt_tokens")
            if count is None or count <= PROMPT_TOKEN_LIMIT:
                continue
            self.samples += 1
            prompt = str(r.plan.get("prompt", ""))
            if prompt not in self.cut:
                self.cut[prompt] = int(count)
                if len(self.cut) <= self.SHOWN:
                    lines.append(
                        f"{r.key}: the prompt has {count} CLIP tokens; the text encoder keeps the first "
                        f"{PROMPT_TOKEN_LIMIT} (the index records prompt_tokens): {prompt[:80]!r}"
                    )
        return lines

    def notes(self) -> list[str]:
        if not self.samples:
            return []
        return [
            f"warning: {plural(self.samples, 'sample')} ({plural(len(self.cut), 'prompt')}) cut at "
            f"{PROMPT_TOKEN_LIMIT} CLIP tokens; the index's prompt_tokens column lists them"
        ]


def check_resize(out: Path, n: int, shrink: bool, manifest: Manifest) -> int:
    """Refuse a smaller N than an existing run's unless ``shrink``; returns its done samples.

    Lowering N rewrites the plan: the done samples beyond the new N leave it (they stay on disk
    and come back if N is raised again), which should never happen by a typo. A run of another
    manifest is not this run resized: preparing the store names that difference instead.
    """
    if not (out / RUN_FILE).is_file():
        return 0
    store = RunStore.open(out)
    try:
        info = store.info
        if run_mismatch(info, manifest, info.get("model", "")):
            return 0
        old_n = int(info.get("n") or 0)
        parts = list(store.committed(["index", "status"]))  # committed rows only: costs what is done, not N
        index = pa.concat_tables(parts) if parts else pa.table({"index": pa.array([], pa.int64()), "status": pa.array([], pa.string())})
    except (InputError, RunError, OSError, ValueError, pa.ArrowException):
        return 0  # the store reports its own problems when the run is prepared
    done = (index["status"].to_numpy(zero_copy_only=False) == STATUS_DONE)
    if n < old_n and not shrink:
        beyond = int(done[index["index"].to_numpy() >= n].sum())
        raise InputError(
            f"{out}: the run has {old_n} planned samples and --n {n} would leave {beyond} done samples out "
            f"of its plan; pass --shrink to lower N anyway, or --n {old_n} to resume"
        )
    return int(done[index["index"].to_numpy() < n].sum())


#: Compressed size of a sample's files as a share of the raw pixels, kept low (a noisy photo
#: compresses less) so that the estimate refuses only a run that cannot fit.
_PNG_SHARE = {"rgb": 0.4, "alpha": 0.1}


def rendered_size(manifest: Manifest) -> tuple[int, int]:
    """The size the samples will have: the manifest's, or the native size of a model known to
    render smaller (tiny and toy draw at most 64 px), without loading it."""
    from factory.sampler.sizes import NATIVE_BY_SOURCE, render_size

    return render_size(manifest.sampler.width, manifest.sampler.height, NATIVE_BY_SOURCE.get(manifest.model.source))


def estimate_sample_bytes(manifest: Manifest) -> int:
    """About how many bytes one sample's four files take (image, alpha, foreground, JSON)."""
    width, height = rendered_size(manifest)
    pixels = width * height
    alpha_bytes = manifest.export.alpha_bits // 8
    return int(pixels * (2 * 3 * _PNG_SHARE["rgb"] + alpha_bytes * _PNG_SHARE["alpha"])) + 2000


def check_disk_space(out: Path, manifest: Manifest, todo: int) -> None:
    """Refuse up front a run whose samples cannot fit on the disk of ``out`` (an estimate)."""
    if todo <= 0:
        return
    where = Path(os.path.abspath(out))
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    per = estimate_sample_bytes(manifest)
    need = per * todo
    if need > free:
        width, height = rendered_size(manifest)
        raise InputError(
            f"--n: the {plural(todo, 'sample')} to make need about {human_bytes(need)} ({human_bytes(per)} each at "
            f"{width}x{height}), but {where} has {human_bytes(free)} free; "
            "free space, lower --n or choose another --out"
        )


def wait_for_plan(store: RunStore) -> None:
    """Wait for plan.parquet's background write at the end of a run (the run's rows were made
    from the manifest meanwhile); a signal here stops it with its own line."""
    try:
        store.finish_plan_writer()
    except KeyboardInterrupt as exc:
        raise Interrupted(
            f"interrupted while writing the plan of {store.root}; the samples made are committed: re-run the same command"
        ) from exc


def fold_or_rebuild(store: RunStore, summary: GenerateSummary) -> None:
    """The end-of-run compaction, which reads every index file whole: a file damaged in a way the
    resume's columns did not show is set aside and rebuilt here (one line in the summary)."""
    try:
        store.fold()
    except DamagedIndex:
        note = store.rebuild_index()
        if note:
            summary.notes.append(note)
        store.fold()


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
