"""User-facing errors: one line on stderr, a chosen exit code, no traceback.

Raise these (never bare exceptions) for anything the user can fix. The CLI turns them into
``error: <message>`` and the exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class FactoryError(Exception):
    """Base class. ``exit_code`` 2 is bad usage or bad input, 1 a failed run."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it to one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


class InputError(FactoryError):
    """Bad input: a malformed manifest, a missing file, an invalid option value."""

    exit_code = 2


class RunError(FactoryError):
    """The work itself failed (a run with failures under --strict, a full disk, a dead cluster)."""

    exit_code = 1


class Interrupted(FactoryError):
    """The user pressed Ctrl-C; what was finished is committed. Exit code 130, as shells expect."""

    exit_code = 130
