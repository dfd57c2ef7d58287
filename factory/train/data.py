"""Training data: matting sets read from folders or WebDataset shards, composited on green on the fly.

Sources (``--data``, repeatable; see ``docs/train.md``):

- **paired folders**: ``image/`` and/or ``fg/`` plus ``alpha/`` sub-folders with matching file
  stems (aliases: ``images im img merged original``; ``alpha alphas matte mattes mask masks gt``;
  ``fg foreground``), optionally a ``metadata.jsonl`` (``factory export --format folder`` writes
  one; its ``file_name``/``key``, ``prompt``/``caption``/``text`` and ``class_name`` are read). An
  export root holding a ``train/`` split is read as that split.
- **flat folders** (searched recursively): ``KEY.png|jpg|jpeg|webp`` + ``KEY.alpha.png``
  [+ ``KEY.fg.png``] [+ ``KEY.json``], the layout of a run's ``samples/`` and of the shards.
- **WebDataset shards**: a ``.tar``, a brace pattern (``data-{000000..000009}.tar``) or a folder
  of ``.tar`` files, with members ``KEY.png|jpg``, ``KEY.alpha.png`` [, ``KEY.fg.png``]
  [, ``KEY.json``]. Shards are indexed once at start (tar headers only) and then read by offset,
  so the data order is a deterministic function of the seed and the step (exact resume).

Captions, first found wins: the ``--captions`` file, the sample's JSON ``caption``, ``prompt`` or
``text``, its ``class_name``, then ``default_caption``; none is an error naming the sample. The
prompt is the caption when it already holds the canvas token ("green") as a word, else
``prompt_template.format(caption=...)``. The class name's words are the object tokens.

Per sample (:meth:`MattingDataset.__getitem__`), from a generator seeded with (seed, position):
make square (pad with alpha 0, sparing sides the object touches, or crop), random square crop of
``crop_scale``, resize to ``resolution``, horizontal flip; all on image, alpha and foreground
together. The foreground is the given ``fg`` or, when none, pymatting's ``estimate_foreground_ml``
on the resized crop. Then ``x = alpha F + (1 - alpha) G`` on a flat green ``G`` drawn from the HSV
ranges ``green_hue``, ``green_saturation``, ``green_value``. The mask ``M`` is the alpha itself.
"""

from __future__ import annotations

import colorsys
import glob
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from factory.errors import InputError, RunError
from factory.imageio import IMAGE_SUFFIXES

IMAGE_DIRS = ("image", "images", "im", "img", "merged", "original")
ALPHA_DIRS = ("alpha", "alphas", "matte", "mattes", "mask", "masks", "gt")
FG_DIRS = ("fg", "foreground")
ALPHA_SUFFIX = ".alpha.png"
FG_SUFFIX = ".fg.png"
CAPTION_KEYS = ("caption", "prompt", "text")
#: An object "touches" a border when some alpha on that border row/column exceeds this.
TOUCH_ALPHA = 0.1


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Ref:
    """Where one file's bytes are: a file path, or a member of a tar (offset and size of its data)."""

    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        if self.offset < 0:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: truncated member at offset {self.offset}")
        return data

    def describe(self) -> str:
        return self.path if self.offset < 0 else f"{self.path}@{self.offset}"


@dataclass
class Record:
    """One training sample: its files, metadata, and (after :func:`assign_prompts`) its prompt."""

    key: str
    alpha: Ref
    image: Ref | None = None
    fg: Ref | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    prompt: str = ""
    object_words: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ scanning


def scan_sources(sources: Sequence[str]) -> list[Record]:
    """Index every ``--data`` source, in the given order (each sorted by key). One-line errors."""
    if not sources:
        raise InputError("no training data: give --data (a folder or WebDataset shards)")
    records: list[Record] = []
    for source in sources:
        found = _scan_one(source)
        if not found:
            raise InputError(f"{source}: no training samples found (need an image or foreground plus an alpha per sample)")
        records.extend(found)
    return records


