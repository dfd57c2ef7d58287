"""``factory toy-data``: write N samples of the toy world as a matting set.

Layout (the flat layout ``factory train --data`` reads, and ``factory matte`` / ``eval`` take)::

    OUT/
      toy.json                 the world's settings (seed, size, classes): a resumed run must match
      toy-000000.png           the composite on its green canvas (gradient and soft shadow included)
      toy-000000.alpha.png     the exact alpha, 8-bit
      toy-000000.fg.png        the foreground colour (the object's colour where alpha is 0)
      toy-000000.json          caption, class name, colour, canvas settings (written last)

Each file is written atomically; a sample whose ``.json`` exists is complete, so re-running the
same command resumes, and the same seed gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory.errors import InputError
from factory.feedback import plural
from factory.fsutil import atomic_write_bytes, atomic_write_text, check_writable_dir
from factory.imageio import encode_alpha_png, encode_png
from factory.toy.world import CLASS_NAMES, DEFAULT_SIZE, render_sample

SETTINGS_FILE = "toy.json"
FORMAT = "factory-toy-world"


def sample_key(index: int) -> str:
    return f"toy-{index:06d}"


@dataclass
class ToySetSummary:
    out: Path
    written: int
    skipped: int

    def lines(self) -> list[str]:
        return [
            f"toy world: {plural(self.written, 'sample')} written, {self.skipped} already there, in {self.out}",
            f"train on it: factory train --data {self.out} --out RUN",
        ]


def write_toy_set(
    out: Path, n: int, seed: int = 0, size: int = DEFAULT_SIZE, start: int = 0, on_sample: Callable[[int], None] | None = None
) -> ToySetSummary:
    """Render samples ``start .. start + n - 1`` of world ``seed`` into ``out`` (resumable)."""
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if size < 16 or size % 8 or size > 1024:
        raise InputError(f"--size must be a multiple of 8 between 16 and 1024, got {size}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    settings = {"format": FORMAT, "version": 1, "seed": seed, "size": size, "classes": list(CLASS_NAMES)}
    marker = out / SETTINGS_FILE
    if marker.is_file():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{marker}: unreadable ({exc}); remove the folder or choose another --out") from exc
        if {k: old.get(k) for k in settings} != settings:
            raise InputError(f"{out}: holds a toy set with other settings (seed {old.get('seed')}, size {old.get('size')}); choose another --out")
    elif out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out}: is not empty and is not a toy set; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    check_writable_dir(out)
    if not marker.is_file():
        atomic_write_text(marker, json.dumps(settings, indent=2) + "\n")
    written = skipped = 0
    for index in range(start, start + n):
        key = sample_key(index)
        if (out / f"{key}.json").is_file():
            skipped += 1
        else:
            s = render_sample(seed, index, size)
            atomic_write_bytes(out / f"{key}.png", encode_png(s.image), fsync=False)
            atomic_write_bytes(out / f"{key}.alpha.png", encode_alpha_png(s.alpha / 255.0), fsync=False)
            atomic_write_bytes(out / f"{key}.fg.png", encode_png(s.fg), fsync=False)
            meta = {"key": key, "caption": s.caption, "class_name": s.class_name, "colour": s.colour, **s.meta}
            atomic_write_text(out / f"{key}.json", json.dumps(meta, sort_keys=True) + "\n", fsync=False)
            written += 1
        if on_sample is not None:
            on_sample(index)
    return ToySetSummary(out=out, written=written, skipped=skipped)
