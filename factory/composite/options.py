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
    ray_tmp: Path | None = None  # Ray's temporary folder (local Ray only); None: one in the temp dir
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


#: Options used by some layouts only (settings field -> (option, layouts)). Given on the command
#: line for another layout they would change nothing, so they are refused; the manifest's
#: ``composite:`` section may hold them all.
LAYOUT_OPTIONS = {
    "format": ("--format", ("baked",)),
    "layers": ("--layers", ("baked",)),
    "mix": ("--mix", ("baked",)),
    "objects": ("--objects-per-scene", ("scenes",)),
    "blend": ("--blend", ("scenes",)),
    "threshold": ("--threshold", ("scenes",)),
    "min_visible": ("--min-visible", ("scenes",)),
    "alpha_bits": ("--alpha-bits", ("baked", "scenes")),  # dim copies the stored alpha as it is
    "scale": ("--scale", ("baked", "scenes")),
    "rotation": ("--rotation", ("baked", "scenes")),
    "flip": ("--flip", ("baked", "scenes")),
    "truncation": ("--truncation", ("baked", "scenes")),
    "harmonize": ("--harmonize", ("baked", "scenes")),
    "shadow": ("--shadow", ("baked", "scenes")),
}
#: Options used only with ``--generative``.
GENERATIVE_OPTIONS = {"prompt": "--prompt", "ring": "--ring", "steps": "--steps"}


def _check_used(overrides: dict[str, Any], settings: CompositeSettings) -> None:
    """Refuse an option given for a layout (or without ``--generative``) that does not use it."""
    for name, (option, layouts) in LAYOUT_OPTIONS.items():
        if overrides.get(name) is not None and settings.layout not in layouts:
            raise InputError(f"{option} is for the {' and '.join(layouts)} layout{'s' if len(layouts) > 1 else ''}, "
                             f"not --layout {settings.layout}")
    for name, option in GENERATIVE_OPTIONS.items():
        if overrides.get(name) is not None and not settings.generative:
            raise InputError(f"{option} is for --generative; give a model with --generative or leave {option} out")


def resolve_settings(options: CompositeOptions, defaults: CompositeSettings) -> CompositeSettings:
    overrides = dict(options.overrides)
    own_size = overrides.get("size") == 0  # --size 0: each background's own size
    if own_size:
        overrides.pop("size")
    settings = with_overrides(defaults, overrides, {"objects": "--objects-per-scene"})
    if own_size:
        settings = settings.model_copy(update={"size": None})
    _check_used(options.overrides, settings)
    if options.ray_tmp is not None and options.workers <= 1 and options.address is None:
        raise InputError("--ray-tmp is for Ray (--workers 2 or more); with one worker the parts run in this process")
    if settings.size is not None and settings.size < settings.min_size:
        raise InputError(f"--size {settings.size} is smaller than --min-size {settings.min_size}")
    return settings
