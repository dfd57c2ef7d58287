"""Recovery and hardening: what a crash, a signal, a hostile path or an odd option leaves behind,
and that the same command then works. Generation here uses a fake executor (tests/fake_run.py's
samples, no model) unless a test is about the model; signal tests run the CLI in a subprocess
that blocks at a chosen point (an event), never at a chosen time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import factory.generate as generate
from factory.fsutil import FileLock
from factory.store import RunStore
from tests.conftest import fail_mkdir_under
from tests.fake_run import make_run, sample_result
from tests.processes import as_a_foreground_command

REPO = Path(__file__).resolve().parent.parent


class FakeExecutor:
    """Finished samples without a model: tests/fake_run.py's, two per batch."""

    def __init__(self, spec: object, opts: object) -> None:
        pass

    def run(self, rows):
        for start in range(0, len(rows), 2):
            yield [sample_result(r) for r in rows[start : start + 2]]

    def close(self) -> None:
        pass


@pytest.fixture
def fake_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "_default_executor", FakeExecutor)


def gen_args(manifest: Path, run: Path, n: int = 4) -> list:
    return ["generate", "--manifest", manifest, "--n", n, "--out", run, "--model", "tiny", "--no-ray"]


# ------------------------------------------------------------------------------ 15.1 nothing outside the run