def _scan_one(source: str) -> list[Record]:
    from factory.export.outdir import check_export_finished

    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".tar":
            check_export_finished(path.parent, source)
            return _scan_shards([path], source)
        raise InputError(f"{source}: not a folder or a .tar shard")
    if path.is_dir():
        check_export_finished(path, source)
        split = path / "train"
        if not _paired_dirs(path) and _paired_dirs(split):
            path = split
        dirs = _paired_dirs(path)
        if dirs:
            return _scan_paired(path, dirs, source)
        tars = sorted(path.glob("*.tar"))
        train_tars = [t for t in tars if t.name.startswith("train-")]
        if train_tars:  # a `factory export` folder: held-out splits (val-*.tar ...) are not trained on
            tars = train_tars
        if tars:
            return _scan_shards(tars, source)
        return _scan_flat(path, source)
    if any(c in source for c in "{*?["):
        from braceexpand import braceexpand

        shards = sorted({Path(p) for pattern in braceexpand(source) for p in (glob.glob(str(Path(pattern).expanduser())) or [pattern])})
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise InputError(f"{source}: shard {missing[0]} not found")
        if not shards:
            raise InputError(f"{source}: matches no shard")
        for folder in sorted({p.parent for p in shards}):
            check_export_finished(folder, source)
        return _scan_shards(shards, source)
    raise InputError(f"{source}: training data not found")


def _paired_dirs(path: Path) -> dict[str, Path] | None:
    if not path.is_dir():
        return None
    found: dict[str, Path] = {}
    for role, names in (("image", IMAGE_DIRS), ("alpha", ALPHA_DIRS), ("fg", FG_DIRS)):
        for name in names:
            if (path / name).is_dir():
                found[role] = path / name
                break
    if "alpha" in found and ("image" in found or "fg" in found):
        return found
    return None


def _images_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".tif", ".tiff", ".bmp") and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def _scan_paired(root: Path, dirs: dict[str, Path], source: str) -> list[Record]:
    alphas = _images_by_stem(dirs["alpha"])
    images = _images_by_stem(dirs["image"]) if "image" in dirs else {}
    fgs = _images_by_stem(dirs["fg"]) if "fg" in dirs else {}
    meta = _read_metadata_jsonl(root / "metadata.jsonl")
    records = []
    for stem, alpha in alphas.items():
        image, fg = images.get(stem), fgs.get(stem)
        if image is None and fg is None:
            continue
        m = meta.get(stem) or meta.get((image or fg).name) or {}  # type: ignore[union-attr]
        key = str(m.get("key") or stem)
        records.append(Record(key, Ref(str(alpha)), Ref(str(image)) if image else None, Ref(str(fg)) if fg else None, m, source))
    return records


def _read_metadata_jsonl(path: Path) -> dict[str, dict[str, Any]]:
    """metadata.jsonl rows by file stem, file name and key."""
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{n}: not JSON ({exc})") from exc
        if not isinstance(row, dict):
            continue
        for name in (row.get("file_name"), row.get("key")):
            if isinstance(name, str) and name:
                out.setdefault(Path(name).name, row)
                out.setdefault(Path(name).stem, row)
    return out


