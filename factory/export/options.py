"""What the export command is asked to do: its options, and the settings they resolve to.

The settings (format, image format, alpha depth, shard limits, splits, shuffle seed, JPEG quality)
are the manifest's ``export:`` section (:class:`factory.manifest.ExportSettings`) with the options
given on the command line, validated by the same model: one source of defaults and limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from factory.errors import InputError
from factory.manifest import ExportSettings, with_overrides

VERIFY_MODES = ("crc", "decode")

#: Test hook: seconds to sleep after each written sample (lets a test kill an export mid-way).
SLOW_ENV = "FACTORY_EXPORT_TEST_DELAY_S"


@dataclass
class ExportOptions:
    """What the CLI passes; ``None`` means the manifest's ``export:`` setting."""

    run: Path | None = None
    format: str | None = None
    out: Path | None = None
    selection: str | None = None
    all_done: bool = False
    image_format: str | None = None
    alpha_bits: int | None = None
    maxcount: int | None = None
    maxsize: int | None = None
    splits: dict[str, float] | None = None
    seed: int | None = None
    jpeg_quality: int | None = None
    verify: str = "crc"
    strict: bool = False
    restart: bool = False
    fsync: bool = True
    progress: bool = True


def resolve_settings(options: ExportOptions, defaults: ExportSettings) -> ExportSettings:
    """The manifest's export settings with the command line's options."""
    if options.verify not in VERIFY_MODES:
        raise InputError(f"--verify {options.verify}: choose one of {', '.join(VERIFY_MODES)}")
    overrides = {
        "format": options.format,
        "image_format": options.image_format,
        "alpha_bits": options.alpha_bits,
        "maxcount": options.maxcount,
        "maxsize": options.maxsize,
        "split": options.splits,
        "shuffle_seed": options.seed,
        "jpeg_quality": options.jpeg_quality,
    }
    settings = with_overrides(defaults, overrides)
    _check_used(options, settings)
    return settings


def _check_used(options: ExportOptions, settings: ExportSettings) -> None:
    """Refuse an option that the resolved format would ignore (the manifest may set them all)."""
    if options.jpeg_quality is not None and settings.image_format != "jpg":
        raise InputError(f"--jpeg-quality is for --image-format jpg; images are exported as {settings.image_format} (copied)")
    for option, value in (("--maxcount", options.maxcount), ("--maxsize", options.maxsize)):
        if value is not None and settings.format != "webdataset":
            raise InputError(f"{option} limits WebDataset shards; --format {settings.format} writes none")


def parse_splits(values: list[str] | None) -> dict[str, float] | None:
    """``["val=0.05", "test=0.02"]`` or ``["val=0.05,test=0.02"]`` -> {"val": 0.05, "test": 0.02}.

    ``none`` (or ``0``) means no held-out split. ``None`` (option not given) means the manifest's.
    """
    if not values:
        return None
    items = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if items in (["none"], ["0"]):
        return {}
    out: dict[str, float] = {}
    for item in items:
        name, sep, frac = item.partition("=")
        name = name.strip()
        if not sep:
            raise InputError(f"--split {item}: expected NAME=FRACTION, e.g. val=0.05")
        if name in out:
            raise InputError(f"--split {item}: split {name!r} is given twice")
        try:
            out[name] = float(frac)
        except ValueError as exc:
            raise InputError(f"--split {item}: fraction must be a number, e.g. val=0.05") from exc
    return out


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """``"1G"`` -> 1_000_000_000, ``"512Mi"`` -> 536870912, ``"3e9"`` -> 3000000000."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InputError(f"--maxsize {text}: expected bytes, e.g. 1000000000, 1G or 512Mi")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise InputError(f"--maxsize {text}: must be at least one byte")
    return int(value)
