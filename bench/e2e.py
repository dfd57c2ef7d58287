"""End-to-end `factory generate` (Ray fan-out) against the sampler alone; driver memory against N.

``speed`` (default): in one process, first the sampler alone (``sample`` on batches of the same
size, with the same torch thread count as a sampler worker, after one warm-up batch), then the full
``generate`` path on a local Ray instance started by the run (sampler actors, finishing tasks,
commits by the driver). Reported: images/s of both and their ratio; the per-sample overhead in ms
(end-to-end ms per image minus sampler-only ms per image); and where the end-to-end time goes:
finishing CPU time per sample (``t_post_s`` in the index: GreenPost, GSG, PNG encoding), commit
time per batch, how busy the sampler workers were, start-up time (Ray, model loading). The
end-to-end rate is the steady-state one: samples committed / (end - first sampler worker ready).

``memory``: the driver's resident memory (VmHWM: its peak RSS, and VmRSS sampled every 0.2 s)
for runs of N = 1000 and N = 20000 with the tiny model. To keep it to minutes on a small CPU
machine, each run is prepared with all but the last ``--work`` samples already committed
(canned files, written through RunStore.save), then ``factory generate`` is run in a fresh
process to resume it: so the driver pays every N-dependent cost (plan of N rows, resume checks of
N samples, journal folds over N index rows) and pushes ``--work`` samples through the fan-out,
whose in-flight state is bounded whatever N is.

    python bench/e2e.py speed  [--n 48] [--batch-size 4] [--workers 1] [--repeat 3] [--json bench/out/e2e.json]
    python bench/e2e.py speed  --full --n 256 --steps 30 --size 512   # GPU machine, SD1.5 architecture
    python bench/e2e.py memory [--sizes 1000 20000] [--work 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))

MANIFEST = """\
name: {name}
prompts:
  classes:
    - {{class_name: red fox, category: fur}}
    - {{class_name: wine glass, category: glass_transparent}}
    - {{class_name: fern, category: plants}}
    - {{class_name: owl, category: feathers, phrase: snowy owl}}
  templates:
    - "{{a}} {{phrase}}, {{view}}, isolated on a pure green background"
    - "studio photo of {{a}} {{phrase}} on a green screen, {{view}}"
  slots:
    view: [front view, side view, top view]
