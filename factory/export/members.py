"""One exported sample's members: its checked files (copied, or re-encoded where the format
changes) and the exported metadata JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from factory import __version__
from factory.errors import InputError, RunError
from factory.imageio import decode_alpha, decode_rgb, encode_alpha_png, encode_jpeg
from factory.export.schema import attributes_of, phash_hex, public_model
from factory.integrity import CorruptSample, FileReader, OpenFile, checked_png, close_all, stored_metadata
from factory.manifest import ExportSettings
from factory.store import RunStore

if TYPE_CHECKING:
    from factory.export.prepare import Prepared


@dataclass
class Members:
    """The encoded files of one exported sample."""

    key: str
    image: bytes | memoryview | OpenFile  # views point into the reader's buffers: use before the next
    alpha: bytes | memoryview | OpenFile  # read; open files are closed by the caller (close())
    fg: bytes | memoryview | OpenFile
    meta: dict[str, Any]
    image_copied: bool
    alpha_copied: bool

    def close(self) -> None:
        close_all(self.image, self.alpha, self.fg)


def load_members(
    store: RunStore, rec: dict[str, Any], settings: ExportSettings, verify: str, reader: FileReader | None = None
) -> Members:
    """Read, check and (only where the format changes) re-encode one sample's files."""
    key = rec["key"]
    opened: list[Any] = []
    try:
        image, _ = checked_png(store, rec, ".png", verify, reader)
        opened.append(image)
        alpha, alpha_info = checked_png(store, rec, ".alpha.png", verify, reader)
        opened.append(alpha)
        fg, _ = checked_png(store, rec, ".fg.png", verify, reader)
        opened.append(fg)
        meta = stored_metadata(store, rec, reader)
        image_copied = alpha_copied = True
        if settings.image_format == "jpg":
            try:
                image = encode_jpeg(decode_rgb(_bytes_of(image)), quality=settings.jpeg_quality)
            except InputError as exc:
                raise CorruptSample(key, "corrupt image", f"{key}.png: {exc}") from exc
            image_copied = False
        if alpha_info.bit_depth != settings.alpha_bits:
            try:
                alpha = encode_alpha_png(decode_alpha(_bytes_of(alpha)), settings.alpha_bits)
            except InputError as exc:
                raise CorruptSample(key, "corrupt alpha", f"{key}.alpha.png: {exc}") from exc
            alpha_copied = False
    except BaseException:
        close_all(*opened)
        raise
    close_all(*(f for f in opened if f is not image and f is not alpha and f is not fg))  # re-encoded ones
    return Members(key, image, alpha, fg, meta, image_copied, alpha_copied)


def _bytes_of(data: Any) -> bytes:
    return data.read_all() if isinstance(data, OpenFile) else bytes(data)


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def sample_json(rec: dict[str, Any], m: Members, split: str, settings: ExportSettings, p: Prepared) -> bytes:
    """The exported metadata, in the one shape :func:`factory.export.schema.sample_json_feature`
    declares: from the index row and the run's manifest (the stored JSON is checked, not copied),
    with the exported sizes, local paths removed."""
    sampler = p.manifest.sampler
    meta = {
        "key": rec["key"],
        "index": rec["index"],
        "class_name": rec.get("class_name"),
        "category": rec.get("category"),
        "prompt": rec.get("prompt"),
        "negative_prompt": rec.get("negative_prompt"),
        "attributes": attributes_of(rec, p.attribute_keys),
        "seed": rec.get("seed"),
        "model": public_model(rec.get("model")),
        "alpha_source": rec.get("alpha_source"),
        "sampler": {
            "steps": sampler.steps,
            "guidance": float(sampler.guidance),
            "scheduler": sampler.scheduler,
            "width": sampler.width,
            "height": sampler.height,
        },
        "size": {"width": rec.get("width"), "height": rec.get("height")},
        "scores": {
            "gsg": _round(rec.get("gsg")),
            "gsg_distance": _round(rec.get("gsg_distance")),
            "bg_uniformity": _round(rec.get("bg_uniformity")),
            "canvas_color": rec.get("canvas_color"),
            "alpha_coverage": _round(rec.get("alpha_coverage")),
            "touches_border": rec.get("touches_border"),
            "contains_key_color": rec.get("contains_key_color"),
            "phash": phash_hex(rec.get("phash")),
        },
        "alpha_bits": settings.alpha_bits,
        "file_bytes": {"image": len(m.image), "alpha": len(m.alpha), "fg": len(m.fg)},
        "export": {
            "split": split,
            "image_format": settings.image_format,
            "image_copied": m.image_copied,
            "alpha_copied": m.alpha_copied,
            "factory_version": __version__,
        },
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str).encode()


def fail_strict(problem: str) -> RunError:
    return RunError(f"{problem}; stopped (--strict). Finished shards are kept: re-run to resume")


def load_or_skip(
    p: Prepared, rec: dict[str, Any], reader: FileReader, problems: list[str], on_problem: Callable[[str], None]
) -> Members | None:
    """:func:`load_members`, or None for a damaged sample: reported by key and skipped, or the end
    of the export with ``--strict``."""
    try:
        return load_members(p.store, rec, p.settings, p.options.verify, reader)
    except CorruptSample as exc:
        if p.options.strict:
            raise fail_strict(str(exc)) from exc
        problems.append(str(exc))
        on_problem(str(exc))
        return None
