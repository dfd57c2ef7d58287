"""Benchmark of how fast `factory generate` refuses a bad argument (issue 19), against `factory plan`.

A user who types ``factory generate --n 0`` should hear about it as fast as ``factory plan`` answers:
the refusal must come before Ray, torch or the matting stack are imported. Each round runs, in
fresh processes and alternating: ``plan --n 1`` (reads the manifest, plans one row, prints) and
``generate --n 0`` (refused with exit 2). Reported: the median and best wall time of each over
``--repeat`` rounds and the ratio of the medians (generate / plan), a figure that stays
comparable on a loaded machine because both run side by side.

    python bench/startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = """\
name: bench
prompts:
  classes:
    - {class_name: red fox, category: fur}
  templates:
    - "{a} {class_name} on a pure green background"
"""


def timed(args: list[str], cwd: Path, expect: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != expect:
        raise SystemExit(f"{args}: exit {res.returncode}, expected {expect}: {res.stderr.strip()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "m.yaml").write_text(MANIFEST)
        plan, generate = [], []
        for _ in range(args.repeat):
            plan.append(timed(["plan", "-m", "m.yaml", "--n", "1"], cwd, 0))
            generate.append(timed(["generate", "-m", "m.yaml", "--n", "0"], cwd, 2))
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; {args.repeat} rounds")
    print("| command | median s | best s |\n|---|---:|---:|")
    for name, times in (("plan --n 1", plan), ("generate --n 0 (refused)", generate)):
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} |")
    print(f"ratio of medians generate/plan: {statistics.median(generate) / statistics.median(plan):.2f}")


if __name__ == "__main__":
    main()