negative_prompt: "blurry, green tint"
sampler: {{steps: {steps}, guidance: 5.0, width: {size}, height: {size}, scheduler: ddim}}
seed: 11
"""


def write_manifest(folder: Path, name: str, steps: int, size: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(MANIFEST.format(name=name, steps=steps, size=size))
    return path


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        info["gpu"] = None
    import ray

    info["ray"] = ray.__version__
    info["loadavg_1m"] = os.getloadavg()[0]
    return info


# ------------------------------------------------------------------------------ the SD1.5 model


def build_sd15_random(folder: Path) -> Path:
    """A diffusers folder with the full SD1.5 architecture and random weights (fp16 files).

    UNet (320, 640, 1280, 1280), 2 layers per block, cross-attention 768, 8 heads; SD's VAE;
    a 12-layer, 768-wide CLIP text encoder over the tiny model's byte-level tokenizer (no download).
    """
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from factory.sampler.sd15 import build_sd15_modules
    from factory.sampler.tiny import build_tiny_tokenizer, tiny_scheduler_config

    tokenizer = build_tiny_tokenizer()
    unet, vae, text = build_sd15_modules(tokenizer, seed=0)
    pipe = StableDiffusionPipeline(
        unet=unet.half(),
        vae=vae.half(),
        text_encoder=text.half(),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**tiny_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# ------------------------------------------------------------------------------ speed


def sampler_only(manifest_path: Path, model: str, n: int, batch_size: int, device: str, threads: int) -> dict[str, Any]:
    import torch

    from factory.generate import GenerateOptions, resolve_manifest
    from factory.plan import build_plan, table_rows
    from factory.sampler import load_sampler

    torch.set_num_threads(threads)
    manifest = resolve_manifest(GenerateOptions(manifest=manifest_path, n=n, model=model))
    settings = manifest.sampler.model_copy(update={"batch_size": batch_size})
    t0 = time.perf_counter()
    sampler = load_sampler(manifest.model, settings, manifest.canvas, device=device)
    load_s = time.perf_counter() - t0
    rows = table_rows(build_plan(manifest, n))
    sampler.sample(rows[:batch_size])  # warm-up (allocations, kernels, compile)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    failed = 0
    for start in range(0, n, batch_size):
        failed += sum(g.error is not None for g in sampler.sample(rows[start : start + batch_size]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del sampler
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "ms_per_image": 1000 * seconds / n, "load_s": load_s, "failed": failed}


def end_to_end(manifest_path: Path, model: str, n: int, batch_size: int, workers: int | None, out: Path) -> dict[str, Any]:
    import pyarrow.compute as pc

    from factory.distribute import RayExecutor
    from factory.generate import GenerateOptions, run_generate
    from factory.store import RunStore

    captured: dict[str, Any] = {}
    commits: list[float] = []
    original_save = RunStore.save

    def timed_save(self: RunStore, results: Any) -> None:
        t0 = time.perf_counter()
        original_save(self, results)
        commits.append(time.perf_counter() - t0)

    def factory(spec: Any, opts: Any) -> Any:
        captured["executor"] = RayExecutor(spec, opts)
        captured["created"] = time.monotonic()
        return captured["executor"]

    RunStore.save = timed_save  # type: ignore[method-assign]
    try:
        t0 = time.monotonic()
        summary = run_generate(
            GenerateOptions(manifest=manifest_path, n=n, out=out, model=model, batch_size=batch_size, workers=workers, progress=False),
            executor_factory=factory,
        )
        wall = time.monotonic() - t0
    finally:
        RunStore.save = original_save  # type: ignore[method-assign]
    ex = captured["executor"]
    stats = ex.stats
    steady = stats.ended_at - stats.first_ready_at
    index = RunStore.open(out).index()
    done = index.filter(pc.equal(index["status"], "done"))
    t_post = [v for v in done["t_post_s"].to_pylist() if v is not None]
    return {
        "images": summary.done,
        "failed": summary.failed,
        "wall_s": wall,
        "startup_s": stats.first_ready_at - t0,
        "steady_s": steady,
        "images_per_s": summary.done / steady,
        "ms_per_image": 1000 * steady / max(1, summary.done),
        "finish_ms_per_image": 1000 * statistics.mean(t_post) if t_post else None,
        "commit_ms_per_batch": 1000 * statistics.mean(commits) if commits else None,
        "batches": stats.batches,
        "sampler_busy": stats.sampler_busy_s / (steady * ex.plan.workers) if steady > 0 else None,
        # Time the sampler workers were not sampling, per sample and worker (ramp-up, the finishing
        # and commit of the last batches, any wait for the driver): the fan-out's cost measured
        # inside one run, immune to the machine's load changing between runs.
        "idle_ms_per_image": 1000 * (steady * ex.plan.workers - stats.sampler_busy_s) / max(1, summary.done),
        "workers": ex.plan.workers,
        "threads_per_worker": ex.plan.threads_per_worker,
        "finish_slots": ex.plan.finish_slots,
        "received_kb_per_sample": stats.bytes_received / max(1, stats.samples_received) / 1e3,
        "loadavg_1m": os.getloadavg()[0],
        "notes": summary.notes,
    }


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    from factory.distribute.sizing import plan_workers

    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=args.tmp))
    try:
        if args.full:
            model = str(build_sd15_random(Path(args.model_dir)))
            size, steps, device = args.size or 512, args.steps or 30, args.device or "cuda"
        else:
            model, size, steps, device = "tiny", args.size or 64, args.steps or 4, args.device or "cpu"
        manifest = write_manifest(work, "e2e", steps, size)
        import torch

        gpus = torch.cuda.device_count() if device == "cuda" else 0
        plan = plan_workers({"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}, gpus=None, workers=args.workers)
        threads = plan.threads_per_worker if not plan.on_gpu else torch.get_num_threads()
        rounds = []
        for i in range(args.repeat):  # alternate, so that a change of machine load hits both
            alone = sampler_only(manifest, model, args.n, args.batch_size, device, threads)
            e2e = end_to_end(manifest, model, args.n, args.batch_size, args.workers, work / f"run-{i}")
            per_worker = e2e["images_per_s"] / e2e["workers"]
            rounds.append(
                {
                    "sampler_only": alone,
                    "end_to_end": e2e,
                    "ratio_per_worker": per_worker / alone["images_per_s"],
                    "overhead_ms_per_image": e2e["ms_per_image"] * e2e["workers"] - alone["ms_per_image"],
                }
            )
            print(report_round(rounds[-1]), flush=True)
        middle = sorted(rounds, key=lambda r: r["ratio_per_worker"])[len(rounds) // 2]
        return {
            "mode": "speed",
            "model": "sd15-architecture (random weights)" if args.full else "tiny",
            "device": device,
            "size": size,
            "steps": steps,
            "batch_size": args.batch_size,
            "n": args.n,
            "machine": machine(),
            "repeat": args.repeat,
            "sampler_only": middle["sampler_only"],  # the round with the median ratio
            "end_to_end": middle["end_to_end"],
            "ratio_per_worker": middle["ratio_per_worker"],
            "overhead_ms_per_image": middle["overhead_ms_per_image"],
            "rounds": [
                {
                    "sampler_ms": r["sampler_only"]["ms_per_image"],
                    "e2e_ms": r["end_to_end"]["ms_per_image"],
                    "ratio": r["ratio_per_worker"],
                    "overhead_ms": r["overhead_ms_per_image"],
                    "sampler_busy": r["end_to_end"]["sampler_busy"],
                    "idle_ms": r["end_to_end"]["idle_ms_per_image"],
                    "finish_ms": r["end_to_end"]["finish_ms_per_image"],
                    "commit_ms_per_batch": r["end_to_end"]["commit_ms_per_batch"],
                    "loadavg_1m": r["end_to_end"]["loadavg_1m"],
                }
                for r in rounds
            ],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------ memory


DRIVER = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
rss = []
def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
stop = False
def sample():
    t0 = time.monotonic()
    while not stop:
        rss.append((round(time.monotonic() - t0, 2), vm("VmRSS:")))
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
from pathlib import Path
from factory.generate import GenerateOptions, run_generate
t0 = time.monotonic()
summary = run_generate(GenerateOptions(manifest=Path(sys.argv[2]), n=int(sys.argv[3]), out=Path(sys.argv[4]), model="tiny",
                                       batch_size=int(sys.argv[5]), progress=False))
stop = True
print(json.dumps({"done": summary.done, "failed": summary.failed, "skipped": summary.skipped, "seconds": time.monotonic() - t0,
                  "peak_rss": vm("VmHWM:"), "rss": rss}))
"""