def _scan_flat(root: Path, source: str) -> list[Record]:
    records = []
    for alpha in sorted(root.rglob(f"*{ALPHA_SUFFIX}")):
        if any(part.startswith(".") for part in alpha.relative_to(root).parts):
            continue
        key = alpha.name[: -len(ALPHA_SUFFIX)]
        folder = alpha.parent
        image = next((folder / f"{key}{s}" for s in IMAGE_SUFFIXES if (folder / f"{key}{s}").is_file()), None)
        fg = folder / f"{key}{FG_SUFFIX}"
        fg_ref = Ref(str(fg)) if fg.is_file() else None
        if image is None and fg_ref is None:
            continue
        meta_path = folder / f"{key}.json"
        meta = _json_meta(meta_path.read_bytes(), str(meta_path)) if meta_path.is_file() else {}
        records.append(Record(key, Ref(str(alpha)), Ref(str(image)) if image else None, fg_ref, meta, source))
    return records


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key ends at the first dot of the file name (dirs stay in the key)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _scan_shards(shards: Sequence[Path], source: str) -> list[Record]:
    records: list[Record] = []
    for shard in shards:
        members: dict[str, dict[str, Ref]] = {}
        order: list[str] = []
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _split_member(info.name)
                    if key not in members:
                        members[key] = {}
                        order.append(key)
                    members[key][ext] = Ref(str(shard), info.offset_data, info.size)
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"{shard}: not a readable (uncompressed) tar shard ({exc})") from exc
        for key in order:
            parts = members[key]
            alpha = parts.get("alpha.png")
            image = next((parts[e] for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
            fg = parts.get("fg.png")
            if alpha is None or (image is None and fg is None):
                continue
            meta = _json_meta(parts["json"].read(), f"{shard}:{key}.json") if "json" in parts else {}
            records.append(Record(key, alpha, image, fg, meta, source))
    return records


def _json_meta(data: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise InputError(f"{where}: not JSON ({exc})") from exc
    return meta if isinstance(meta, dict) else {}


# ------------------------------------------------------------------------------ captions


def read_captions(path: str | Path) -> dict[str, dict[str, str]]:
    """key -> {"caption", ["class_name"]} from .jsonl, .json (key -> caption) or .tsv/.txt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the captions file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: cannot read the captions file (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc
    out: dict[str, dict[str, str]] = {}
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path}: not JSON ({exc})") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise InputError(f"{path}: a .json captions file maps each key to its caption (a string)")
        return {str(k): {"caption": v} for k, v in data.items()}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{n}: not JSON ({exc})") from exc
            key = row.get("key") or row.get("file_name") if isinstance(row, dict) else None
            caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None) if isinstance(row, dict) else None
            if not key or caption is None:
                raise InputError(f"{path}:{n}: each line needs \"key\" and \"caption\"")
            entry = {"caption": caption}
            if isinstance(row.get("class_name"), str):
                entry["class_name"] = row["class_name"]
            out[Path(str(key)).stem if "file_name" in row and "key" not in row else str(key)] = entry
        else:
            key, sep, caption = line.partition("\t")
            if not sep:
                raise InputError(f"{path}:{n}: expected KEY<TAB>caption")
            out[key.strip()] = {"caption": caption.strip()}
    return out


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(word.lower())}(?![\w])", text.lower()) is not None


def assign_prompts(
    records: Sequence[Record],
    captions: dict[str, dict[str, str]] | None,
    template: str,
    canvas_token: str,
    default_caption: str | None,
) -> None:
    """Set each record's ``prompt`` and ``object_words`` (see the module docstring)."""
    captions = captions or {}
    for rec in records:
        entry = captions.get(rec.key) or captions.get(rec.key.rsplit("/", 1)[-1]) or {}
        class_name = entry.get("class_name") or rec.meta.get("class_name") or rec.meta.get("class")
        caption = entry.get("caption") or next((rec.meta[k] for k in CAPTION_KEYS if isinstance(rec.meta.get(k), str) and rec.meta[k].strip()), None)
        if caption is None and isinstance(class_name, str) and class_name.strip():
            caption = class_name.strip()
        if caption is None:
            caption = default_caption
        if caption is None:
            raise InputError(
                f"{rec.key} (from {rec.source}): no caption; give --captions FILE, sample metadata with a "
                "caption/prompt/class_name, or default_caption in --config"
            )
        rec.prompt = caption if has_word(caption, canvas_token) else template.format(caption=caption)
        words = re.findall(r"[a-z0-9]+", class_name.lower()) if isinstance(class_name, str) else []
        rec.object_words = tuple(w for w in words if w != canvas_token.lower())


def data_summary(records: Sequence[Record]) -> dict[str, Any]:
    """What resume compares: count and a hash of keys, files and prompts, in order."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.key}\0{r.alpha.describe()}\0{r.prompt}\n".encode())
    return {"samples": len(records), "digest": h.hexdigest()[:16], "with_fg": sum(r.fg is not None for r in records)}


# ------------------------------------------------------------------------------ transforms


def random_green(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """A flat canvas colour (3,) float in [0, 1] drawn uniformly from the HSV box."""
    h = rng.uniform(*hue) / 360.0
    s = rng.uniform(*sat)
    v = rng.uniform(*val)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _touches(alpha: np.ndarray) -> tuple[bool, bool, bool, bool]:
    """Whether the object reaches the top, bottom, left, right border."""
    return (
        bool(alpha[0].max() > TOUCH_ALPHA),
        bool(alpha[-1].max() > TOUCH_ALPHA),
        bool(alpha[:, 0].max() > TOUCH_ALPHA),
        bool(alpha[:, -1].max() > TOUCH_ALPHA),
    )


def _pad_offset(rng: np.random.Generator, room: int, near: bool, far: bool) -> int:
    if room <= 0:
        return 0
    if near and not far:
        return 0  # keep the touched near border at the canvas border
    if far and not near:
        return room
    return int(rng.integers(0, room + 1))


def square_box(alpha: np.ndarray, mode: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(side, y, x): a square that holds the image at (y, x) when padding, or a crop origin."""
    h, w = alpha.shape
    if mode == "pad":
        side = max(h, w)
        top, bottom, left, right = _touches(alpha)
        return side, _pad_offset(rng, side - h, top, bottom), _pad_offset(rng, side - w, left, right)
    side = min(h, w)
    return side, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))


def _resize(arr: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    if arr.ndim == 2:
        im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))  # mode F
        return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), dtype=np.float32)
    im = Image.fromarray(arr)
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)


