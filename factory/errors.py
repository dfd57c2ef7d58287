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


_signals = {"terminated": False, "finished": False, "interrupted": False}


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


def _on_sigint(signum: int, frame: object) -> None:
    _signals["interrupted"] = True
    raise KeyboardInterrupt


def install_sigint_handler() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` as Python's own handler does, and is remembered, so that
    an interrupt a library catches and turns into an error of its own (pyarrow's compute functions
    then raise a ``TypeError``) still ends the command as interrupted (:func:`was_interrupted`)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        _signals["interrupted"] = False
        signal.signal(signal.SIGINT, _on_sigint)


def was_interrupted() -> bool:
    """Whether this process received Ctrl-C (SIGINT) since :func:`install_sigint_handler`."""
    return _signals["interrupted"]


def exit_on_ctrl_c_while_importing():  # noqa: ANN201 - returns the function that undoes it
    """Until the returned function is called, Ctrl-C ends the process at once with the one line
    ``error: interrupted`` and exit 130, instead of a ``KeyboardInterrupt`` traceback from the
    middle of an import. For the CLI's own imports, before any work: nothing is open to lose."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def exit_now(signum: int, frame: object) -> None:
        os.write(2, b"error: interrupted\n")
        os._exit(130)

    previous = signal.signal(signal.SIGINT, exit_now)

    def undo() -> None:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    return undo


def terminated() -> Terminated:
    """A :class:`Terminated` for a SIGTERM that another handler caught first (Ray's, while
    ``ray.init`` runs, exits with code 15): the command then ends as for any SIGTERM."""
    _signals["terminated"] = True
    return Terminated()


def was_terminated() -> bool:
    """Whether this process received SIGTERM."""
    return _signals["terminated"]


HELD_SIGNALS = (2, 15)  # SIGINT, SIGTERM


def hold_signals():  # noqa: ANN201 - a context manager
    """A block (``ray.init``) that Ctrl-C and SIGTERM do not interrupt: they wait, blocked, until
    the block ends, and then reach factory's handlers, which were put back first.

    ``ray.init`` installs three SIGTERM handlers in turn (one exiting 15, one exiting 1, and the
    native failure handler of Ray's core worker, which kills the process by the signal itself);
    a signal that met one of them ended the command without its one line. Blocked in the main
    thread (the threads Ray starts inherit the block; factory's own threads block them for good,
    see :func:`ignore_signals_in_this_thread`), it stays pending until factory's handler is back.
    """
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def block():  # noqa: ANN202
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        held = {signal.Signals(s) for s in HELD_SIGNALS}
        previous = {s: signal.getsignal(s) for s in held}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)  # also takes the OS-level handler back from Ray's native one
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a held signal is delivered here

    return block()


def ignore_signals_in_this_thread() -> None:
    """Block Ctrl-C and SIGTERM in the calling (non-main) thread, so that the kernel delivers them
    to the main thread, where factory's handlers run, and never to a thread whose OS-level handler
    could be another library's while :func:`hold_signals` holds them in the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.Signals(s) for s in HELD_SIGNALS})
