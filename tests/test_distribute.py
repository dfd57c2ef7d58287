"""The Ray fan-out of `factory generate` (factory.distribute), on CPU with the tiny model.

One Ray session (2 CPUs) serves the in-process tests of this module; the driver-kill test and the
multi-node test run `factory generate` in subprocesses that start (or build) their own Ray.
Samples are 64x64, 2 steps (tests/conftest.py's small manifest).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from factory.distribute.sizing import plan_workers
from factory.ray_session import MAX_TEMP_DIR_CHARS, choose_temp_dir, prune_sessions, worker_env_vars
from factory.errors import InputError, RunError
from factory.generate import GenerateOptions, run_generate
from factory.sample import SAMPLE_SUFFIXES
from factory.store import RunStore
from tests import fault_samplers
from tests.conftest import SMALL_MANIFEST, write_manifest
from tests.processes import as_a_foreground_command

REPO = Path(__file__).resolve().parent.parent
N = 12
pytestmark = pytest.mark.slow
#: Only a guard against a hang: the tests wait on events (samples committed, processes gone), and
#: on a loaded 2-core machine one of them took over 240 s where a quiet one takes 40.
HANG_S = 1200


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def ray_session():
    import ray

    tmp = tempfile.mkdtemp(prefix="fray-", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tmp,
        log_to_driver=False,
        logging_level="WARNING",
        runtime_env={"env_vars": worker_env_vars()},
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distribute")


@pytest.fixture(scope="module")
def manifest_path(module_dir: Path) -> Path:
    return write_manifest(module_dir, SMALL_MANIFEST, "small.yaml")


def options(manifest: Path, out: Path, n: int = N, **kw) -> GenerateOptions:
    kw.setdefault("batch_size", 2)
    return GenerateOptions(manifest=manifest, n=n, out=out, model="tiny", progress=False, **kw)


def with_sampler(factory):
    """An executor factory: RayExecutor whose workers build their sampler with ``factory``."""

    def make(spec, opts):
        import dataclasses

        from factory.distribute import RayExecutor

        return RayExecutor(dataclasses.replace(spec, sampler_factory=factory), opts)

    return make


def sample_files(run: Path) -> dict[str, dict[str, bytes]]:
    """key -> suffix -> bytes, for every done sample of the run (read through the index)."""
    store = RunStore.open(run)
    out = {}
    for rec in store.index().to_pylist():
        if rec["status"] == "done":
            out[rec["key"]] = {s: store.sample_path(rec["index"], rec["key"], s).read_bytes() for s in SAMPLE_SUFFIXES}
    return out


def check_complete(run: Path, n: int) -> list[dict]:
    """Exactly n done samples, unique keys, every file readable and of its indexed size, no orphans."""
    from PIL import Image

    store = RunStore.open(run)
    index = store.index()
    recs = index.to_pylist()
    assert index.num_rows == n
    assert [r["status"] for r in recs] == ["done"] * n, [(r["key"], r["status"], r["error"]) for r in recs if r["status"] != "done"]
    keys = [r["key"] for r in recs]
    assert len(set(keys)) == n
    assert keys == store.plan()["key"].to_pylist()
    for rec in recs:
        for suffix, column in ((".png", "image_bytes"), (".alpha.png", "alpha_bytes"), (".fg.png", "fg_bytes"), (".json", "meta_bytes")):
            path = store.sample_path(rec["index"], rec["key"], suffix)
            assert path.stat().st_size == rec[column], path
        with Image.open(store.sample_path(rec["index"], rec["key"], ".png")) as im:
            im.load()
            assert im.size == (64, 64)
        with Image.open(store.sample_path(rec["index"], rec["key"], ".alpha.png")) as im:
            im.load()
        assert json.loads(store.sample_path(rec["index"], rec["key"], ".json").read_text())["key"] == rec["key"]
    files = [p for p in (run / "samples").rglob("*") if p.is_file()]
    assert len(files) == n * len(SAMPLE_SUFFIXES), sorted(p.name for p in files)  # no orphans, no temporaries
    return recs


@pytest.fixture(scope="module")
def reference(ray_session, manifest_path: Path, module_dir: Path) -> dict[str, dict[str, bytes]]:
    """A 1-worker run of the N samples: what every other run must reproduce byte for byte."""
    run = module_dir / "one-worker"
    summary = run_generate(options(manifest_path, run, workers=1, writes="driver"))
    assert summary.done == N and summary.failed == 0
    assert any(note.startswith("writes: driver") for note in summary.notes)
    # the sampler's notes (the model's, a render size cut to the model's) reach the summary from the workers
    assert any("non-photographic" in note for note in summary.notes), summary.notes
    recs = check_complete(run, N)
    assert len({r["worker"] for r in recs}) == 1
    return sample_files(run)


# ------------------------------------------------------------------------------ unit: sizing, temp dir


def test_plan_workers_sizes_gpu_and_cpu_clusters() -> None:
    gpu = plan_workers({"CPU": 96, "GPU": 8}, gpus=None, workers=None)
    assert (gpu.workers, gpu.gpus_per_worker, gpu.cpus_per_worker, gpu.finish_slots) == (8, 1.0, 1.0, 88)
    capped = plan_workers({"CPU": 96, "GPU": 8}, gpus=2, workers=None)
    assert (capped.workers, capped.gpus_per_worker) == (2, 1.0)
    shared = plan_workers({"CPU": 16, "GPU": 2}, gpus=None, workers=4)
    assert (shared.workers, shared.gpus_per_worker) == (4, 0.5)
    cpu = plan_workers({"CPU": 2}, gpus=None, workers=None)
    assert (cpu.workers, cpu.gpus_per_worker, cpu.threads_per_worker, cpu.finish_slots) == (2, 0.0, 1, 1)
    assert cpu.workers * cpu.cpus_per_worker <= 1.0  # one CPU always left for finishing
    no_gpu = plan_workers({"CPU": 16, "GPU": 4}, gpus=0, workers=3)
    assert (no_gpu.workers, no_gpu.gpus_per_worker, no_gpu.threads_per_worker) == (3, 0.0, 1)  # a fixed count on CPU
    with pytest.raises(InputError, match="--gpus 4: the Ray cluster has 2 GPUs"):
        plan_workers({"CPU": 8, "GPU": 2}, gpus=4, workers=None)
    with pytest.raises(RunError, match="at least one"):
        plan_workers({"CPU": 0, "GPU": 2}, gpus=None, workers=None)


def test_finishing_capacity_is_reported_against_the_sampler_rate() -> None:
    from factory.distribute.executor import ExecutorStats, finishing_notes

    node = plan_workers({"CPU": 40, "GPU": 8}, gpus=None, workers=None)  # 32 finishing slots
    # 8 GPUs at 8 images/s, 0.5 CPU-s a sample: 64/s wanted, 32 / 0.5 = 64/s... just enough
    stats = ExecutorStats(samples_received=800, samples_sampled=800, sampler_busy_s=800 / 8, finish_cpu_s=400.0)
    (line,) = finishing_notes(stats, node)
    assert "32 slots at 0.50 CPU-s a sample finish 64.00 samples/s; the samplers make 64.00/s" in line and "warning" not in line
    slow = ExecutorStats(samples_received=800, samples_sampled=800, sampler_busy_s=800 / 8, finish_cpu_s=600.0)
    (line,) = finishing_notes(slow, node)
    assert "warning: finishing is the limit; about 6.0 CPU cores per sampler worker" in line
    assert finishing_notes(ExecutorStats(), node) == []
    two_cpus = plan_workers({"CPU": 2}, gpus=None, workers=None)  # the README's first run on 2 cores: one slot
    (line,) = finishing_notes(stats, two_cpus)
    assert line.startswith("finishing: 1 slot at 0.50 CPU-s a sample finish 2.00 samples/s;"), line


def test_ray_temp_dir_goes_under_the_run_or_a_short_path(tmp_path: Path) -> None:
    short_run = Path("/tmp/r")
    assert choose_temp_dir(short_run, None) == (Path("/tmp/r/ray"), None)
    assert choose_temp_dir(short_run, Path("/tmp/x")) == (Path("/tmp/x"), None)
    long_run = tmp_path / ("a" * 60)
    path, note = choose_temp_dir(long_run, None)
    assert len(str(path)) <= MAX_TEMP_DIR_CHARS and note is not None and str(path) in note and "too long" in note
    assert choose_temp_dir(long_run, None)[0] == path  # the same run always falls back to the same place
    assert choose_temp_dir(tmp_path / "other" / ("b" * 60), None)[0] != path
    for name in ("session_2024-01-01_00-00-01_1_1", "session_2024-01-02_00-00-01_1_1", "session_2024-01-03_00-00-01_1_1"):
        (tmp_path / "t" / name).mkdir(parents=True)
    prune_sessions(tmp_path / "t", keep=2)
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["session_2024-01-03_00-00-01_1_1"]


def test_plan_rows_are_made_on_demand(manifest_path: Path, tmp_path: Path) -> None:
    from factory.manifest import load_manifest
    from factory.plan import PlanReader, PlanRows, build_plan, plan_chunks, table_rows
    import pyarrow.parquet as pq

    table = build_plan(load_manifest(manifest_path), 7)
    path = tmp_path / "plan.parquet"
    with pq.ParquetWriter(path, table.schema) as writer:  # row groups of 3 rows: reads cross groups
        for chunk in plan_chunks(load_manifest(manifest_path), 7, size=3):
            writer.write_table(chunk)
    assert pq.read_metadata(path).num_row_groups == 3
    rows = PlanRows(PlanReader(path), range(7))
    assert len(rows) == 7 and rows[2:5] == table_rows(table)[2:5] and rows[-1] == table_rows(table)[6]
    assert rows[5:100] == table_rows(table)[5:] and rows[3:3] == [] and rows[::3] == table_rows(table)[::3]
    some = PlanRows(PlanReader(path), [6, 0, 4])
    assert [r.index for r in some] == [6, 0, 4] and some.keys == [table["key"][i].as_py() for i in (6, 0, 4)]


# ------------------------------------------------------------------------------ fan-out


@pytest.mark.timeout(HANG_S)
def test_two_workers_make_exactly_the_planned_samples_and_the_same_images(ray_session, reference, manifest_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "two"
    # The samplers wait for each other before their first batch, so that both get work even when
    # one loads its model much later than the other (a loaded machine).
    factory = functools.partial(fault_samplers.barrier, parties=2, marker_dir=tmp_path)
    summary = run_generate(options(manifest_path, run, workers=2), executor_factory=with_sampler(factory))
    assert (summary.done, summary.failed) == (N, 0)
    recs = check_complete(run, N)
    assert len({r["worker"] for r in recs}) == 2  # both actors sampled
    assert {r["attempts"] for r in recs} == {1}
    assert sample_files(run) == reference  # every file, byte for byte, as from one worker writing through the driver
    assert any("2 CPU sampler workers" in note for note in summary.notes)
    assert any(note.startswith("writes: workers (one node)") for note in summary.notes)  # auto on one node
    assert any("the driver received index rows only" in note for note in summary.notes)


@pytest.mark.timeout(HANG_S)
def test_an_actor_that_crashes_on_its_second_batch_is_replaced_and_the_run_completes(
    ray_session, reference, manifest_path: Path, tmp_path: Path
) -> None:
    run = tmp_path / "crash"
    marker = tmp_path / "markers"
    marker.mkdir()
    factory = functools.partial(fault_samplers.crash_on_second_batch, marker_dir=marker)
    summary = run_generate(options(manifest_path, run, workers=2), executor_factory=with_sampler(factory))
    assert (marker / "crashed").exists()  # the fault did happen
    crashed = {int(i) for i in (marker / "crashed-rows").read_text().split(",")}
    assert (summary.done, summary.failed) == (N, 0)
    recs = check_complete(run, N)
    assert {r["index"] for r in recs if r["attempts"] == 2} >= crashed  # its batch was re-run
    assert sample_files(run) == reference
    assert any(re.match(r"faults: 1 sampler worker restart, [12] batch(es)? re-submitted, 0 batches given up$", n) for n in summary.notes), summary.notes


@pytest.mark.timeout(HANG_S)
def test_a_batch_that_kills_its_worker_every_time_is_given_up_after_bounded_attempts(
    ray_session, reference, manifest_path: Path, tmp_path: Path
) -> None:
    run = tmp_path / "poison"
    marker = tmp_path / "markers"
    marker.mkdir()
    n = 6
    factory = functools.partial(fault_samplers.crash_on_row, index=3, marker_dir=marker)
    summary = run_generate(options(manifest_path, run, n=n, workers=2), executor_factory=with_sampler(factory))
    assert len((marker / "poison-attempts").read_text().split()) == 3  # MAX_ATTEMPTS, not more
    assert (summary.done, summary.failed) == (4, 2)
    recs = RunStore.open(run).index().to_pylist()
    failed = [r for r in recs if r["status"] == "failed"]
    assert [r["index"] for r in failed] == [2, 3]  # the poison row's batch, and nothing else
    assert all("gave up after 3 attempts" in r["error"] and "died" in r["error"] for r in failed)
    assert all(r["attempts"] == 3 for r in failed)
    done = {k: v for k, v in sample_files(run).items()}
    assert done == {k: v for k, v in reference.items() if k in done} and len(done) == 4


@pytest.mark.timeout(HANG_S)
def test_a_failing_sample_is_recorded_and_the_run_exits_0_or_1_with_strict(
    ray_session, reference, manifest_path: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import factory.generate as generate

    n = 8
    monkeypatch.setattr(generate, "_default_executor", with_sampler(functools.partial(fault_samplers.fail_row, index=3)))
    run = tmp_path / "fail"
    args = ["generate", "--manifest", manifest_path, "--n", n, "--out", run, "--model", "tiny", "--batch-size", 2]
    res = cli(args)
    assert res.code == 0, res.err
    assert "warning: 1 of 8 samples failed" in res.err
    assert "8 planned, 7 done (7 now, 0 before), 1 failed" in res.out
    recs = RunStore.open(run).index().to_pylist()
    assert [r["status"] for r in recs] == ["done"] * 3 + ["failed"] + ["done"] * 4
    assert "non-finite values" in recs[3]["error"] and recs[3]["attempts"] == 1
    assert not list((run / "samples").rglob(f"{recs[3]['key']}*"))  # a failed sample has no files
    # Re-running resumes: only the failed sample is tried again; it fails again; --strict exits 1.
    res = cli([*args, "--strict"])
    assert res.code == 1
    assert "8 planned, 7 done (0 now, 7 before), 1 failed" in res.out
    assert "warning: 1 of 8 samples failed" in res.err
    files = sample_files(run)
    assert files == {k: v for k, v in reference.items() if k in files} and len(files) == 7


@pytest.mark.timeout(HANG_S)
def test_a_model_that_cannot_load_stops_the_run_with_its_message(ray_session, manifest_path: Path, tmp_path: Path, cli, monkeypatch) -> None:
    import factory.generate as generate

    monkeypatch.setattr(generate, "_default_executor", with_sampler(fault_samplers.broken_model))
    res = cli(["generate", "--manifest", manifest_path, "--n", 4, "--out", tmp_path / "broken", "--model", "tiny"])
    assert res.code == 2
    assert res.err.strip().splitlines()[-1] == (
        "error: sampler worker could not load the model: model weights not found: /nowhere/model.safetensors"
    )


@pytest.mark.timeout(HANG_S)
def test_no_ray_gives_the_same_bytes_as_ray_for_the_same_rows(reference, manifest_path: Path, tmp_path: Path) -> None:
    """A run resumed in the other mode must not end up mixed: one plan row, one set of bytes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever the driver's own thread count (Ray's sampler worker: its own)
    try:
        summary = run_generate(options(manifest_path, tmp_path / "local", n=4, use_ray=False))
    finally:
        torch.set_num_threads(before)
    assert (summary.done, summary.failed) == (4, 0)
    files = sample_files(tmp_path / "local")
    assert len(files) == 4
    for key, by_suffix in files.items():
        assert by_suffix == reference[key], key  # every file, byte for byte


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("use_ray", [False, True], ids=["no-ray", "ray"])
def test_the_bar_moves_per_sample_and_a_batch_is_committed_as_one(
    ray_session, reference, manifest_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_ray: bool
) -> None:
    """A batch of 4 shows 1/4, 2/4, 3/4 as its samples are finished; the store commits it once
    with the same bytes. In-process, a sample is on the bar before the next one's finishing starts."""
    import io

    from rich.console import Console

    import factory.feedback as feedback
    import factory.worker as worker

    terminal = io.StringIO()
    monkeypatch.setattr(feedback, "stderr_console", lambda: Console(file=terminal, force_terminal=True, width=160))
    finishing: list[str] = []  # what the terminal showed when each sample's finishing started (in-process)
    real_finish = worker.finish_sample
    monkeypatch.setattr(worker, "finish_sample", lambda *a, **kw: finishing.append(terminal.getvalue()) or real_finish(*a, **kw))
    commits: list[tuple[int, str]] = []
    real_save = RunStore.save
    monkeypatch.setattr(RunStore, "save", lambda self, results: commits.append((len(results), terminal.getvalue())) or real_save(self, results))

    run = tmp_path / "bar"
    opts = GenerateOptions(manifest=manifest_path, n=4, out=run, model="tiny", batch_size=4, workers=1, use_ray=use_ray)
    summary = run_generate(opts)
    assert (summary.done, summary.failed) == (4, 0)
    assert [n for n, _ in commits] == [4]  # one commit (one journal chunk) for the batch
    shown = commits[0][1]
    assert all(f"{k}/4" in shown for k in (1, 2, 3)) and "img/s" in shown  # each sample before the commit
    if not use_ray:
        assert len(finishing) == 4
        for k, seen in enumerate(finishing):
            assert f"{k}/4" in seen if k else "/4" not in seen  # the samples before it, already on the bar
            assert f"{k + 1}/4" not in seen
    assert sample_files(run) == {k: v for k, v in reference.items() if k in sample_files(run)}
    assert len(sample_files(run)) == 4


