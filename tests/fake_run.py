"""Runs with real, small samples and chosen scores, for the filter and export tests (no model).

Each sample is a 32x32 image: a disc of a sample-specific colour and place on green, a soft alpha
matte (8- or 16-bit single-channel PNG), the foreground as RGB, and the metadata JSON, all encoded
the way ``factory.finish`` encodes them, so decoding and integrity checks are exercised for real.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from factory.imageio import encode_alpha_png, encode_png
from factory.manifest import load_manifest
from factory.plan import PlanRow, table_rows
from factory.sample import SampleResult
from factory.store import RunStore
from tests.conftest import SMALL_MANIFEST, write_manifest

SIZE = 32


def plan_dict(row: PlanRow) -> dict[str, Any]:
    data = asdict(row)
    data["attributes"] = json.dumps(row.attributes, sort_keys=True)
    return data


def sample_arrays(i: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    r = rng.uniform(size * 0.15, size * 0.3)
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    alpha = np.clip((r - dist) / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)  # soft edge
    colour = rng.integers(0, 200, 3).astype(np.float32)
    fg = np.broadcast_to(colour, (size, size, 3)).astype(np.uint8)
    green = np.array([0, 255, 0], np.float32)
    image = (alpha[..., None] * colour + (1 - alpha[..., None]) * green).round().astype(np.uint8)
    return image, alpha, fg


def sample_result(row: PlanRow, fields: dict[str, Any] | None = None, alpha_bits: int = 8) -> SampleResult:
    image, alpha, fg = sample_arrays(row.index)
    rng = np.random.default_rng(row.index)
    base: dict[str, Any] = {
        "model": "fake:1",
        "alpha_source": "greenpost",
        "width": SIZE,
        "height": SIZE,
        "alpha_bits": alpha_bits,
        "gsg": 0.9,
        "gsg_distance": 0.05,
        "bg_uniformity": 0.95,
        "canvas_color": "#00ff00",
        "alpha_coverage": float(alpha.mean()),
        "touches_border": False,
        "contains_key_color": False,
        "phash": int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64)),
        "matte_confidence": float(0.3 + 0.6 * rng.random()),
        "attempts": 1,
    }
    base.update(fields or {})
    files = {".png": encode_png(image), ".alpha.png": encode_alpha_png(alpha, alpha_bits), ".fg.png": encode_png(fg)}
    meta = {
        "key": row.key,
        "index": row.index,
        "class_name": row.class_name,
        "category": row.category,
        "prompt": row.prompt,
        "negative_prompt": row.negative_prompt,
        "attributes": row.attributes,
        "seed": row.seed,
        "model": base["model"],
        "sampler": {"steps": 2},
        "alpha_bits": alpha_bits,
        "scores": {"gsg": base["gsg"], "phash": f"{base['phash'] & (2**64 - 1):016x}"},
        "file_bytes": {"image": len(files[".png"]), "alpha": len(files[".alpha.png"]), "fg": len(files[".fg.png"])},
    }
    files[".json"] = json.dumps(meta, indent=1, sort_keys=True).encode()
    return SampleResult(plan=plan_dict(row), status="done", files=files, fields=base)


def make_run(
    folder: Path,
    n: int,
    fields: Callable[[PlanRow], dict[str, Any] | None] | None = None,
    status: Callable[[PlanRow], str] | None = None,
    alpha_bits: int = 8,
    name: str = "run",
    model: str = "fake:1",
) -> RunStore:
    """A run of ``n`` samples of the small manifest (4 classes); ``fields(row)`` overrides scores,
    ``status(row)`` may return 'failed' or 'planned' to leave a sample undone; ``model`` is the
    run's model identity."""
    manifest = write_manifest(folder, SMALL_MANIFEST, f"{name}.yaml")
    store = RunStore.prepare(folder / name, load_manifest(manifest), n, model)
    try:
        results = []
        for row in table_rows(store.plan()):
            s = status(row) if status else "done"
            if s == "planned":
                continue
            if s == "failed":
                results.append(SampleResult(plan=plan_dict(row), status="failed", error="boom", fields={"model": model}))
            else:
                results.append(sample_result(row, {"model": model, **((fields(row) if fields else None) or {})}, alpha_bits))
        store.save(results)
        store.fold()
    finally:
        store.release_lock()
    return store
