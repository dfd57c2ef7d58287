"""`factory train` as diffusers users drive it: --resume_from_checkpoint latest|PATH, fp16 mixed
precision with loss scaling, W&B in offline mode, and the one-line errors of a resume with no run,
of a resume from a damaged checkpoint, of an unwritable --out and of a bad training-config file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from factory.errors import InputError
from factory.train import TrainOptions, run_train, run_folder
from tests.conftest import fail_mkdir_under
from tests.test_train_loop import FAST
from tests.train_toy import make_toy_folder

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_folder(tmp_path_factory.mktemp("toy") / "data", n=4, size=32)


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resume_without_a_run_and_config_file_errors(toy: Path, tmp_path: Path, cli) -> None:
    r = cli(["train", "--data", toy, "--out", tmp_path / "empty", "--resume"])
    assert r.code == 2 and r.err.strip() == f"error: {(tmp_path / 'empty').resolve()}: holds no training run to resume (no train.json or checkpoints); run without --resume to start one"
    r = cli(["train", "--data", toy, "--out", tmp_path / "empty", "--resume_from_checkpoint", "step-00000001"])
    assert r.code == 2 and "holds no training run to resume" in r.err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: -1\nresolution: 32\n")
    r = cli(["train", "--data", toy, "--out", tmp_path / "o", "--config", bad])
    assert r.code == 2 and r.err.startswith(f"error: {bad}: lr: Input should be greater than 0"), r.err
    bad.write_text("learning_rate: 0.1\n")
    r = cli(["train", "--data", toy, "--out", tmp_path / "o", "--config", bad])
    assert r.code == 2 and r.err.startswith(f"error: {bad}: learning_rate: Extra inputs are not permitted"), r.err
    r = cli(["train", "--data", toy, "--out", tmp_path / "o", "--mixed_precision", "fp8"])
    assert r.code == 2 and r.err.startswith("error: command line: mixed_precision: Input should be"), r.err
    bad.write_bytes(b"\x7fELF\x02\x01\x01\x00\xd0\xcf")  # not text: it was an internal error (UnicodeDecodeError)
    r = cli(["train", "--data", toy, "--out", tmp_path / "o", "--config", bad])
    assert r.code == 2 and r.err.startswith(f"error: {bad}: cannot read the training config (not UTF-8 text"), r.err
    assert r.err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_fp16_run_resumes_exactly_from_an_earlier_checkpoint(toy: Path, tmp_path: Path) -> None:
    """On a diffusers base (frozen parts held in fp16): checkpoints get float32 VAE and text encoder
    files, shared by hard links between checkpoints, and a resume from step 1 redoes step 2 exactly."""
    from factory.sampler import build_tiny_pipeline

    base = tmp_path / "sd"
    build_tiny_pipeline(seed=0).save_pretrained(base)
    out = tmp_path / "run"
    over = {**FAST, "model": str(base), "data": [str(toy)], "steps": 2, "checkpoint_every": 1, "keep_checkpoints": 3,
            "mixed_precision": "fp16", "report_to": "none"}  # fmt: skip
    s = run_train(TrainOptions(out=out, overrides=over, progress=False))
    assert s.step == 2
    vae_files = [out / f"checkpoints/step-0000000{i}/vae/diffusion_pytorch_model.safetensors" for i in (1, 2)]
    assert vae_files[0].stat().st_ino == vae_files[1].stat().st_ino == (out / "vae/diffusion_pytorch_model.safetensors").stat().st_ino
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(vae_files[0])).values()} == {torch.float32}
    first = [json.loads(x) for x in (out / run_folder.LOG_FILE).read_text().splitlines()]
    assert all(x["grad_scale"] > 0 for x in first)
    assert torch.load(out / "checkpoints/step-00000002/training_state/optimizer.pt", weights_only=True)["grad_scaler"]["scale"] > 0
    final = _unet(out / "checkpoints/step-00000002")
    again = run_train(TrainOptions(out=out, resume_from=str(out / "checkpoints/step-00000001"), progress=False))
    assert (again.start_step, again.step) == (1, 2)
    assert any("deleted the later step-00000002" in n for n in again.notes)
    second = [json.loads(x) for x in (out / run_folder.LOG_FILE).read_text().splitlines()]
    assert [x["loss"] for x in second] == [x["loss"] for x in first]
    redone = _unet(out / "checkpoints/step-00000002")
    assert all(torch.equal(final[k], redone[k]) for k in final)
    assert json.loads((out / "diffumatting.json").read_text())["latest_checkpoint"] == "checkpoints/step-00000002"
    with pytest.raises(InputError, match="not a complete checkpoint of the run"):
        run_train(TrainOptions(out=out, resume_from="step-00000099", progress=False))
    # 'latest' on a folder with no run starts one, as in diffusers' scripts
    fresh = run_train(TrainOptions(out=tmp_path / "new", overrides={**over, "steps": 1}, resume_from="latest", progress=False))
    assert fresh.step == 1 and any("started a new one" in n for n in fresh.notes)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_and_a_missing_tracker(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "w"
    over = {**FAST, "data": [str(toy)], "steps": 1, "report_to": "wandb"}
    assert run_train(TrainOptions(out=out, overrides=over, progress=False)).step == 1
    (run,) = (out / "logs" / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(InputError, match=r"^--report_to wandb needs the wandb package: pip install wandb"):
        run_train(TrainOptions(out=tmp_path / "x", overrides=over, progress=False))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_prints_nothing_with_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """-q leaves only warnings and errors (README): W&B's own banner and run summary are left out."""
    from factory import feedback
    from factory.train.report import WandbReporter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    feedback.set_verbosity(feedback.QUIET)
    try:
        reporter = WandbReporter(tmp_path / "run", {"lr": 1.0})
        reporter.log({"step": 1, "loss": 0.5})
        reporter.close()
    finally:
        feedback.set_verbosity(feedback.NORMAL)
    captured = capfd.readouterr()
    shown = [line for line in (captured.out + captured.err).splitlines() if line.strip() and "WARNING" not in line]
    assert not shown, shown
    assert list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))


