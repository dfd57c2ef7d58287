"""``RayExecutor``: the fan-out of `factory generate` over Ray sampler actors and finishing tasks.

Topology, for W sampler actors (one per GPU; ``--workers`` on CPU)::

    driver ── rows ──> SamplerActor 0..W-1   (model loaded once; ``sample`` only)
       ^                    │ status (small) ──> driver
       │                    └ payload ObjectRef ──> finish_task (CPU: matte, score, encode)
       └──────── each SampleResult (encoded files) as it is finished ┘  -> RunStore.save (driver only)

Flow control (memory stays flat whatever N is):

- at most ``QUEUE_DEPTH`` (2) sample calls per actor: one running, one queued behind it, so the
  GPU never waits for the driver or for CPU work;
- at most ``max_finishing`` batches being finished (2 per finishing CPU, at least 2); when finishing
  falls behind, no new batches are sampled until it catches up;
- a finishing task streams its samples back one at a time (a Ray streaming generator): each goes
  to ``on_result`` (the driver's progress bar) as soon as it is finished, and the batch is yielded
  (committed by the driver as one chunk) once its last sample is in.

The driver holds plan rows and ObjectRefs, never images: the status is small and the payload goes
from the actor's object store straight to the finishing task.

Faults:

- a sample the sampler marks failed, or a batch whose ``sample`` raised, becomes failed rows with
  the error (not retried: it would fail again);
- an actor that dies (process crash, OOM kill, lost node) is replaced by a new one that loads the
  model again, and its batches are re-submitted; a re-submitted batch runs alone on its actor
  (nothing queued behind it) so that a batch that kills its worker cannot take others down with
  it. A batch is tried at most ``MAX_ATTEMPTS`` (3) times, then its rows are recorded failed
  with the last error. An actor slot that dies ``MAX_RESTARTS_IN_ROW`` + 1 times in a row without
  finishing a batch is retired; when every slot is retired the run stops with an error;
- a finishing task whose worker dies is retried by Ray (``FINISH_TASK_RETRIES``; the samples it
  had already streamed are not sent twice); if its input was lost with a node, the samples of the
  batch not yet received are sampled again (counted as an attempt);
- a model that fails to load stops the run at once with the loader's message;
- Ctrl-C: the sampler actors are stopped, the batches already being finished are collected for up
  to ``DRAIN_S`` seconds and yielded (so the driver commits them), then KeyboardInterrupt goes on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import exceptions as rex

from factory.distribute.actors import SamplerActor, finish_task, warm_up_task
from factory.distribute.sizing import WorkerPlan, plan_workers
from factory.distribute.writes import choose_writes
from factory.ray_session import RaySession, start_ray
from factory.errors import InputError, RunError, Terminated
from factory.feedback import human_bytes, plural
from factory.finish import failed_result
from factory.plan import PlanRow
from factory.sample import SIZE_COLUMNS, SampleResult

QUEUE_DEPTH = 2
MAX_ATTEMPTS = 3
MAX_RESTARTS_IN_ROW = 3
FINISH_PER_SLOT = 2
POLL_S = 1.0
DRAIN_S = 10.0
START_TIMEOUT_S = 900.0

#: Errors that mean "the process or node holding the work went away": retry elsewhere.
SYSTEM_ERRORS: tuple[type[BaseException], ...] = (
    rex.RayActorError,
    rex.WorkerCrashedError,
    rex.ObjectLostError,
    rex.NodeDiedError,
    rex.OutOfMemoryError,
    rex.LocalRayletDiedError,
    rex.RaySystemError,
    rex.TaskCancelledError,
)


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception as one short line (Ray's messages are multi-line with tracebacks)."""
    if isinstance(exc, rex.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, str):
        text = exc
    else:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        head = lines[0] if lines else ""
        text = f"{type(exc).__name__}: {head}" if head else type(exc).__name__
    return " ".join(text.split())[:limit]


@dataclass
class _Batch:
    rows: list[PlanRow]
    attempt: int = 1


@dataclass
class _Slot:
    index: int
    actor: Any = None
    generation: int = 0
    ready: bool = False
    name: str = ""
    batch_size: int = 0
    inflight: int = 0  # sample calls of the current actor whose status is not back
    solo: bool = False  # a re-submitted batch runs alone on this actor
    failures_in_row: int = 0
    retired: bool = False
    last_error: str = ""


