"""Starting or joining the Ray instance a command fans out over (generate, train).

- No ``--address``: a local Ray instance sized to this machine (all its GPUs and CPUs), whose
  temporary files go under ``<run>/ray`` (or ``--ray-tmp``); it is shut down at the end. A driver
  that ends any other way (Ctrl-C, SIGTERM, SIGKILL) takes it down too: a watchdog process
  (:mod:`factory.ray_watchdog`) stops every process the driver started once the driver is gone.
- ``--address auto|HOST:PORT|ray://...``: join an existing cluster; its temporary files are the
  cluster's own, and the ``factory`` package is shipped to its workers (``py_modules``).
- A Ray session that is already initialised in this process (tests, notebooks) is used as it is and
  left running.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.errors import InputError, RunError, hold_signals, terminated

#: Ray's Unix sockets live at ``<tmp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store``;
#: AF_UNIX paths are limited to 107 bytes, which leaves this much for ``<tmp>`` itself.
MAX_TEMP_DIR_CHARS = 107 - len("/session_2024-01-01_00-00-00_000000_4194304/sockets/plasma_store.99")
#: Ray session folders kept under a run's temp dir (older ones are deleted at start).
KEEP_SESSIONS = 2

ENV_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")

#: The logger of Ray's token-authentication setup. ``ray.init`` enables token authentication by
#: default (unless ``RAY_AUTH_MODE`` is set) and says so in a WARNING from it on every start; it
#: logs nothing else above INFO (its failures are raised, and reported by :func:`start_ray`).
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@dataclass
class RaySession:
    """The Ray instance this run uses, and whether this run must shut it down."""

    owned: bool
    mode: str  # "local", "cluster" or "existing"
    temp_dir: Path | None
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def shutdown(self) -> None:
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()


# ------------------------------------------------------------------------------ temp dir


def choose_temp_dir(run_dir: Path, ray_tmp: Path | None) -> tuple[Path, str | None]:
    """Ray's temp dir: ``ray_tmp`` or ``<run>/ray``; a short one when that is too long for sockets.

    Returns the folder and, when it had to fall back, a note saying where and why.
    """
    wanted = Path(os.path.abspath(ray_tmp if ray_tmp is not None else Path(run_dir) / "ray"))
    if len(str(wanted)) <= MAX_TEMP_DIR_CHARS:
        return wanted, None
    digest = hashlib.sha1(str(wanted).encode()).hexdigest()[:10]
    base = Path(tempfile.gettempdir())
    if len(str(base)) > MAX_TEMP_DIR_CHARS - 22:
        base = Path("/tmp")
    short = base / f"factory-ray-{digest}"
    note = (
        f"ray: temporary files in {short} ({wanted} is {len(str(wanted))} characters, too long for Ray's "
        f"sockets, at most {MAX_TEMP_DIR_CHARS}; pass a shorter --ray-tmp to choose)"
    )
    return short, note


def prune_sessions(temp_dir: Path, keep: int = KEEP_SESSIONS) -> None:
    """Delete all but the newest ``keep - 1`` Ray session folders (a new one is about to be made)."""
    if not temp_dir.is_dir():
        return
    sessions = sorted(p for p in temp_dir.glob("session_*") if p.is_dir() and not p.is_symlink())
    for old in sessions[: max(0, len(sessions) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ start / join

#: Seconds to wait for a TCP answer from a cluster's head before saying it cannot be reached.
PROBE_TIMEOUT_S = 5.0


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` or ``ray://HOST:PORT`` address; None for ``auto`` (Ray finds
    the local cluster itself). A malformed address or a port out of range is refused in one line."""
    rest = address.strip()
    if rest == "auto":
        return None
    if rest.startswith("ray://"):
        rest = rest[len("ray://") :]
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT with a port 1-65535")
    return host, int(port)


