"""`factory generate` as a user meets it, without a model: the sampler options recorded in the run,
fast refusal of bad arguments, the start-up status and the progress bar (a fake executor stands in
for Ray and the sampler, so nothing here imports torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from factory.errors import InputError
from factory.generate import GenerateOptions, run_generate
from factory.store import RunStore
from tests.fake_run import sample_result


class FakeExecutor:
    """Yields finished samples one batch at a time, like the real executors."""

    def __init__(self, spec, opts, batch: int = 2, on_run=None) -> None:
        self.spec, self.batch, self.on_run = spec, batch, on_run

    def run(self, rows):
        if self.on_run is not None:
            self.on_run()
        for start in range(0, len(rows), self.batch):
            yield [sample_result(row) for row in rows[start : start + self.batch]]

    def close(self) -> None:
        pass


def fake_executor(spec, opts):
    return FakeExecutor(spec, opts)


def _opts(manifest: Path, out: Path, n: int = 4, **kw) -> GenerateOptions:
    return GenerateOptions(manifest=manifest, n=n, out=out, model="tiny", progress=False, **kw)


def test_sampler_options_are_recorded_in_the_run_and_a_resume_with_others_is_refused(small_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    options = {"steps": 3, "guidance": 4.5, "size": "48x32", "scheduler": "euler", "negative_prompt": "lowres"}
    summary = run_generate(_opts(small_manifest, out, **options), executor_factory=fake_executor)
    assert summary.done == 4
    manifest = RunStore.open(out).manifest()  # the manifest as run: RUN/manifest.yaml
    s = manifest.sampler
    assert (s.steps, s.guidance, s.width, s.height, s.scheduler) == (3, 4.5, 48, 32, "euler")
    assert manifest.negative_prompt == "lowres"
    assert set(RunStore.open(out).index()["negative_prompt"].to_pylist()) == {"lowres"}
    assert json.loads((out / "run.json").read_text())["fingerprint"] == manifest.fingerprint()

    # the same values resume; any other value is refused like an edited manifest
    again = run_generate(_opts(small_manifest, out, **options), executor_factory=fake_executor)
    assert again.done == 0 and again.skipped == 4
    for change in ({"steps": 4}, {"guidance": 5.0}, {"size": "48"}, {"scheduler": "ddim"}, {"negative_prompt": ""}):
        with pytest.raises(InputError, match="different manifest.*--restart"):
            run_generate(_opts(small_manifest, out, **{**options, **change}), executor_factory=fake_executor)
    # the manifest's own values are what the options default to
    plain = run_generate(_opts(small_manifest, tmp_path / "plain"), executor_factory=fake_executor)
    assert RunStore.open(plain.run).manifest().sampler.steps == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "--n must be a positive integer"),
        (["--n", "4", "--steps", "0"], "--steps 0: "),
        (["--n", "4", "--guidance", "99"], "--guidance 99.0: "),
        (["--n", "4", "--size", "100"], "--size 100: must be a multiple of 8"),
        (["--n", "4", "--size", "big"], "--size big: give SIZE or WIDTHxHEIGHT"),
        (["--n", "4", "--scheduler", "fast"], "--scheduler 'fast': "),
        # refused here, not by each sampler worker once Ray has started and is loading the model
        (["--n", "4", "--device", "potato"], "--device potato: not a torch device"),
        (["--n", "4", "--device", "cuda:x"], "--device cuda:x: not a torch device"),
    ],
)
def test_bad_arguments_are_refused_before_anything_heavy(cli, small_manifest: Path, tmp_path: Path, args, message) -> None:
    heavy = ("ray", "torch", "factory.worker", "factory.distribute", "factory.finish")
    loaded_before = {m for m in heavy if m in sys.modules}
    res = cli(["generate", "-m", small_manifest, "--out", tmp_path / "r", *args])
    assert res.code == 2 and message in res.err, res.err
    assert {m for m in heavy if m in sys.modules} == loaded_before  # nothing heavy was imported for it
    assert not (tmp_path / "r").exists()


def test_n_0_is_refused_without_importing_ray_torch_or_the_matting_stack(small_manifest: Path, tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys\nfrom cli import main\n"
        f"try:\n    main(['generate', '-m', {str(small_manifest)!r}, '--n', '0'])\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "heavy = ('ray', 'torch', 'diffusers', 'numba', 'factory.worker', 'factory.finish')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.stdout.strip() == "2 []", (res.stdout, res.stderr)
    assert "--n must be a positive integer" in res.stderr


@pytest.fixture
def terminal(monkeypatch):
    """The feedback console as a captured terminal (what a user would see on stderr)."""
    import io

    from rich.console import Console

    import factory.feedback as feedback

    buf = io.StringIO()
    monkeypatch.setattr(feedback, "stderr_console", lambda: Console(file=buf, force_terminal=True, width=160))
    return buf


def test_start_up_status_is_shown_before_the_model_loads_then_a_bar(small_manifest: Path, tmp_path: Path, terminal) -> None:
    seen: dict[str, str] = {}

    def make(spec, opts):
        seen["model_loading"] = terminal.getvalue()  # the executor is where Ray starts and models load
        return FakeExecutor(spec, opts, batch=1, on_run=lambda: seen.setdefault("first_batch", terminal.getvalue()))

    opts = GenerateOptions(manifest=small_manifest, n=3, out=tmp_path / "run", model="tiny", progress=True)
    summary = run_generate(opts, executor_factory=make)
    assert summary.done == 3
    before = seen["model_loading"]
    assert "generate: planning 3 samples" in before and "generate: starting Ray" in before
    assert "generate: loading the model on 1 worker and warming up" in seen["first_batch"]
    after = terminal.getvalue()[len(seen["first_batch"]):]
    assert "1/3" in after and "2/3" in after and "3/3" in after and "img/s" in after  # one step per sample


def test_quiet_shows_nothing_and_verbose_prints_each_phase(cli, small_manifest: Path, tmp_path: Path, terminal, monkeypatch) -> None:
    import factory.generate as generate

    monkeypatch.setattr(generate, "_default_executor", fake_executor)
    res = cli(["generate", "-m", small_manifest, "--n", "2", "--out", tmp_path / "q", "-q"])
    assert res.code == 0 and res.out == "" and terminal.getvalue() == ""
    res = cli(["-v", "generate", "-m", small_manifest, "--n", "2", "--out", tmp_path / "v"])
    assert res.code == 0 and "samples: 2 planned, 2 done" in res.out
    log = terminal.getvalue()
    for phase in ("checking the model", "planning 2 samples", "starting Ray", "loading the model on 1 worker"):
        assert f"s] generate: {phase}" in log


def test_a_prompt_cut_at_77_tokens_is_recorded_and_warned_on_the_console(small_manifest: Path, tmp_path: Path, terminal) -> None:
    class LongPrompts(FakeExecutor):
        def run(self, rows):
            for results in super().run(rows):
                for r in results:
                    r.fields["prompt_tokens"] = 90 if r.plan["index"] % 2 else 20
                yield results

    opts = GenerateOptions(manifest=small_manifest, n=6, out=tmp_path / "run", model="tiny", progress=True)
    summary = run_generate(opts, executor_factory=lambda spec, o: LongPrompts(spec, o))
    index = RunStore.open(summary.run).index()
    assert index["prompt_tokens"].to_pylist() == [20, 90, 20, 90, 20, 90]
    warnings = [line[line.index("warning: "):] for line in terminal.getvalue().splitlines() if "warning: " in line]
    assert warnings and all("90 CLIP tokens" in w and "keeps the first 77" in w for w in warnings)
    assert any("3 samples" in note and "cut at 77 CLIP tokens" in note for note in summary.notes)


def test_the_plan_is_written_beside_the_run_not_before_it(small_manifest: Path, tmp_path: Path, terminal) -> None:
    """Nothing before the first sample costs N (issue 20): no plan-writing phase; plan.parquet is
    written in the background and complete at the end."""
    from factory.manifest import load_manifest
    from factory.plan import build_plan

    run_generate(GenerateOptions(manifest=small_manifest, n=6, out=tmp_path / "run", model="tiny"), executor_factory=FakeExecutor)
    assert "writing the plan" not in terminal.getvalue()
    assert RunStore.open(tmp_path / "run").plan().equals(build_plan(load_manifest(small_manifest), 6))


def test_version_and_a_clean_help(cli, monkeypatch) -> None:
    import factory

    monkeypatch.setenv("COLUMNS", "200")

    res = cli(["--version"])
    assert res.code == 0 and res.out.strip() == f"factory {factory.__version__}"
    top = cli(["--help"]).out
    assert all(flag in top for flag in ("--debug", "--quiet", "--verbose", "--version"))
    for command in ("plan", "generate", "matte", "eval", "filter", "export", "train"):
        text = cli([command, "--help"]).out
        assert "Usage: factory " in text and "<bool>" not in text, command  # flags take no value
    plan = cli(["plan", "--help"]).out
    # each paragraph wraps to the terminal's width, not at the docstring's line ends
    assert any("a larger N keeps the first rows unchanged. Prints a summary" in line for line in plan.splitlines()), plan
    matte = cli(["matte", "--help"]).out
    assert "Usage: factory matte [OPTIONS] IN_DIR" in matte and "{in_dir}" not in matte
    generate = cli(["generate", "--help"]).out
    assert all(option in generate for option in ("--steps", "--guidance", "--size", "--scheduler", "--negative-prompt"))
    # --model names every kind of source the README's model table lists, the shipped toy model too
    assert all(source in " ".join(generate.split()) for source in ("'tiny'", "'toy'", "diffusers folder", "DiffuMatting checkpoint", "hub id"))


def test_an_eof_error_from_a_command_is_an_internal_error_not_an_abort(cli, tmp_path: Path, monkeypatch) -> None:
    """typer would show an EOFError escaping a command as Ctrl-C's ``aborted`` (exit 130); it is an
    unexpected error like any other: one line, exit 1. A real Ctrl-C still exits 130."""
    import factory.toy.dataset as toy_dataset

    def raises(error: BaseException):
        def write_toy_set(*args, **kwargs):
            raise error

        return write_toy_set

    monkeypatch.setattr(toy_dataset, "write_toy_set", raises(EOFError("Ran out of input")))
    res = cli(["toy-data", "--out", tmp_path / "toy"])
    assert res.code == 1, res.err
    assert res.err == "error: internal error: EOFError: Ran out of input (re-run with --debug for details)\n", res.err
    with pytest.raises(EOFError, match="Ran out of input"):
        cli(["--debug", "toy-data", "--out", tmp_path / "toy"])
    monkeypatch.setattr(toy_dataset, "write_toy_set", raises(KeyboardInterrupt()))
    res = cli(["toy-data", "--out", tmp_path / "toy"])
    assert res.code == 130 and res.err == "error: interrupted\n", res.err


def test_a_run_that_fails_before_its_first_sample_does_not_become_the_latest_run(small_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    from factory.errors import RunError
    from factory.store import resolve_run

    monkeypatch.chdir(tmp_path)
    run_generate(_opts(small_manifest, tmp_path / "good"), executor_factory=fake_executor)
    assert resolve_run(None) == (tmp_path / "good").resolve()

    class ModelFails(FakeExecutor):
        def run(self, rows):
            raise RunError("the model did not load")

    with pytest.raises(RunError):
        run_generate(_opts(small_manifest, tmp_path / "broken"), executor_factory=lambda spec, o: ModelFails(spec, o))
    assert (tmp_path / "broken").is_dir()  # the folder is there, to be taken over by a corrected command
    assert resolve_run(None) == (tmp_path / "good").resolve()  # filter and export still default to the good run

    class DiesAfterOneBatch(FakeExecutor):
        def run(self, rows):
            yield from list(super().run(rows))[:1]
            raise RunError("a worker died")

    with pytest.raises(RunError):
        run_generate(_opts(small_manifest, tmp_path / "partial"), executor_factory=lambda spec, o: DiesAfterOneBatch(spec, o))
    assert resolve_run(None) == (tmp_path / "partial").resolve()  # it made samples: resume it, filter it


def test_without_a_pointer_the_newest_run_that_made_samples_is_the_default(small_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    from factory.errors import RunError
    from factory.store import LATEST_RUN_FILE, resolve_run

    monkeypatch.chdir(tmp_path)
    run_generate(_opts(small_manifest, Path("runs/good")), executor_factory=fake_executor)
    (tmp_path / LATEST_RUN_FILE).unlink()

    class ModelFails(FakeExecutor):
        def run(self, rows):
            raise RunError("the model did not load")

    with pytest.raises(RunError):
        run_generate(_opts(small_manifest, Path("runs/broken")), executor_factory=lambda spec, o: ModelFails(spec, o))
    assert not (tmp_path / LATEST_RUN_FILE).exists()
    assert resolve_run(None) == (tmp_path / "runs/good").resolve()
