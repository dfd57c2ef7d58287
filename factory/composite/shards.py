"""WebDataset shards read by key: a tar's members indexed once (name -> offset, size), then each
member read with one ``pread``. Patterns such as ``bg-{000000..000009}.tar`` expand with
braceexpand; a folder means every ``*.tar`` in it."""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from factory.errors import InputError


@dataclass(frozen=True)
class Member:
    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, self.size, self.offset)
        finally:
            os.close(fd)


def is_shards(spec: str) -> bool:
    """Whether ``spec`` names shards: a .tar, a brace pattern of them, or a folder holding only them."""
    if spec.endswith(".tar") or "{" in spec:
        return True
    p = Path(spec)
    return p.is_dir() and any(p.glob("*.tar")) and not any(x.is_dir() for x in p.iterdir())


def shard_paths(spec: str) -> list[Path]:
    p = Path(spec)
    paths = sorted(p.glob("*.tar")) if p.is_dir() else [Path(x) for x in braceexpand(spec)]
    missing = [x for x in paths if not x.is_file()]
    if not paths or missing:
        raise InputError(f"{spec}: no such shard{f' ({missing[0]})' if missing else 's'}")
    return paths


def index_shards(spec: str) -> dict[str, dict[str, Member]]:
    """key -> {suffix -> member} over every shard (``KEY.alpha.png`` has suffix ``alpha.png``)."""
    out: dict[str, dict[str, Member]] = {}
    for path in shard_paths(spec):
        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    name = info.name.rsplit("/", 1)[-1]
                    key, _, suffix = name.partition(".")
                    folder = info.name.rsplit("/", 1)[0] + "/" if "/" in info.name else ""
                    out.setdefault(folder + key, {})[suffix] = Member(str(path), info.offset_data, info.size)
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"{path}: not a readable tar shard ({exc})") from exc
    return out
