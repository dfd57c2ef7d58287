"""The run directory's names and the index's schema: the store's on-disk format."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from factory.errors import InputError
from factory.plan import PLAN_SCHEMA

RUN_FILE = "run.json"
#: The keys every run.json has (written by ``RunStore.prepare`` since the first store format).
RUN_FILE_KEYS = ("format", "manifest", "fingerprint", "model", "n")
MANIFEST_FILE = "manifest.yaml"
PLAN_FILE = "plan.parquet"
INDEX_FILE = "index.parquet"
JOURNAL_DIR = "index"
#: In ``index/`` while a rebuild is under way (from setting the damaged files aside until the
#: recovered rows are committed): the damaged files' names, one a line. A run that finds it
#: finishes the rebuild before anything else (see ``RunStore.rebuild_index``).
REBUILD_MARKER = "rebuild-pending"
SAMPLES_DIR = "samples"
SELECTIONS_DIR = "selections"
LOCK_FILE = ".lock"
STORE_FORMAT = 1
BUCKET_SIZE = 1000
#: Plan indices per step of the store's streaming passes (resume, fold, index): whole buckets, so a
#: pass holds one step of rows (a few MB) however large the run.
STEP_ROWS = 16 * BUCKET_SIZE

#: Index rows: the plan's columns, then what happened to the sample.
RESULT_FIELDS = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("alpha_source", pa.string()),  # "head" (matting head + GreenPost) or "greenpost" alone
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("alpha_bits", pa.int8()),
    pa.field("image_bytes", pa.int64()),
    pa.field("alpha_bytes", pa.int64()),
    pa.field("fg_bytes", pa.int64()),
    pa.field("meta_bytes", pa.int64()),
    pa.field("gsg", pa.float32()),
    pa.field("gsg_distance", pa.float32()),
    pa.field("bg_uniformity", pa.float32()),
    pa.field("canvas_color", pa.string()),  # "#rrggbb", estimated key colour
    pa.field("alpha_coverage", pa.float32()),  # mean alpha
    pa.field("touches_border", pa.bool_()),
    pa.field("contains_key_color", pa.bool_()),
    pa.field("phash", pa.int64()),  # 64-bit perceptual hash of the alpha-weighted image
    pa.field("t_sample_s", pa.float32()),  # sampler time per image (batch time / batch size)
    pa.field("t_post_s", pa.float32()),  # matting, scoring and encoding
    pa.field("worker", pa.string()),
    pa.field("updated_at", pa.timestamp("ms", tz="UTC")),
    # CLIP tokens of the prompt, start and end included (over sample.PROMPT_TOKEN_LIMIT: it was cut)
    pa.field("prompt_tokens", pa.int32()),
    # How far the matte can be trusted (factory.matte.confidence; docs/matting.md "Matte confidence")
    pa.field("no_board", pa.bool_()),  # no green board found: nothing matted
    pa.field("key_colored_fraction", pa.float32()),  # share of the image that is object keyed as board
    pa.field("matte_residual", pa.float32()),  # mean |I - (a F + (1 - a) B)| over the band, 8-bit levels
    pa.field("matte_green_residue", pa.float32()),  # mean G - max(R, B) > 0 of the foreground's rim, levels
    pa.field("matte_ambiguous", pa.float32()),  # share of the band where spill and coverage are not told apart
    pa.field("matte_confidence", pa.float32()),  # all of it in [0, 1]; 0 with key colour or no board
]
INDEX_SCHEMA = pa.schema([*PLAN_SCHEMA, *RESULT_FIELDS])
RESULT_NAMES = [f.name for f in RESULT_FIELDS]


def bucket_name(index: int) -> str:
    """The ``samples/`` sub-folder of plan index ``index``."""
    return f"{index // BUCKET_SIZE:05d}"


def refuse_linked_folders(root: Path) -> None:
    """Refuse a run whose ``samples/`` or ``index/`` is a symlink: the store writes, and its
    clean-ups delete, only in folders it makes (a resume deletes files named as this run's
    uncommitted samples; a fold deletes journal chunks), never in a folder a link leads to."""
    for name, what in ((SAMPLES_DIR, "keeps samples"), (JOURNAL_DIR, "keeps its index journal")):
        path = root / name
        if path.is_symlink():
            raise InputError(
                f"{path}: is a symlink, where this run {what}; the store writes only into folders it makes: "
                "move the link away (or the real folder back) and re-run"
            )
