"""The README's two fresh-machine commands stay true: CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    ci_command = [line for line in ci.splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_command) == 1
    assert any(ci_command[0] in block for block in _readme_commands())


def test_readme_has_the_main_job_command() -> None:
    blocks = _readme_commands()
    assert any("factory generate" in b and "factory filter" in b and "factory export" in b for b in blocks)
