"""The training loop on the tiny model (CPU, 32x32, batch 2): which parameters each loss trains,
that training lowers the loss, checkpoints that the sampler and `factory generate` load with their
head, exact resume, the run folder's rules, and data-parallel training in two processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from factory.errors import InputError
from factory.train import TrainOptions, run_train
from factory.train import run_folder
from factory.train.data import assign_prompts, collate, scan_sources
from factory.train.distributed import single
from factory.train.loop import Trainer, TrainJob
from factory.train.config import TrainConfig
from tests.conftest import SMALL_MANIFEST, write_manifest
from tests.train_toy import make_toy_folder

FAST = {
    "model": "tiny",
    "resolution": 32,
    "batch_size": 2,
    "data_workers": 0,
    "gradient_checkpointing": False,
    "validation_prompts": [],
    "lr_warmup_steps": 0,
    "lr": 2e-4,
    "head_lr": 2e-3,
    "detail_max_timestep": 1000,
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_folder(tmp_path_factory.mktemp("toy") / "data", n=6, size=64)


def _trainer(toy: Path, out: Path, **over) -> Trainer:
    cfg = TrainConfig(**{**FAST, "data": [str(toy)], **over})
    records = scan_sources(cfg.data)
    assign_prompts(records, None, cfg.prompt_template, cfg.canvas_token, None)
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(TrainJob(config=cfg.model_dump(mode="json"), records=records, out=str(out)), single("cpu"))


def _batch(trainer: Trainer, positions=(0, 1)) -> dict:
    return collate([trainer.data[(p % len(trainer.data), p)] for p in positions])


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def _no_grads(module: torch.nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


def _train(toy: Path, out: Path, stop_at: int | None = None, resume: bool = False, **over) -> object:
    values = {**FAST, "data": [str(toy)], **over}
    return run_train(TrainOptions(out=out, overrides=values, resume=resume, stop_at=stop_at, progress=False))


# ------------------------------------------------------------------------------ gradients


def test_each_loss_trains_only_what_it_should(toy: Path, tmp_path: Path) -> None:
    tr = _trainer(toy, tmp_path / "o", stage="joint", lambda_object=0.1)
    batch = _batch(tr)
    frozen = (tr.components.vae, tr.components.text_encoder)
    for term, unet_learns, head_learns in [
        ("noise", True, False),
        ("green", True, False),
        ("object", True, False),
        ("detail", True, False),
        ("latent", False, True),
    ]:
        tr.optimizer.zero_grad(set_to_none=True)
        terms = tr.compute_losses(batch, "joint", torch.Generator().manual_seed(0))
        assert set(terms) == {"noise", "green", "object", "detail", "latent"}
        assert terms[term].item() > 0, term
        terms[term].backward()
        tr.release()
        assert (_grads(tr.unet) > 0) is unet_learns, term
        assert (_grads(tr.head) > 0) is head_learns, term
        assert all(_no_grads(m) for m in frozen), term
    # L_g reaches the UNet through the cross-attention queries and keys only
    tr.optimizer.zero_grad(set_to_none=True)
    tr.compute_losses(batch, "joint", torch.Generator().manual_seed(0))["green"].backward()
    tr.release()
    touched = {n for n, p in tr.unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("attn2.to_k" in n for n in touched) and not any(n.startswith("conv_out") for n in touched)
    # the generator stage has no head term, and a full step leaves the head without gradient
    tr.optimizer.zero_grad(set_to_none=True)
    terms = tr.compute_losses(batch, "generator", torch.Generator().manual_seed(0))
    assert "latent" not in terms
    sum(terms.values()).backward()
    tr.release()
    assert _grads(tr.unet) > 0 and _no_grads(tr.head)


def test_latent_from_the_prediction_also_trains_the_unet(toy: Path, tmp_path: Path) -> None:
    tr = _trainer(toy, tmp_path / "o", stage="joint", latent_source="pred", detail_space="image")
    tr.optimizer.zero_grad(set_to_none=True)
    terms = tr.compute_losses(_batch(tr), "joint", torch.Generator().manual_seed(0))
    terms["latent"].backward()
    tr.release()
    assert _grads(tr.unet) > 0 and _grads(tr.head) > 0
    assert _no_grads(tr.components.vae)


def test_green_loss_gradient_survives_gradient_checkpointing(toy: Path, tmp_path: Path) -> None:
    grads = []
    for gc in (False, True):
        tr = _trainer(toy, tmp_path / f"o{gc}", stage="generator", gradient_checkpointing=gc)
        tr.compute_losses(_batch(tr), "generator", torch.Generator().manual_seed(0))["green"].backward()
        tr.release()
        grads.append(torch.cat([p.grad.flatten() for p in tr.unet.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------------------ training


def test_thirty_steps_lower_the_loss(toy: Path, tmp_path: Path) -> None:
    tr = _trainer(toy, tmp_path / "o", steps=30, checkpoint_every=100, generator_steps=10)
    batch = _batch(tr, positions=range(6))
    before = tr.evaluate(batch, "joint")
    result = tr.run()
    after = tr.evaluate(batch, "joint")
    assert result.step == 30 and result.checkpoint is not None
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    assert after["latent"] < before["latent"] and after["green"] < before["green"]
    logged = [json.loads(line) for line in (tmp_path / "o" / run_folder.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert {r["stage"] for r in logged[:10]} == {"generator"} and {r["stage"] for r in logged[10:]} == {"joint"}
    assert all({"loss", "noise", "green", "detail", "lr", "grad_norm", "seconds"} <= set(r) for r in logged)
    assert "latent" in logged[-1] and "latent" not in logged[0]


def test_checkpoint_loads_in_the_sampler_with_its_head(toy: Path, tmp_path: Path) -> None:
    from factory.manifest import CanvasSettings, ModelSpec, SamplerSettings
    from factory.plan import PlanRow
    from factory.sampler import load_head, load_sampler

    out = tmp_path / "run"
    s = _train(toy, out, steps=4, checkpoint_every=2, generator_steps=2, validation_prompts=["a red disc on a green background"], validation_steps=2)
    assert s.step == 4 and not s.stopped
    ckpts = [p.name for _, p in run_folder.list_checkpoints(out)]
    assert ckpts == ["step-00000002", "step-00000004"]
    desc = json.loads((out / "diffumatting.json").read_text())
    assert desc["latest_checkpoint"] == "checkpoints/step-00000004" and desc["training"]["head_trained"]
    # the generator-stage checkpoint has no (untrained) head; the joint one has the trained head
    assert json.loads((out / "checkpoints/step-00000002/diffumatting.json").read_text())["head"] is None
    head = load_head(out / "checkpoints/step-00000004/matting_head.safetensors")
    assert torch.equal(head.conv1.weight, run_folder.read_tensors(out / "checkpoints/step-00000004", run_folder.RAW_HEAD_FILE)["conv1.weight"])
    sampler = load_sampler(ModelSpec(source=str(out)), SamplerSettings(steps=2, width=64, height=64, scheduler="ddim"), CanvasSettings())
    assert sampler.has_head and sampler.identity.startswith("diffumatting:")
    row = PlanRow(index=0, key="k", class_name="disc", category="o", prompt="a red disc on green", negative_prompt="", seed=3, attributes={})
    (g,) = sampler.sample([row])
    assert g.error is None and g.coarse_alpha is not None and g.coarse_alpha.shape == (64, 64)
    assert sorted(p.name for p in (out / "validation/step-00000004").iterdir()) == ["00.alpha.png", "00.png", "prompts.json"]
    assert not (out / "validation/step-00000002/00.alpha.png").exists()


def test_resume_repeats_an_uninterrupted_run(toy: Path, tmp_path: Path) -> None:
    over = {"steps": 20, "checkpoint_every": 10, "generator_steps": 12, "ema": True, "ema_decay": 0.9, "lr_scheduler": "cosine", "lr_warmup_steps": 3}
    whole = tmp_path / "whole"
    _train(toy, whole, **over)
    parts = tmp_path / "parts"
    first = _train(toy, parts, stop_at=10, **over)
    assert first.step == 10 and first.stopped
    with (parts / run_folder.LOG_FILE).open("a") as fh:  # a step after the checkpoint, lost in a crash
        fh.write(json.dumps({"step": 11, "loss": 9.9}) + "\n")
    second = run_train(TrainOptions(out=parts, resume=True, progress=False))  # the saved settings come back
    assert second.start_step == 10 and second.step == 20
    logs = [[json.loads(x) for x in (d / run_folder.LOG_FILE).read_text().splitlines()] for d in (whole, parts)]
    assert [r["step"] for r in logs[1]] == list(range(1, 21))
    for a, b in zip(*logs):
        for key in ("loss", "noise", "green", "detail", "lr", "head_lr"):
            assert a.get(key) == pytest.approx(b.get(key), rel=1e-4, abs=1e-6), (a["step"], key)
    w = [run_folder.read_tensors(d / "checkpoints/step-00000020", run_folder.RAW_UNET_FILE) for d in (whole, parts)]
    assert all(torch.allclose(w[0][k], w[1][k], atol=1e-6) for k in w[0])
    ema = [run_folder.read_tensors(d / "checkpoints/step-00000020", run_folder.EMA_HEAD_FILE) for d in (whole, parts)]
    assert all(torch.allclose(ema[0][k], ema[1][k], atol=1e-6) for k in ema[0])


def test_run_folder_rules(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(toy, out, steps=1, checkpoint_every=1)
    with pytest.raises(InputError, match="already holds a training run"):
        _train(toy, out, steps=1)
    with pytest.raises(InputError, match=r"lr \(0.0002 -> 0.001\)"):
        run_train(TrainOptions(out=out, overrides={"lr": 1e-3}, resume=True, progress=False))
    s = run_train(TrainOptions(out=out, overrides={"steps": 2}, resume=True, progress=False))  # steps may grow
    assert (s.start_step, s.step) == (1, 2)
    # a run that failed before its first checkpoint starts over, with other settings if need be
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / run_folder.TRAIN_FILE).write_text(json.dumps({"config": {"lr": 1.0}}))
    (failed / run_folder.LOG_FILE).write_text('{"step": 1}\n')
    s = _train(toy, failed, steps=1, checkpoint_every=1)
    assert (s.start_step, s.step) == (0, 1) and len((failed / run_folder.LOG_FILE).read_text().splitlines()) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        _train(toy, other, steps=1)
    with pytest.raises(InputError, match="bitsandbytes|CUDA"):
        _train(toy, tmp_path / "bnb", steps=1, use_8bit_adam=True)
    with pytest.raises(InputError, match="resolution: must be a multiple of 8"):
        _train(toy, tmp_path / "r", resolution=36)


# ------------------------------------------------------------------------------ the command


def test_cli_train_then_generate_uses_the_head(toy: Path, tmp_path: Path, cli, monkeypatch) -> None:
    """diffusers' option names; the run folder and its checkpoints load in diffusers as they are, and
    in `factory generate --model` with the head; TensorBoard's reader reads the logged losses back.
    Checkpoints are written with transformers quiet (its shard bar, its image-processor notices)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.utils import logging as tlog

    import factory.sampler

    writes: list[tuple[int, bool]] = []
    save = factory.sampler.save_checkpoint

    def recording_save(*args, **kwargs):
        writes.append((tlog.get_verbosity(), tlog.is_progress_bar_enabled()))
        return save(*args, **kwargs)

    monkeypatch.setattr(factory.sampler, "save_checkpoint", recording_save)

    out = tmp_path / "C"
    cfg = tmp_path / "train.yaml"
    cfg.write_text("data_workers: 0\nvalidation_steps: 2\nresolution: 32\n")
    r = cli(["train", "--train_data_dir", toy, "--pretrained_model_name_or_path", "tiny", "--max_train_steps", "3", "--output_dir", out,
             "--config", cfg, "--checkpointing_steps", "2", "--learning_rate", "1e-4", "--train_batch_size", "2",
             "--gradient_accumulation_steps", "1", "--mixed_precision", "no", "--report_to", "tensorboard"])  # fmt: skip
    assert r.code == 0, r.err
    assert writes and all(level >= tlog.ERROR and not bars for level, bars in writes), writes
    assert "trained 3 steps (0 -> 3 of 3)" in r.out and f"factory generate --model {out.resolve()}" in r.out
    assert f"tensorboard --logdir {out.resolve() / 'logs'}" in r.out
    assert len(list((out / "validation/step-00000003").glob("*.alpha.png"))) == 4
    for folder in (out, out / "checkpoints/step-00000002"):
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        (image,) = pipe("a red disc on a green background", num_inference_steps=1, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0
    assert torch.equal(pipe.unet.conv_in.weight, StableDiffusionPipeline.from_pretrained(out / "checkpoints/step-00000002").unet.conv_in.weight)
    trained = StableDiffusionPipeline.from_pretrained(out).unet.conv_in.weight
    assert not torch.equal(trained, pipe.unet.conv_in.weight)  # the top is the last checkpoint (step 3)
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    logged = [json.loads(line) for line in (out / run_folder.LOG_FILE).read_text().splitlines()]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(x["step"], pytest.approx(x["loss"])) for x in logged]
    assert {"train/noise", "train/green", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert "validation/00.alpha" in events.Tags()["images"]
    r = cli(["train", "--data", toy, "--out", out, "--steps", "3"])
    assert r.code == 2 and r.err.startswith("error:") and "--resume" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli(["train", "--data", tmp_path / "nothing", "--out", tmp_path / "D"])
    assert r.code == 2 and "training data not found" in r.err
    manifest = write_manifest(tmp_path, SMALL_MANIFEST, "small.yaml")
    r = cli(["generate", "--manifest", manifest, "--n", 4, "--model", out, "--out", tmp_path / "R", "--no-ray"])
    assert r.code == 0, r.err
    import pyarrow.parquet as pq

    index = pq.read_table(tmp_path / "R" / "index.parquet").to_pylist()
    assert [row["alpha_source"] for row in index] == ["head"] * 4


def test_a_damaged_sample_stops_training_with_one_line(toy: Path, tmp_path: Path, cli) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(toy, data)
    (data / "alpha" / "toy-003.png").write_bytes(b"not a png")
    cfg = tmp_path / "t.yaml"
    cfg.write_text("data_workers: 1\nresolution: 32\nvalidation_prompts: []\n")
    r = cli(["train", "--data", data, "--out", tmp_path / "o", "--steps", "6", "--config", cfg])
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert r.code == 1 and len(errors) == 1 and "Traceback" not in r.err, r.err
    assert errors[0] == f"error: training sample toy-003: cannot read its alpha {data / 'alpha' / 'toy-003.png'} (UnidentifiedImageError)"


# ------------------------------------------------------------------------------ data parallel


def _ddp_rank(rank: int, port: int, out: str, over: dict, queue) -> None:
    """One rank of a torchrun-style job, forked from the test process (imports already done)."""
    try:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        torch.set_num_threads(1)
        from factory.train import loop

        seen: dict = {}
        original = loop.Trainer.run

        def run(self):
            result = original(self)
            seen["unet"] = float(sum(p.detach().double().sum() for p in self.unet.parameters()))
            seen["head"] = float(sum(p.detach().double().sum() for p in self.head.parameters()))
            return result

        loop.Trainer.run = run
        s = run_train(TrainOptions(out=Path(out), overrides=over, progress=False))
        queue.put({"rank": rank, "step": s.step, "world": s.world, "engine": s.engine, "lines": s.lines(), **seen})
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_data_parallel(toy: Path, tmp_path: Path) -> None:
    """Two CPU processes under a torchrun-style environment (gloo): DDP, rank 0 writes."""
    import multiprocessing

    out = tmp_path / "ddp"
    over = {**FAST, "data": [str(toy)], "steps": 3, "checkpoint_every": 3, "stage": "joint", "batch_size": 1, "gradient_checkpointing": True}
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(rank, port, str(out), over, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=300) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    assert all("error" not in r for r in results), results
    assert [r["world"] for r in results] == [2, 2] and {r["engine"] for r in results} == {"torchrun"}
    assert results[0]["lines"] and not results[1]["lines"]  # only rank 0 reports
    # DDP kept the ranks' weights identical although each rank saw different samples
    assert results[0]["unet"] == results[1]["unet"] and results[0]["head"] == results[1]["head"]
    logged = [json.loads(x) for x in (out / run_folder.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]  # one log, written by rank 0
    state = run_folder.read_state(out / "checkpoints/step-00000003")
    assert state["world_size"] == 2 and state["positions_done"] == 3 * 2 * 1
    assert len(run_folder.read_rng(out / "checkpoints/step-00000003")) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_train_two_workers(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    values = {**FAST, "data": [str(toy)], "steps": 2, "checkpoint_every": 2, "stage": "joint", "batch_size": 1}
    s = run_train(TrainOptions(out=out, overrides=values, workers=2, progress=False))
    assert (s.engine, s.world, s.step) == ("ray", 2, 2)
    assert run_folder.read_state(out / "checkpoints/step-00000002")["world_size"] == 2
