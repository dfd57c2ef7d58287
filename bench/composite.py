"""Benchmark of `factory composite --layout baked` (issue 18): composites per second per core at 512
and 1024 px, against a minimal numpy composite-and-PNG-encode loop of the same images, side by side.

Inputs are made here: ``--objects`` objects (a soft-edged textured blob on a square of the output
size, 8-bit alpha, as a folder export) and ``--objects`` JPEG backgrounds of 1.5x the output size
(so each composite scales and crops one). Ours: ``run_composite`` in this process (one worker, so
one core does everything: decoding the object and background, placement, the exact composite, the
trimap, PNG encoding of image, alpha and trimap, the recipe, the tar shard). The baseline gets the
same composites' layers already placed (read back from a ``--layers`` run, decoded in advance) and
does only ``round(a F + (1 - a) B)`` in numpy float32 and a PNG encode of the composite (Pillow,
the same compression level 1). Runs alternate (baseline, ours, baseline, ours, ...); the best of
``--repeat`` of each is compared, in wall time and in CPU time of this process (steadier on a
shared machine).

    python bench/composite.py                      # 512 and 1024 px, 8 objects x 16, Markdown table
    python bench/composite.py --sizes 512 --repeat 1 --per-object 2   # quick look

Outputs go to ``bench/out/composite`` (git-ignored) and are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from factory.composite import CompositeOptions, run_composite  # noqa: E402
from factory.imageio import decode_alpha, decode_rgb, encode_alpha_png, encode_png  # noqa: E402


def make_objects(folder: Path, n: int, size: int) -> None:
    split = folder / "train"
    (split / "fg").mkdir(parents=True)
    (split / "alpha").mkdir()
    lines = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        rng = np.random.default_rng(i)
        cy, cx, r = 0.5 + rng.uniform(-0.1, 0.1), 0.5 + rng.uniform(-0.1, 0.1), rng.uniform(0.25, 0.4)
        wobble = 0.04 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(3, 9))
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - wobble
        alpha = np.clip((r - dist) * size / 6 + 0.5, 0, 1)
        fg = np.clip(rng.integers(40, 220, 3) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
        key = f"obj-{i:04d}"
        (split / "fg" / f"{key}.png").write_bytes(encode_png(fg))
        (split / "alpha" / f"{key}.png").write_bytes(encode_alpha_png(alpha, 8))
        lines.append(json.dumps({"key": key, "class_name": f"class {i % 4}", "fg_file_name": f"fg/{key}.png",
                                 "alpha_file_name": f"alpha/{key}.png", "file_name": f"fg/{key}.png"}))
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def make_backgrounds(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True)
    side = int(size * 1.5)
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 12, (side, side * 4 // 3, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"bg-{i:03d}.jpg", quality=90)


def ours(objects: Path, backgrounds: Path, out: Path, size: int, per_object: int, layers: bool) -> tuple[float, float, int]:
    if out.exists():
        shutil.rmtree(out)
    overrides = {"backgrounds": str(backgrounds), "layout": "baked", "size": size, "per_object": per_object, "layers": layers}
    w0, c0 = time.perf_counter(), time.process_time()
    summary = run_composite(CompositeOptions(objects=str(objects), out=out, overrides=overrides, progress=False))
    return time.perf_counter() - w0, time.process_time() - c0, summary.rows


def read_layers(out: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    layers = []
    for shard in sorted(out.glob("composite-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                members.setdefault(key, {})[suffix] = tar.extractfile(info).read()
        for m in members.values():
            layers.append((decode_rgb(m["fg.png"]), decode_alpha(m["alpha.png"]), decode_rgb(m["bg.png"])))
    return layers


def baseline(layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, float, int]:
    """The minimal loop: composite in numpy, encode the PNG; nothing else."""
    w0, c0 = time.perf_counter(), time.process_time()
    total = 0
    for fg, alpha, bg in layers:
        a = alpha[..., None]
        image = np.rint(a * fg.astype(np.float32) + (1.0 - a) * bg.astype(np.float32)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        total += len(buf.getvalue())
    return time.perf_counter() - w0, time.process_time() - c0, len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--per-object", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = REPO / "bench" / "out" / "composite"
    if root.exists():
        shutil.rmtree(root)
    load = os.getloadavg()
    rows = []
    for size in args.sizes:
        objects, backgrounds = root / f"objects-{size}", root / f"bg-{size}"
        make_objects(objects, args.objects, size)
        make_backgrounds(backgrounds, args.objects, size)
        ours(objects, backgrounds, root / f"layers-{size}", size, args.per_object, layers=True)
        layers = read_layers(root / f"layers-{size}")
        best_ours, best_base = (1e9, 1e9, 0), (1e9, 1e9, 0)
        for _ in range(args.repeat):
            b = baseline(layers)
            o = ours(objects, backgrounds, root / f"out-{size}", size, args.per_object, layers=False)
            best_base = (min(best_base[0], b[0]), min(best_base[1], b[1]), b[2])
            best_ours = (min(best_ours[0], o[0]), min(best_ours[1], o[1]), o[2])
        n = best_ours[2]
        rows.append((size, n, n / best_ours[0], n / best_base[0], n / best_ours[1], n / best_base[1]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (one used by each contender); load average "
          f"{load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; CPU only")
    print(f"{args.objects} objects x {args.per_object} composites, best of {args.repeat} alternating runs\n")
    print("| size | composites | ours /s (wall) | numpy+PNG /s (wall) | ratio (wall) | ours /s per core (CPU) | numpy+PNG /s (CPU) | ratio (CPU) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, n, ow, bw, oc, bc in rows:
        print(f"| {size} | {n} | {ow:.1f} | {bw:.1f} | {ow / bw:.2f}x | {oc:.1f} | {bc:.1f} | {oc / bc:.2f}x |")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