def seed_store(manifest_path: Path, out: Path, n: int, work: int) -> float:
    """Prepare a run of N with all but the last ``work`` samples committed (canned files)."""
    import json as _json

    import numpy as np

    from factory.finish import FinishSettings, finish_sample
    from factory.generate import GenerateOptions, resolve_manifest
    from factory.sampler import model_identity
    from factory.sample import SampleResult
    from factory.store import RunStore

    import functools

    import factory.store.run as store_module
    import factory.store.samples as samples_module

    t0 = time.perf_counter()
    manifest = resolve_manifest(GenerateOptions(manifest=manifest_path, n=n, model="tiny"))
    identity = model_identity(manifest.model)
    store = RunStore.prepare(out, manifest, n, identity)
    # Canned samples need no durability: skip the fsyncs (tens of thousands of files).
    original = samples_module.atomic_write_bytes, samples_module.fsync_path, store_module.fsync_path
    samples_module.atomic_write_bytes = functools.partial(original[0], fsync=False)
    samples_module.fsync_path = store_module.fsync_path = lambda path: None
    try:
        rows = store.resume().pending[0 : n - work]
        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, (manifest.sampler.height, manifest.sampler.width, 3), dtype=np.uint8)
        canned = finish_sample(rows[0], image, None, FinishSettings(model=identity, canvas_color=tuple(manifest.canvas.color)))
        meta = _json.loads(canned.files[".json"])
        for start in range(0, len(rows), 500):
            batch = []
            for row in rows[start : start + 500]:
                files = dict(canned.files)
                files[".json"] = _json.dumps({**meta, "key": row.key, "index": row.index}, indent=1, sort_keys=True).encode()
                plan = {**row.__dict__, "attributes": _json.dumps(row.attributes, sort_keys=True)}
                batch.append(SampleResult(plan=plan, status="done", files=files, fields=dict(canned.fields)))
            store.save(batch)
        store.fold()
    finally:
        samples_module.atomic_write_bytes, samples_module.fsync_path, store_module.fsync_path = original
        store.release_lock()
    return time.perf_counter() - t0


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    work_dir = Path(tempfile.mkdtemp(prefix="e2e-mem-", dir=args.tmp))
    results = []
    try:
        manifest = write_manifest(work_dir, "mem", args.steps or 2, args.size or 64)
        for n in args.sizes:
            out = work_dir / f"run-{n}"
            seed_s = seed_store(manifest, out, n, args.work)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run(
                [sys.executable, "-c", DRIVER, str(REPO), str(manifest), str(n), str(out), str(args.batch_size)],
                capture_output=True, text=True, env=env, cwd=work_dir,
            )  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"driver for N={n} failed:\n{proc.stderr[-3000:]}")
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            rss = [r for _, r in data["rss"]]
            quarter = max(1, len(rss) // 4)
            results.append(
                {
                    "n": n,
                    "generated": data["done"],
                    "already_done": data["skipped"],
                    "seed_s": seed_s,
                    "seconds": data["seconds"],
                    "peak_rss_mb": data["peak_rss"] / 2**20,
                    "rss_mb_by_quarter": [max(rss[i * quarter : (i + 1) * quarter] or [0]) / 2**20 for i in range(4)],
                }
            )
            print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"mode": "memory", "work": args.work, "batch_size": args.batch_size, "machine": machine(), "runs": results}