def augment(
    alpha: np.ndarray,
    rgb: Sequence[np.ndarray | None],
    *,
    size: int,
    square: str,
    crop_scale: tuple[float, float],
    flip: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Square, random crop, resize, flip: alpha (H, W) float and RGB uint8 arrays stay aligned."""
    side, oy, ox = square_box(alpha, square, rng)
    h, w = alpha.shape
    if square == "pad" and (side != h or side != w):
        pad = ((oy, side - h - oy), (ox, side - w - ox))
        alpha = np.pad(alpha, pad)
        rgb = [None if a is None else np.pad(a, (*pad, (0, 0)), mode="edge") for a in rgb]
        oy = ox = 0
    scale = rng.uniform(*crop_scale)
    crop = max(1, min(side, int(round(scale * side))))
    y = oy + int(rng.integers(0, side - crop + 1))
    x = ox + int(rng.integers(0, side - crop + 1))
    box = (x, y, x + crop, y + crop)
    alpha = np.clip(_resize(alpha, box, size), 0.0, 1.0)
    rgb = [None if a is None else _resize(a, box, size) for a in rgb]
    if rng.random() < flip:
        alpha = alpha[:, ::-1]
        rgb = [None if a is None else a[:, ::-1] for a in rgb]
    return np.ascontiguousarray(alpha), [None if a is None else np.ascontiguousarray(a) for a in rgb]


def estimate_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Foreground colour in [0, 1] (H, W, 3) float32 by pymatting's ``estimate_foreground_ml``."""
    from pymatting import estimate_foreground_ml

    fg = estimate_foreground_ml(image.astype(np.float64) / 255.0, alpha.astype(np.float64))
    return np.clip(fg, 0.0, 1.0).astype(np.float32)


def composite(fg: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    """``alpha F + (1 - alpha) G`` in [0, 1], (H, W, 3) float32."""
    a = alpha[..., None]
    return (a * fg + (1.0 - a) * color.reshape(1, 1, 3)).astype(np.float32)


# ------------------------------------------------------------------------------ dataset


class MattingDataset:
    """Map-style dataset of composited samples; items are addressed as ``(index, position)``.

    ``position`` is the sample's place in the run's stream (see :class:`StepBatches`); it seeds
    the sample's augmentation and canvas, so an item is the same whichever worker loads it.
    """

    def __init__(self, records: Sequence[Record], cfg: Any) -> None:
        self.records = list(records)
        self.size = int(cfg.resolution)
        self.square = cfg.square
        self.crop_scale = tuple(cfg.crop_scale)
        self.flip = float(cfg.flip)
        self.hsv = (tuple(cfg.green_hue), tuple(cfg.green_saturation), tuple(cfg.green_value))
        self.seed = int(cfg.seed)
        self.empty_prompts = float(cfg.proportion_empty_prompts)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, rec: Record) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        from factory.imageio import decode_alpha, decode_rgb

        def read(role: str, ref: Ref | None, decoder: Any) -> Any:
            if ref is None:
                return None
            try:
                return decoder(ref.read())
            except (InputError, OSError) as exc:
                reason = type(exc.__cause__ or exc).__name__
                raise RunError(f"training sample {rec.key}: cannot read its {role} {ref.describe()} ({reason})") from exc

        alpha = read("alpha", rec.alpha, decode_alpha)
        image = read("image", rec.image, decode_rgb)
        fg = read("foreground", rec.fg, decode_rgb)
        for name, arr in (("image", image), ("fg", fg)):
            if arr is not None and arr.shape[:2] != alpha.shape:
                raise RunError(f"training sample {rec.key}: {name} is {arr.shape[1]}x{arr.shape[0]}, its alpha {alpha.shape[1]}x{alpha.shape[0]}")
        return alpha, image, fg

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        import torch

        index, position = item
        rec = self.records[index]
        rng = np.random.default_rng([self.seed, int(position), 0x5A11])
        alpha, image, fg = self.load(rec)
        alpha, (image, fg) = augment(
            alpha, [image, fg], size=self.size, square=self.square, crop_scale=self.crop_scale, flip=self.flip, rng=rng
        )
        fg_f = fg.astype(np.float32) / 255.0 if fg is not None else estimate_foreground(image, alpha)  # type: ignore[arg-type]
        color = random_green(rng, *self.hsv)
        x = composite(fg_f, alpha, color)
        # its own stream, so that the augmentation and canvas do not depend on the proportion
        empty = self.empty_prompts > 0 and np.random.default_rng([self.seed, int(position), 0xE417]).random() < self.empty_prompts
        return {
            "pixel_values": torch.from_numpy(x.transpose(2, 0, 1) * 2.0 - 1.0),
            "alpha": torch.from_numpy(alpha[None]),
            "prompt": "" if empty else rec.prompt,
            "object_words": [] if empty else list(rec.object_words),
            "key": rec.key,
            "position": int(position),
        }


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
        "alpha": torch.stack([i["alpha"] for i in items]),
        "prompt": [i["prompt"] for i in items],
        "object_words": [i["object_words"] for i in items],
        "key": [i["key"] for i in items],
        "position": [i["position"] for i in items],
    }


