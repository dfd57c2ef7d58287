"""Where the backgrounds come from: a folder of images (searched recursively: BG-20k, COCO and VOC
are plain folders), WebDataset shards, or ``procedural`` (gradients, noise textures and random
shapes drawn in code, for demos and tests, and labelled as such in the card).

Files that are not readable images are skipped and counted. A licence travels with each
background: a ``LICENSE``/``LICENCE`` file at the folder's top for all of them, or a per-image
``license`` column (``metadata.csv``/``metadata.jsonl`` with ``file_name`` in a folder, the
``license`` field of ``KEY.json`` in shards).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from factory.composite.shards import Member, index_shards, is_shards, shard_paths
from factory.errors import InputError
from factory.fsutil import portable_path
from factory.imageio import IMAGE_SUFFIXES, exif_orientation, orient, oriented_size, to_rgb8

PROCEDURAL = "procedural"
PROCEDURAL_LICENCE = "procedural (drawn by factory; no licence needed)"
PROCEDURAL_DESCRIPTION = "procedural (gradients, noise textures, random shapes; for demos and tests)"
#: How many distinct procedural backgrounds exist (each is drawn from its number).
PROCEDURAL_COUNT = 4096
#: The side of a procedural background when composites take the background's own size (``--size 0``).
PROCEDURAL_SIZE = 512
_SHARD_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class BackgroundRef:
    id: str  # relative path, shard#key, or procedural:N
    where: str | Member | None  # None: procedural
    licence: str
    size: tuple[int, int] | None  # (width, height) as shown (EXIF orientation applied), from the header; None for procedural
    orientation: int = 1  # EXIF orientation of the stored pixels (factory.imageio.orient)


@dataclass
class BackgroundSource:
    refs: list[BackgroundRef]
    kind: str  # folder, shards, procedural
    location: str | None  # the folder or shards as given (a path of this machine); None: procedural
    skipped: int = 0  # unreadable files
    roots: tuple[Path, ...] = ()  # the folder (and its symlinked sub-folders) or shard files read

    @property
    def description(self) -> str:
        """For the terminal: the kind of source and where it is, with this machine's path."""
        return PROCEDURAL_DESCRIPTION if self.location is None else f"{self.kind} {self.location}"

    def described(self, out: Path) -> str:
        """For the files written in ``out``: the location as :func:`portable_path` names it."""
        return PROCEDURAL_DESCRIPTION if self.location is None else f"{self.kind} {portable_path(self.location, out)}"

    def by_id(self) -> dict[str, BackgroundRef]:
        if getattr(self, "_ids", None) is None:
            self._ids = {r.id: r for r in self.refs}
        return self._ids

    def load(self, ref: BackgroundRef, size: int | None) -> np.ndarray:
        """The background as RGB uint8 (procedural ones drawn at ``size``, or ``PROCEDURAL_SIZE``)."""
        if ref.where is None:
            return procedural_background(int(ref.id.split(":")[1]), size or PROCEDURAL_SIZE)
        return np.asarray(self.open(ref), np.uint8)

    def open(self, ref: BackgroundRef, draft: tuple[int, int] | None = None) -> Image.Image:
        """A file background as a decoded RGB Pillow image, turned as its EXIF orientation says (a
        phone's portrait photo stands upright); ``draft``: a JPEG may be decoded at 1/2, 1/4 or
        1/8 scale when that still covers this (width, height)."""
        data = ref.where.read() if isinstance(ref.where, Member) else Path(str(ref.where)).read_bytes()
        try:
            im = Image.open(io.BytesIO(data))
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", oriented_size(draft, ref.orientation))  # the stored pixels' (width, height)
            im.load()
            rgb = to_rgb8(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"background {ref.id}: not a readable image ({exc})") from exc
        return rgb if ref.orientation == 1 else Image.fromarray(orient(np.asarray(rgb), ref.orientation))


def _header(data_or_path: bytes | Path) -> tuple[tuple[int, int], int] | None:
    """(size as shown, EXIF orientation) of a readable image, from its header; None otherwise."""
    try:
        src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
        with Image.open(src) as im:
            orientation = exif_orientation(im)
            im.verify()
            return oriented_size(im.size, orientation), orientation
    except Exception:  # noqa: BLE001 - any failure means "not a readable image": skipped and counted
        return None


def _licence_file(root: Path) -> str | None:
    for p in sorted(root.iterdir()):
        if p.is_file() and p.stem.lower() in ("license", "licence"):
            text = p.read_text(errors="replace").strip()
            return text.splitlines()[0].strip() if text else p.name
    return None


