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


def latest_run_pointer(cwd: Path | None = None) -> str | None:
    """What the latest-run pointer of this working directory says now (None: there is none), so
    that a run which made nothing can give the pointer back (:func:`restore_latest_run`)."""
    try:
        return ((cwd or Path.cwd()) / LATEST_RUN_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def restore_latest_run(previous: str | None, cwd: Path | None = None) -> None:
    """Put the pointer back as :func:`latest_run_pointer` read it: a run that failed before it made
    a sample (a model that does not load) must not become what ``filter`` and ``export`` default to."""
    pointer = (cwd or Path.cwd()) / LATEST_RUN_FILE
    with contextlib.suppress(OSError, RunError):
        if previous is None:
            pointer.unlink(missing_ok=True)
        else:
            atomic_write_text(pointer, previous)


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
    runs = [p.parent for p in sorted(cwd.glob(f"runs/*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime)]
    made = [root for root in runs if RunStore(root).has_commits()]  # not a run whose model failed to load
    if made or runs:
        return (made or runs)[-1]
    raise InputError("no run found in this directory; give --run DIR (runs are made by `factory generate`)")

