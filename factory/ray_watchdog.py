"""Outlives a driver to take its local Ray instance down with it, however the driver ended.

``python ray_watchdog.py DRIVER_PID`` (started by :func:`factory.ray_session.start_ray` after a
local ``ray.init``, in its own session so that a Ctrl-C to the terminal does not reach it). While
the driver lives it notes, every half second, the driver's descendants: the Ray processes the
driver started (GCS, raylet, monitors) and theirs (workers, agents). When the driver is gone (a
normal exit, Ctrl-C, SIGTERM or ``kill -9``) it sends SIGTERM to every one of them still running,
then SIGKILL to those left after a grace period, and exits. Without it, after a ``kill -9`` the
agents lived on, and after a Ctrl-C a sampler worker outlived the driver by 15 s.

Processes are recognised by pid *and* start time, so a pid reused by an unrelated process is never
signalled. Standard library only: this file runs as a script, without the package.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

POLL_S = 0.5
GRACE_S = 3.0


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks), from ``/proc``."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        with contextlib.suppress(IndexError, ValueError):
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """The descendants of ``root``: pid -> start time."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            stack.extend(children.get(pid, []))
    return found


def alive(pids: dict[int, int]) -> dict[int, int]:
    """Those of ``pids`` still running with the same start time (not a reused pid)."""
    table = process_table()
    return {pid: start for pid, start in pids.items() if pid in table and table[pid][1] == start}


def signal_all(pids: dict[int, int], sig: int) -> None:
    for pid in alive(pids):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def wait_for_exit(driver: int) -> dict[int, int]:
    """Block until ``driver`` exits; returns its descendants as last seen (and still running)."""
    seen: dict[int, int] = {}
    me = os.getpid()
    try:
        fd = os.pidfd_open(driver)
    except (OSError, AttributeError):
        fd = None
    first = True
    while True:
        table = process_table()
        if driver not in table:
            break
        # Remember every descendant ever seen (a worker whose raylet died is reparented away).
        seen.update(descendants(driver, table))
        seen.pop(me, None)
        if first:  # for whoever waits on the watchdog being in place (stdout is /dev/null in use)
            print("watching", flush=True)
            first = False
        if fd is not None:
            if select.select([fd], [], [], POLL_S)[0]:
                break
        else:
            time.sleep(POLL_S)
    table = process_table()
    for pid in list(alive(seen)):  # and what they started since the last look
        seen.update(descendants(pid, table))
    seen.pop(me, None)
    return alive(seen)


def main(argv: list[str]) -> None:
    driver = int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    left = wait_for_exit(driver)
    if not left:
        return
    signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while alive(left) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_all(left, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv)
