"""The benchmark scripts under bench/ still load, and the quickest part still runs (BENCHMARKS.md's
figures come from them; nothing else exercises them).

Each script is loaded as a module without running ``main``: that catches a name the factory no
longer has (an import, a dataclass field's type) at import time. Names a script uses only inside
its functions are not checked here; the run below covers those of the script it runs.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def load_script(path: Path) -> ModuleType:
    """Execute ``path`` as a module named after it (``__name__`` is not ``"__main__"``)."""
    name = f"_bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_every_bench_script_is_covered() -> None:
    assert {p.name for p in SCRIPTS} >= {"export.py", "sampler.py", "matte.py", "startup.py"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports(path: Path) -> None:
    module = load_script(path)
    assert callable(getattr(module, "main", None)), f"bench/{path.name} has no main()"


def test_export_bench_filter_part_runs(tmp_path: Path) -> None:
    """The filter part of bench/export.py on a 2,000-row index (~1 s): its synthetic index must
    fill every column of the index schema, which it stopped doing unnoticed once."""
    work = tmp_path / "export"
    cmd = [sys.executable, str(BENCH / "export.py"), "--skip-export", "--rows", "2000", "--repeat", "1", "--work", str(work)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kept " in res.stderr + res.stdout
    assert "`factory filter` end to end" in res.stdout
    assert not work.exists()  # outputs are deleted without --keep