def _per_image_licences(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                lic = row.get("license") or row.get("licence")
                if row.get("file_name") and lic:
                    out[row["file_name"]] = lic
    if (root / "metadata.jsonl").is_file():
        for line in (root / "metadata.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                lic = row.get("license") or row.get("licence")
                if row.get("file_name") and lic:
                    out[row["file_name"]] = str(lic)
    return out


def _image_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The image files under ``root`` (hidden names left out), in sorted order, and the symlinked
    folders walked. Symlinked folders are followed (a folder of links to datasets is a common
    layout), each real folder once, so a link loop ends."""
    seen: set[tuple[int, int]] = set()
    found, linked = [], []
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if folder != str(root) and os.path.islink(folder):
            linked.append(Path(folder))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: which alias is kept is fixed
        found += [Path(folder) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file()), linked


def from_folder(root: Path) -> BackgroundSource:
    default = _licence_file(root) or "unknown (no LICENSE file)"
    per_image = _per_image_licences(root)
    refs, skipped = [], 0
    files, linked = _image_files(root)
    for p in files:
        header = _header(p)
        if header is None:
            skipped += 1
            continue
        rel = p.relative_to(root).as_posix()
        refs.append(BackgroundRef(rel, str(p), per_image.get(rel, default), *header))
    return BackgroundSource(refs, "folder", str(root), skipped, (root, *linked))


def from_shards(spec: str) -> BackgroundSource:
    refs, skipped = [], 0
    for key, members in sorted(index_shards(spec).items()):
        suffix = next((s for s in _SHARD_IMAGE_SUFFIXES if s in members), None)
        if suffix is None:
            continue
        image = members[suffix]
        header = _header(image.read())
        if header is None:
            skipped += 1
            continue
        lic = "unknown (no license field)"
        if "json" in members:
            try:
                meta = json.loads(members["json"].read())
                lic = str(meta.get("license") or meta.get("licence") or lic)
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        refs.append(BackgroundRef(f"{Path(image.path).name}#{key}.{suffix}", image, lic, *header))
    roots = (Path(spec),) if Path(spec).is_dir() else tuple(shard_paths(spec))
    return BackgroundSource(refs, "shards", spec, skipped, roots)


def check_apart(out: Path, src: BackgroundSource) -> None:
    """Refuse an output folder that is, holds or lies inside the backgrounds: a re-run would take
    the command's own files for backgrounds, and the restart of the changed plan would delete
    backgrounds it is reading."""
    o = Path(os.path.realpath(out))  # Path.resolve raises on a symlink loop; realpath leaves it to the folder's own check
    for root in src.roots:
        r = Path(os.path.realpath(root))
        if o == r or o in r.parents or r in o.parents:
            raise InputError(f"--out {out} overlaps --backgrounds {root}; write the composites outside the backgrounds")


def procedural_source() -> BackgroundSource:
    refs = [BackgroundRef(f"{PROCEDURAL}:{i}", None, PROCEDURAL_LICENCE, None) for i in range(PROCEDURAL_COUNT)]
    return BackgroundSource(refs, PROCEDURAL, None)


def load_backgrounds(spec: str | None, min_side: int, size: int | None) -> BackgroundSource:
    """The background source named by ``--backgrounds``, checked: at least one readable image, none
    smaller than ``min_side`` when composites take the background's own size."""
    if not spec:
        raise InputError("no backgrounds: give --backgrounds FOLDER, SHARDS or procedural (or composite.backgrounds)")
    if spec == PROCEDURAL:
        if size is None and min_side > PROCEDURAL_SIZE:
            raise InputError(
                f"procedural backgrounds are {PROCEDURAL_SIZE}x{PROCEDURAL_SIZE} with --size 0, smaller than the "
                f"minimum object size {min_side} px; give --size or a smaller --min-size"
            )
        return procedural_source()
    if is_shards(spec):
        src = from_shards(spec)
    elif Path(spec).is_dir():
        src = from_folder(Path(spec))
    else:
        raise InputError(f"--backgrounds {spec}: not a folder, WebDataset shards or 'procedural'")
    if not src.refs:
        raise InputError(f"--backgrounds {spec}: no readable background image ({src.skipped} unreadable files)")
    if size is None:
        small = [r for r in src.refs if r.size is not None and min(r.size) < min_side]
        if small:
            w, h = small[0].size or (0, 0)
            raise InputError(
                f"background {small[0].id} is {w}x{h}, smaller than the minimum object size {min_side} px "
                f"({len(small)} such); give --size or a smaller --min-size"
            )
    return src


def procedural_background(number: int, size: int) -> np.ndarray:
    """A square background drawn from its number: a two-colour gradient, value noise at a few
    scales, and a handful of soft random shapes."""
    rng = np.random.default_rng([0x6267, number])
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (t[None, :] - 0.5) * np.cos(angle) + (t[:, None] - 0.5) * np.sin(angle), 0, 1)
    img = c0[None, None, :] * (1 - ramp[..., None]) + c1[None, None, :] * ramp[..., None]
    for cells, amp in ((4, 28.0), (16, 14.0), (64, 6.0)):
        grid = rng.normal(0, 1, (cells + 1, cells + 1, 3)).astype(np.float32)
        noise = np.asarray(
            [np.asarray(Image.fromarray(grid[..., c], "F").resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)]
        ).transpose(1, 2, 0)
        img = img + amp * noise
    shapes = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shapes)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 10, size // 2, 2)
        colour = (*map(int, rng.integers(0, 256, 3)), int(rng.integers(60, 160)))
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    layer = np.asarray(shapes, np.float32)
    a = layer[..., 3:] / 255.0
    img = img * (1 - a) + layer[..., :3] * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
