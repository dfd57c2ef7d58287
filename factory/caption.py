"""``factory caption``: captions for a training set, from a transformers image-to-text model.

The paper captions its training objects automatically (InstructBLIP); this command does the same
for any set ``factory train --data`` reads (paired or flat folders, WebDataset shards), with any
image-to-text model transformers loads through ``AutoProcessor`` + ``AutoModelForImageTextToText``
from a local folder or the local hub cache: BLIP, BLIP-2, InstructBLIP, Florence-2, GIT, ... It
writes the ``.jsonl`` captions file that ``factory train --captions`` reads, one line per sample::

    {"key": "toy-000", "caption": "cup, a red cup on a table", "class_name": "cup"}

Each sample's picture is its image, or its foreground over white when it has no image. Batches run
in this process or, with ``--ray``, on Ray actors (one model each; one GPU each where there are
GPUs), which receive the encoded images, so a cluster needs no shared disk.

Resumable: each finished batch is appended (flushed and fsynced) to ``OUT.partial``; a rerun reads
``OUT`` and ``OUT.partial`` (a torn last line is ignored) and captions only the samples not done;
at the end ``OUT`` is written atomically (the samples in data order, then any other keys it held)
and ``OUT.partial`` is removed. Delete ``OUT`` to caption everything again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.errors import InputError, RunError
from factory.feedback import Feedback, plural
from factory.fsutil import atomic_write_text, check_output_file

#: The text prompt (or task token) a model family needs to caption; None = unconditional.
DEFAULT_PROMPTS: dict[str, str | None] = {
    "florence2": "<CAPTION>",
    "instructblip": "A short image description:",
    "blip": None,
    "blip-2": None,
}
JOURNAL_SUFFIX = ".partial"


@dataclass
class CaptionOptions:
    data: list[str]
    out: Path
    model: str
    batch_size: int = 8
    prompt: str | None = None
    """Text given with each image (BLIP: a caption prefix, e.g. "a photo of"; Florence-2: a task
    token). None = the model family's default (:data:`DEFAULT_PROMPTS`)."""
    class_prefix: bool = False
    """Start each caption with the sample's class name ("cup, ...") when it has one and the caption
    does not already name it."""
    max_new_tokens: int = 40
    device: str | None = None
    ray: bool = False
    workers: int = 1
    address: str | None = None
    ray_tmp: Path | None = None  # with ray: Ray's temporary folder (local Ray only); None: one in the temp dir
    progress: bool = True


@dataclass
class CaptionSummary:
    out: Path
    samples: int
    done_before: int
    captioned: int
    empty: int
    seconds: float
    model: str
    engine: str
    notes: list[str] = field(default_factory=list)
    caption_seconds: float = 0.0
    """Time spent captioning, without loading the model (for the rate)."""

    def lines(self) -> list[str]:
        rate = f", {self.captioned / self.caption_seconds:.2f} img/s" if self.captioned and self.caption_seconds > 0 else ""
        lines = [
            f"captioned {self.captioned} of {plural(self.samples, 'sample')} ({self.done_before} done before) with {self.model} "
            f"({self.engine}), {self.seconds:.1f} s{rate}",
            f"captions: {self.out} (use with factory train --captions {self.out})",
        ]
        if self.empty:
            lines.append(f"note: {self.empty} caption{'s are' if self.empty != 1 else ' is'} empty (the model gave no text); train falls back to their metadata")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines


# ------------------------------------------------------------------------------ the model


