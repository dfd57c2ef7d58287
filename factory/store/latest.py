"""Which run a command works on: the one given, else the latest made in this directory."""

from __future__ import annotations

import contextlib
from pathlib import Path

from factory.errors import InputError, RunError
from factory.fsutil import atomic_write_text
from factory.store.layout import RUN_FILE
from factory.store.run import RunStore

LATEST_RUN_FILE = ".factory-latest-run"  # in the working directory: the run that --run defaults to


def remember_latest_run(root: Path, cwd: Path | None = None) -> None:
    """Record ``root`` as the run that ``--run`` defaults to in this working directory."""
    cwd = cwd or Path.cwd()
    with contextlib.suppress(OSError, RunError):
        atomic_write_text(cwd / LATEST_RUN_FILE, str(Path(root).resolve()) + "\n")


def resolve_run(run: str | Path | None, cwd: Path | None = None) -> Path:
    """The run a command works on: the one given, else the latest made in this directory."""
    if run is not None:
        return RunStore.open(run).root
    cwd = cwd or Path.cwd()
    pointer = cwd / LATEST_RUN_FILE
    if pointer.is_file():
        candidate = Path(pointer.read_text().strip())
        if (candidate / RUN_FILE).is_file():
            return candidate
    runs = sorted(cwd.glob(f"runs/*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime)
    if runs:
        return runs[-1].parent
    raise InputError("no run found in this directory; give --run DIR (runs are made by `factory generate`)")