def probe_cluster(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in one line, within ``timeout`` seconds, when the cluster's head does not answer. Ray
    itself retries an unreachable head for minutes, with Ctrl-C held while it does."""
    import socket

    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise RunError(f"cannot join the Ray cluster at {address}: unknown host {host} ({exc.strerror or exc})") from exc
    except TimeoutError as exc:
        raise RunError(f"cannot join the Ray cluster at {address}: no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise RunError(f"cannot join the Ray cluster at {address}: {(exc.strerror or str(exc)).lower()}") from exc



def package_root() -> Path:
    """The folder holding the ``factory`` package (the repository root in a checkout)."""
    import factory

    return Path(factory.__file__).resolve().parent.parent


def worker_env_vars() -> dict[str, str]:
    """Environment for Ray workers: the package importable, one BLAS/OpenMP thread per task.

    Sampler actors set torch's thread count themselves; finishing tasks run one per CPU.
    """
    root = str(package_root())
    path = os.environ.get("PYTHONPATH", "")
    env = {"PYTHONPATH": root + (os.pathsep + path if path else "")}
    for var in ENV_THREAD_VARS:
        env[var] = "1"
    if "NUMBA_CACHE_DIR" in os.environ:
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return env


@contextlib.contextmanager
def quiet_auth_notice() -> Iterator[None]:
    """Silence Ray's notice that it enabled token authentication (it does, as it would otherwise)
    while ``ray.init`` runs: on stderr a user sees factory's own lines only."""
    logger = logging.getLogger(RAY_AUTH_LOGGER)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def start_ray(run_dir: Path, address: str | None, ray_tmp: Path | None, gpus: int | None, workers: int | None) -> RaySession:
    """Start a local Ray instance, join a cluster, or use the session already initialised."""
    import ray

    env = worker_env_vars()
    if ray.is_initialized():
        # Its workers see what its driver set up (an installed package, or its own runtime_env).
        return RaySession(owned=False, mode="existing", temp_dir=None, runtime_env={})
    if address:
        # Ship this package to the cluster's workers so they run the driver's code.
        runtime_env = {"env_vars": {k: v for k, v in env.items() if k != "PYTHONPATH"}, "py_modules": [str(package_root() / "factory")]}
        notes = []
        if ray_tmp is not None:
            notes.append("ray: --ray-tmp is ignored with --address (the cluster keeps its own temporary files)")
        probe_cluster(address)
        try:
            with hold_signals(), quiet_auth_notice():
                ray.init(
                    address=address,
                    runtime_env=runtime_env,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        except SystemExit as exc:  # SIGTERM while ray.init ran: Ray's own handler exits with 15
            if exc.code == signal.SIGTERM:
                raise terminated() from exc
            raise
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RunError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}") from exc
        return RaySession(owned=True, mode="cluster", temp_dir=None, runtime_env={}, notes=notes)
    temp_dir, note = choose_temp_dir(run_dir, ray_tmp)
    try:
        temp_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{temp_dir}: cannot create Ray's temporary folder ({exc.strerror or exc})") from exc
    prune_sessions(temp_dir)
    notes = []
    if note:
        print(note, file=sys.stderr)
        notes.append(note)
    num_gpus = None
    if gpus is not None:
        num_gpus = min(gpus, detect_gpus())
    cpus = os.cpu_count() or 1
    try:
        with hold_signals(), quiet_auth_notice():  # Ctrl-C or SIGTERM now waits until Ray has started and its watchdog too
            ray.init(
                address="local",  # never join a cluster named by RAY_ADDRESS without --address
                num_cpus=cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                _temp_dir=str(temp_dir),
                runtime_env={"env_vars": env},
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            start_watchdog()
    except SystemExit as exc:  # SIGTERM while ray.init ran: Ray's own handler exits with 15
        if exc.code == signal.SIGTERM:
            raise terminated() from exc
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; one line for the user
        raise RunError(f"cannot start a local Ray instance in {temp_dir}: {' '.join(str(exc).split())[:300]}") from exc
    return RaySession(owned=True, mode="local", temp_dir=temp_dir, runtime_env={}, notes=notes)


def start_watchdog() -> None:
    """Start :mod:`factory.ray_watchdog`: when this process ends, however it ends (even by
    ``kill -9``), the Ray processes it started are stopped. Best effort: a failure to start it
    is not a reason to stop the run."""
    import subprocess

    script = Path(__file__).with_name("ray_watchdog.py")
    with contextlib.suppress(OSError):
        _WATCHDOGS.append(subprocess.Popen(
            [sys.executable, str(script), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C to the terminal's process group does not reach it
        ))


_WATCHDOGS: list[Any] = []  # kept referenced: the watchdog runs until this process is gone


def detect_gpus() -> int:
    """GPUs on this machine, without initialising CUDA in the driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    with contextlib.suppress(Exception):
        import torch

        return int(torch.cuda.device_count())
    return 0