def model_folder(model: str) -> Path:
    """A local model folder, or the cached snapshot of a hub id (never downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a transformers model folder (no config.json)")
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")):
        raise InputError(f"{model}: captioning model folder not found")
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", model):
        raise InputError(f"{model}: not a model folder or a hub id (owner/name)")
    from factory.sampler.hub import require_snapshot

    return require_snapshot(model, "captioning model", instead="pass a local model folder with --model")[1]


class Captioner:
    """A processor and an image-to-text model, and one batched call: images -> captions."""

    def __init__(self, folder: str, prompt: str | None, max_new_tokens: int, device: str | None) -> None:
        import torch
        from safetensors import SafetensorError
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from factory.sampler.components import quiet_transformers

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        with quiet_transformers():
            try:
                self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
                self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=dtype).to(self.device).eval()
            except SafetensorError as exc:  # a truncated or damaged weights file: safetensors' own error type
                raise InputError(f"{folder}: the model's weights could not be read ({_first_line(exc)})") from exc
            except Exception as exc:
                checkpoint = _torch_load_file(exc)
                if checkpoint is not None:
                    raise InputError(
                        f"{folder}: the model's weights could not be read "
                        f"({Path(checkpoint).name} is damaged or not a PyTorch checkpoint: {type(exc).__name__})"
                    ) from exc
                if isinstance(exc, (OSError, ValueError, KeyError)):
                    raise InputError(f"{folder}: cannot load it as an image-to-text model ({type(exc).__name__}: {_first_line(exc)})") from exc
                raise
        self.model_type = str(getattr(self.model.config, "model_type", ""))
        self.prompt = prompt if prompt is not None else DEFAULT_PROMPTS.get(self.model_type)
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype

    def __call__(self, images: Sequence[bytes]) -> list[str]:
        import torch
        from PIL import Image

        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        kwargs: dict[str, Any] = {"images": pictures, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(pictures)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        new_tokens = self.max_new_tokens
        limit = getattr(getattr(self.model.config, "text_config", None) or self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:  # a decoder cannot write past its position table
            used = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
            new_tokens = max(1, min(new_tokens, limit - used - 1))
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [clean(t, self.prompt) for t in texts]


def _torch_load_file(exc: BaseException) -> str | None:
    """The file ``torch.load`` was reading when ``exc`` was raised, or None if it was not raised
    there. A damaged ``.bin`` weights file fails inside ``torch.load`` with whatever its bytes
    trip on (RuntimeError for a truncated zip, UnpicklingError for garbage, EOFError when empty),
    so where it was raised, not its type, tells a weights problem apart."""
    found: str | None = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == "torch.serialization" and frame.f_code.co_name == "load":
            found = str(frame.f_locals.get("f", "the weights file"))
        tb = tb.tb_next
    return found


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line, cut to a readable length."""
    return " ".join(str(exc).split())[:300]


def clean(text: str, prompt: str | None) -> str:
    """One line of caption: the echoed prompt and task tokens removed, spaces collapsed."""
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt) :]
    text = re.sub(r"</?[A-Za-z_]+>", " ", text)
    return " ".join(text.split()).strip(" ,.:") if text.strip() else ""


# ------------------------------------------------------------------------------ the data


def picture(rec: Any) -> bytes:
    """The encoded picture to caption: the sample's image (checked to decode), or its foreground
    over white (PNG). A damaged file is a one-line ``RunError`` naming the sample."""
    import numpy as np

    from factory.imageio import decode_alpha, decode_rgb, encode_png

    ref = rec.image if rec.image is not None else rec.fg
    if ref is None:
        raise RunError(f"training sample {rec.key}: no image or foreground to caption")
    role = "image" if rec.image is not None else "foreground"
    try:
        data = ref.read()
        rgb = decode_rgb(data)
        if rec.image is not None:
            return data
        alpha = decode_alpha(rec.alpha.read())[..., None]
    except (OSError, InputError) as exc:
        raise RunError(f"training sample {rec.key}: cannot read its {role} {ref.describe()} ({type(exc.__cause__ or exc).__name__})") from exc
    return encode_png((rgb.astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8))


def class_name_of(rec: Any) -> str | None:
    name = rec.meta.get("class_name") or rec.meta.get("class")
    return name.strip() if isinstance(name, str) and name.strip() else None


def with_prefix(caption: str, class_name: str | None) -> str:
    from factory.train.data import has_word

    if not class_name or has_word(caption, class_name):
        return caption
    return f"{class_name}, {caption}" if caption else class_name


# ------------------------------------------------------------------------------ the files