class StepBatches:
    """Batch sampler: for each optimizer step from ``start_step``, its micro-batches for one rank.

    The run is one stream of positions 0, 1, 2, ...: position ``p`` is sample ``perm_e[p % N]``
    of epoch ``e = p // N``, where ``perm_e`` is a permutation seeded with (seed, e). Step ``s``,
    micro-batch ``a``, rank ``r`` and item ``b`` take position
    ``((s * accum + a) * world + r) * batch + b``, so the order depends on nothing but the seed
    and the step: resuming at step ``s`` continues exactly, whatever the loader workers.
    """

    def __init__(self, n: int, *, seed: int, start_step: int, end_step: int, batch: int, accum: int, world: int = 1, rank: int = 0) -> None:
        if n <= 0:
            raise ValueError("no samples")
        self.n, self.seed, self.start, self.end = n, seed, start_step, end_step
        self.batch, self.accum, self.world, self.rank = batch, accum, world, rank
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def index_at(self, position: int) -> int:
        epoch, j = divmod(position, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0xDA7A]).permutation(self.n)
            self._epoch = epoch
        assert self._perm is not None
        return int(self._perm[j])

    def positions(self, step: int, micro: int) -> list[int]:
        first = ((step * self.accum + micro) * self.world + self.rank) * self.batch
        return list(range(first, first + self.batch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            for micro in range(self.accum):
                yield [(self.index_at(p), p) for p in self.positions(step, micro)]

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum


def make_loader(dataset: MattingDataset, batches: StepBatches, workers: int) -> Any:
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=False,
        prefetch_factor=2 if workers > 0 else None,
    )

