"""Child processes that tests send signals to."""

from __future__ import annotations

import signal


def as_a_foreground_command() -> None:
    """``preexec_fn`` for a child that a test sends Ctrl-C: it reaches the child as it reaches a
    command typed in a terminal. A child inherits an ignored SIGINT and a blocked signal mask from
    the test process, and a test suite started as a background job of a script (as CI may start
    it) has SIGINT ignored: the child would then rightly ignore the test's Ctrl-C, as a background
    job must, and the test would hang or test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