@dataclass
class _Pending:
    kind: str  # "info", "sample" or "finish"
    slot: _Slot | None = None
    generation: int = 0
    batch: _Batch | None = None
    payload: Any = None
    worker: str = ""
    received: list[SampleResult] = field(default_factory=list)  # samples a finishing task streamed so far


class _RowQueue:
    """Plan rows in order, cut into batches on demand; re-submitted batches go first."""

    def __init__(self, rows: Sequence[PlanRow]) -> None:
        self.rows = rows
        self.cursor = 0
        self.retry: deque[_Batch] = deque()

    def __bool__(self) -> bool:
        return bool(self.retry) or self.cursor < len(self.rows)

    def peek_retry(self) -> _Batch | None:
        return self.retry[0] if self.retry else None

    def take(self, size: int) -> _Batch | None:
        if self.retry:
            return self.retry.popleft()
        if self.cursor >= len(self.rows):
            return None
        rows = list(self.rows[self.cursor : self.cursor + size])
        self.cursor += len(rows)
        return _Batch(rows)


@dataclass
class ExecutorStats:
    batches: int = 0
    restarts: int = 0
    resubmitted: int = 0
    failed_batches: int = 0
    sampler_busy_s: float = 0.0
    first_ready_at: float | None = None
    ended_at: float | None = None
    workers_seen: set[str] = field(default_factory=set)
    bytes_received: int = 0
    bytes_written_by_workers: int = 0
    samples_received: int = 0
    samples_sampled: int = 0  # images the sampler actors returned (batches without a batch-wide error)
    finish_cpu_s: float = 0.0  # finishing time of the received samples (t_post_s)


