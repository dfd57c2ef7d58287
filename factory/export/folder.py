"""Folder layout (Composition-1k style), readable by HF datasets' ``imagefolder`` loader::

    OUT/train/image/KEY.png      image on green (KEY.jpg with --image-format jpg)
    OUT/train/alpha/KEY.png      alpha matte, one channel, 8 or 16 bits
    OUT/train/fg/KEY.png         decontaminated foreground
    OUT/train/metadata.jsonl     one line per sample: file_name, alpha_file_name, fg_file_name, key,
                                 class, prompt, seed, attributes (an object), model and scores
    OUT/val/...                  the same for each held-out split

``file_name`` and the ``*_file_name`` columns make imagefolder load three image columns
(``image``, ``alpha``, ``fg``); the split folders ``train``, ``val``/``validation``, ``test`` are
recognised by name (imagefolder reports ``val`` as ``validation``).

Every file is written to a temporary name and renamed, so a file under a final name is complete.
A split's ``metadata.jsonl`` is written last (the commit). Resume (same plan): samples whose three
files are all present (copied ones with the store's size) are kept; stale files are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factory.export.card import FOLDER_LOADING
from factory.export.members import load_or_skip
from factory.export.options import SLOW_ENV
from factory.export.outdir import OutDir
from factory.export.prepare import Prepared
from factory.export.schema import attributes_of, phash_hex, public_model
from factory.export.records import Records, SplitResult, WriteResult, split_rows
from factory.errors import InputError
from factory.feedback import plural
from factory.fsutil import TMP_PREFIX, AtomicFile, atomic_write_bytes
from factory.integrity import FileReader
from factory.plan import KEY_PATTERN

SUBDIRS = ("image", "alpha", "fg")
_FILE_RE = re.compile(r"^" + KEY_PATTERN + r"\.(png|jpg)$")
METADATA = "metadata.jsonl"


def metadata_row(rec: dict[str, Any], names: dict[str, str], alpha_bits: int, attribute_keys: list[str]) -> dict[str, Any]:
    """One line of metadata.jsonl: the columns :data:`factory.export.schema.FOLDER_COLUMNS` types."""
    return {
        "file_name": names["image"],
        "alpha_file_name": names["alpha"],
        "fg_file_name": names["fg"],
        "key": rec["key"],
        "index": rec["index"],
        "class_name": rec["class_name"],
        "category": rec["category"],
        "prompt": rec["prompt"],
        "negative_prompt": rec["negative_prompt"],
        "seed": rec["seed"],
        "attributes": attributes_of(rec, attribute_keys),
        "model": public_model(rec.get("model")),
        "width": rec.get("width"),
        "height": rec.get("height"),
        "alpha_bits": alpha_bits,
        "gsg": rec.get("gsg"),
        "gsg_distance": rec.get("gsg_distance"),
        "bg_uniformity": rec.get("bg_uniformity"),
        "canvas_color": rec.get("canvas_color"),
        "alpha_coverage": rec.get("alpha_coverage"),
        "touches_border": rec.get("touches_border"),
        "contains_key_color": rec.get("contains_key_color"),
        "phash": phash_hex(rec.get("phash")),
    }


def write_folder(
    p: Prepared, outdir: OutDir, advance: Callable[[int, int], None], on_problem: Callable[[str], None]
) -> WriteResult:
    out = outdir.root
    delay = float(os.environ.get(SLOW_ENV, "0") or 0)
    result = WriteResult(records=Records(p.attribute_keys), splits={}, problems=[])
    pending: list[AtomicFile] = []  # each split's metadata.jsonl, committed once every file is written
    try:
        _write_splits(p, out, advance, on_problem, result, pending, delay)
    finally:
        for meta in pending:  # interrupted: drop the unfinished metadata files
            meta.abort()
    for path in out.iterdir():  # split folders of an older plan
        if path.is_dir() and not path.is_symlink() and path.name not in result.splits and (path / METADATA).exists():
            left = remove_split(path)
            if left:
                on_problem(left_alone_line(left))
    return result


def _export_file(path: Path) -> bool:
    """A file an export writes in a split's sub-folder: ``KEY.png``/``KEY.jpg`` or a temporary name."""
    return path.is_file() and not path.is_symlink() and (path.name.startswith(TMP_PREFIX) or _FILE_RE.match(path.name) is not None)


def remove_split(path: Path) -> list[str]:
    """Delete what an export wrote in the split folder ``path`` and the folders left empty.

    Symlinks and files an export does not write are left where they are; returns their paths.
    """
    left: list[str] = []
    for sub in SUBDIRS:
        folder = path / sub
        if folder.is_symlink():
            left.append(f"{folder} (symlink)")
        elif folder.is_dir():
            for item in folder.iterdir():
                if _export_file(item):
                    item.unlink()
                else:
                    left.append(str(item) + (" (symlink)" if item.is_symlink() else ""))
            with contextlib.suppress(OSError):
                folder.rmdir()
    meta = path / METADATA
    if meta.is_file() and not meta.is_symlink():
        meta.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()
    return left


def left_alone_line(left: list[str]) -> str:
    shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
    return f"left alone: {plural(len(left), 'entry', 'entries')} an export did not write (symlinks or foreign files): {shown}"


