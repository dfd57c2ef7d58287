"""`factory caption` with a tiny random BLIP: a captions file that `factory train --captions`
uses, class-name prefixes, resume after an interruption (torn journal line included) on Ray, and
one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from factory.caption import CaptionOptions, journal_path, run_caption
from factory.train import TrainOptions
from factory.train.data import read_captions
from factory.train.run import prepare
from tests.caption_fixtures import WORDS, make_tiny_blip
from tests.train_toy import make_toy_folder, make_toy_shards

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_folder(tmp_path_factory.mktemp("toy") / "data", n=5, size=32)


def test_caption_file_is_what_train_uses(blip: Path, toy: Path, tmp_path: Path, cli) -> None:
    caps = tmp_path / "captions.jsonl"
    r = cli(["caption", "--data", toy, "--model", blip, "--out", caps, "--batch-size", "2", "--class-prefix"])
    assert r.code == 0, r.err
    assert "captioned 5 of 5 samples (0 done before)" in r.out and f"factory train --captions {caps}" in r.out
    rows = [json.loads(line) for line in caps.read_text().splitlines()]
    assert [row["key"] for row in rows] == [f"toy-{i:03d}" for i in range(5)]
    for row in rows:
        name, _, caption = row["caption"].partition(", ")
        assert name == row["class_name"] and caption and set(caption.split()) <= set(WORDS)
    assert not journal_path(caps).exists()
    out = tmp_path / "run"
    cfg, records, *_ = prepare(TrainOptions(out=out, overrides={"data": [str(toy)], "captions": str(caps), "resolution": 32}))
    assert [rec.prompt for rec in records] == [f"{row['caption']}, on a green background" for row in rows]
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text("data_workers: 0\nvalidation_prompts: []\nresolution: 32\ngradient_checkpointing: false\nreport_to: none\n")
    r = cli(["train", "--data", toy, "--captions", caps, "--max_train_steps", "1", "--output_dir", out, "--config", cfg_file])
    assert r.code == 0, r.err
    assert json.loads((out / "train.json").read_text())["config"]["captions"] == str(caps)


def test_caption_bar_on_a_terminal_only_and_none_with_quiet(blip: Path, toy: Path, tmp_path: Path, cli, monkeypatch) -> None:
    """The bar is ``factory.feedback``'s: nothing on stderr off a terminal (with or without -q);
    on a terminal a bar over the samples, none with -q."""
    import io

    from rich.console import Console

    import factory.feedback as feedback

    for flags in ([], ["-q"]):
        r = cli([*flags, "caption", "--data", toy, "--model", blip, "--out", tmp_path / f"off{len(flags)}.jsonl", "--batch-size", "2"])
        assert r.code == 0 and r.err == "", r.err
        assert ("captioned 5 of 5 samples" in r.out) is not flags, r.out
    for flags, bar in (([], True), (["-q"], False)):
        screen = io.StringIO()
        monkeypatch.setattr(feedback, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=160))
        r = cli([*flags, "caption", "--data", toy, "--model", blip, "--out", tmp_path / f"on{len(flags)}.jsonl", "--batch-size", "2"])
        assert r.code == 0 and r.err == "", r.err
        assert ("5/5" in screen.getvalue()) is bar and ("caption" in screen.getvalue()) is bar, screen.getvalue()
        # a status line while the model loads (large models take minutes), before the bar
        assert (f"caption: loading {blip.name}" in screen.getvalue()) is bar, screen.getvalue()


def test_caption_resumes_on_ray_and_errors(blip: Path, toy: Path, tmp_path: Path, cli) -> None:
    caps = tmp_path / "c.jsonl"
    seen = []

    def stop_after_two(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_caption(CaptionOptions(data=[str(toy)], out=caps, model=str(blip), batch_size=2, progress=False), on_batch=stop_after_two)
    assert not caps.exists() and len(journal_path(caps).read_text().splitlines()) == 4
    with journal_path(caps).open("a") as fh:
        fh.write('{"key": "toy-004", "capt')  # a write the kill tore
    s = run_caption(CaptionOptions(data=[str(toy)], out=caps, model=str(blip), batch_size=2, progress=False, ray=True, workers=1))
    assert (s.done_before, s.captioned, s.engine) == (4, 1, "ray")
    assert s.caption_seconds > 0 and s.lines()[0].endswith(f", {1 / s.caption_seconds:.2f} img/s"), s.lines()
    assert sorted(read_captions(caps)) == [f"toy-{i:03d}" for i in range(5)] and not journal_path(caps).exists()
    shards = make_toy_shards(tmp_path / "shards", n=3, per_shard=2, size=32)
    again = run_caption(CaptionOptions(data=[str(toy), str(shards[0].parent)], out=caps, model=str(blip), progress=False))
    assert (again.done_before, again.captioned) == (5, 3)
    assert list(read_captions(caps))[5:] == ["shard-00000", "shard-00001", "shard-00002"]
    r = cli(["caption", "--data", toy, "--model", tmp_path / "nope", "--out", caps])
    assert r.code == 2 and r.err.strip() == f"error: {tmp_path / 'nope'}: captioning model folder not found"
    r = cli(["caption", "--data", toy, "--model", "someone/not-cached", "--out", caps])
    assert r.code == 2 and "not in the local Hugging Face cache" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli(["caption", "--data", toy, "--model", blip, "--out", tmp_path / "c.txt"])
    assert r.code == 2 and "must be .jsonl" in r.err


def test_caption_with_truncated_model_weights_is_one_line(blip: Path, toy: Path, tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad-blip"
    bad.mkdir()
    for f in blip.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:100] if f.name == "model.safetensors" else f.read_bytes())
    out = tmp_path / "c.jsonl"
    r = cli(["caption", "--data", toy, "--model", bad, "--out", out, "--device", "cpu"])
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert f"error: {bad}: the model's weights could not be read (" in r.err and "internal error" not in r.err, r.err
    assert not out.exists() and not journal_path(out).exists()


def _copy_with_bin_weights(blip: Path, folder: Path, damage: str) -> Path:
    """The tiny BLIP with its weights as a PyTorch ``pytorch_model.bin``, damaged: cut in half,
    replaced by bytes that are not a checkpoint, or empty."""
    import torch
    from safetensors.torch import load_file

    folder.mkdir()
    for f in blip.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "pytorch_model.bin"
    torch.save(load_file(blip / "model.safetensors"), weights)
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint " * 64, "empty": b""}[damage])
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_caption_with_damaged_bin_weights_is_one_line(blip: Path, toy: Path, tmp_path: Path, cli, damage: str) -> None:
    bad = _copy_with_bin_weights(blip, tmp_path / "bad-blip", damage)
    out = tmp_path / "c.jsonl"
    r = cli(["caption", "--data", toy, "--model", bad, "--out", out, "--device", "cpu"])
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert f"error: {bad}: the model's weights could not be read (" in r.err and "pytorch_model.bin" in r.err, r.err
    assert "internal error" not in r.err and "weights_only" not in r.err, r.err
    assert not out.exists() and not journal_path(out).exists()


def test_caption_on_ray_with_a_model_that_cannot_load(blip: Path, toy: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """The actors' model error is the command's one-line error (exit 2), and no journal is left:
    the run with a good model then captions every sample, its summary with a rate, and nothing
    of Ray's on stderr (its notice that it enabled token authentication included)."""
    bad = tmp_path / "bad-blip"
    bad.mkdir()
    for f in blip.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:100] if f.name == "model.safetensors" else f.read_bytes())
    out = tmp_path / "c.jsonl"
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # a Ray start sets it in this process; unset, Ray would warn
    r = cli(["caption", "--data", toy, "--model", bad, "--out", out, "--ray", "--workers", "1", "--batch-size", "2"])
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in r.err and "a captioning worker failed" not in r.err and "caption " not in r.err, r.err
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: the model's weights could not be read ("), r.err
    assert not out.exists() and not journal_path(out).exists()
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    r = cli(["caption", "--data", toy, "--model", blip, "--out", out, "--ray", "--workers", "1", "--batch-size", "2"])
    assert r.code == 0, r.err
    assert "captioned 5 of 5 samples (0 done before)" in r.out
    assert re.search(r"\(ray\), [0-9.]+ s, [0-9.]+ img/s$", r.out.splitlines()[0]), r.out
    assert "Token authentication" not in r.err and "WARNING" not in r.err, r.err
    assert sorted(read_captions(out)) == [f"toy-{i:03d}" for i in range(5)] and not journal_path(out).exists()


