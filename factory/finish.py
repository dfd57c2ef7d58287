"""The CPU half of one sample: matte, score, encode. Runs beside the GPU sampler, never inside it.

``finish_sample`` turns what the sampler drew for one plan row (image on green, optional coarse
alpha from the matting head) into a :class:`~factory.sample.SampleResult`: GreenPost alpha and
foreground, the GSG score, coverage, border and key-colour flags, a perceptual hash for
near-duplicate filtering, and the encoded files with their metadata JSON. It is a pure function of
its inputs, so it can run in a process pool or a Ray task. The matte's confidence measures
(:mod:`factory.matte.confidence`) are computed here and go to the index (``CONFIDENCE_FIELDS``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from factory import __version__
from factory.imageio import encode_alpha_png, encode_png
from factory.matte import GreenPostSettings, greenpost
from factory.matte.confidence import matte_confidence
from factory.plan import PlanRow
from factory.score import gsg
from factory.sample import STATUS_DONE, STATUS_FAILED, SampleResult

#: The matte's trust measures, in the index and in each sample's JSON ``scores``.
CONFIDENCE_FIELDS = (
    "no_board", "key_colored_fraction", "matte_residual", "matte_green_residue", "matte_ambiguous", "matte_confidence",
)  # fmt: skip

#: A sample "touches the border" when more than this share of its border pixels is foreground.
BORDER_FOREGROUND_SHARE = 0.01


@dataclass(frozen=True)
class FinishSettings:
    """Everything the CPU stage needs besides the sample itself (picklable, sent to workers once)."""

    model: str
    canvas_color: tuple[int, int, int]
    alpha_bits: int = 8
    greenpost: GreenPostSettings = field(default_factory=GreenPostSettings)
    sampler: dict[str, Any] = field(default_factory=dict)  # steps, guidance, scheduler: for metadata


def plan_dict(row: PlanRow) -> dict[str, Any]:
    data = asdict(row)
    data["attributes"] = json.dumps(row.attributes, sort_keys=True)
    return data


def failed_result(row: PlanRow, error: str, settings: FinishSettings, **fields: Any) -> SampleResult:
    """A failed sample: its error, one line, recorded in the index; no files."""
    return SampleResult(
        plan=plan_dict(row),
        status=STATUS_FAILED,
        error=" ".join(error.split())[:1000],
        fields={"model": settings.model, **fields},
    )


def finish_sample(
    row: PlanRow,
    image: np.ndarray,
    coarse_alpha: np.ndarray | None,
    settings: FinishSettings,
    t_sample_s: float = 0.0,
    worker: str = "",
) -> SampleResult:
    """Matte, score and encode one generated image. Exceptions become a failed result."""
    start = time.perf_counter()
    try:
        return _finish(row, image, coarse_alpha, settings, t_sample_s, worker, start)
    except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the run
        return failed_result(row, f"post-processing failed: {type(exc).__name__}: {exc}", settings, worker=worker)


def _finish(
    row: PlanRow,
    image: np.ndarray,
    coarse_alpha: np.ndarray | None,
    settings: FinishSettings,
    t_sample_s: float,
    worker: str,
    start: float,
) -> SampleResult:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sampler returned an image of shape {image.shape} and type {image.dtype}")
    matte = greenpost(image, coarse_alpha, settings.greenpost)
    trust = matte_confidence(image, matte, settings.greenpost.despill_width)
    score = gsg(image, reference=settings.canvas_color)
    alpha = matte.alpha
    height, width = alpha.shape
    files = {
        ".png": encode_png(image),
        ".alpha.png": encode_alpha_png(alpha, settings.alpha_bits),
        ".fg.png": encode_png(matte.fg),
    }
    fields: dict[str, Any] = {
        "model": settings.model,
        "alpha_source": "head" if coarse_alpha is not None else "greenpost",
        "width": width,
        "height": height,
        "alpha_bits": settings.alpha_bits,
        "gsg": score.score,
        "gsg_distance": score.distance,
        "bg_uniformity": score.uniformity,
        "canvas_color": "#{:02x}{:02x}{:02x}".format(*matte.canvas_color),
        "alpha_coverage": float(alpha.mean()),
        "touches_border": touches_border(alpha),
        "contains_key_color": bool(matte.contains_key_color),
        "no_board": bool(matte.no_board),
        "key_colored_fraction": trust.key_colored_fraction,
        "matte_residual": trust.residual,
        "matte_green_residue": trust.green_residue,
        "matte_ambiguous": trust.ambiguous_fraction,
        "matte_confidence": trust.confidence,
        "phash": perceptual_hash(image),
        "t_sample_s": t_sample_s,
        "worker": worker,
        "attempts": 1,
    }
    fields["t_post_s"] = time.perf_counter() - start
    meta = metadata(row, fields, {k: len(v) for k, v in files.items()}, settings)
    files[".json"] = json.dumps(meta, indent=1, sort_keys=True).encode()
    return SampleResult(plan=plan_dict(row), status=STATUS_DONE, files=files, fields=fields)


def touches_border(alpha: np.ndarray, threshold: float = 0.5) -> bool:
    """True when the object is cut by the image frame (a share of border pixels is foreground)."""
    border = np.concatenate([alpha[0], alpha[-1], alpha[1:-1, 0], alpha[1:-1, -1]])
    return bool(np.mean(border > threshold) > BORDER_FOREGROUND_SHARE)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) as a signed int64 for Parquet."""
    value = int(str(imagehash.phash(Image.fromarray(image))), 16)
    return value - (1 << 64) if value >= (1 << 63) else value


def metadata(row: PlanRow, fields: dict[str, Any], sizes: dict[str, int], settings: FinishSettings) -> dict[str, Any]:
    """The per-sample JSON: what it shows, how it was made, and how good it is."""
    phash = fields["phash"]
    return {
        "key": row.key,
        "index": row.index,
        "class_name": row.class_name,
        "category": row.category,
        "prompt": row.prompt,
        "negative_prompt": row.negative_prompt,
        "attributes": row.attributes,
        "seed": row.seed,
        "model": settings.model,
        "sampler": settings.sampler,
        "canvas_reference": list(settings.canvas_color),
        "alpha_source": fields["alpha_source"],
        "size": {"width": fields["width"], "height": fields["height"]},
        "alpha_bits": fields["alpha_bits"],
        "scores": {
            "gsg": fields["gsg"],
            "gsg_distance": fields["gsg_distance"],
            "bg_uniformity": fields["bg_uniformity"],
            "canvas_color": fields["canvas_color"],
            "alpha_coverage": fields["alpha_coverage"],
            "touches_border": fields["touches_border"],
            "contains_key_color": fields["contains_key_color"],
            **{name: fields[name] for name in CONFIDENCE_FIELDS},
            "phash": f"{phash & ((1 << 64) - 1):016x}",
        },
        "file_bytes": {"image": sizes[".png"], "alpha": sizes[".alpha.png"], "fg": sizes[".fg.png"]},
        "factory_version": __version__,
    }