class RayExecutor:
    """Executor protocol (``run(rows)`` yields lists of results; ``close()``) on Ray."""

    def __init__(self, spec: Any, opts: Any) -> None:
        self.spec = spec
        self.opts = opts
        self.notes: list[str] = []
        self.stats = ExecutorStats()
        self.session: RaySession | None = None
        self.slots: list[_Slot] = []
        self._pending: dict[Any, _Pending] = {}
        self._results: list[SampleResult] = []
        self._on_result: Callable[[SampleResult], None] | None = None
        run_dir = Path(opts.out) if opts.out is not None else Path("runs") / "ray"
        self.session = start_ray(run_dir, opts.address, opts.ray_tmp, opts.gpus, opts.workers)
        try:
            self.notes.extend(self.session.notes)
            self.plan: WorkerPlan = plan_workers(ray.cluster_resources(), opts.gpus, opts.workers)
            self.max_finishing = max(2, FINISH_PER_SLOT * self.plan.finish_slots)
            where = {"local": "local Ray", "cluster": f"Ray cluster {opts.address}", "existing": "Ray"}[self.session.mode]
            tmp = f", temp {self.session.temp_dir}" if self.session.temp_dir else ""
            self.notes.append(f"ray: {where}{tmp}; {self.plan.describe()}")
            self._actor_options: dict[str, Any] = {
                "num_cpus": self.plan.cpus_per_worker,
                "num_gpus": self.plan.gpus_per_worker,
            }
            self._finish_options: dict[str, Any] = {"num_cpus": 1}
            if self.session.runtime_env:
                self._actor_options["runtime_env"] = self.session.runtime_env
                self._finish_options["runtime_env"] = self.session.runtime_env
            self._finish_ref = ray.put(spec.finish)
            write_root, note = choose_writes(getattr(opts, "writes", "auto"), run_dir, self.session.runtime_env)
            self.write_to = str(write_root) if write_root is not None else None
            self.notes.append(note)
            for i in range(self.plan.workers):
                slot = _Slot(index=i)
                self.slots.append(slot)
                self._start_actor(slot)
            # Start the finishing workers while the models load (fire and forget).
            warm = min(self.plan.finish_slots, 2 * self.plan.workers)
            self._warm_refs = [warm_up_task.options(**self._finish_options).remote() for _ in range(warm)]
        except BaseException:
            self.close()
            raise
        self._created_at = time.monotonic()

    # -------------------------------------------------------------- actors

    def _start_actor(self, slot: _Slot) -> None:
        slot.generation += 1
        slot.ready = False
        slot.inflight = 0
        slot.solo = False
        slot.actor = SamplerActor.options(**self._actor_options).remote(self.spec, slot.index, self.plan.threads_per_worker)
        self._pending[slot.actor.info.remote()] = _Pending("info", slot, slot.generation)

    def _actor_failed(self, slot: _Slot, generation: int, exc: BaseException) -> None:
        """The actor of ``slot`` (as of ``generation``) died: replace it, or retire the slot."""
        if generation != slot.generation or slot.retired:
            return  # already replaced
        slot.last_error = one_line(exc)
        slot.failures_in_row += 1
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        if slot.failures_in_row > MAX_RESTARTS_IN_ROW:
            slot.retired = True
            slot.actor = None
            self.notes.append(f"sampler worker {slot.index} retired after {slot.failures_in_row} deaths in a row: {slot.last_error}")
            if all(s.retired for s in self.slots):
                raise RunError(
                    f"every sampler worker died {MAX_RESTARTS_IN_ROW + 1} times in a row without finishing a batch; "
                    f"last error: {slot.last_error}"
                )
            return
        self.stats.restarts += 1
        self._start_actor(slot)

    def _on_info(self, pend: _Pending, ref: Any) -> None:
        slot = pend.slot
        assert slot is not None
        try:
            info = ray.get(ref)
        except SYSTEM_ERRORS as exc:
            self._actor_failed(slot, pend.generation, exc)
            return
        if pend.generation != slot.generation:
            return
        if info["error"]:
            message = f"sampler worker could not load the model: {info['error']}"
            raise (InputError(message) if info["exit_code"] == 2 else RunError(message))
        slot.ready = True
        slot.name = info["name"]
        for note in info.get("notes") or []:  # e.g. "tiny: randomly initialised test model"
            if note not in self.notes:
                self.notes.append(note)
        slot.batch_size = int(info["batch_size"] or 1)
        if self.stats.first_ready_at is None:
            self.stats.first_ready_at = time.monotonic()

    # -------------------------------------------------------------- submitting

    def _fill(self, queue: _RowQueue) -> None:
        """Give every ready actor work up to QUEUE_DEPTH, while finishing keeps up."""
        progress = True
        while progress and queue:
            progress = False
            for slot in self.slots:
                if not queue or self._finishing() >= self.max_finishing:
                    return
                if not slot.ready or slot.retired or slot.solo or slot.inflight >= QUEUE_DEPTH:
                    continue
                retry = queue.peek_retry()
                if retry is not None and slot.inflight > 0:
                    continue  # a re-submitted batch waits for an idle actor
                batch = queue.take(slot.batch_size)
                if batch is None:
                    return
                self._submit(slot, batch)
                progress = True

    def _submit(self, slot: _Slot, batch: _Batch) -> None:
        status, payload = slot.actor.sample.options(num_returns=2).remote(batch.rows)
        slot.inflight += 1
        if batch.attempt > 1:
            slot.solo = True
        self._pending[status] = _Pending("sample", slot, slot.generation, batch, payload=payload)

    def _finishing(self) -> int:
        return sum(1 for p in self._pending.values() if p.kind == "finish")

    def _resubmit(self, queue: _RowQueue, batch: _Batch, error: str, worker: str) -> None:
        if batch.attempt >= MAX_ATTEMPTS:
            self.stats.failed_batches += 1
            message = f"gave up after {batch.attempt} attempts: {error}"
            self._fail_rows(batch, message, worker)
            return
        self.stats.resubmitted += 1
        queue.retry.append(_Batch(batch.rows, batch.attempt + 1))

    def _fail_rows(self, batch: _Batch, error: str, worker: str) -> None:
        for row in batch.rows:
            self._results.append(failed_result(row, error, self.spec.finish, worker=worker, attempts=batch.attempt))

    # -------------------------------------------------------------- completions

    def _on_sample(self, pend: _Pending, ref: Any, queue: _RowQueue) -> None:
        slot, batch = pend.slot, pend.batch
        assert slot is not None and batch is not None
        current = pend.generation == slot.generation
        try:
            status = ray.get(ref)
        except SYSTEM_ERRORS as exc:
            self._resubmit(queue, batch, f"sampler worker died: {one_line(exc)}", slot.name)
            self._actor_failed(slot, pend.generation, exc)
            return
        if current:
            slot.inflight -= 1
            if batch.attempt > 1:
                slot.solo = False
            slot.failures_in_row = 0
        self.stats.batches += 1
        self.stats.sampler_busy_s += status["seconds"]
        if not status["error"]:
            self.stats.samples_sampled += len(batch.rows)
        self.stats.workers_seen.add(status["worker"])
        if status["error"]:
            self._fail_rows(batch, status["error"], status["worker"])
            return
        finish = finish_task.options(**self._finish_options).remote(
            batch.rows, pend.payload, self._finish_ref, status["worker"], self.write_to
        )
        self._pending[finish] = _Pending("finish", slot, pend.generation, batch, worker=status["worker"])

    def _on_finish(self, pend: _Pending, stream: Any, queue: _RowQueue) -> None:
        """The next sample of a finishing task (or its end): shown at once, committed with its batch."""
        batch = pend.batch
        assert batch is not None
        try:
            ref = next(stream)  # ready: does not block
        except StopIteration:
            self._results.extend(pend.received)
            return
        try:
            result = ray.get(ref)
        except SYSTEM_ERRORS as exc:
            # The finishing worker died Ray's retries over, or the payload went with its node.
            self._results.extend(pend.received)
            left = self._not_received(pend)
            if left.rows:
                self._resubmit(queue, left, f"finishing failed: {one_line(exc)}", pend.worker)
            return
        except rex.RayTaskError as exc:  # a bug in the finishing code: deterministic, not retried
            self._results.extend(pend.received)
            self._fail_rows(self._not_received(pend), f"post-processing failed: {one_line(exc)}", pend.worker)
            return
        result.fields["attempts"] = batch.attempt
        self.stats.bytes_received += sum(len(b) for b in result.files.values())
        self.stats.finish_cpu_s += float(result.fields.get("t_post_s") or 0.0)
        if not result.files:  # written by the worker (--writes workers): its sizes are in the row
            self.stats.bytes_written_by_workers += sum(int(result.fields.get(c) or 0) for c in SIZE_COLUMNS.values())
        self.stats.samples_received += 1
        pend.received.append(result)
        self._pending[stream] = pend  # wait for its next sample
        if self._on_result is not None:
            self._on_result(result)

    @staticmethod
    def _not_received(pend: _Pending) -> _Batch:
        """The rows of a finishing task's batch whose samples did not come back (same attempt)."""
        assert pend.batch is not None
        got = {r.key for r in pend.received}
        return _Batch([row for row in pend.batch.rows if row.key not in got], pend.batch.attempt)

    # -------------------------------------------------------------- the loop

    def run(self, rows: Sequence[PlanRow], on_result: Callable[[SampleResult], None] | None = None) -> Iterator[list[SampleResult]]:
        """Yield each finished batch; ``on_result`` sees each sample as soon as it is finished."""
        self._on_result = on_result
        queue = _RowQueue(rows)
        try:
            while True:
                self._fill(queue)
                if self._results:
                    out, self._results = self._results, []
                    yield out
                    continue
                work = list(self._pending)
                if not queue and not any(p.kind in ("sample", "finish") for p in self._pending.values()):
                    break
                if not work:
                    raise RunError("no sampler worker is left to run the remaining samples")
                ready, _ = ray.wait(work, num_returns=1, timeout=POLL_S, fetch_local=False)
                if ready:
                    first = set(ready)
                    rest = [r for r in work if r not in first]
                    if rest:
                        ready += ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)[0]
                for ref in ready:
                    self._handle(ref, queue)
                self._check_started()
        except KeyboardInterrupt:
            yield from self._drain()
            raise
        finally:
            self.stats.ended_at = time.monotonic()

    def _handle(self, ref: Any, queue: _RowQueue) -> None:
        pend = self._pending.pop(ref)
        if pend.kind == "info":
            self._on_info(pend, ref)
        elif pend.kind == "sample":
            self._on_sample(pend, ref, queue)
        else:
            self._on_finish(pend, ref, queue)

    def _check_started(self) -> None:
        if self.stats.first_ready_at is None and time.monotonic() - self._created_at > START_TIMEOUT_S:
            raise RunError(
                f"no sampler worker started within {START_TIMEOUT_S:.0f} s "
                f"(cluster resources: {ray.cluster_resources()}); see Ray's logs"
            )

    def _drain(self) -> Iterator[list[SampleResult]]:
        """After Ctrl-C: stop sampling, collect what is being finished (bounded), yield it."""
        self._kill_actors()
        finishing = {r: p for r, p in self._pending.items() if p.kind == "finish"}
        deadline = time.monotonic() + DRAIN_S
        out: list[SampleResult] = list(self._results)
        self._results = []
        while finishing and time.monotonic() < deadline:
            ready, _ = ray.wait(list(finishing), num_returns=1, timeout=max(0.0, deadline - time.monotonic()), fetch_local=False)
            for stream in ready:
                pend = finishing[stream]
                try:
                    result = ray.get(next(stream))
                except Exception:  # noqa: BLE001 - its end, or a failure: keep what came
                    finishing.pop(stream)
                    continue
                result.fields["attempts"] = pend.batch.attempt if pend.batch else 1
                pend.received.append(result)
        for pend in [p for p in self._pending.values() if p.kind == "finish"]:
            out.extend(pend.received)  # every sample that came back, its batch complete or not
        if out:
            yield out

    # -------------------------------------------------------------- closing

    def _kill_actors(self) -> None:
        for slot in self.slots:
            if slot.actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)
                slot.actor = None
                slot.ready = False

    def summary_notes(self) -> list[str]:
        notes = list(self.notes)
        if self.stats.restarts or self.stats.resubmitted:
            notes.append(
                f"faults: {plural(self.stats.restarts, 'sampler worker restart')}, "
                f"{plural(self.stats.resubmitted, 'batch', 'batches')} re-submitted, "
                f"{plural(self.stats.failed_batches, 'batch', 'batches')} given up"
            )
        if self.stats.first_ready_at is not None and self.stats.ended_at is not None and self.plan.workers:
            wall = (self.stats.ended_at - self.stats.first_ready_at) * self.plan.workers
            if wall > 0:
                notes.append(f"sampler workers busy {100 * min(1.0, self.stats.sampler_busy_s / wall):.0f}% of the time after start-up")
            seconds = self.stats.ended_at - self.stats.first_ready_at
            if self.stats.samples_received and seconds > 0 and self.stats.bytes_received:
                got = self.stats.bytes_received
                notes.append(
                    f"driver received {human_bytes(got)} of encoded samples ({human_bytes(got / seconds)}/s, "
                    f"{human_bytes(got / self.stats.samples_received)} per sample)"
                )
            elif self.stats.samples_received and seconds > 0:
                wrote = self.stats.bytes_written_by_workers
                notes.append(
                    f"workers wrote {human_bytes(wrote)} of encoded samples ({human_bytes(wrote / seconds)}/s); "
                    "the driver received index rows only"
                )
        notes.extend(finishing_notes(self.stats, self.plan))
        return notes

    def close(self) -> None:
        """Stop the actors and shut down a Ray instance this run started; Ctrl-C waits for it."""
        with sigint_deferred():
            if not ray.is_initialized():
                return
            for ref in [r for r, p in self._pending.items() if p.kind == "finish"] + getattr(self, "_warm_refs", []):
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            self._pending.clear()
            self._kill_actors()
            if self.session is not None:
                self.session.shutdown()


