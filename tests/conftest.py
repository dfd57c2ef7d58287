"""Shared fixtures: small manifests written in code, and a CLI runner that captures exit codes."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep numba's compiled pymatting kernels between test runs (compiling takes ~35 s).
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))


SMALL_MANIFEST = """\
name: small
prompts:
  classes:
    - {class_name: red fox, category: fur}
    - {class_name: wine glass, category: glass_transparent}
    - {class_name: fern, category: plants}
    - {class_name: owl, category: feathers, phrase: snowy owl}
  templates:
    - "{a} {phrase}, {view}, isolated on a pure green background"
    - "studio photo of {a} {phrase} on a green screen, {view}"
  slots:
    view: [front view, side view, top view]
negative_prompt: "blurry, green tint"
sampler: {steps: 2, guidance: 3.0, width: 64, height: 64, scheduler: ddim}
seed: 7
"""

GRID_MANIFEST = """\
name: grid
prompts:
  grid:
    axes:
      age_group: [child, adult, elderly]
      gender: [woman, man]
      hair_style: [curly, straight]
    cells: [age_group, gender]
    extra: [hair_style]
  templates:
    - "portrait of {a} {age_group} {gender} with {hair_style} hair on green"
seed: 3
"""


def write_manifest(folder: Path, text: str, name: str = "m.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def small_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, SMALL_MANIFEST, "small.yaml")


@pytest.fixture
def grid_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, GRID_MANIFEST, "grid.yaml")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the `factory` CLI in-process: cli(["plan", ...]) -> CliResult(code, out, err)."""
    from cli import main

    def run(args: list[str]) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a test module: tiny models gain nothing from threads, and the CPUs are
    shared, so one thread is faster. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """The tiny randomly initialised SD components (seed 0), built once per test module."""
    from factory.sampler.tiny import build_tiny_components

    return build_tiny_components(seed=0)


def fail_mkdir_under(monkeypatch: pytest.MonkeyPatch, root: Path, err: int) -> None:
    """Make ``os.mkdir`` fail with ``err`` (``errno.EROFS``, ``errno.EACCES``) for paths under
    ``root``: a read-only disk or a folder without write permission, which a test running as root
    cannot get from ``chmod``."""
    import errno

    real_mkdir = os.mkdir
    error = PermissionError if err in (errno.EACCES, errno.EPERM) else OSError

    def failing(path, *args, **kw):
        if str(path).startswith(str(root)):
            raise error(err, os.strerror(err), str(path))
        return real_mkdir(path, *args, **kw)

    monkeypatch.setattr(os, "mkdir", failing)
