"""Who writes the sample files: the finishing workers or the driver (``generate --writes``).

- ``workers``: each finishing task writes its samples' files into the run directory (temporary
  names, fsync, rename: :func:`factory.store.run.write_sample_files`) and sends the driver only the
  index rows, a few hundred bytes a sample. The driver's commit rate is then bounded by its
  journal writes, not by moving 0.7 MB per 512-px sample through one process. The run directory
  must be storage every node sees (NFS, Lustre, a FUSE-mounted bucket).
- ``driver``: the finishing tasks return the encoded files and the driver writes them (one
  machine's local disk, or nodes that do not share the run directory).
- ``auto`` (the default): ``workers`` when every node of the Ray cluster sees the run directory
  (always true on one node; on several, a probe file written by the driver is looked for by a
  task pinned to each node), else ``driver``. The choice and its reason are printed.

Either way the commit point is the driver's index row: files of a sample whose row is not
committed do not count and are deleted by the next resume (inside the run only).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from factory.errors import InputError
from factory.fsutil import TMP_PREFIX

MODES = ("auto", "workers", "driver")
PROBE_TIMEOUT_S = 120.0


def _sees(path: str) -> bool:
    return os.path.isfile(path)


_sees_task = ray.remote(num_cpus=0, max_retries=0)(_sees)


def nodes_without(run_dir: Path, runtime_env: dict | None = None) -> tuple[int, list[str]]:
    """(alive nodes, the ids of those that do not see ``run_dir``), by a probe file."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes), []
    probe = Path(run_dir) / f"{TMP_PREFIX}probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"factory")
    try:
        options: dict = {}
        if runtime_env:
            options["runtime_env"] = runtime_env
        refs = {
            n["NodeID"]: _sees_task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False), **options
            ).remote(str(probe.resolve()))
            for n in nodes
        }
        blind = []
        for node, ref in refs.items():
            try:
                if not ray.get(ref, timeout=PROBE_TIMEOUT_S):
                    blind.append(node[:8])
            except Exception:  # noqa: BLE001 - a node that cannot answer cannot be written from
                blind.append(node[:8])
        return len(nodes), blind
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def choose_writes(requested: str, run_dir: Path, runtime_env: dict | None = None) -> tuple[Path | None, str]:
    """(the run directory the workers write to, or None for the driver; the note that says why)."""
    if requested not in MODES:
        raise InputError(f"--writes {requested}: choose one of {', '.join(MODES)}")
    if requested == "driver":
        return None, "writes: driver (--writes driver): the finishing tasks send the files to the driver"
    count, blind = nodes_without(run_dir, runtime_env)
    if not blind:
        why = "one node" if count <= 1 else f"all {count} nodes see the run directory"
        return Path(run_dir).resolve(), f"writes: workers ({why}): the driver receives only the index rows"
    if requested == "workers":
        raise InputError(
            f"--writes workers: {len(blind)} of {count} nodes ({', '.join(blind)}) do not see {run_dir}; "
            "put the run on storage every node mounts, or use --writes driver"
        )
    return None, f"writes: driver ({len(blind)} of {count} nodes do not see the run directory: {', '.join(blind)})"