# ------------------------------------------------------------------------------ main


def report_round(r: dict[str, Any]) -> str:
    a, e = r["sampler_only"], r["end_to_end"]
    return (
        f"round: sampler alone {a['ms_per_image']:.0f} ms/img, end to end {e['ms_per_image']:.0f} ms/img "
        f"(ratio {100 * r['ratio_per_worker']:.0f}%, overhead {r['overhead_ms_per_image']:.0f} ms), sampler busy "
        f"{100 * e['sampler_busy']:.0f}% (idle {e['idle_ms_per_image']:.0f} ms/img), load {e['loadavg_1m']:.1f}"
    )


def report(result: dict[str, Any]) -> str:
    if result["mode"] == "speed":
        a, e = result["sampler_only"], result["end_to_end"]
        return "\n".join(
            [
                f"model {result['model']}, {result['size']}x{result['size']}, {result['steps']} steps, batch {result['batch_size']}, "
                f"N={result['n']}, {e['workers']} worker(s) x {e['threads_per_worker']} thread(s), {e['finish_slots']} finishing slot(s); "
                f"median of {result['repeat']} round(s):",
                f"sampler alone: {a['images_per_s']:.2f} img/s ({a['ms_per_image']:.0f} ms/img)",
                f"end to end:    {e['images_per_s']:.2f} img/s ({e['ms_per_image']:.0f} ms/img), "
                f"per worker {result['ratio_per_worker'] * 100:.0f}% of the sampler alone",
                f"overhead:      {result['overhead_ms_per_image']:.0f} ms per sample per worker; finishing {e['finish_ms_per_image']:.0f} ms/sample "
                f"(CPU), commit {e['commit_ms_per_batch']:.1f} ms/batch, sampler busy {100 * e['sampler_busy']:.0f}% "
                f"(idle {e['idle_ms_per_image']:.0f} ms per sample per worker)",
                f"start-up:      {e['startup_s']:.1f} s (Ray + model loading); {e['received_kb_per_sample']:.1f} kB per sample to the driver",
                f"machine:       {result['machine']}",
            ]
        )
    lines = [f"driver memory (generating the last {result['work']} samples of each run, batch {result['batch_size']}):"]
    for r in result["runs"]:
        lines.append(
            f"  N={r['n']:>6}: peak RSS {r['peak_rss_mb']:.0f} MB; RSS max by quarter of the run "
            f"{', '.join(f'{v:.0f}' for v in r['rss_mb_by_quarter'])} MB; {r['generated']} generated in {r['seconds']:.0f} s"
        )
    lines.append(f"machine: {result['machine']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["speed", "memory"], default="speed")
    parser.add_argument("--n", type=int, default=48, help="samples per speed run")
    parser.add_argument("--repeat", type=int, default=3, help="speed: rounds of (sampler alone, end to end); the median is reported")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="sampler workers (default: one per GPU, 1 on CPU for speed)")
    parser.add_argument("--steps", type=int, default=None, help="default: 4 (tiny), 30 (--full)")
    parser.add_argument("--size", type=int, default=None, help="default: 64 (tiny), 512 (--full)")
    parser.add_argument("--full", action="store_true", help="SD1.5 architecture (random weights) on CUDA")
    parser.add_argument("--device", default=None, help="sampler-only device (default: cuda with --full, else cpu)")
    parser.add_argument("--model-dir", default=str(REPO / "bench" / "out" / "sd15-random"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000], help="memory: run sizes N")
    parser.add_argument("--work", type=int, default=300, help="memory: samples generated per run")
    parser.add_argument("--tmp", default=None, help="folder for the runs (default: the system's temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.mode == "speed" and args.workers is None and not args.full:
        args.workers = 1
    result = run_speed(args) if args.mode == "speed" else run_memory(args)
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
