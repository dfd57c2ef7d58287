"""The training run folder (``--out``): checkpoints, the state for exact resume, logs, EMA, RNG.

Layout::

    OUT/
      model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/
      diffumatting.json  matting_head.safetensors
                                 the latest checkpoint, published at the top (hard links to its
                                 files): OUT is a diffusers pipeline folder
                                 (``StableDiffusionPipeline.from_pretrained(OUT)``) and a
                                 DiffuMatting model (``factory generate --model OUT``); the
                                 descriptor's ``latest_checkpoint`` names the checkpoint
      train.json                 settings, data summary, base identity, engine, history
      log.jsonl                  one line per optimizer step: every loss term, lr, grad norm, timings
      logs/                      TensorBoard event files (``report_to: tensorboard``)
      checkpoints/step-00000500/ a DiffuMatting checkpoint (``factory.sampler.save_checkpoint``):
        model_index.json unet/ vae/ text_encoder/ tokenizer/ scheduler/ (a diffusers pipeline;
        the frozen parts are hard links to the previous checkpoint's files)
        diffumatting.json  matting_head.safetensors
        training_state/          what resume needs besides the checkpoint's weights
          state.json             step, stage, stream position, settings and data fingerprints,
                                 world size, EMA update count (written last: marks the state complete)
          optimizer.pt           {"optimizer": ..., "lr_scheduler": ...[, "grad_scaler": ...]} state
                                 dicts (torch.save, read back with weights_only=True)
          rng.json               per rank: python, numpy, torch CPU and CUDA generator states
          head.safetensors       the matting head's raw (non-EMA) weights
          unet.safetensors       with EMA only: the UNet's raw weights (the checkpoint holds the EMA)
          ema_head.safetensors   with EMA only: the head's EMA weights (the EMA UNet is unet/)
      validation/step-00000500/  00.png, 00.alpha.png, ... and prompts.json, drawn by the sampler

Each checkpoint folder is written atomically by ``save_checkpoint``; ``training_state/`` is then
written to a temporary folder and renamed in; then each part is published at the top of OUT (a
folder of links renamed over the old one), ``diffumatting.json`` last. Only the UNet and the head
change between checkpoints, so a crash while publishing leaves a loadable model. Resume takes the
newest checkpoint whose ``training_state/state.json`` exists, after :func:`verify_checkpoint` has
read every file of it (a damaged one stops the resume before anything changes: its frozen parts
would be linked into every later checkpoint and published at the top). The checkpoint's ``unet/``
is float32 (the trainable weights' own precision), so resuming loses nothing.

Run folders of earlier versions (checkpoints in the version-1 layout, and an ``OUT/diffumatting.json``
whose paths lead into ``checkpoints/``) still load and resume; new checkpoints use the new layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factory.errors import InputError
from factory.fsutil import TMP_PREFIX, atomic_write_text, fsync_path, link_tree, read_json_object, replace_dir, temp_dir_for

CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "training_state"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.json"
RAW_HEAD_FILE = "head.safetensors"
RAW_UNET_FILE = "unet.safetensors"
EMA_HEAD_FILE = "ema_head.safetensors"
TRAIN_FILE = "train.json"
LOG_FILE = "log.jsonl"
VALIDATION_DIR = "validation"
POINTER_FILE = "diffumatting.json"
TB_DIR = "logs"
#: What a checkpoint publishes at the top of OUT (the diffusers pipeline and the head).
PUBLISHED = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "matting_head.safetensors")
STATE_FORMAT = "factory-train-state"
RUN_FORMAT = "factory-train-run"
STATE_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS_DIR / checkpoint_name(step)


def list_checkpoints(out: Path, complete: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints, oldest first; ``complete``: with a training state."""
    root = out / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                if not complete or (p / STATE_DIR / STATE_FILE).is_file():
                    found.append((int(p.name[5:]), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def is_run_folder(out: Path) -> bool:
    return (out / TRAIN_FILE).is_file() or (out / CHECKPOINTS_DIR).is_dir()


# ------------------------------------------------------------------------------ pointer


def publish(out: Path, ckpt: Path) -> None:
    """Make the top of OUT the model of checkpoint ``ckpt`` (hard links to its files).

    Parts are replaced one by one (a folder of links renamed over the old one); the descriptor
    ``OUT/diffumatting.json`` is written last and names the checkpoint. A version-1 checkpoint
    (no pipeline files) is published as a descriptor whose paths lead into it.
    """
    desc = read_json_object(ckpt / POINTER_FILE, "checkpoint descriptor")
    rel = ckpt.relative_to(out).as_posix()
    if (ckpt / "model_index.json").is_file():
        for name in PUBLISHED:
            src, dst = ckpt / name, out / name
            if src.is_dir():
                tmp = temp_dir_for(dst)
                try:
                    link_tree(src, tmp)
                    replace_dir(tmp, dst)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            elif src.is_file():
                tmp_file = out / f"{TMP_PREFIX}{name}"
                tmp_file.unlink(missing_ok=True)
                link_tree_file(src, tmp_file)
                tmp_file.replace(dst)
        fsync_path(out)
    else:
        desc["unet"] = f"{rel}/{desc.get('unet', 'unet')}"
        if desc.get("head"):
            desc["head"] = {**desc["head"], "file": f"{rel}/{desc['head'].get('file', 'matting_head.safetensors')}"}
        if desc.get("base", {}).get("kind") == "embedded":
            desc["base"] = {**desc["base"], "path": f"{rel}/{desc['base'].get('path', 'base')}"}
    desc["latest_checkpoint"] = rel
    atomic_write_text(out / POINTER_FILE, json.dumps(desc, indent=2, sort_keys=True) + "\n")
    if not desc.get("head"):
        (out / "matting_head.safetensors").unlink(missing_ok=True)


def link_tree_file(src: Path, dst: Path) -> None:
    """A hard link to one file (a copy where links are refused)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------ training state


def write_state(ckpt: Path, state: dict[str, Any], optimizer: dict[str, Any], rng: list[dict[str, Any]], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write ``ckpt/training_state`` atomically (temporary folder renamed in, state.json last)."""
    from safetensors.torch import save_file

    final = ckpt / STATE_DIR
    tmp = temp_dir_for(final)
    try:
        torch.save(optimizer, tmp / OPTIMIZER_FILE)
        (tmp / RNG_FILE).write_text(json.dumps(rng), encoding="utf-8")
        for name, tensor_map in tensors.items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensor_map.items()}, str(tmp / name))
        (tmp / STATE_FILE).write_text(json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_DIR / STATE_FILE
    state = read_json_object(path, "training state")
    if state.get("format") != STATE_FORMAT or int(state.get("version", 0)) > STATE_VERSION:
        raise InputError(f"{path}: not a training state this factory can resume (format {state.get('format')!r} v{state.get('version')})")
    return state


def read_optimizer(ckpt: Path, device: torch.device) -> dict[str, Any]:
    path = ckpt / STATE_DIR / OPTIMIZER_FILE
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:  # what torch.load raises on a damaged file
        raise InputError(f"{path}: unreadable optimizer state ({_first_line(exc)})") from exc


def read_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = ckpt / STATE_DIR / name
    if not path.is_file():
        raise InputError(f"{path}: missing from the training state")
    return load_file(str(path))


def read_rng(ckpt: Path) -> list[dict[str, Any]]:
    path = ckpt / STATE_DIR / RNG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable generator states ({_first_line(exc)})") from exc


# ------------------------------------------------------------------------------ verification


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def file_problem(path: Path) -> str | None:
    """Why the file ``path`` does not read whole as what its name says, or None.

    A safetensors file must have a header whose tensors cover the file exactly (a truncated or
    overwritten file fails), JSON must parse, a ``torch.save`` archive must have its zip directory
    (written last, so a truncated one has none); any other file must read to its end.
    """
    from safetensors import SafetensorError, safe_open

    try:
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), "pt") as fh:
                fh.keys()
        elif path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        else:
            with path.open("rb") as fh:
                while fh.read(1 << 20):
                    pass
    except OSError as exc:
        return f"is unreadable ({exc.strerror or exc})"
    except (ValueError, zipfile.BadZipFile, SafetensorError) as exc:
        return f"is damaged ({_first_line(exc)})"
    return None


