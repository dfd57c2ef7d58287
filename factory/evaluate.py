"""`factory eval`: matting metrics of predicted mattes against ground truth, per image and mean.

Files pair up by key (or by a key that differs only in case, where that is the only one:
``pair_by_key``), and both folders are read the same way (``matte_files``): ``KEY.alpha.png``
is the matte of ``KEY``, and beside it ``KEY.png`` (the image) and ``KEY.fg.png`` (the foreground)
are not mattes (the layout ``factory matte --out`` and ``factory toy-data`` write).
Any other ``STEM.(png|jpg|jpeg|webp)`` is the matte of ``STEM``. The trimap, when a folder is
given, is ``TRIMAP/KEY.<image suffix>`` (0 background, 255 foreground, any other value unknown).
A matte may be 8- or 16-bit grey, RGB with equal channels, or a cut-out whose alpha channel is the
matte (RGBA); a colour image is not a matte and is reported (``factory.imageio.alpha_from_image``).

A ground truth without a prediction (or trimap), a pair whose sizes differ, or a trimap without an
unknown pixel (a binary mask: its metrics would be a perfect 0) is reported and left out of the
mean; no pair at all is an error. Metric definitions: ``factory.metrics``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factory.errors import FactoryError, InputError
from factory.feedback import plural
from factory.imageio import IMAGE_SUFFIXES, read_alpha
from factory.metrics import METRIC_NAMES, evaluate_pair, unknown_region

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
        # A name is never cut: on a line too narrow for the table it folds (whole, over several
        # lines), and the numbers keep their width rather than give it to the names.
        t.add_column("image", overflow="fold")
        for k in METRIC_NAMES:
            t.add_column(LABELS[k] + (" x1e3" if k == "mse" else ""), justify="right", no_wrap=True)

        def cells(values: dict[str, float]) -> list[str]:
            return [f"{values[k] * (1000 if k == 'mse' else 1):.4f}" for k in METRIC_NAMES]

        for r in self.rows:
            t.add_row(r["image"], *cells(r))
        if self.rows:
            t.add_section()
            t.add_row("mean", *cells(self.mean), style="bold")
        return t


MATTE_SUFFIX = ".alpha.png"  # KEY.alpha.png: the matte of KEY (factory matte, toy-data, a run's samples)
FOREGROUND_TAG = ".fg"  # KEY.fg.png beside KEY.alpha.png: its foreground colour, not a matte


def _key(name: str, suffix: str) -> str:
    return name[: len(name) - len(suffix)]


def matte_files(folder: Path) -> dict[str, Path]:
    """The mattes of a folder: key (as written) -> path.

    ``KEY.alpha.png`` is the matte of ``KEY``; beside it, ``KEY.<image suffix>`` (the image) and
    ``KEY.fg.<image suffix>`` (the foreground) are not mattes. Any other image file is the matte
    of its stem (the first of ``IMAGE_SUFFIXES`` when a stem has several). Suffixes are matched in
    any case; keys that differ only in case (``a.png``, ``A.png``) are different keys."""
    # A broken symbolic link is listed too: reading it fails, and that is reported, not skipped silently.
    files = sorted((p for p in folder.iterdir() if p.is_file() or (p.is_symlink() and not p.is_dir())), key=lambda p: p.name)
    found = {_key(p.name, MATTE_SUFFIX): p for p in files if p.name.lower().endswith(MATTE_SUFFIX)}
    beside = {key.lower() for key in found}
    for suffix in IMAGE_SUFFIXES:
        for path in files:
            name = path.name.lower()
            if not name.endswith(suffix) or name.endswith(MATTE_SUFFIX):
                continue
            key = _key(path.name, suffix)
            folded = key.lower()
            if key in found or folded in beside or (folded.endswith(FOREGROUND_TAG) and _key(folded, FOREGROUND_TAG) in beside):
                continue
            found[key] = path
    return found


def pair_by_key(keys: list[str], mattes: dict[str, Path]) -> dict[str, Path]:
    """The matte in ``mattes`` of each key that has one: the same key, else the one key that
    differs only in case, when no other key on either side is spelt that way (``IMG_1`` pairs with
    ``img_1``, but ``a`` and ``A`` each pair only with themselves)."""
    pairs = {key: mattes[key] for key in keys if key in mattes}
    ours = Counter(key.lower() for key in keys)
    theirs: dict[str, list[str]] = {}
    for key in mattes:
        theirs.setdefault(key.lower(), []).append(key)
    for key in keys:
        same = theirs.get(key.lower(), [])
        if key not in pairs and ours[key.lower()] == 1 and len(same) == 1:
            pairs[key] = mattes[same[0]]
    return pairs


def check_report_file(path: Path, *folders: Path | None) -> None:
    """Refuse a ``--json`` path that names an image in a folder eval reads (a typo such as
    ``--json gt/a.png`` would replace a ground truth with the report)."""
    target = path.resolve()
    if not target.name.lower().endswith(IMAGE_SUFFIXES):
        return
    for folder in folders:
        if folder is not None and target.parent == folder.resolve():
            raise InputError(f"--json {path} names an image in {folder}, which eval reads; give a .json file elsewhere")


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
        if t is not None and not unknown_region(t, g.shape).any():
            # its metrics would be 0, a perfect score in the mean for an image never looked at
            raise InputError(f"{trimap.name} has no unknown pixel (only 0 and 255: a mask, not a trimap?); nothing to score")
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
    gt_mattes = matte_files(gt)
    if not gt_mattes:
        raise InputError(f"no ground-truth mattes ({', '.join(IMAGE_SUFFIXES)}) in {gt}")
    keys = sorted(gt_mattes)
    preds = pair_by_key(keys, matte_files(pred))
    trimaps = pair_by_key(keys, matte_files(trimap)) if trimap is not None else {}
    jobs, issues = [], []
    for key in keys:
        p, t = preds.get(key), trimaps.get(key)
        if p is None:
            issues.append(f"missing prediction for {key} in {pred}")
        elif trimap is not None and t is None:
            issues.append(f"missing trimap for {key} in {trimap}")
        else:
            jobs.append((key, p, gt_mattes[key], t))
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