# ------------------------------------------------------------------------------ the driver killed


def _generate_cmd(manifest: Path, run: Path, ray_tmp: Path, n: int = N) -> list[str]:
    return [
        sys.executable, "-c", "from cli import main; main()", "generate", "--manifest", str(manifest), "--n", str(n),
        "--out", str(run), "--model", "tiny", "--batch-size", "2", "--ray-tmp", str(ray_tmp),
    ]  # fmt: skip


def _done_files(run: Path) -> int:
    """Committed done samples (files alone do not count: with --writes workers they precede the commit)."""
    try:
        return sum(s == "done" for s in RunStore.open(run).records()["status"].to_pylist())
    except Exception:  # noqa: BLE001 - no run yet, or a chunk being renamed: nothing committed to count
        return 0


def _ray_processes(marker: str) -> list[int]:
    """Pids of processes whose command line, stdout or stderr mentions ``marker`` (the run's Ray
    temp dir): Ray's daemons name it on their command line; its workers (``ray::SamplerWorker``)
    write their output to log files under it."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                names = [(proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")]
                for fd in ("1", "2"):
                    with contextlib.suppress(OSError):
                        names.append(os.readlink(proc / "fd" / fd))
            except OSError:
                continue
            if any(marker in name for name in names):
                pids.append(int(proc.name))
    return pids


def _wait_gone(marker: str, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _ray_processes(marker)
        if not left:
            return []
        time.sleep(0.2)
    return _ray_processes(marker)


@pytest.mark.timeout(HANG_S)
def test_driver_killed_at_random_moments_then_resumed_gives_exactly_n_samples(reference, manifest_path: Path, tmp_path: Path) -> None:
    """SIGKILL (and once SIGTERM, once Ctrl-C) the driver at random moments; re-run each time; check the store."""
    run = tmp_path / "killed"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fk-", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(20240607)
    # (signal, moment): "start" = a random moment in start-up, "work" = a random moment after
    # the run has committed new samples (so every kill interrupts sampling, finishing or commits).
    plan = [(signal.SIGKILL, "work"), (signal.SIGKILL, "start"), (signal.SIGTERM, "work"), (signal.SIGINT, "work"), (None, None)]
    try:
        for sig, moment in plan:
            before = _done_files(run)
            proc = subprocess.Popen(_generate_cmd(manifest_path, run, ray_tmp), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=as_a_foreground_command)  # fmt: skip
            if sig is not None:
                if moment == "start":
                    time.sleep(rng.uniform(1.0, 6.0))
                else:
                    while _done_files(run) <= before and proc.poll() is None:  # new samples committed
                        time.sleep(0.05)
                    time.sleep(rng.uniform(0.0, 1.0))
                if proc.poll() is None:
                    proc.send_signal(sig)
            out, err = proc.communicate(timeout=HANG_S)
            if sig == signal.SIGINT and proc.returncode != 0:
                assert proc.returncode == 130, err
                assert "interrupted;" in err and "re-run the same command to resume" in err
            if sig == signal.SIGTERM:
                # SIGTERM takes Ctrl-C's path (commit what is finished, stop the workers) and exits
                # 143 with its one line; 0: it came as the run finished, and the run had finished.
                # -15: seen once under heavy load, with nothing on stderr: the signal met a handler
                # other than factory's (Ray's native code installs its own); what was committed
                # stays, which the resume below checks.
                assert proc.returncode in (0, 143, -15), err
                assert "Traceback" not in err, err
                if proc.returncode == 143:
                    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)"), err
            if sig is None:
                assert proc.returncode == 0, err
                assert f"{N} planned, {N} done" in out
            left = _wait_gone(str(ray_tmp))
            assert not left, f"Ray processes outlived their driver: {left}"
            RunStore.open(run).index()  # readable whatever the moment of death
    finally:
        for pid in _ray_processes(str(ray_tmp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    check_complete(run, N)
    assert sample_files(run) == reference  # the resumed run made the same samples as an uninterrupted one


# ------------------------------------------------------------------------------ multi-node output

CLUSTER_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[3])  # the driver imports factory from the checkout; the workers cannot
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from factory.generate import GenerateOptions, run_generate
from factory.store import RunStore

manifest, run = Path(sys.argv[1]), Path(sys.argv[2])  # Ray temporary files: RAY_TMPDIR
# The head node (where the driver runs) has no CPU for work: every sampler actor and finishing
# task runs on the second node, and what they make reaches the run store only through the driver.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
worker_node = cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
try:
    summary = run_generate(GenerateOptions(manifest=manifest, n=6, out=run, model="tiny", batch_size=2,
                                           address=cluster.address, progress=False))
    workers = sorted({r["worker"] for r in RunStore.open(run).index().to_pylist()})
    print(json.dumps({"done": summary.done, "failed": summary.failed, "workers": workers,
                      "worker_node": worker_node.node_id[:8], "head_node": cluster.head_node.node_id[:8],
                      "notes": summary.notes}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.timeout(HANG_S)
def test_cluster_two_nodes_write_one_shared_run_killed_and_resumed(reference, manifest_path: Path, tmp_path: Path) -> None:
    """Two Ray nodes on this machine: the workers (all on the second node) write the sample files
    into the one run directory both see (``--writes auto`` picks workers); the driver is killed
    (SIGKILL) once it has committed, its cluster with it, and a new cluster resumes the run."""
    run = tmp_path / "cluster"
    ray_tmp = tempfile.mkdtemp(prefix="fc-", dir="/tmp")
    # Neither PYTHONPATH nor the working directory gives the workers the package: they run the
    # copy the driver ships (runtime_env py_modules), as on a real cluster.
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-c", CLUSTER_SCRIPT, str(manifest_path), str(run), str(REPO)]
    try:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + HANG_S
        while first.poll() is None and time.monotonic() < deadline and not list((run / "index").glob("chunk-*.parquet")):
            time.sleep(0.05)
        killed = first.poll() is None
        first.kill()
        first.communicate()
        for pid in _ray_processes(ray_tmp):  # the cluster's processes outlive a killed script
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not _wait_gone(ray_tmp)
        before = sum(r["status"] == "done" for r in RunStore.open(run).index().to_pylist())
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    finally:
        for pid in _ray_processes(ray_tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert killed and 0 < before < 6 and (result["done"], result["failed"]) == (6 - before, 0)
    assert result["worker_node"] != result["head_node"]
    # workers of both runs (each cluster has its own node ids), none on the driver's node
    assert any(w.endswith("@" + result["worker_node"]) for w in result["workers"])
    assert not any(w.endswith("@" + result["head_node"]) for w in result["workers"])
    assert any("Ray cluster" in note for note in result["notes"])
    assert any(note.startswith("writes: workers (all 2 nodes see the run directory)") for note in result["notes"])
    check_complete(run, 6)  # no orphan or temporary file left by the killed run's workers
    files = sample_files(run)
    assert files == reference_subset(reference, files) and len(files) == 6


def reference_subset(reference: dict, files: dict) -> dict:
    return {k: v for k, v in reference.items() if k in files}


# ------------------------------------------------------------------------------ a signal while Ray starts

#: The driver, with a SIGTERM sent to itself as ``ray.init`` returns: the OS-level handler is then
#: the native failure handler of Ray's core worker, which dumped a stack trace on stderr before
#: passing the signal on (and could end the process by the signal itself).
SIGNAL_IN_INIT = r"""
import os, signal
import ray