def carried_parts_problem(ckpt: Path) -> str | None:
    """What is wrong with the files a new checkpoint links from ``ckpt`` (its VAE, text encoder,
    tokenizer, scheduler and model index), checked by :func:`file_problem`; None when all read."""
    from factory.sampler.checkpoint import MODEL_INDEX, PIPELINE_PARTS

    files = [ckpt / MODEL_INDEX]
    for part in PIPELINE_PARTS:
        found = sorted(p for p in (ckpt / part).rglob("*") if p.is_file())
        if not found:
            return f"{part}/ holds no files"
        files += found
    for path in files:
        problem = file_problem(path)
        if problem is not None:
            return f"{path.relative_to(ckpt).as_posix()} {problem}"
    return None


def _checkpoint_problem(ckpt: Path, state: dict[str, Any]) -> str | None:
    """The first missing or damaged file of checkpoint ``ckpt`` that a resume reads or carries."""
    from factory.sampler.checkpoint import MODEL_INDEX, UNET_DIR
    from factory.sampler.components import load_base_folder

    needed = [POINTER_FILE, *(f"{STATE_DIR}/{name}" for name in (OPTIMIZER_FILE, RNG_FILE, RAW_HEAD_FILE))]
    if state.get("ema_updates") is not None:
        needed += [f"{STATE_DIR}/{RAW_UNET_FILE}", f"{STATE_DIR}/{EMA_HEAD_FILE}"]
    pipeline = (ckpt / MODEL_INDEX).is_file()
    if pipeline:
        needed += [f"{UNET_DIR}/config.json", f"{UNET_DIR}/diffusion_pytorch_model.safetensors"]
    missing = [name for name in needed if not (ckpt / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        problem = file_problem(path)
        if problem is not None:
            return f"{path.relative_to(ckpt).as_posix()} {problem}"
    if pipeline:  # the parts every later checkpoint links must also load as models
        try:
            load_base_folder(ckpt)
        except InputError as exc:
            return f"its VAE, text encoder, tokenizer or scheduler do not load ({str(exc).removeprefix(f'{ckpt}: ')})"
    return None


def verify_checkpoint(out: Path, ckpt: Path) -> None:
    """Read every file of checkpoint ``ckpt`` that resuming from it loads or carries forward; an
    :class:`InputError` naming the checkpoint and the first bad file (and the run's earlier
    complete checkpoints, to resume from instead) when one is missing or damaged."""
    problem = _checkpoint_problem(ckpt, read_state(ckpt))
    if problem is None:
        return
    earlier = [p.name for _, p in list_checkpoints(out) if p.name < ckpt.name]
    advice = f"resume from an earlier one with --resume_from_checkpoint {earlier[-1]}" if earlier else "no earlier checkpoint to resume from"
    raise InputError(f"{ckpt}: cannot resume from this checkpoint: {problem}; nothing was changed ({advice})")


def prune_checkpoints(out: Path, keep: int, current: Path) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, incomplete older ones, and the
    temporary folders of saves a crash interrupted."""
    complete = list_checkpoints(out)
    doomed = [p for _, p in complete[: max(0, len(complete) - keep)]]
    newest_step = complete[-1][0] if complete else -1
    doomed += [p for s, p in list_checkpoints(out, complete=False) if s < newest_step and not (p / STATE_DIR / STATE_FILE).is_file()]
    root = out / CHECKPOINTS_DIR
    doomed += [p for p in root.glob(f"{TMP_PREFIX}step-*") if p.is_dir()]  # a crash mid-save
    for p in doomed:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)


def clear_run(out: Path) -> None:
    """Forget a run that never completed a checkpoint: its log, partial checkpoints, previews."""
    for name in (LOG_FILE, TRAIN_FILE, POINTER_FILE, *PUBLISHED):
        if (out / name).is_file():
            (out / name).unlink()
    for name in (CHECKPOINTS_DIR, VALIDATION_DIR, TB_DIR, *PUBLISHED):
        if (out / name).is_dir():
            shutil.rmtree(out / name, ignore_errors=True)


# ------------------------------------------------------------------------------ logs


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after ``last_step`` (they are redone after a resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= last_step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue
    atomic_write_text(path, "".join(f"{ln}\n" for ln in keep))


# ------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """This process's global generator states, JSON-able."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------ EMA


class EMA:
    """Exponential moving average of parameters, in float32.

    ``update()`` after each optimizer step: ``s <- d s + (1 - d) p`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at update ``n`` (a warm-up so early averages are not
    dominated by the initial weights).
    """

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        self.modules = modules
        self.decay = decay
        self.updates = 0
        self.shadow = {name: {k: p.detach().float().clone() for k, p in m.named_parameters()} for name, m in modules.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, m in self.modules.items():
            shadow = self.shadow[name]
            for k, p in m.named_parameters():
                shadow[k].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def load(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        shadow = self.shadow[name]
        missing = set(shadow) - set(tensors)
        if missing:
            raise InputError(f"EMA weights for {name} lack {sorted(missing)[0]}")
        for k in shadow:
            shadow[k].copy_(tensors[k])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the modules (raw weights restored afterwards)."""
        backup = {name: {k: p.detach().to("cpu", copy=True) for k, p in m.named_parameters()} for name, m in self.modules.items()}
        try:
            with torch.no_grad():
                for name, m in self.modules.items():
                    for k, p in m.named_parameters():
                        p.copy_(self.shadow[name][k])
            yield
        finally:
            with torch.no_grad():
                for name, m in self.modules.items():
                    for k, p in m.named_parameters():
                        p.copy_(backup[name][k])
