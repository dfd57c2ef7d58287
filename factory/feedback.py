"""What a command shows while it works, on stderr: a status line for each phase, progress bars, and
how much of it to show (``-q`` nothing but errors and warnings, ``-v`` every phase as a log line).

A status line (a spinner and what is happening: "planning 10000 samples", "starting Ray",
"loading the model on 2 workers") is shown from the first second on a terminal, replaced by the
next phase and by the progress bar when work starts, so a long start-up is never silent. Off a
terminal nothing moves; with ``-v`` each phase is also printed as a line with its start time.
Warnings go above the live display and are shown even with ``-q``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

QUIET, NORMAL, VERBOSE = -1, 0, 1


class _Count(MofNCompleteColumn):
    """``done/total`` for a bar; nothing for a status line (it has no total)."""

    def render(self, task: Any) -> Any:
        return Text("") if task.total is None else super().render(task)


_level = NORMAL


def set_verbosity(level: int) -> None:
    """Set by the command line (``-q``: QUIET, ``-v``: VERBOSE) before a command runs."""
    global _level
    _level = max(QUIET, min(VERBOSE, level))


def verbosity() -> int:
    return _level


def stderr_console() -> Console:
    """The console feedback goes to (a seam: tests capture it)."""
    return Console(stderr=True)


class Feedback:
    """A status line and, once work starts, a progress bar, in one live display on stderr."""

    def __init__(self, name: str, enabled: bool = True, console: Console | None = None) -> None:
        self.name = name
        self.console = console or stderr_console()
        self.enabled = enabled and _level > QUIET
        self.verbose = self.enabled and _level >= VERBOSE
        live = self.enabled and self.console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _Count(),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not live,
            transient=False,
        )
        self._status: TaskID | None = None
        self._start = time.perf_counter()

    def __enter__(self) -> Feedback:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._status is not None:
            self.progress.remove_task(self._status)
            self._status = None
        self.progress.stop()

    def status(self, text: str) -> None:
        """Show what is happening now (replaces the previous status)."""
        if self.verbose:
            self.console.print(f"[{self.elapsed():6.1f} s] {self.name}: {text}", markup=False, highlight=False, soft_wrap=True)
        if self._status is None:
            self._status = self.progress.add_task(f"{self.name}: {text}", total=None, extra="")
        else:
            self.progress.update(self._status, description=f"{self.name}: {text}")
        self.progress.refresh()

    def done_status(self) -> None:
        if self._status is not None:
            self.progress.remove_task(self._status)
            self._status = None
            self.progress.refresh()

    def bar(self, total: int, description: str | None = None, extra: str = "") -> TaskID:
        """A progress bar of ``total`` items; the status line goes away."""
        self.done_status()
        task = self.progress.add_task(description or self.name, total=total, extra=extra)
        self.progress.refresh()
        return task

    def remove(self, task: TaskID) -> None:
        self.progress.remove_task(task)

    def advance(self, task: TaskID, n: float = 1, extra: str | None = None) -> None:
        """Move a bar on and draw it now (batches arrive seconds apart: each step is shown)."""
        if extra is None:
            self.progress.update(task, advance=n)
        else:
            self.progress.update(task, advance=n, extra=extra)
        self.progress.refresh()

    def warn(self, line: str) -> None:
        """A warning printed above the live display (shown even with ``-q``)."""
        self.console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start


@contextlib.contextmanager
def rate_bar(
    name: str, total: int, enabled: bool, rate: Callable[[float], str]
) -> Iterator[Callable[[int, float], None]]:
    """A progress bar of ``total`` items on stderr with a rate, on a terminal only and never with
    ``-q``; yields ``advance(items, amount)``, and the rate shown is ``rate(amount per second)``.
    Unlike :class:`Feedback` it is not redrawn on every step (rich redraws it ten times a second):
    export advances it once per sample."""
    console = stderr_console()
    progress = Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal and _level > QUIET),
        transient=False,
    )
    start = time.perf_counter()
    amount = [0.0]
    with progress:
        task = progress.add_task(name, total=total, rate="-")

        def advance(items: int, more: float) -> None:
            amount[0] += more
            elapsed = time.perf_counter() - start
            progress.update(task, advance=items, rate=rate(amount[0] / elapsed) if elapsed > 0 else "-")

        yield advance


def human_bytes(n: float) -> str:
    """``1.2 GB``, ``3.4 MB``, ``56 kB``: a unit that shows a non-zero figure."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def plural(n: float, noun: str, many: str | None = None) -> str:
    """``1 sample``, ``2 samples``; ``many`` for another plural (``1 process``, ``2 processes``).
    A float count is shown as ``%g`` (``1 GPU``, ``0.5 GPUs``)."""
    shown = f"{n:g}" if isinstance(n, float) else f"{n}"
    return f"{shown} {noun if n == 1 else (many or noun + 's')}"

