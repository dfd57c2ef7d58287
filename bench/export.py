"""Benchmark of `factory filter` and `factory export` (issue 6).

1. Export throughput against a plain ``tar cf`` of the same files, in one run: a synthetic run of
   ``--samples`` samples of 512x512 (image on green, 8-bit alpha, foreground, metadata: the sizes a
   real run has) is exported as WebDataset shards (PNG bytes copied) and the same files are tarred
   with GNU tar. Runs alternate (tar, export, tar, export, ...); before each, ``sync`` and a read
   of every input put both contenders in the same state (inputs in the page cache, no dirty
   pages). Best and median wall time of ``--repeat`` runs, and the median CPU time (user + system,
   all threads; for tar, of the child processes), are reported: on a shared machine CPU time is
   the steadier measure. MB/s counts the sample files read (the same bytes for both). Variants:
   with and without fsync of each shard (tar is timed without and with a final ``sync`` of its
   archive), CRC with plain zlib instead of zlib-ng, and ``--verify decode``.
2. Filter time on a synthetic 1,000,000-row index (500 classes, realistic prompts, GSG ~ Beta(8, 2),
   2 % near-duplicates and 1 % identical hashes) against the time to read that index, both the raw
   ``pyarrow.parquet.read_table`` of index.parquet and ``RunStore.index()`` (what the filter reads).

    python bench/export.py                       # both parts, results as a Markdown table
    python bench/export.py --samples 500 --rows 100000 --repeat 1   # quick look

Outputs go to ``bench/out/export`` (git-ignored) and are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from factory.store import run as store_mod  # noqa: E402
from factory.store import samples as samples_mod  # noqa: E402
from factory.export import ExportOptions, run_export  # noqa: E402
from factory.filter import run_filter, select  # noqa: E402
from factory.manifest import FilterSettings  # noqa: E402
from factory.manifest import manifest_from_dict  # noqa: E402
from factory.plan import PLAN_SCHEMA, slugify  # noqa: E402
from factory.sample import SampleResult  # noqa: E402
from factory.store import INDEX_FILE, INDEX_SCHEMA, PLAN_FILE, RunStore  # noqa: E402

MANIFEST = {
    "name": "bench",
    "prompts": {
        "classes": [{"class_name": f"object {i:03d}", "category": "bench"} for i in range(500)],
        "templates": ["{a} {phrase} isolated on a pure green background, studio photo, {view}"],
        "slots": {"view": ["front view", "side view", "top view"]},
    },
    "negative_prompt": "blurry, green tint, lowres, watermark",
    "sampler": {"width": 512, "height": 512},
}


# ------------------------------------------------------------------------------ synthetic run


def _variant(seed: int, size: int = 512) -> dict[str, bytes]:
    """One sample's encoded files: a textured blob on green (PNG sizes like a generated image)."""
    from factory.imageio import encode_alpha_png, encode_png

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.3)
    wobble = 0.03 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(3, 9))
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - (r + wobble)
    alpha = np.clip(0.5 - d * size / 6.0, 0, 1).astype(np.float32)
    base = rng.uniform(40, 220, 3).astype(np.float32)
    texture = rng.normal(0, 18, (size, size, 3)).astype(np.float32)  # photographic-like noise
    shade = (1.0 - 0.5 * (yy - cy))[..., None]
    fg = np.clip(base * shade + texture, 0, 255)
    green = np.array([20, 230, 30], np.float32) + rng.normal(0, 3, (size, size, 3)).astype(np.float32)
    image = (alpha[..., None] * fg + (1 - alpha[..., None]) * green).round().clip(0, 255).astype(np.uint8)
    files = {".png": encode_png(image), ".alpha.png": encode_alpha_png(alpha, 8), ".fg.png": encode_png(fg.astype(np.uint8))}
    files[".json"] = json.dumps({"sampler": {"steps": 30}, "seed": seed}, indent=1).encode()
    return files


def make_sample_run(root: Path, n: int, variants: int = 48) -> RunStore:
    """A run of ``n`` done samples; file contents cycle through ``variants`` encodings."""
    manifest = manifest_from_dict(MANIFEST)
    pool = [_variant(v) for v in range(variants)]
    # bench only: skip the per-file fsync of the store (8 fsyncs per sample would dominate set-up)
    original = samples_mod.atomic_write_bytes
    samples_mod.atomic_write_bytes = lambda path, data, fsync=True: original(path, data, fsync=False)
    try:
        store = RunStore.prepare(root, manifest, n, "bench:synthetic")
        plan = store.plan().to_pylist()
        rng = np.random.default_rng(0)
        batch = []
        for rec in plan:
            files = pool[rec["index"] % variants]
            fields = {
                "model": "bench:synthetic",
                "alpha_source": "greenpost",
                "width": 512,
                "height": 512,
                "alpha_bits": 8,
                "gsg": float(rng.uniform(0.8, 1.0)),
                "alpha_coverage": float(rng.uniform(0.1, 0.6)),
                "touches_border": False,
                "contains_key_color": False,
                "phash": int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64)),
            }
            batch.append(SampleResult(plan=rec, status="done", files=files, fields=fields))
            if len(batch) == 256:
                store.save(batch)
                batch = []
        store.save(batch)
        store.fold()
    finally:
        samples_mod.atomic_write_bytes = original
        store.release_lock()
    return store