def _damage(path: Path) -> None:
    """Replace ``path`` by its first 100 bytes (a new file: its hard links elsewhere stay whole)."""
    head = path.read_bytes()[:100]
    path.unlink()
    path.write_bytes(head)


def test_resume_refuses_a_damaged_checkpoint_and_keeps_the_model(toy: Path, tmp_path: Path, cli) -> None:
    """The frozen parts of the resumed checkpoint are linked into every later one and published at
    the top of OUT: a damaged file there stops the resume before anything changes."""
    out = tmp_path / "run"
    over = {**FAST, "data": [str(toy)], "steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2, "report_to": "none"}
    run_train(TrainOptions(out=out, overrides=over, progress=False))
    vae = "vae/diffusion_pytorch_model.safetensors"
    good = (out / vae).read_bytes()
    train_json = (out / run_folder.TRAIN_FILE).read_text()
    first, last = ((out / f"checkpoints/step-0000000{i}").resolve() for i in (1, 2))
    _damage(last / vae)
    r = cli(["train", "--out", out, "--resume", "--steps", "3"])
    assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert r.err.startswith(f"error: {last}: cannot resume from this checkpoint: {vae} is damaged ("), r.err
    assert r.err.endswith("nothing was changed (resume from an earlier one with --resume_from_checkpoint step-00000001)\n"), r.err
    assert (out / vae).read_bytes() == good and (out / run_folder.TRAIN_FILE).read_text() == train_json
    assert not (out / "checkpoints/step-00000003").exists()
    optimizer = first / run_folder.STATE_DIR / run_folder.OPTIMIZER_FILE
    intact = optimizer.read_bytes()
    _damage(optimizer)
    with pytest.raises(InputError, match=r"training_state/optimizer.pt is damaged \(File is not a zip file\)"):
        run_train(TrainOptions(out=out, resume_from="step-00000001", progress=False))
    assert last.is_dir()  # not deleted for a resume that cannot start
    optimizer.write_bytes(intact)
    s = run_train(TrainOptions(out=out, resume_from="step-00000001", progress=False))
    assert (s.start_step, s.step) == (1, 2) and (out / vae).read_bytes() == good


def test_a_checkpoint_damaged_during_the_run_is_not_linked_into_the_next(toy: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "run"
    vae = "vae/diffusion_pytorch_model.safetensors"

    def damage_the_first_checkpoint(record: dict) -> None:
        if record["step"] == 2:
            _damage(out / "checkpoints/step-00000001" / vae)

    over = {**FAST, "data": [str(toy)], "steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2, "report_to": "none"}
    s = run_train(TrainOptions(out=out, overrides=over, progress=False), on_step=damage_the_first_checkpoint)
    assert s.step == 2 and any(f"{vae} is damaged" in n and "written again" in n for n in s.notes), s.notes
    for folder in (out, out / "checkpoints/step-00000002"):
        assert load_file(str(folder / vae)), folder
    assert (out / vae).stat().st_ino == (out / "checkpoints/step-00000002" / vae).stat().st_ino


def test_an_unwritable_out_is_one_line_before_any_model(toy: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import factory.sampler

    def no_model(*args, **kw):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(factory.sampler, "load_components", no_model)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    args = ["train", "--data", toy, "--steps", "1", "--resolution", "32", "--report_to", "none", "--dataloader_num_workers", "0", "--device", "cpu"]
    r = cli([*args, "--out", blocker / "sub"])
    assert r.code == 2 and r.err == f"error: {blocker / 'sub'}: output folder is not writable (Not a directory)\n", r.err
    assert blocker.read_text() == "x"
    locked = tmp_path / "locked"
    fail_mkdir_under(monkeypatch, locked, errno.EACCES)
    r = cli([*args, "--out", locked / "run"])
    assert r.code == 2 and r.err == f"error: {locked / 'run'}: output folder is not writable (Permission denied)\n", r.err


@pytest.mark.parametrize("text", ["[]", '{"config": [1]}', '{"history": []}', '{"config": {}, "data": 3}', '"x"'])
def test_a_train_json_of_the_wrong_shape_is_damaged_in_one_line(tmp_path: Path, text: str) -> None:
    from factory.train.run import saved_run

    (tmp_path / run_folder.TRAIN_FILE).write_text(text)
    with pytest.raises(InputError, match=r"train\.json: damaged training run file.*cannot resume"):
        saved_run(tmp_path)


def test_a_training_state_of_the_wrong_shape_is_damaged_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / run_folder.STATE_DIR / run_folder.STATE_FILE
    state.parent.mkdir()
    state.write_text("[]")
    with pytest.raises(InputError, match="damaged training state: an array"):
        run_folder.read_state(tmp_path)


def test_train_help_states_the_config_defaults() -> None:
    """Every number `factory train --help` gives as a default is TrainConfig's default, and a
    setting whose default depends on the model (None in TrainConfig) states no number."""
    import re

    import typer

    from cli import app
    from factory.train.config import TrainConfig

    fields = {"accumulation": "gradient_accumulation_steps", "keep": "keep_checkpoints", "empty_prompts": "proportion_empty_prompts"}
    command = typer.main.get_command(app).commands["train"]
    checked = []
    for param in command.params:
        stated = re.search(r"Default: ([-+0-9.e]+)[ .]", param.help or "")
        field = fields.get(param.name, param.name)
        if field not in TrainConfig.model_fields:
            continue
        default = TrainConfig.model_fields[field].default
        if default is None:
            assert stated is None, f"--{param.name}: help states {stated.group(1)}, TrainConfig's default depends on the model"
        elif stated:
            assert float(stated.group(1)) == float(default), f"--{param.name}: help says {stated.group(1)}, TrainConfig {default}"
            checked.append(field)
    assert {"steps", "batch_size", "lr", "checkpoint_every", "keep_checkpoints"} <= set(checked)


def test_the_progress_bar_shows_on_a_terminal_and_never_with_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """train's bar: drawn on a terminal, nothing with -q (README: only warnings and errors), nothing
    off a terminal (a log file gets no bar frames)."""
    import io

    from rich.console import Console

    from factory import feedback
    from factory.train import run as train_run
    from factory.train.config import make_config

    cfg = make_config({**FAST, "steps": 3})
    for level, terminal, shown in ((feedback.NORMAL, True, True), (feedback.QUIET, True, False), (feedback.NORMAL, False, False)):
        screen = io.StringIO()
        monkeypatch.setattr(feedback, "stderr_console", lambda: Console(file=screen, force_terminal=terminal, width=120))
        feedback.set_verbosity(level)
        try:
            with train_run._progress(True, cfg, 0, None) as show:
                show({"step": 3, "stage": "joint", "loss": 0.5, "seconds": 0.1})
        finally:
            feedback.set_verbosity(feedback.NORMAL)
        text = screen.getvalue()
        assert ("train" in text and "3/3" in text) is shown, (level, terminal, text)


def test_out_inside_the_training_data_is_refused(toy: Path, tmp_path: Path, cli) -> None:
    """A run folder inside a flat data folder: its validation images (NN.png + NN.alpha.png) became
    training samples of the next run on that folder, and a resume found the data changed."""
    out = toy / "model"
    r = cli(["train", "--data", toy, "--out", out, "--steps", "1"])
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert f"--out {out.resolve()}: inside the training data {toy}" in r.err, r.err
    assert not out.exists()


def test_out_through_a_symlink_to_nothing_says_so_and_creates_nothing(toy: Path, tmp_path: Path, cli) -> None:
    """The run folder was resolved through the link first, so its target (and every missing parent)
    was created, against docs/recovery.md: 'nothing is created through the link'."""
    link = tmp_path / "dang"
    link.symlink_to(tmp_path / "gone" / "run")
    for out in (link, link / "sub"):
        r = cli(["train", "--data", toy, "--out", out, "--steps", "1"])
        assert r.code == 2 and r.err.count("\n") == 1, r.err
        assert f"{link}: is a symlink to {tmp_path / 'gone' / 'run'}, which does not exist" in r.err, r.err
    assert not (tmp_path / "gone").exists() and link.is_symlink()
