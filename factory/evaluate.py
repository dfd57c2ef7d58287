"""`factory eval`: matting metrics of predicted mattes against ground truth, per image and mean.

Files are matched by stem. For a ground-truth ``GT/STEM.(png|jpg|jpeg|webp)`` the prediction is
``PRED/STEM.alpha.png`` (what ``factory matte`` writes) or else ``PRED/STEM.<image suffix>``; the
trimap, when a folder is given, ``TRIMAP/STEM.<image suffix>`` (0 background, 255 foreground, any
other value unknown). Mattes may be 8- or 16-bit, grey or RGB with equal channels.

A ground truth without a prediction (or trimap), or a pair whose sizes differ, is reported and left
out of the mean; no pair at all is an error. Metric definitions: ``factory.metrics``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factory.errors import FactoryError, InputError
from factory.feedback import plural
from factory.imageio import IMAGE_SUFFIXES, read_alpha
from factory.metrics import METRIC_NAMES, evaluate_pair

LABELS = {
    "sad": "SAD",
    "mse": "MSE",
    "grad": "Grad",
    "conn": "Conn",
    "sad_whole": "SAD (whole)",
    "mad": "MAD (whole)",
}


@dataclass
class EvalReport:
    """Per-image metrics, their mean, and the files that could not be evaluated."""

    rows: list[dict[str, Any]]  # {"image": stem, "sad": ..., "mse": ..., ...}
    region: str  # "trimap unknown region" or "whole image"
    issues: list[str] = field(default_factory=list)  # one line per file left out

    @property
    def mean(self) -> dict[str, float]:
        if not self.rows:
            return {}
        return {k: float(np.mean([r[k] for r in self.rows])) for k in METRIC_NAMES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "count": len(self.rows),
            "mean": self.mean,
            "images": self.rows,
            "issues": self.issues,
            "definitions": "Composition-1k: SAD and Grad and Conn are sums over the region / 1000, "
            "MSE the mean over the region; sad_whole = SAD over all pixels, mad = mean |pred - gt| "
            "over all pixels (see factory/metrics.py)",
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> Any:
        """A Rich table: one row per image, then the mean. MSE is shown x1000."""
        from rich.table import Table

        t = Table(title=f"matting metrics ({self.region}; {plural(len(self.rows), 'image')})")
        t.add_column("image")
        for k in METRIC_NAMES:
            t.add_column(LABELS[k] + (" x1e3" if k == "mse" else ""), justify="right")

        def cells(values: dict[str, float]) -> list[str]:
            return [f"{values[k] * (1000 if k == 'mse' else 1):.4f}" for k in METRIC_NAMES]

        for r in self.rows:
            t.add_row(r["image"], *cells(r))
        if self.rows:
            t.add_section()
            t.add_row("mean", *cells(self.mean), style="bold")
        return t


def _index(folder: Path) -> dict[str, Path]:
    """Lower-cased file name -> path, for the folder's files."""
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file()}


def _find(index: dict[str, Path], stem: str, preferred: tuple[str, ...] = ()) -> Path | None:
    for suffix in (*preferred, *IMAGE_SUFFIXES):
        hit = index.get((stem + suffix).lower())
        if hit is not None:
            return hit
    return None


def _check_folder(path: Path | None, what: str) -> None:
    if path is None:
        return
    if not path.exists():
        raise InputError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise InputError(f"{what} path {path} is not a folder")


def _evaluate_one(stem: str, pred: Path, gt: Path, trimap: Path | None) -> dict[str, Any]:
    try:
        p, g = read_alpha(pred), read_alpha(gt)
        t = read_alpha(trimap) if trimap is not None else None
        if p.shape != g.shape:
            raise InputError(f"{pred.name} is {p.shape[1]}x{p.shape[0]}, ground truth {g.shape[1]}x{g.shape[0]}")
        return {"image": stem, **evaluate_pair(p, g, t)}
    except FactoryError as exc:
        return {"image": stem, "error": str(exc)}


def evaluate_folders(
    pred: Path, gt: Path, trimap: Path | None = None, workers: int | None = None
) -> EvalReport:
    """Evaluate every ground truth in ``gt`` that has a prediction in ``pred`` (see the module doc).
    ``workers`` processes (default: the CPU count; 1 evaluates in this process)."""
    pred, gt = Path(pred), Path(gt)
    trimap = Path(trimap) if trimap is not None else None
    for path, what in ((pred, "prediction"), (gt, "ground-truth"), (trimap, "trimap")):
        _check_folder(path, what)
    gt_index, pred_index = _index(gt), _index(pred)
    trimap_index = _index(trimap) if trimap is not None else {}
    stems = sorted({p.stem for name, p in gt_index.items() if name.endswith(IMAGE_SUFFIXES)})
    if not stems:
        raise InputError(f"no ground-truth mattes ({', '.join(IMAGE_SUFFIXES)}) in {gt}")
    jobs, issues = [], []
    for stem in stems:
        p = _find(pred_index, stem, (".alpha.png",))
        t = _find(trimap_index, stem)
        if p is None:
            issues.append(f"missing prediction for {stem} in {pred}")
        elif trimap is not None and t is None:
            issues.append(f"missing trimap for {stem} in {trimap}")
        else:
            jobs.append((stem, p, _find(gt_index, stem), t))
    if not jobs:
        raise InputError(f"no prediction in {pred} matches a ground truth in {gt} (by file stem)")
    n = min(workers or os.cpu_count() or 1, len(jobs))
    if n == 1:
        results = [_evaluate_one(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_evaluate_one, *zip(*jobs)))
    rows = []
    for r in results:
        if "error" in r:
            issues.append(f"skipped {r['image']}: {r['error']}")
        else:
            rows.append(r)
    if not rows:
        raise InputError(f"no pair could be evaluated: {issues[0]}")
    region = "trimap unknown region" if trimap is not None else "whole image"
    return EvalReport(rows=rows, region=region, issues=issues)