def _real_folder(path: Path) -> Path:
    """``path`` created as a real folder; a symlink there is refused (an export never writes through one)."""
    if path.is_symlink():
        raise InputError(f"{path}: is a symlink; an export writes only into folders it makes (remove the link or choose another --out)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_splits(
    p: Prepared,
    out: Path,
    advance: Callable[[int, int], None],
    on_problem: Callable[[str], None],
    result: WriteResult,
    pending: list[AtomicFile],
    delay: float,
) -> None:
    settings = p.settings
    reader = FileReader(reuse_buffers=True)  # each sample is written before the next is read
    for split in settings.split_order():
        rows = split_rows(p.ordered, split)
        sres = SplitResult(split)
        result.splits[split] = sres
        base = out / split
        if len(rows) == 0:  # nothing in this split (e.g. every class has one sample): no folder
            if (base / METADATA).exists() and not base.is_symlink():
                left = remove_split(base)
                if left:
                    on_problem(left_alone_line(left))
            continue
        _real_folder(base)
        for sub in SUBDIRS:
            _real_folder(base / sub)
        meta_fh = AtomicFile(base / METADATA, "w", fsync=False, encoding="utf-8")
        pending.append(meta_fh)
        wanted: dict[str, set[str]] = {sub: set() for sub in SUBDIRS}
        for rec in rows.iter_from(0):
            key = rec["key"]
            names = {"image": f"image/{key}.{settings.image_ext}", "alpha": f"alpha/{key}.png", "fg": f"fg/{key}.png"}
            paths = {sub: base / name for sub, name in names.items()}
            sizes = _existing_sizes(paths, rec, settings)
            if sizes is not None:
                result.resumed_samples += 1
                advance(1, 0)
            else:
                m = load_or_skip(p, rec, reader, result.problems, on_problem)
                if m is None:
                    advance(1, 0)
                    continue
                data = {"image": m.image, "alpha": m.alpha, "fg": m.fg}
                for sub, path in paths.items():
                    atomic_write_bytes(path, data[sub], fsync=False)  # one sync for all before the commit
                sizes = {sub: len(d) for sub, d in data.items()}
                written = sum(sizes.values())
                result.bytes_written += written
                advance(1, written)
                if delay:
                    time.sleep(delay)
            for sub, path in paths.items():
                wanted[sub].add(path.name)
            meta_fh.write(json.dumps(metadata_row(rec, names, settings.alpha_bits, p.attribute_keys), allow_nan=False) + "\n")
            result.records.append(
                {
                    "key": key,
                    "index": rec["index"],
                    "split": split,
                    "path": f"{split}/{names['image']}",
                    "class_name": rec["class_name"],
                    "category": rec["category"],
                    "gsg": rec.get("gsg"),
                    "alpha_coverage": rec.get("alpha_coverage"),
                    "image_bytes": sizes["image"],
                    "alpha_bytes": sizes["alpha"],
                    "fg_bytes": sizes["fg"],
                    "json_bytes": None,
                    "attributes": attributes_of(rec, p.attribute_keys),
                    "phash": phash_hex(rec.get("phash")),
                }
            )
            sres.samples += 1
            sres.bytes += sum(sizes.values())
        left: list[str] = []
        for sub in SUBDIRS:  # files of samples no longer in the plan
            for path in (base / sub).iterdir():
                if path.name in wanted[sub]:
                    continue
                if _export_file(path):
                    path.unlink()
                else:
                    left.append(str(path) + (" (symlink)" if path.is_symlink() else ""))
        if left:
            on_problem(left_alone_line(left))

    if p.options.fsync:
        os.sync()  # the sample files, once, before the metadata files commit them
    for meta in pending:
        meta.commit()
    pending.clear()


def _existing_sizes(paths: dict[str, Path], rec: dict[str, Any], settings: Any) -> dict[str, int] | None:
    """Sizes of a sample already written by an interrupted run of the same plan, else None."""
    sizes = {}
    for sub, path in paths.items():
        try:
            sizes[sub] = path.stat().st_size
        except FileNotFoundError:
            return None
    if settings.image_format == "png" and sizes["image"] != rec["image_bytes"]:
        return None
    if settings.alpha_bits == rec["alpha_bits"] and sizes["alpha"] != rec["alpha_bytes"]:
        return None
    if sizes["fg"] != rec["fg_bytes"]:
        return None
    return sizes


class FolderFormat:
    """The ``folder`` output format: ``SPLIT/image|alpha|fg/`` and ``SPLIT/metadata.jsonl``."""

    name = "folder"

    def write(self, p: Prepared, outdir: OutDir, advance: Callable[[int, int], None], on_problem: Callable[[str], None]) -> WriteResult:
        return write_folder(p, outdir, advance, on_problem)

    def sidecars(self, out: Path, result: WriteResult) -> None:
        """Nothing beyond each split's ``metadata.jsonl``, written with the split."""

    def clean(self, out: Path) -> None:
        """Delete the split folders an earlier export wrote: their known sub-folders and metadata
        only (a split folder is removed when nothing else is left in it)."""
        for path in out.iterdir():
            if not path.is_dir() or path.is_symlink():
                continue
            if not ((path / METADATA).exists() or any((path / s).is_dir() for s in SUBDIRS)):
                continue
            remove_split(path)

    def loading(self, p: Prepared, result: WriteResult) -> str:
        return FOLDER_LOADING
