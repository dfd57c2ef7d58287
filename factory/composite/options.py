"""What ``factory composite`` is asked to do: its options, and the settings they resolve to (the
manifest's ``composite:`` section with the options given, validated by
:class:`factory.manifest.CompositeSettings`: one source of defaults and limits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.errors import InputError
from factory.manifest import CompositeSettings, with_overrides


@dataclass
class CompositeOptions:
    """What the CLI passes; ``None`` means the manifest's ``composite:`` setting."""

    run: Path | None = None
    selection: str | None = None
    objects: str | None = None  # an export (shards or folder) instead of a run
    out: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # CompositeSettings fields
    restart: bool = False
    workers: int = 1
    address: str | None = None
    device: str | None = None
    progress: bool = True


def parse_range(text: str | None, option: str, kind: type = float) -> tuple[Any, Any] | None:
    """``"0.3,0.8"`` -> (0.3, 0.8); one number means (x, x)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [kind(p) for p in parts]
    except ValueError as exc:
        raise InputError(f"{option} {text}: expected LOW,HIGH numbers, e.g. 0.3,0.8") from exc
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise InputError(f"{option} {text}: expected LOW,HIGH")
    return values[0], values[1]


def resolve_settings(options: CompositeOptions, defaults: CompositeSettings) -> CompositeSettings:
    overrides = dict(options.overrides)
    own_size = overrides.get("size") == 0  # --size 0: each background's own size
    if own_size:
        overrides.pop("size")
    settings = with_overrides(defaults, overrides, {"objects": "--objects-per-scene"})
    if own_size:
        settings = settings.model_copy(update={"size": None})
    if settings.size is not None and settings.size < settings.min_size:
        raise InputError(f"--size {settings.size} is smaller than --min-size {settings.min_size}")
    return settings