def test_caption_ray_options_reach_ray_and_need_ray(blip: Path, toy: Path, tmp_path: Path, cli, monkeypatch) -> None:
    import factory.ray_session as ray_session
    from factory.errors import InputError

    caps = tmp_path / "c.jsonl"
    for extra in (["--workers", "2"], ["--address", "auto"], ["--ray-tmp", tmp_path / "rt"]):
        r = cli(["caption", "--data", toy, "--model", blip, "--out", caps, *extra])
        assert r.code == 2 and r.err == "error: --workers, --address and --ray-tmp are for --ray (captioning on Ray actors); add --ray\n", r.err
    seen: list = []

    def no_ray(run_dir, address, ray_tmp, gpus, workers):
        seen.append((ray_tmp, workers))
        raise InputError("no Ray in this test")

    monkeypatch.setattr(ray_session, "start_ray", no_ray)
    r = cli(["caption", "--data", toy, "--model", blip, "--out", caps, "--ray", "--workers", "2", "--ray-tmp", tmp_path / "rt"])
    assert r.code == 2 and "no Ray in this test" in r.err and seen == [(tmp_path / "rt", 2)], r.err
    assert not caps.exists() and not journal_path(caps).exists()



def test_a_journal_torn_inside_a_character_resumes(tmp_path: Path) -> None:
    """A kill can tear the journal's last line inside a multi-byte character ("café"): that line is
    skipped like any torn one (it was a UnicodeDecodeError, and the run could not resume)."""
    from factory.caption import read_done
    from factory.errors import InputError

    out = tmp_path / "c.jsonl"
    good = '{"key": "toy-000", "caption": "a café table"}\n'
    journal_path(out).write_bytes(good.encode() + '{"key": "toy-001", "caption": "a café'.encode()[:-1])
    assert list(read_done(out)) == ["toy-000"]
    out.write_bytes(b'{"key": "toy-000", "caption": "caf\xc3"}\n')
    with pytest.raises(InputError, match=r"c.jsonl:1: not a captions line"):
        read_done(out)