def test_resume_never_deletes_or_follows_anything_outside_the_run(cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(gen_args(small_manifest, run)).code == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (outside / "small-00007000-fern.png").write_bytes(b"named like a sample of bucket 7")
    os.symlink(outside, run / "samples" / "00007")  # a bucket folder that is a symlink
    bucket = run / "samples" / "00000"
    (bucket / "notes.txt").write_text("mine")  # a foreign file among the samples
    os.symlink(outside / "precious.txt", bucket / "small-00000009-owl.png")  # a symlink named as a sample
    res = cli(gen_args(small_manifest, run))
    assert res.code == 0, res.err
    assert (outside / "precious.txt").read_text() == "keep me"
    assert (outside / "small-00007000-fern.png").exists()
    assert (bucket / "notes.txt").read_text() == "mine"
    assert (bucket / "small-00000009-owl.png").is_symlink()
    line = [ln for ln in res.out.splitlines() if ln.startswith("left alone:")]
    assert len(line) == 1 and "3 entries" in line[0] and "samples/00007 (symlink)" in line[0], res.out
    assert "4 planned, 4 done (0 now, 4 before)" in res.out


def test_a_bucket_of_this_run_that_is_a_symlink_is_refused_and_left_alone(cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(gen_args(small_manifest, run)).code == 0
    outside = tmp_path / "elsewhere"
    (run / "samples" / "00000").rename(outside)
    os.symlink(outside, run / "samples" / "00000")
    key = RunStore.open(run).plan()["key"][3].as_py()
    (outside / f"{key}.png").unlink()  # a sample to redo: it must not be written through the link
    before = sorted(p.name for p in outside.iterdir())
    res = cli(gen_args(small_manifest, run))
    assert res.code == 2 and res.err.count("\n") == 1 and "is a symlink" in res.err, res.err
    assert sorted(p.name for p in outside.iterdir()) == before


def test_folder_export_never_deletes_or_writes_through_anything_outside(cli, tmp_path: Path) -> None:
    make_run(tmp_path, 6)
    run, out = tmp_path / "run", tmp_path / "export"
    args = ["export", "--run", run, "--format", "folder", "--all", "--out", out, "--split", "none"]
    assert cli(args).code == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.png").write_bytes(b"keep me")
    (out / "train" / "alpha" / "notes.txt").write_text("mine")  # a foreign file in an export folder
    os.symlink(outside / "precious.png", out / "train" / "fg" / "small-00000099-owl.png")
    res = cli([*args, "--alpha-bits", "16"])  # another plan: the export starts over
    assert res.code == 0, res.err
    assert (out / "train" / "alpha" / "notes.txt").read_text() == "mine"
    assert (outside / "precious.png").read_bytes() == b"keep me"
    assert "left alone:" in res.err and "notes.txt" in res.err
    # A split folder that is a symlink is refused in one line; nothing is written through it.
    for sub in ("image", "alpha", "fg"):
        for p in (out / "train" / sub).iterdir():
            if not p.is_symlink() and p.name != "notes.txt":
                p.unlink()
    (out / "train" / "image").rmdir()
    os.symlink(outside, out / "train" / "image")
    res = cli([*args, "--restart"])
    assert res.code == 2 and res.err.count("\n") == 1 and "is a symlink" in res.err, res.err
    assert sorted(p.name for p in outside.iterdir()) == ["precious.png"]


# ------------------------------------------------------------------------------ 15.2 killed before it started


def test_a_folder_left_by_a_start_killed_while_planning_is_taken_over(cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").touch()
    (run / ".tmp-plan.parquet.4242.0123abcd").write_bytes(b"PAR1 half a plan")
    (run / "samples").mkdir()
    res = cli(gen_args(small_manifest, run))
    assert res.code == 0, res.err
    assert "4 planned, 4 done (4 now, 0 before)" in res.out
    assert not list(run.glob(".tmp-*"))
    # ... but not while another process holds its lock, nor with a file the store did not write.
    other = tmp_path / "other"
    other.mkdir()
    (other / ".tmp-plan.parquet.1.x").touch()
    lock = FileLock(other / ".lock", "held")
    try:
        res = cli(gen_args(small_manifest, other))
        assert res.code == 2 and "another factory process is writing" in res.err
    finally:
        lock.release()
    (other / "mine.txt").write_text("x")
    res = cli(gen_args(small_manifest, other))
    assert res.code == 2 and "exists and is not a run directory" in res.err
    assert (other / "mine.txt").read_text() == "x"


def test_an_export_killed_before_its_first_shard_is_taken_over(cli, tmp_path: Path) -> None:
    make_run(tmp_path, 4)
    out = tmp_path / "export"
    out.mkdir()
    (out / ".lock").touch()
    (out / ".tmp-export.json.4242.0123abcd").write_text("{")
    res = cli(["export", "--run", tmp_path / "run", "--all", "--out", out, "--split", "none"])
    assert res.code == 0, res.err
    assert (out / "train-000000.tar").is_file() and not list(out.glob(".tmp-*"))


BLOCKING_DRIVER = r"""
import faulthandler, signal, sys, threading
faulthandler.register(signal.SIGUSR1, all_threads=True)  # where every thread is, if it hangs
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import factory.plan as plan

marker = Path(sys.argv[2])
real = plan.plan_chunks

def blocked(manifest, n, size=plan.PLAN_ROW_GROUP, start=0):  # one row group to the writer, then it stops
    for chunk in real(manifest, n, size, start):
        yield chunk
        marker.touch()
        threading.Event().wait()

plan.plan_chunks = blocked
from cli import main
main(sys.argv[3:])
"""


def _driver(small_manifest: Path, run: Path, marker: Path) -> subprocess.Popen:
    args = [str(a) for a in gen_args(small_manifest, run)]
    return subprocess.Popen(
        [sys.executable, "-c", BLOCKING_DRIVER, str(REPO), str(marker), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=as_a_foreground_command,
    )  # fmt: skip



def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    import time

    while not path.exists():  # an event (the file), polled; the test's timeout bounds it
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_while_the_plan_is_written_then_the_same_command_succeeds(sig, cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "planning"
    proc = _driver(small_manifest, run, marker)
    _wait_for(marker, proc)
    assert list(run.glob(".tmp-plan.parquet.*"))  # caught in the middle of writing the plan
    proc.send_signal(sig)
    if sig == signal.SIGKILL:
        # Its exit, not its pipes: the test is about what the folder holds after the kill.
        assert proc.wait(timeout=200) == -9
        proc.stdout.close()
        proc.stderr.close()
    else:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the driver prints its threads' stacks ...
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the driver did not stop on {signal.Signals(sig).name}; its threads:\n{err}")
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        assert err.count("\n") == 1 and err.startswith({signal.SIGINT: "error: interrupted", signal.SIGTERM: "error: terminated (SIGTERM)"}[sig]), err
        # The plan is written in the background while the run works (issue 20): the signal lands
        # wherever the run is; a run that only waits for the plan says "while writing the plan".
    res = cli(gen_args(small_manifest, run))  # the same command, in this process
    assert res.code == 0, res.err
    assert "4 planned, 4 done" in res.out  # the plan is written beside the run (issue 20): samples may be done
    assert len(RunStore.open(run).records()) == 4
    assert RunStore.open(run).plan().num_rows == 4 and not list(run.glob(".tmp-*"))


# ------------------------------------------------------------------------------ 15.5 OS errors, one line


def test_export_disk_full_is_one_line_and_the_same_command_resumes(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.full_disk import fill_disk_at_shard_add

    make_run(tmp_path, 6)
    out = tmp_path / "export"
    args = ["export", "--run", tmp_path / "run", "--all", "--out", out, "--split", "none", "--maxcount", 2]
    fill_disk_at_shard_add(monkeypatch, 3)  # the first sample of the second shard
    res = cli(args)
    assert res.code == 1 and res.err.count("\n") == 1, res.err
    assert "disk full while writing" in res.err and "re-run the same command to resume" in res.err
    assert (out / "train-000000.tar").is_file() and not list(out.glob(".tmp-*"))
    monkeypatch.undo()
    res = cli(args)
    assert res.code == 0, res.err
    assert "resumed: 2 samples already written were kept" in res.out


def test_filter_on_a_read_only_run_is_one_line_and_dry_run_works(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    make_run(tmp_path, 4)
    fail_mkdir_under(monkeypatch, tmp_path / "run", errno.EROFS)
    assert cli(["filter", "--run", tmp_path / "run", "--dry-run"]).code == 0
    res = cli(["filter", "--run", tmp_path / "run"])
    assert res.code == 1 and res.err.count("\n") == 1 and "read-only file system" in res.err, res.err


def test_generate_refuses_an_out_path_that_is_not_utf8(cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / os.fsdecode(b"run-\xff")
    res = cli(gen_args(small_manifest, run))
    assert res.code == 2 and res.err.count("\n") == 1 and "not valid UTF-8" in res.err, res.err
    assert not os.path.lexists(run)


def test_a_manifest_name_too_long_for_sample_file_names_is_refused_up_front(cli, tmp_path: Path) -> None:
    from tests.conftest import SMALL_MANIFEST, write_manifest

    manifest = write_manifest(tmp_path, SMALL_MANIFEST.replace("name: small", "name: " + "a" * 170))
    res = cli(["generate", "--manifest", manifest, "--n", 2, "--out", tmp_path / "run", "--model", "tiny", "--no-ray"])
    assert res.code == 2 and res.err.count("\n") == 1 and "at most 150" in res.err, res.err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 15.9 exit codes everywhere


def test_eval_checks_its_json_path_before_the_work(cli, tmp_path: Path) -> None:
    from PIL import Image

    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        Image.new("L", (8, 8), 128).save(tmp_path / folder / "a.png")
    json_out = tmp_path / ("m" * 245 + ".json")  # fits, but its temporary name does not
    res = cli(["eval", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--json", json_out, "--workers", 1])
    assert res.code == 2 and res.err.count("\n") == 1 and "cannot write this file" in res.err, res.err
    assert "SAD" not in res.out  # refused before any metric was computed


def test_matte_on_an_empty_folder_creates_no_output_folder(cli, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    res = cli(["matte", tmp_path / "in", "--out", tmp_path / "out"])
    assert res.code == 2 and "no images" in res.err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 15.7 smaller holes


def test_filter_while_generate_writes_the_run_says_so(cli, tmp_path: Path) -> None:
    make_run(tmp_path, 4)
    lock = FileLock(tmp_path / "run" / ".lock", "held")  # as a running generate holds it
    try:
        res = cli(["filter", "--run", tmp_path / "run"])
    finally:
        lock.release()
    assert res.code == 0
    warning = [ln for ln in res.err.splitlines() if "is being written" in ln]
    assert len(warning) == 1 and "read the 4 samples done so far of 4 planned" in warning[0], res.err
    assert "is being written" not in cli(["filter", "--run", tmp_path / "run"]).err


def test_export_all_while_generate_writes_the_run_says_so_a_selection_does_not(cli, tmp_path: Path) -> None:
    make_run(tmp_path, 4)
    assert cli(["filter", "--run", tmp_path / "run"]).code == 0
    lock = FileLock(tmp_path / "run" / ".lock", "held")  # as a running generate holds it
    try:
        every = cli(["export", "--run", tmp_path / "run", "--all", "--out", tmp_path / "all"])
        chosen = cli(["export", "--run", tmp_path / "run", "--out", tmp_path / "chosen"])
    finally:
        lock.release()
    assert every.code == 0 and chosen.code == 0, every.err + chosen.err
    warning = [ln for ln in every.err.splitlines() if "is being written" in ln]
    assert len(warning) == 1 and "holds the 4 samples done so far" in warning[0], every.err
    assert "is being written" not in chosen.err  # a selection is what it is, however the run goes on
    again = cli(["export", "--run", tmp_path / "run", "--all", "--out", tmp_path / "all"])
    assert again.code == 0 and "is being written" not in again.err


def test_seed_minus_one_is_refused_on_the_command_line_as_in_a_manifest(cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    for command in (["plan", "--manifest", small_manifest, "--n", 2], gen_args(small_manifest, tmp_path / "run")):
        res = cli([*command, "--seed", -1])
        assert res.code == 2 and res.err.count("\n") == 1 and "--seed" in res.err, res.err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 15.6 nothing recorded before it is true


def test_a_run_with_no_committed_sample_takes_the_corrected_model(cli, small_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import factory.sampler

    from tests import fault_samplers

    run = tmp_path / "run"

    def broken(spec, opts):
        fault_samplers.broken_model(spec.model, spec.sampler, spec.canvas)

    monkeypatch.setattr(generate, "_default_executor", broken)
    monkeypatch.setattr(factory.sampler, "model_identity", lambda model: "typo:/nowhere")
    res = cli(gen_args(small_manifest, run))
    assert res.code == 2 and "model weights not found" in res.err
    monkeypatch.setattr(generate, "_default_executor", FakeExecutor)
    monkeypatch.setattr(factory.sampler, "model_identity", lambda model: "fixed:1")
    res = cli(gen_args(small_manifest, run))
    assert res.code == 0, res.err
    assert RunStore.open(run).info["model"] == "fixed:1"
    # Once samples exist, another model is refused as before.
    monkeypatch.setattr(factory.sampler, "model_identity", lambda model: "other:2")
    res = cli(gen_args(small_manifest, run))
    assert res.code == 2 and "made with a different model" in res.err


# ------------------------------------------------------------------------------ 15.8 nothing shrinks or doubles silently


def test_a_smaller_n_is_refused_unless_shrink(cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(gen_args(small_manifest, run, n=6)).code == 0
    res = cli(gen_args(small_manifest, run, n=4))
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "has 6 planned samples" in res.err and "leave 2 done samples" in res.err and "--shrink" in res.err
    assert RunStore.open(run).plan_size() == 6  # nothing rewritten
    res = cli([*gen_args(small_manifest, run, n=4), "--shrink"])
    assert res.code == 0 and "4 planned, 4 done (0 now, 4 before)" in res.out, res.err


def test_a_smaller_n_with_another_manifest_names_the_manifest_not_shrink(
    cli, fake_executor, small_manifest: Path, grid_manifest: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert cli(gen_args(small_manifest, run, n=6)).code == 0
    res = cli(gen_args(grid_manifest, run, n=4))
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "made by a different manifest" in res.err and "--shrink" not in res.err, res.err


def test_the_same_lora_twice_is_refused(cli, fake_executor, small_manifest: Path, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    res = cli([*gen_args(small_manifest, tmp_path / "run"), "--lora", f"{lora}:0.5", "--lora", f"{lora}:0.8"])
    assert res.code == 2 and res.err.count("\n") == 1 and "given twice" in res.err, res.err
    assert not (tmp_path / "run").exists()


def test_an_n_beyond_the_free_disk_space_is_refused_up_front(cli, fake_executor, small_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    res = cli(gen_args(small_manifest, tmp_path / "run", n=1000))
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "the 1000 samples to make need about" in res.err and "has 1.0 MB free" in res.err  # a unit that shows the figure
    assert not (tmp_path / "run").exists()
    assert cli(gen_args(small_manifest, tmp_path / "run", n=4)).code == 0  # what fits is not refused
    # tiny (and toy) draw at most 64 px whatever --size asks: 40 samples fit in 1 MB at that size
    res = cli([*gen_args(small_manifest, tmp_path / "run512", n=1000), "--size", "512"])
    assert res.code == 2 and "each at 64x64" in res.err, res.err
    assert cli([*gen_args(small_manifest, tmp_path / "run512", n=40), "--size", "512"]).code == 0


# ------------------------------------------------------------------------------ 15.2 / 15.10 signals and Ray processes

FAKE_DRIVER = r"""
import subprocess, sys, threading
child = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"])  # as Ray's daemons
print(child.pid, flush=True)
threading.Event().wait()
"""


@pytest.mark.timeout(120)
def test_the_watchdog_stops_what_a_killed_driver_started(tmp_path: Path) -> None:
    import time

    from factory import ray_watchdog

    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER], stdout=subprocess.PIPE, text=True)
    child = int(driver.stdout.readline())
    watchdog = subprocess.Popen([sys.executable, ray_watchdog.__file__, str(driver.pid)], stdout=subprocess.PIPE, text=True)
    assert watchdog.stdout.readline().strip() == "watching"  # its first look at the driver's processes
    driver.kill()  # kill -9: no clean-up of its own
    driver.wait()
    watchdog.wait(timeout=100)
    while os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split(")")[-1][:3]:
        time.sleep(0.05)  # the child is gone (or a zombie waiting for init to reap it)


def test_a_sigterm_while_ray_shuts_down_is_held_until_the_shutdown_is_done() -> None:
    from factory.distribute.executor import sigint_deferred
    from factory.errors import Terminated, install_sigterm_handler

    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm_handler()
    finished = []
    try:
        with pytest.raises(Terminated):
            with sigint_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # the handler runs here, between bytecodes: it must only take note
                finished.append(True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert finished == [True]


FINISHED_DRIVER = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import factory.generate as generate
from tests.test_recovery import FakeExecutor

generate._default_executor = FakeExecutor
finished, go = Path(sys.argv[2]), Path(sys.argv[3])
real = generate.run_generate

def run_then_wait(*args, **kw):  # the run is over; the summary is not printed yet
    summary = real(*args, **kw)
    finished.touch()
    while not go.exists():
        time.sleep(0.05)
    return summary

generate.run_generate = run_then_wait
from cli import main
main(sys.argv[4:])
"""


@pytest.mark.timeout(300)
def test_a_sigterm_once_the_run_has_finished_leaves_exit_0(small_manifest: Path, tmp_path: Path) -> None:
    run, finished, go = tmp_path / "run", tmp_path / "finished", tmp_path / "go"
    args = [str(a) for a in gen_args(small_manifest, run)]
    proc = subprocess.Popen(
        [sys.executable, "-c", FINISHED_DRIVER, str(REPO), str(finished), str(go), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for(finished, proc)
    proc.send_signal(signal.SIGTERM)
    go.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "4 planned, 4 done (4 now, 0 before)" in out and "error" not in err


# ------------------------------------------------------------------------------ 15.10 signals in start-up


class _InterruptedImport:
    """A module whose names cannot be read: as if Ctrl-C came while the worker side was imported."""

    def __getattr__(self, name: str):
        raise KeyboardInterrupt


def test_ctrl_c_while_the_worker_side_is_imported_says_what_to_run(cli, fake_executor, small_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "factory.finish", _InterruptedImport())
    result = cli(gen_args(small_manifest, run))
    assert result.code == 130, result.err
    assert result.err.count("\n") == 1 and result.err.startswith("error: interrupted;"), result.err
    assert "re-run the same command to resume" in result.err
    monkeypatch.undo()
    result = cli(gen_args(small_manifest, run))
    assert result.code == 0, result.err


def test_out_through_a_dangling_symlink_says_so_in_one_line(cli, small_manifest: Path, tmp_path: Path) -> None:
    """``--out`` a symlink to nothing (or inside one): it said 'output directory is not writable (File
    exists)', which is neither; nothing is created through the link."""
    link = tmp_path / "dang"
    link.symlink_to(tmp_path / "gone" / "run")
    for out in (link, link / "sub"):
        res = cli(gen_args(small_manifest, out))
        assert res.code == 2 and res.err.count("\n") == 1, res.err
        assert f"{link}: is a symlink to {tmp_path / 'gone' / 'run'}, which does not exist" in res.err, res.err
    assert not (tmp_path / "gone").exists() and link.is_symlink()


@pytest.mark.parametrize("folder", ["samples", "index"])
def test_a_samples_or_index_folder_that_is_a_symlink_is_refused_and_left_alone(
    folder: str, cli, fake_executor, small_manifest: Path, tmp_path: Path
) -> None:
    """The run's samples/ (or index/) replaced by a link to a folder elsewhere: generate (a resume,
    a --restart) and check --repair refuse it in one line and write or delete nothing there,
    not even a file named as one of this run's samples."""
    run = tmp_path / "run"
    assert cli(gen_args(small_manifest, run)).code == 0
    outside = tmp_path / "elsewhere"
    (run / folder).rename(outside)
    os.symlink(outside, run / folder)
    stray = outside / ("00000/small-00000009-owl.png" if folder == "samples" else "chunk-000000099.parquet")
    stray.write_bytes(b"named like this run's, not its")
    before = sorted((p.relative_to(outside), p.read_bytes()) for p in outside.rglob("*") if p.is_file())
    for args in (gen_args(small_manifest, run), [*gen_args(small_manifest, run), "--restart"], ["check", "--run", run, "--repair"]):
        res = cli(args)
        assert res.code == 2 and res.err.count("\n") == 1 and f"{run / folder}: is a symlink" in res.err, (args, res.err)
        assert sorted((p.relative_to(outside), p.read_bytes()) for p in outside.rglob("*") if p.is_file()) == before


#: The command line, with a signal sent to itself while typer builds the command (the command's
#: option annotations evaluated: a few hundred ms on a loaded machine, before any work starts).
SIGNAL_WHILE_PARSING = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import typer.main

real = typer.main.get_command
def signalled(app):
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    return real(app)
typer.main.get_command = signalled
from cli import main
main(sys.argv[3:])
"""


@pytest.mark.parametrize(("sig", "code", "line"), [("SIGTERM", 143, "error: terminated (SIGTERM)"), ("SIGINT", 130, "error: interrupted")])
def test_a_signal_while_the_command_line_is_read_is_one_line(sig: str, code: int, line: str, tmp_path: Path) -> None:
    out = tmp_path / "toy"
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_PARSING, str(REPO), sig, "toy-data", "--out", str(out), "--n", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=as_a_foreground_command,
    )  # fmt: skip
    assert proc.returncode == code and proc.stderr == line + "\n", proc.stderr
    assert not out.exists()
