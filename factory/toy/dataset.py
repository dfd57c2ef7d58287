"""``factory toy-data``: write N samples of the toy world as a matting set.

Layout (the flat layout ``factory train --data`` reads, and ``factory matte`` / ``eval`` take)::

    OUT/
      toy.json                 the world's settings (seed, size, classes): a resumed run must match
      toy-000000.png           the composite on its green canvas (gradient and soft shadow included)
      toy-000000.alpha.png     the exact alpha, 8-bit
      toy-000000.fg.png        the foreground colour (the object's colour where alpha is 0)
      toy-000000.json          caption, class name, colour, canvas settings (written last)

Each file is written atomically, the ``.json`` last. Re-running the same command resumes: a sample
whose files are all there and whole (complete PNGs, a JSON object) is kept, any other is rendered
again, and the same seed gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.errors import InputError
from factory.feedback import plural
from factory.fsutil import atomic_write_bytes, atomic_write_text, check_writable_dir, read_json_object
from factory.imageio import encode_alpha_png, encode_png
from factory.integrity import check_png
from factory.toy.world import CLASS_NAMES, DEFAULT_SIZE, ToySample, render_sample

SETTINGS_FILE = "toy.json"
FORMAT = "factory-toy-world"
PNG_SUFFIXES = (".png", ".alpha.png", ".fg.png")
#: The largest world seed: a manifest's bound (and ``generate --seed``'s).
MAX_SEED = 2**62


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
    """Render samples ``start .. start + n - 1`` of world ``seed`` into ``out`` (resumable).

    Every option and the folder are checked before anything is written. A sample counts as
    already there only when its four files are whole (:func:`sample_complete`); any other is
    rendered again, which gives the same bytes.
    """
    check_options(n, seed, size)
    out = Path(out).expanduser()
    settings = {"format": FORMAT, "version": 1, "seed": seed, "size": size, "classes": list(CLASS_NAMES)}
    open_toy_folder(out, settings)
    written = skipped = 0
    for index in range(start, start + n):
        key = sample_key(index)
        if sample_complete(out, key, size):
            skipped += 1
        else:
            write_sample(out, key, render_sample(seed, index, size))
            written += 1
        if on_sample is not None:
            on_sample(index)
    return ToySetSummary(out=out, written=written, skipped=skipped)


def check_options(n: int, seed: int, size: int) -> None:
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed must be between 0 and 2^62 (as a manifest's seed), got {seed}")
    if size < 16 or size % 8 or size > 1024:
        raise InputError(f"--size must be a multiple of 8 between 16 and 1024, got {size}")


def open_toy_folder(out: Path, settings: dict[str, Any]) -> None:
    """Check that ``out`` is new, empty or a toy set made with ``settings``, and writable; create
    it and its settings file. One-line :class:`InputError` otherwise, with nothing written."""
    marker = out / SETTINGS_FILE
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder")
        has_settings = marker.is_file()
        if has_settings:
            old = read_json_object(marker, "toy set settings file", hint="remove the folder or choose another --out")
            if {k: old.get(k) for k in settings} != settings:
                raise InputError(f"{out}: holds a toy set with other settings (seed {old.get('seed')}, size {old.get('size')}); choose another --out")
        elif out.is_dir() and any(out.iterdir()):
            raise InputError(f"{out}: is not empty and is not a toy set; choose an empty or new --out")
    except OSError as exc:
        raise InputError(f"{out}: cannot read the output folder ({exc.strerror or exc})") from exc
    check_writable_dir(out)
    if not has_settings:
        atomic_write_text(marker, json.dumps(settings, indent=2) + "\n")


def sample_complete(out: Path, key: str, size: int) -> bool:
    """Whether sample ``key`` is whole in ``out``: its three PNGs present, each a complete PNG
    (every chunk and CRC, IEND included) of ``size`` x ``size``, and its metadata a JSON object.
    Cheap next to rendering it; a file a crash, a copy or a disk cut short fails it."""
    try:
        for suffix in PNG_SUFFIXES:
            info = check_png((out / f"{key}{suffix}").read_bytes())
            if (info.width, info.height) != (size, size):
                return False
        return isinstance(json.loads((out / f"{key}.json").read_bytes()), dict)
    except (OSError, ValueError):  # missing, unreadable, a damaged PNG (PngError), not JSON
        return False


def write_sample(out: Path, key: str, s: ToySample) -> None:
    """The sample's files, each atomically; the metadata last."""
    atomic_write_bytes(out / f"{key}.png", encode_png(s.image), fsync=False)
    atomic_write_bytes(out / f"{key}.alpha.png", encode_alpha_png(s.alpha / 255.0), fsync=False)
    atomic_write_bytes(out / f"{key}.fg.png", encode_png(s.fg), fsync=False)
    meta = {"key": key, "caption": s.caption, "class_name": s.class_name, "colour": s.colour, **s.meta}
    atomic_write_text(out / f"{key}.json", json.dumps(meta, sort_keys=True) + "\n", fsync=False)
