"""Fault-injecting samplers for the fan-out tests (``WorkSpec.sampler_factory``).

Each wraps the real ``load_sampler`` (the tiny model) and misbehaves in one chosen way. They are
passed to the workers as ``functools.partial`` objects, pickled by reference to this module, so
the workers must be able to import ``tests.fault_samplers`` (the repository root is on their path).
Markers that must survive a worker's death (``os._exit``) are files in ``marker_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _real(model: Any, settings: Any, canvas: Any, device: str | None = None, compile: bool = False) -> Any:
    from factory.sampler import load_sampler

    return load_sampler(model, settings, canvas, device=device, compile=compile)


class _Wrapper:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batch_size = inner.batch_size
        self.identity = getattr(inner, "identity", "")
        self.batches = 0

    def sample(self, rows: list[Any]) -> list[Any]:
        self.batches += 1
        return self.inner.sample(rows)


class _Barrier(_Wrapper):
    def __init__(self, inner: Any, parties: int, marker_dir: Path) -> None:
        super().__init__(inner)
        self.parties = parties
        self.marker_dir = Path(marker_dir)
        (self.marker_dir / f"loaded-{os.getpid()}").touch()

    def sample(self, rows: list[Any]) -> list[Any]:
        import time

        # An event (every party's marker file), however long it takes on a loaded machine; the
        # test's own timeout guards against a party that never loads.
        while len(list(self.marker_dir.glob("loaded-*"))) < self.parties:
            time.sleep(0.05)
        return super().sample(rows)


def barrier(model: Any, settings: Any, canvas: Any, device: str | None = None, compile: bool = False, *, parties: int, marker_dir: Path) -> Any:
    """No sampling until ``parties`` samplers have loaded (so every worker gets batches). Faultless."""
    return _Barrier(_real(model, settings, canvas, device, compile), parties, marker_dir)


def _claim(marker: Path) -> bool:
    """True for exactly one caller across processes (the one that creates ``marker``)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class _CrashOnSecondBatch(_Wrapper):
    def __init__(self, inner: Any, marker_dir: Path) -> None:
        super().__init__(inner)
        self.marker_dir = Path(marker_dir)

    def sample(self, rows: list[Any]) -> list[Any]:
        self.batches += 1
        if self.batches == 2 and _claim(self.marker_dir / "crashed"):
            (self.marker_dir / "crashed-rows").write_text(",".join(str(r.index) for r in rows))
            os._exit(1)  # the actor's process dies mid-batch, as on a segfault or an OOM kill
        return self.inner.sample(rows)


def crash_on_second_batch(model: Any, settings: Any, canvas: Any, device: str | None = None, compile: bool = False, *, marker_dir: Path) -> Any:
    """The first actor to reach its 2nd batch kills its own process (once per run)."""
    return _CrashOnSecondBatch(_real(model, settings, canvas, device, compile), marker_dir)


class _CrashOnRow(_Wrapper):
    def __init__(self, inner: Any, index: int, marker_dir: Path) -> None:
        super().__init__(inner)
        self.index = index
        self.marker_dir = Path(marker_dir)

    def sample(self, rows: list[Any]) -> list[Any]:
        if any(r.index == self.index for r in rows):
            with open(self.marker_dir / "poison-attempts", "a") as fh:
                fh.write(f"{os.getpid()}\n")
            os._exit(1)
        return self.inner.sample(rows)


def crash_on_row(model: Any, settings: Any, canvas: Any, device: str | None = None, compile: bool = False, *, index: int, marker_dir: Path) -> Any:
    """Every batch that holds plan row ``index`` kills its actor's process (a poison batch)."""
    return _CrashOnRow(_real(model, settings, canvas, device, compile), index, marker_dir)


class _FailRow(_Wrapper):
    def __init__(self, inner: Any, index: int) -> None:
        super().__init__(inner)
        self.index = index

    def sample(self, rows: list[Any]) -> list[Any]:
        from factory.sampler import Generated

        out = self.inner.sample(rows)
        for i, row in enumerate(rows):
            if row.index == self.index:
                out[i] = Generated(out[i].image * 0, None, "non-finite values (NaN/inf) in the generated sample (injected)", out[i].seconds)
        return out


def fail_row(model: Any, settings: Any, canvas: Any, device: str | None = None, compile: bool = False, *, index: int) -> Any:
    """Plan row ``index`` always comes out failed (as a NaN output would), the rest as usual."""
    return _FailRow(_real(model, settings, canvas, device, compile), index)


def broken_model(model: Any, settings: Any, canvas: Any, device: str | None = None, compile: bool = False) -> Any:
    """Loading the model fails (a wrong path, a corrupt file)."""
    from factory.errors import InputError

    raise InputError("model weights not found: /nowhere/model.safetensors")