def finishing_notes(stats: ExecutorStats, plan: WorkerPlan) -> list[str]:
    """The finishing capacity against the samplers' measured rate, and a warning when finishing
    (GreenPost, GSG, PNG encoding on CPUs) is what limits the run rather than the GPUs."""
    if not stats.samples_received or not stats.samples_sampled or stats.sampler_busy_s <= 0 or stats.finish_cpu_s <= 0:
        return []
    per_sample = stats.finish_cpu_s / stats.samples_received  # CPU seconds per sample
    capacity = plan.finish_slots / per_sample  # samples/s the finishing slots can take
    sampler_rate = plan.workers * stats.samples_sampled / stats.sampler_busy_s  # samples/s the samplers make when busy
    line = (
        f"finishing: {plural(plan.finish_slots, 'slot')} at {per_sample:.2f} CPU-s a sample finish {capacity:.2f} samples/s; "
        f"the samplers make {sampler_rate:.2f}/s"
    )
    if capacity < sampler_rate:
        cores = sampler_rate / max(plan.workers, 1) * per_sample
        line += (
            f" (warning: finishing is the limit; about {cores:.1f} CPU cores per sampler worker would keep up: "
            "add CPU nodes to the cluster, finishing tasks run on any node)"
        )
    return [line]


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done (an interrupted ``ray.shutdown`` leaves Ray
    half-closed), then raise KeyboardInterrupt (:class:`Terminated` for SIGTERM) if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in received:
        if callable(previous[signal.SIGTERM]):
            previous[signal.SIGTERM](signal.SIGTERM, None)  # the handler the process had (ours raises Terminated)
        raise Terminated
    if received:
        raise KeyboardInterrupt