def read_done(out: Path) -> dict[str, dict[str, Any]]:
    """Captions already made: ``OUT`` (written whole) and the journal ``OUT.partial``, whose torn
    or malformed lines (a killed run) are skipped."""
    done: dict[str, dict[str, Any]] = {}
    for path, strict in ((out, True), (journal_path(out), False)):
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_bytes().splitlines(), 1):  # bytes: a kill can tear a character
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # a line that is not UTF-8 is a ValueError (UnicodeDecodeError)
                key, caption = row["key"], row["caption"]
                if not isinstance(key, str) or not isinstance(caption, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError) as exc:
                if strict:
                    raise InputError(f"{path}:{n}: not a captions line ({{\"key\", \"caption\"}}); move the file away to start over") from exc
                continue
            done[key] = row
    return done


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + JOURNAL_SUFFIX)


def write_final(out: Path, records: Sequence[Any], done: dict[str, dict[str, Any]]) -> None:
    keys = [r.key for r in records if r.key in done]
    known = set(keys)
    keys += [k for k in done if k not in known]
    atomic_write_text(out, "".join(json.dumps(done[k], ensure_ascii=False) + "\n" for k in keys))
    journal_path(out).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ the command


def _batches(todo: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(todo), size):
        yield list(todo[i : i + size])


def run_caption(opts: CaptionOptions, on_batch: Callable[[int], None] | None = None) -> CaptionSummary:
    """Caption every sample of ``opts.data`` not yet in ``opts.out`` (see the module docstring)."""
    from factory.train.data import scan_sources

    start = time.perf_counter()
    if opts.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.workers < 1:
        raise InputError(f"--workers must be at least 1, got {opts.workers}")
    if not opts.ray and (opts.workers > 1 or opts.address is not None or opts.ray_tmp is not None):
        raise InputError("--workers, --address and --ray-tmp are for --ray (captioning on Ray actors); add --ray")
    out = opts.out.expanduser().resolve()
    if out.suffix.lower() != ".jsonl":
        raise InputError(f"{out}: the captions file must be .jsonl (what factory train --captions reads with class names)")
    check_output_file(out)
    folder = model_folder(opts.model)
    records = scan_sources(opts.data)
    done = read_done(out)
    todo, seen = [], set(done)
    for rec in records:  # captions are by key: samples sharing a key (two sources) share one, as in train
        if rec.key not in seen:
            seen.add(rec.key)
            todo.append(rec)
    unique = len({r.key for r in records})
    done_before = unique - len(todo)
    engine = "ray" if opts.ray else "local"
    empty = 0
    notes: list[str] = []
    caption_seconds = 0.0
    if todo:
        # The model is loaded first, in this process or on every Ray actor, under a status line: one
        # that cannot load stops the command before a journal or a progress bar exists.
        with (
            Feedback("caption", enabled=opts.progress) as fb,
            _loaded(opts, folder, out, fb) as (captioner, pool),
            journal_path(out).open("a", encoding="utf-8") as journal,
        ):
            bar = fb.bar(unique)  # on a terminal only, none with -q; the samples done before count as complete
            if done_before:
                fb.advance(bar, done_before)

            def record(batch: list[Any], captions: list[str]) -> None:
                """Journal one finished batch (flushed and fsynced: a kill loses at most a batch)."""
                nonlocal empty
                lines = []
                for rec, caption in zip(batch, captions):
                    name = class_name_of(rec)
                    text = with_prefix(caption, name) if opts.class_prefix else caption
                    empty += not caption
                    row: dict[str, Any] = {"key": rec.key, "caption": text}
                    if name:
                        row["class_name"] = name
                    done[rec.key] = row
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                journal.write("".join(lines))
                journal.flush()
                os.fsync(journal.fileno())
                fb.advance(bar, len(batch))
                if on_batch is not None:
                    on_batch(len(batch))

            batches = list(_batches(todo, opts.batch_size))
            t0 = time.perf_counter()  # the models are loaded: from the first batch to the last recorded
            if pool is not None:
                notes += pool.run(batches, record)
            else:
                for batch in batches:
                    record(batch, captioner([picture(r) for r in batch]))
            caption_seconds = time.perf_counter() - t0
    write_final(out, records, done)
    return CaptionSummary(
        out=out, samples=unique, done_before=done_before, captioned=len(todo), empty=empty,
        seconds=time.perf_counter() - start, model=opts.model, engine=engine, notes=notes, caption_seconds=caption_seconds,
    )  # fmt: skip


