"""Ctrl-C at any moment ends a command with one line and exit 130, never a traceback or an
"internal error": while Python imports the CLI, while it builds its commands, and when a library
turns the interrupt into an error of its own (pyarrow's compute functions raise a TypeError)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _swallows(signum: int, error: Exception):
    """A stand-in for a library call that catches the interrupt raised inside it and fails otherwise."""

    def write_toy_set(*args, **kwargs):
        try:
            signal.raise_signal(signum)  # delivered at once, in this (the main) thread
        except BaseException:  # noqa: BLE001 - what the library does
            pass
        raise error

    return write_toy_set


@pytest.mark.parametrize(("signum", "code", "line"), [(signal.SIGINT, 130, "error: interrupted"), (signal.SIGTERM, 143, "error: terminated (SIGTERM)")])
def test_an_interrupt_a_library_turns_into_another_error_still_exits_as_interrupted(
    cli, tmp_path: Path, monkeypatch, signum: int, code: int, line: str
) -> None:
    import factory.toy.dataset as toy_dataset

    monkeypatch.setattr(toy_dataset, "write_toy_set", _swallows(signum, TypeError("Got unexpected argument type <class 'str'>")))
    res = cli(["toy-data", "--out", tmp_path / "toy"])
    assert (res.code, res.err) == (code, line + "\n")


def test_the_same_error_without_an_interrupt_is_still_an_internal_error(cli, tmp_path: Path, monkeypatch) -> None:
    import factory.toy.dataset as toy_dataset

    def write_toy_set(*args, **kwargs):
        raise TypeError("Got unexpected argument type <class 'str'>")

    monkeypatch.setattr(toy_dataset, "write_toy_set", write_toy_set)
    res = cli(["toy-data", "--out", tmp_path / "toy"])
    assert res.code == 1 and res.err.startswith("error: internal error: TypeError"), res.err


def test_ctrl_c_while_the_commands_are_built(cli, monkeypatch) -> None:
    import typer.main

    def get_command(app):
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.main, "get_command", get_command)
    res = cli(["plan", "--help"])
    assert (res.code, res.err) == (130, "error: interrupted\n")


def test_ctrl_c_while_python_imports_the_cli() -> None:
    """A Ctrl-C that lands while `typer` (the first heavy import) is being imported."""
    code = (
        "import signal, sys\n"
        "class Finder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'typer':\n"
        "            signal.raise_signal(signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Finder())\n"
        "from cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "--version"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "error: interrupted\n", "")
