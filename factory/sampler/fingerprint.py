"""Cheap content fingerprints of model files and folders (no torch import, no full read).

The run store compares model identities before any work, so a fingerprint must be fast on a
multi-gigabyte checkpoint, yet change when the weights change (a fine-tuned UNet has the same
tensor names and shapes, hence the same safetensors header, as its parent). We hash, per file:
its path relative to the root, its size, and its content when it is small (< 1 MiB: configs,
tokenizer files, safetensors headers of tiny models); for a large file the first 1 MiB (which
holds the safetensors header) and 32 blocks of 64 KiB at evenly spaced offsets, including the
end. That reads about 3 MiB per large file, and any training step that touches most weights
changes the sampled blocks. Modification times are deliberately ignored, so a copied model keeps
its identity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_SMALL = 1 << 20  # files up to this size are hashed whole
_HEAD = 1 << 20  # bytes hashed at the start of a large file
_BLOCK = 1 << 16  # bytes per sampled block
_BLOCKS = 32  # sampled blocks per large file

#: Files that never change what a model computes.
_IGNORED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".lock", ".metadata")


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    h.update(str(size).encode() + b"\0")
    with path.open("rb") as fh:
        if size <= _SMALL:
            h.update(fh.read())
            return
        h.update(fh.read(_HEAD))
        span = size - _BLOCK
        for i in range(_BLOCKS):
            fh.seek(_HEAD + (span - _HEAD) * i // (_BLOCKS - 1) if span > _HEAD else span)
            h.update(fh.read(_BLOCK))


def model_files(root: Path) -> list[Path]:
    """The files of a model folder that matter, sorted; hidden files and folders are skipped."""
    if root.is_file():
        return [root]
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and not p.name.lower().endswith(_IGNORED_SUFFIXES):
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def fingerprint(root: str | Path, files: Iterable[Path] | None = None, digits: int = 16) -> str:
    """A hex fingerprint of a file, or of a folder's model files (see the module docstring)."""
    root = Path(root)
    h = hashlib.blake2b(digest_size=16)
    for path in files if files is not None else model_files(root):
        rel = path.name if root.is_file() else path.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        _hash_file(h, path)
    return h.hexdigest()[:digits]