@contextlib.contextmanager
def _loaded(
    opts: CaptionOptions, folder: Path, out: Path, fb: Feedback
) -> Iterator[tuple[Captioner | None, _RayCaptioners | None]]:
    """The model loaded in this process (a captioner) or on ``opts.workers`` Ray actors (a pool),
    with a status line while it loads (minutes for a large model)."""
    if opts.ray:
        fb.status(f"starting Ray, loading {folder.name} on {plural(opts.workers, 'actor')}")
        with _RayCaptioners(opts, str(folder), out) as pool:
            yield None, pool
    else:
        fb.status(f"loading {folder.name}")
        yield Captioner(str(folder), opts.prompt, opts.max_new_tokens, opts.device), None


class _RayCaptioners:
    """Ray and ``opts.workers`` actors, each with its own model, loaded when this is made (so a
    model that cannot load on them fails before anything is written); a context manager that
    shuts Ray down."""

    def __init__(self, opts: CaptionOptions, folder: str, out: Path) -> None:
        import tempfile

        import ray

        from factory.ray_session import start_ray

        self.out = out
        self.session = start_ray(Path(tempfile.gettempdir()) / "factory-caption", opts.address, opts.ray_tmp, None, opts.workers)
        try:
            gpus = ray.cluster_resources().get("GPU", 0) if opts.device != "cpu" else 0
            per_actor = 1 if gpus >= 1 else 0
            actor_cls = ray.remote(num_cpus=1, num_gpus=per_actor)(_CaptionActor)
            device = opts.device if opts.device else (None if per_actor else "cpu")
            self.actors = [actor_cls.remote(folder, opts.prompt, opts.max_new_tokens, device) for _ in range(opts.workers)]
            self._get([actor.load.remote() for actor in self.actors], "could not load the captioning model")
        except BaseException:
            self.session.shutdown()
            raise

    def __enter__(self) -> _RayCaptioners:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.session.shutdown()

    def run(self, batches: list[list[Any]], record: Callable[[list[Any], list[str]], None]) -> list[str]:
        """The batches on the actors, results recorded as they come (any order: the journal is by
        key); returns the Ray session's notes."""
        import ray

        pending: dict[Any, list[Any]] = {}
        queue = list(batches)
        free = list(self.actors)
        while queue or pending:
            while queue and free:
                batch = queue.pop(0)
                actor = free.pop(0)
                ref = actor.caption.remote([picture(r) for r in batch])
                pending[ref] = [batch, actor]
            ready, _ = ray.wait(list(pending), num_returns=1)
            batch, actor = pending.pop(ready[0])
            record(batch, self._get(ready[0], f"a captioning worker failed; rerun to continue (done batches are kept in {journal_path(self.out)})"))
            free.append(actor)
        return self.session.notes

    @staticmethod
    def _get(refs: Any, failure: str) -> Any:
        """``ray.get``, with an actor's own error (a model that cannot load, an unreadable image)
        as that one-line error, and any other failure as ``failure``."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, InputError):
                raise InputError(str(cause)) from None
            raise RunError(f"{failure}: {' '.join(str(exc).split())[:300]}") from exc


class _CaptionActor:
    """A Ray actor holding one :class:`Captioner`, made by :meth:`load` rather than in
    ``__init__``: an error in a method comes back as itself (``RayTaskError.cause``), one in
    ``__init__`` only as the text of a dead actor."""

    def __init__(self, folder: str, prompt: str | None, max_new_tokens: int, device: str | None) -> None:
        self.args = (folder, prompt, max_new_tokens, device)
        self.captioner: Captioner | None = None

    def load(self) -> None:
        self.captioner = Captioner(*self.args)

    def caption(self, images: list[bytes]) -> list[str]:
        assert self.captioner is not None, "load() first"
        return self.captioner(images)
