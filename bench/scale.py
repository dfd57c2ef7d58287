"""Scale-out figures of the run store (issue 20): what one driver can commit, and what costs N.

All four parts run in one process, side by side, on this machine (CPU only; no model):

``commit``: the driver's commit ceiling at 512 px, in samples/s. A sample is four files of the
    sizes a 512x512 sample has (image 0.36 MB, alpha 0.06 MB, foreground 0.30 MB, JSON 2 kB;
    incompressible bytes). ``driver`` writes the files and commits the rows (``RunStore.save`` on
    results that carry the bytes); ``workers`` commits rows whose files a worker already wrote
    (``RunStore.save`` on results without bytes: what the driver does with ``--writes workers``).
    Batches of ``--batch`` samples; rounds alternate the two modes; the best round of each counts.
    The transfer of the bytes through Ray (driver mode) is not included: it only adds to driver.
``fold``: the same ``--done`` samples committed (64-sample commits, a fold of the journal every
    64 commits, a full fold at the end) into runs planned for N = 1e4, 1e6, 1e7: total time of the
    commits with their folds, of the final fold, and of a resume.
``first``: time from ``run_generate`` to the first committed sample, N = 1e3 against N = 1e7 (a
    fake executor that yields one batch: the store's part of the start, plan writing included).
``plan``: peak resident memory of ``factory plan --n 1000000 --out`` in a child process.

    python bench/scale.py [--parts commit fold first plan] [--samples 1024] [--batch 64] [--done 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.manifest import load_manifest  # noqa: E402
from factory.plan import ManifestPlan  # noqa: E402
from factory.sample import SIZE_COLUMNS, SampleResult  # noqa: E402
from factory.store import RunStore  # noqa: E402
from factory.store.samples import write_sample_files  # noqa: E402
from tests.conftest import SMALL_MANIFEST  # noqa: E402

SIZES = {".png": 360_000, ".alpha.png": 60_000, ".fg.png": 300_000, ".json": 2_000}


def _manifest(folder: Path) -> Path:
    path = folder / "small.yaml"
    path.write_text(SMALL_MANIFEST)
    return path


def _result(row, payload: dict[str, bytes] | None) -> SampleResult:
    plan = {**row.__dict__, "attributes": json.dumps(row.attributes, sort_keys=True)}
    fields = {"model": "bench", "gsg": 0.9, "width": 512, "height": 512, "alpha_bits": 8, "worker": "w0@bench"}
    if payload is None:  # the worker wrote them: the row carries the sizes
        fields.update({SIZE_COLUMNS[s]: n for s, n in SIZES.items()})
        return SampleResult(plan=plan, status="done", fields=fields)
    return SampleResult(plan=plan, status="done", files=dict(payload), fields=fields)


def commit_ceiling(tmp: Path, samples: int, batch: int, rounds: int) -> dict:
    manifest = load_manifest(_manifest(tmp))
    payload = {s: os.urandom(n) for s, n in SIZES.items()}
    best = {"driver": 0.0, "workers": 0.0}
    for r in range(rounds):
        for mode in ("driver", "workers"):
            root = tmp / f"commit-{mode}-{r}"
            store = RunStore.prepare(root, manifest, samples, "bench:1", write_plan=False)
            rows = ManifestPlan(manifest, samples).rows(range(samples))
            if mode == "workers":  # the finishing workers' part, not timed: files on disk first
                for start in range(0, samples, batch):
                    write_sample_files(root, [_result(row, payload) for row in rows[start : start + batch]])
            results = [_result(row, payload if mode == "driver" else None) for row in rows]
            t0 = time.perf_counter()
            for start in range(0, samples, batch):
                store.save(results[start : start + batch])
            store.fold()
            rate = samples / (time.perf_counter() - t0)
            best[mode] = max(best[mode], rate)
            store.release_lock()
            shutil.rmtree(root)
            print(f"  commit round {r + 1}: {mode:8s} {rate:8.0f} samples/s", flush=True)
    return {"samples_per_s": best, "ratio_workers_over_driver": best["workers"] / best["driver"]}


def fold_cost(tmp: Path, done: int, sizes: list[int]) -> dict:
    manifest = load_manifest(_manifest(tmp))
    out = {}
    for n in sizes:
        root = tmp / f"fold-{n}"
        store = RunStore.prepare(root, manifest, n, "bench:1", write_plan=False)
        rows = ManifestPlan(manifest, n).rows(range(done))
        tiny = {s: b"x" * 16 for s in SIZES}  # files the resume finds (their size is not the point here)
        results = write_sample_files(root, [_result(row, tiny) for row in rows])
        t0 = time.perf_counter()
        for start in range(0, done, 64):
            store.save(results[start : start + 64])
        t_commits = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.fold()
        t_fold = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = store.resume()
        t_resume = time.perf_counter() - t0
        assert state.done == done
        store.release_lock()
        shutil.rmtree(root)
        out[str(n)] = {"commits_with_folds_s": t_commits, "final_fold_s": t_fold, "resume_s": t_resume}
        print(f"  planned N={n:>9,}: {done} commits+folds {t_commits:6.2f} s, final fold {t_fold:5.2f} s, resume {t_resume:5.2f} s", flush=True)
    base = out[str(sizes[0])]
    out["ratio_largest_over_smallest"] = {k: out[str(sizes[-1])][k] / base[k] for k in base}
    return out


class _FirstBatch(Exception):
    pass


def first_commit(tmp: Path, sizes: list[int]) -> dict:
    import factory.generate as generate_mod
    from factory.generate import GenerateOptions, run_generate

    manifest_path = _manifest(tmp)
    out: dict = {}
    for n in [10, *sizes, *sizes]:  # a warm-up run (imports), then each size twice, alternating
        root = tmp / f"first-{n}"
        stamp: dict[str, float] = {}

        class OneBatch:
            def run(self, rows):
                yield [_result(row, {s: b"x" * 16 for s in SIZES}) for row in rows[:4]]
                stamp["committed"] = time.perf_counter()  # the driver asks for more once it has committed
                raise _FirstBatch

            def close(self) -> None:
                pass

        opts = GenerateOptions(manifest=manifest_path, n=n, out=root, model="tiny", use_ray=False, progress=False)
        t0 = time.perf_counter()
        # The fake executor commits one batch of 4 samples, so generate's up-front disk estimate
        # for N (1e7 samples at 64 px need ~120 GB) would refuse a run that never writes them. The
        # check is one statvfs, so leaving it out does not change what is timed.
        with mock.patch.object(generate_mod, "check_disk_space", lambda out, manifest, todo: None):
            try:
                run_generate(opts, executor_factory=lambda spec, o: OneBatch())
            except _FirstBatch:
                pass
        seconds = stamp["committed"] - t0
        shutil.rmtree(root)
        if n != 10:
            out[str(n)] = min(out.get(str(n), seconds), seconds)
            print(f"  N={n:>10,}: first committed sample after {seconds:.2f} s", flush=True)
    out["difference_s"] = out[str(sizes[-1])] - out[str(sizes[0])]
    return out


def plan_memory(tmp: Path, n: int) -> dict:
    manifest = _manifest(tmp)
    script = (
        "import resource, sys; sys.argv = ['factory', 'plan', '--manifest', sys.argv[1], '--n', sys.argv[2], '--out', sys.argv[3]]\n"
        "import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(manifest), str(n), str(tmp / "plan.parquet")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    peak_mb = int(proc.stdout.strip().splitlines()[-1]) / 1024
    print(f"  factory plan --n {n:,}: peak RSS {peak_mb:.0f} MB, {seconds:.0f} s", flush=True)
    return {"n": n, "peak_rss_mb": peak_mb, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["commit", "fold", "first", "plan"])
    ap.add_argument("--samples", type=int, default=1024, help="samples per commit round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--done", type=int, default=8192)
    ap.add_argument("--plan-n", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scale-", dir=os.environ.get("BENCH_TMP")))
    report: dict = {"machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"}
    try:
        if "commit" in args.parts:
            print("commit ceiling, 512-px samples:", flush=True)
            report["commit"] = commit_ceiling(tmp, args.samples, args.batch, args.rounds)
        if "fold" in args.parts:
            print(f"fold cost, {args.done} samples done:", flush=True)
            report["fold"] = fold_cost(tmp, args.done, [10_000, 1_000_000, 10_000_000])
        if "first" in args.parts:
            print("time to the first committed sample:", flush=True)
            report["first"] = first_commit(tmp, [1_000, 10_000_000])
        if "plan" in args.parts:
            report["plan"] = plan_memory(tmp, args.plan_n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["load_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
