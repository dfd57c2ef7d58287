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


# ------------------------------------------------------------------------------ SIGTERM

#: Exit code of a command stopped by SIGTERM (128 + 15, as shells report it; Ctrl-C's is 130).
TERMINATED_EXIT = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler stopping the job), raised where Ctrl-C would be, so that it takes
    the same path: what is finished is committed, workers are stopped, the command exits 143."""


_signals = {"terminated": False, "finished": False}


def _on_sigterm(signum: int, frame: object) -> None:
    if _signals["finished"]:
        return  # the work is committed and the workers stopped: the process is about to exit 0
    _signals["terminated"] = True
    raise Terminated


def work_finished() -> None:
    """Say that the command's work is done and committed: a SIGTERM from now on changes nothing
    (the command exits 0 as it was going to) instead of turning a finished run into exit 143."""
    _signals["finished"] = True


def install_sigterm_handler() -> None:
    """Turn SIGTERM into :class:`Terminated` in the main thread (Ray's ``init`` replaces the
    handler with its own, so the Ray session calls this again after starting)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        _signals["terminated"] = _signals["finished"] = False
        signal.signal(signal.SIGTERM, _on_sigterm)


def terminated() -> Terminated:
    """A :class:`Terminated` for a SIGTERM that another handler caught first (Ray's, while
    ``ray.init`` runs, exits with code 15): the command then ends as for any SIGTERM."""
    _signals["terminated"] = True
    return Terminated()


def was_terminated() -> bool:
    """Whether this process received SIGTERM."""
    return _signals["terminated"]


def restore_sigterm_handler():  # noqa: ANN201 - a context manager
    """A block after which SIGTERM's handler is what it was before (``ray.init`` installs its own,
    which exits with code 15 from wherever the signal lands)."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def block():  # noqa: ANN202
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return block()