init = ray.init
def patched(*args, **kwargs):
    result = init(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return result
ray.init = patched
from cli import main
main()
"""


@pytest.mark.timeout(HANG_S)
def test_sigterm_while_ray_starts_exits_143_with_one_line(manifest_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", SIGNAL_IN_INIT, *_generate_cmd(manifest_path, run, ray_tmp, n=2)[3:]]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S)
        lines = [line for line in proc.stderr.splitlines() if "WARNING" not in line]  # Ray's own notices
        assert proc.returncode == 143, proc.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: terminated (SIGTERM)"), proc.stderr[-3000:]
        assert not _wait_gone(str(ray_tmp)), "Ray processes outlived their driver"
        assert RunStore.open(run).index() is not None
    finally:
        for pid in _ray_processes(str(ray_tmp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ joining a cluster


@pytest.mark.parametrize("address", ["notahost:99999", "foo", "ray://:6379", "host:port"])
def test_a_malformed_address_is_refused_before_the_run_is_made(cli, manifest_path: Path, tmp_path: Path, address: str) -> None:
    res = cli(["generate", "--manifest", manifest_path, "--n", "2", "--model", "tiny", "--out", tmp_path / "r", "--address", address])
    assert res.code == 2 and f"--address {address!r}: expected auto, HOST:PORT" in res.err, res.err
    assert not (tmp_path / "r").exists()


def test_a_cluster_that_does_not_answer_is_reported_in_one_line_at_once(manifest_path: Path, tmp_path: Path) -> None:
    """Ray retries an unreachable head for minutes with Ctrl-C held; factory asks the port first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [*_generate_cmd(manifest_path, tmp_path / "run", tmp_path / "ray", n=2), "--address", "127.0.0.1:1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines == ["error: cannot join the Ray cluster at 127.0.0.1:1: connection refused"], proc.stderr[-3000:]
    assert not _ray_processes(str(tmp_path / "ray"))


def test_cluster_endpoint_reads_the_forms_ray_accepts() -> None:
    from factory.ray_session import cluster_endpoint

    assert cluster_endpoint("auto") is None
    assert cluster_endpoint("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert cluster_endpoint("ray://head.example:10001") == ("head.example", 10001)
    assert cluster_endpoint("[::1]:6379") == ("::1", 6379)