# --------------------------------------------------------------------------- export benchmark


def _sample_files(store: RunStore) -> list[Path]:
    paths = []
    for rec in store.index().select(["index", "key"]).to_pylist():
        for suffix in (".png", ".alpha.png", ".fg.png", ".json"):
            paths.append(store.sample_path(rec["index"], rec["key"], suffix))
    return paths


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time_tar(files: list[Path], root: Path, out: Path, sync: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``tar cf`` [+ ``sync FILE``]."""
    listing = out.with_suffix(".list")
    listing.write_text("\n".join(str(p.relative_to(root)) for p in files) + "\n")
    cpu = _children_cpu()
    start = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(root), "-T", str(listing)], check=True)
    if sync:
        subprocess.run(["sync", str(out)], check=True)  # fsync of the archive (coreutils >= 8.24)
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    out.unlink()
    listing.unlink()
    return seconds, cpu


def _time_export(store: RunStore, out: Path, plain_zlib: bool = False, **kw: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one export."""
    from factory import integrity

    crc = integrity._crc32
    if plain_zlib:  # what the export costs without the optional zlib-ng package
        import zlib

        integrity._crc32 = zlib.crc32
    try:
        cpu = time.process_time()
        start = time.perf_counter()
        run_export(ExportOptions(run=store.root, out=out, all_done=True, progress=False, splits={"val": 0.05}, **kw))  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
    finally:
        integrity._crc32 = crc
    shutil.rmtree(out)
    return seconds, cpu


def bench_export(work: Path, n: int, repeat: int, decode_repeat: int = 1) -> list[tuple[str, float, float, float, float, float]]:
    t0 = time.perf_counter()
    store = make_sample_run(work / "run", n)
    print(f"synthetic run: {n} samples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = _sample_files(store)
    total = sum(p.stat().st_size for p in files)
    for p in files:  # warm the page cache: both contenders read from memory
        p.read_bytes()
    print(f"{len(files)} files, {total / 1e6:.0f} MB", file=sys.stderr)

    def mb_s(seconds: float) -> float:
        return total / 1e6 / seconds

    cases = {
        "tar cf": lambda: _time_tar(files, store.root / "samples", work / "raw.tar", sync=False),
        "export, --no-fsync": lambda: _time_export(store, work / "wds", fsync=False),
        "tar cf + sync of the archive": lambda: _time_tar(files, store.root / "samples", work / "raw.tar", sync=True),
        "export (default: fsync each shard)": lambda: _time_export(store, work / "wds", fsync=True),
        "export, --no-fsync, CRC with zlib instead of zlib-ng": lambda: _time_export(store, work / "wds", plain_zlib=True, fsync=False),
        "export, --verify decode, --no-fsync": lambda: _time_export(store, work / "wds", fsync=False, verify="decode"),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpus: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeat):
        for name, fn in cases.items():
            if "decode" in name and r >= decode_repeat:
                continue
            os.sync()  # start each case with no dirty pages left by the previous one
            for p in files:  # and with every input in the page cache (other processes evict it)
                p.read_bytes()
            wall, cpu = fn()
            times[name].append(wall)
            cpus[name].append(cpu)
            print(f"  {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr)

    # the cost of the integrity check alone (PNG chunk walk + CRCs over every PNG)
    from factory.integrity import check_png

    pngs = [p.read_bytes() for p in files if p.suffix == ".png"]
    start = time.perf_counter()
    for data in pngs:
        check_png(data)
    crc_s = time.perf_counter() - start
    png_mb = sum(len(d) for d in pngs) / 1e6

    rows = [
        (name, min(ts), statistics.median(ts), mb_s(min(ts)), mb_s(statistics.median(ts)), statistics.median(cpus[name]))
        for name, ts in times.items()
    ]
    rows.append((f"PNG check alone (chunk walk + CRC, {png_mb:.0f} MB)", crc_s, crc_s, png_mb / crc_s, png_mb / crc_s, crc_s))
    return rows


# --------------------------------------------------------------------------- filter benchmark


def make_index_run(root: Path, rows: int) -> RunStore:
    """A run whose plan and index have ``rows`` rows (written directly; no images)."""
    manifest = manifest_from_dict(MANIFEST)
    store = RunStore.prepare(root, manifest, 1, "bench:synthetic")
    store.release_lock()
    rng = np.random.default_rng(1)
    idx = np.arange(rows, dtype=np.int64)
    cls = rng.integers(0, 500, rows)
    names = np.array([f"object {i:03d}" for i in range(500)], dtype=object)
    views = np.array(["front view", "side view", "top view"], dtype=object)
    class_name = names[cls]
    prompts = [f"an {c} isolated on a pure green background, studio photo, {v}" for c, v in zip(class_name, views[rng.integers(0, 3, rows)])]
    keys = [f"bench-{i:08d}-{slugify(c)}" for i, c in zip(idx.tolist(), class_name)]
    attributes = [json.dumps({"class_name": c, "category": "bench", "template": "0"}, sort_keys=True) for c in class_name]
    plan = pa.table(
        {
            "index": idx,
            "key": keys,
            "class_name": class_name.tolist(),
            "category": ["bench"] * rows,
            "prompt": prompts,
            "negative_prompt": [MANIFEST["negative_prompt"]] * rows,
            "seed": rng.integers(0, 2**62, rows),
            "attributes": attributes,
            "control_image": pa.nulls(rows, pa.string()),
        },
        schema=PLAN_SCHEMA,
    )
    phash = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    near = rng.choice(rows, rows // 50, replace=False)  # 2 % near-duplicates of another sample
    src = rng.integers(0, rows, near.size)
    flips = np.zeros(near.size, np.uint64)
    for _ in range(3):
        flips |= np.uint64(1) << rng.integers(0, 64, near.size).astype(np.uint64)
    phash[near] = (phash[src].view(np.uint64) ^ flips).view(np.int64)
    exact = rng.choice(rows, rows // 100, replace=False)  # 1 % identical hashes
    phash[exact] = phash[rng.integers(0, rows, exact.size)]
    status = np.where(rng.random(rows) < 0.02, "failed", "done")
    done = status == "done"

    def col(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.array(values, typ, mask=~done)

    n_bytes = rng.integers(200_000, 600_000, rows)
    result = {
        "status": pa.array(status),
        "error": pa.array(np.where(done, None, "boom"), pa.string()),
        "attempts": pa.array(np.ones(rows, np.int32)),
        "model": col(np.full(rows, "bench:synthetic", object), pa.string()),
        "alpha_source": col(np.full(rows, "greenpost", object), pa.string()),
        "width": col(np.full(rows, 512, np.int32), pa.int32()),
        "height": col(np.full(rows, 512, np.int32), pa.int32()),
        "alpha_bits": col(np.full(rows, 8, np.int8), pa.int8()),
        "image_bytes": col(n_bytes, pa.int64()),
        "alpha_bytes": col(n_bytes // 10, pa.int64()),
        "fg_bytes": col(n_bytes, pa.int64()),
        "meta_bytes": col(np.full(rows, 1200), pa.int64()),
        "gsg": col(rng.beta(8, 2, rows).astype(np.float32), pa.float32()),
        "gsg_distance": col(rng.random(rows).astype(np.float32), pa.float32()),
        "bg_uniformity": col(rng.random(rows).astype(np.float32), pa.float32()),
        "canvas_color": col(np.full(rows, "#00ff00", object), pa.string()),
        "alpha_coverage": col(np.clip(rng.normal(0.35, 0.25, rows), 0, 1).astype(np.float32), pa.float32()),
        "touches_border": col(rng.random(rows) < 0.1, pa.bool_()),
        "contains_key_color": col(rng.random(rows) < 0.05, pa.bool_()),
        "phash": col(phash, pa.int64()),
        "t_sample_s": col(rng.random(rows).astype(np.float32), pa.float32()),
        "t_post_s": col(rng.random(rows).astype(np.float32), pa.float32()),
        "worker": col(np.full(rows, "w0", object), pa.string()),
        "updated_at": pa.array(np.full(rows, 1_700_000_000_000, "datetime64[ms]"), pa.timestamp("ms", tz="UTC")),
        "prompt_tokens": col(rng.integers(12, 90, rows).astype(np.int32), pa.int32()),
        # the matte's trust measures (docs/matting.md): 0.5 % without a board, residual ~ 1-8 levels
        "no_board": col(rng.random(rows) < 0.005, pa.bool_()),
        "key_colored_fraction": col((rng.random(rows) < 0.05) * rng.random(rows).astype(np.float32) * 0.02, pa.float32()),
        "matte_residual": col(rng.gamma(2.0, 1.5, rows).astype(np.float32), pa.float32()),
        "matte_green_residue": col(rng.gamma(1.0, 0.5, rows).astype(np.float32), pa.float32()),
        "matte_ambiguous": col(rng.beta(2, 12, rows).astype(np.float32), pa.float32()),
        "matte_confidence": col(rng.beta(6, 2.5, rows).astype(np.float32), pa.float32()),
    }
    index = pa.Table.from_arrays([*plan.columns, *(result[f.name] for f in INDEX_SCHEMA if f.name not in PLAN_SCHEMA.names)], schema=INDEX_SCHEMA)
    store_mod.atomic_write_parquet(plan, root / PLAN_FILE)
    store_mod.atomic_write_parquet(index, root / INDEX_FILE, metadata={"covers": "0"})
    info = store.info
    info["n"] = rows
    store_mod.atomic_write_text(root / "run.json", json.dumps(info, indent=2) + "\n")
    return RunStore.open(root)


def _best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_filter(work: Path, rows: int, repeat: int) -> list[tuple[str, float, float]]:
    from factory.dedup import near_duplicates
    from factory.filter import _CATEGORICAL, _NEEDED

    t0 = time.perf_counter()
    store = make_index_run(work / "index-run", rows)
    size = (store.root / INDEX_FILE).stat().st_size
    print(f"synthetic index: {rows} rows, {size / 1e6:.0f} MB, made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    read_raw, _ = _best(lambda: pq.read_table(store.root / INDEX_FILE), repeat)
    read_store, _ = _best(lambda: store.index(only_plan=False), repeat)
    read_cols, index = _best(lambda: store.index(columns=list(_NEEDED), dictionary=_CATEGORICAL), repeat)
    params = FilterSettings()  # the manifest defaults: GSG 0.8, coverage, key colour, dedup 4 bits
    t_select, result = _best(lambda: select(index, params), repeat)
    hashes = pc.fill_null(index["phash"], 0).to_numpy(zero_copy_only=False)
    t_dedup_all, _ = _best(lambda: near_duplicates(hashes, np.arange(rows), 4), repeat)
    t_filter, summary = _best(lambda: run_filter(store.root, name="bench"), repeat)
    print(f"kept {summary.kept} of {rows}; dropped {summary.dropped}", file=sys.stderr)  # type: ignore[attr-defined]
    return [
        ("read index.parquet, all columns (pyarrow read_table)", read_raw, 1.0),
        ("RunStore.index(only_plan=False) (the merging reader: journal fold, plan join)", read_store, read_store / read_raw),
        ("read the filter's columns (RunStore.index fast path, classes and status as dictionaries)", read_cols, read_cols / read_raw),
        ("select(): every criterion, near-duplicates among the ~47 % that pass", t_select, t_select / read_raw),
        (f"near_duplicates() alone on all {rows:,} hashes (4 bits)", t_dedup_all, t_dedup_all / read_raw),
        ("`factory filter` end to end (read, select, write the selection)", t_filter, t_filter / read_raw),
    ]


# ------------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000, help="samples in the synthetic run (512x512)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic index")
    ap.add_argument("--repeat", type=int, default=5, help="alternating runs of each export case")
    ap.add_argument("--decode-repeat", type=int, default=1, help="runs of the slow --verify decode case")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "export")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--skip-filter", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    print(f"machine: {machine()}")
    try:
        if not args.skip_export:
            rows = bench_export(args.work, args.samples, args.repeat, args.decode_repeat)
            tar = {r[0]: r for r in rows}
            print(f"\nExport of {args.samples} samples (512x512), {args.repeat} alternating runs each"
                  f" ({args.decode_repeat} of --verify decode); load average {os.getloadavg()[0]:.1f}:\n")
            print(
                "| case | best s | median s | best MB/s | median MB/s | throughput vs tar (best) "
                "| (median) | CPU s (median) | CPU vs tar |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name, best, med, rate_best, rate_med, cpu in rows:
                if name.startswith("PNG check"):
                    print(f"| {name} | {best:.2f} | | {rate_best:,.0f} | | | | {cpu:.2f} | |")
                    continue
                ref = tar["tar cf + sync of the archive"] if "sync" in name and "no-fsync" not in name else tar["tar cf"]
                print(
                    f"| {name} | {best:.2f} | {med:.2f} | {rate_best:,.0f} | {rate_med:,.0f} | "
                    f"{rate_best / ref[3]:.2f} | {rate_med / ref[4]:.2f} | {cpu:.2f} | {ref[5] / cpu:.2f} |"
                )
        if not args.skip_filter:
            rows = bench_filter(args.work, args.rows, args.repeat)
            print(f"\nFilter on a {args.rows:,}-row index, median of {args.repeat}; load average {os.getloadavg()[0]:.1f}:\n")
            print("| step | seconds | x read_table |\n|---|---:|---:|")
            for name, seconds, ratio in rows:
                print(f"| {name} | {seconds:.2f} | {ratio:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
