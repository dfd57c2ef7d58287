"""`factory filter`: choose the good samples of a run and record them as a named selection.

The selection (:mod:`factory.selection`) lists the kept samples; the filter's parameters, the counts
by reason and per class go into its metadata. No image is copied or read: the filter works on the
index alone (``--verify-files`` is the one opt-in exception).

Candidates are the ``done`` samples. Each candidate is dropped for the *first* reason that applies,
in this order (so the dropped counts add up to the number of dropped samples):

1. ``low_gsg``: GSG below ``min_gsg`` (a missing GSG counts as failing when ``min_gsg > 0``);
2. ``empty_matte``: alpha coverage below ``min_coverage`` (missing coverage counts as empty);
3. ``full_matte``: alpha coverage above ``max_coverage``;
4. ``touches_border``: the object is cut by the frame (only with ``drop_border``);
5. ``key_color``: the object contains the key colour (Smith and Blinn's hard case; ``drop_key_color``);
6. ``no_board``: GreenPost found no green board (``drop_no_board``);
7. ``untrusted_matte``: the matte's recomposition residual is above ``max_residual`` or its
   confidence below ``min_confidence`` (docs/matting.md, "Matte confidence"; a run made before
   these columns existed has them empty, and an empty value passes);
8. ``near_duplicate``: perceptual hash within ``dedup_distance`` bits of a better kept sample;
9. ``class_cap``: beyond ``per_class_cap`` kept samples of its class;
10. ``corrupt``: a file failed the integrity check (only with ``verify_files``).

Near-duplicates and the class cap only look at samples that passed the earlier tests, and both
prefer the *best* sample: highest GSG, ties broken by the lowest plan index. Within a cluster of
near-duplicates the result is exactly that of the greedy rule "visit samples best first; keep one
unless it is within the distance of a sample already kept" (so of a chain A~B~C where A and C are
far apart, A and C are both kept).

Everything is vectorised (Arrow compute and numpy); the near-duplicate search is multi-index
hashing (:mod:`factory.dedup`). On a synthetic 1,000,000-row index the whole command takes
about 1.2x the time pyarrow needs to read that index (``bench/export.py``; BENCHMARKS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.dedup import near_duplicates
from factory.errors import InputError
from factory.feedback import plural
from factory.fsutil import is_locked
from factory.integrity import CorruptSample, check_sample_files
from factory.manifest import FilterSettings, with_overrides
from factory.sample import SIZE_COLUMNS, STATUS_DONE, STATUS_FAILED, STATUS_PLANNED
from factory.selection import DEFAULT_SELECTION, SELECTION_COLUMNS, check_new_selection_name, save_selection
from factory.store import LOCK_FILE, RunStore, resolve_run

#: Drop reasons, in the order they are tested. Code 0 means kept; reason ``i`` has code ``i + 1``.
REASONS = (
    "low_gsg",
    "empty_matte",
    "full_matte",
    "touches_border",
    "key_color",
    "no_board",
    "untrusted_matte",
    "near_duplicate",
    "class_cap",
    "corrupt",
)
_CODE = {name: i + 1 for i, name in enumerate(REASONS)}


#: Columns with few distinct values: read dictionary-encoded and stored so in the selection.
_CATEGORICAL = ("class_name", "category", "status")

#: Columns the filter reads from the index.
_NEEDED = (
    "index",
    "key",
    "class_name",
    "category",
    "status",
    "gsg",
    "alpha_coverage",
    "touches_border",
    "contains_key_color",
    "phash",
)
#: Columns read when present (an index written before they existed lacks them: nothing is dropped).
_OPTIONAL = ("no_board", "matte_residual", "matte_confidence")
#: Index columns of the sample files' sizes, read with ``--verify-files``.
_SIZE_COLUMNS = ["width", "height", "alpha_bits", *SIZE_COLUMNS.values()]


def filter_settings(defaults: FilterSettings, **overrides: Any) -> FilterSettings:
    """The manifest's filter settings with the command line's options (``None``: not given;
    ``per_class_cap=0``: no cap; ``max_residual=0``: no residual test)."""
    if overrides.get("per_class_cap") == 0:
        overrides["per_class_cap"] = None
        defaults = defaults.model_copy(update={"per_class_cap": None})
    if overrides.get("max_residual") == 0:  # 0 turns the residual test off
        overrides["max_residual"] = None
        defaults = defaults.model_copy(update={"max_residual": None})
    return with_overrides(defaults, overrides)


def describe(params: FilterSettings) -> str:
    cap = "none" if params.per_class_cap is None else str(params.per_class_cap)
    dedup = "off" if params.dedup_distance < 0 else plural(params.dedup_distance, "bit")
    return (
        f"min GSG {params.min_gsg:g}; coverage {params.min_coverage:g}..{params.max_coverage:g}; "
        f"drop border-touching {'yes' if params.drop_border else 'no'}; "
        f"drop key colour {'yes' if params.drop_key_color else 'no'}; "
        f"drop no board {'yes' if params.drop_no_board else 'no'}; "
        f"max residual {'off' if params.max_residual is None else f'{params.max_residual:g}'}; "
        f"min confidence {params.min_confidence:g}; "
        f"near-duplicate distance {dedup}; per-class cap {cap}"
    )


@dataclass
class FilterResult:
    """The outcome on an index table: one reason code per row (0 = kept, -1 = not a candidate)."""

    reason: np.ndarray  # int8 per input row
    duplicate_of: np.ndarray  # int64 per row: row number of the kept sample it duplicates, else -1
    classes: list[str]  # class names, by class code
    class_code: np.ndarray  # int32 per row
    status_counts: dict[str, int]

    @property
    def kept(self) -> np.ndarray:
        return self.reason == 0

    def counts_by_reason(self) -> dict[str, int]:
        counts = np.bincount(self.reason[self.reason > 0], minlength=len(REASONS) + 1)
        return {name: int(counts[_CODE[name]]) for name in REASONS}

    def per_class(self) -> dict[str, dict[str, int]]:
        """class -> {'done': candidates, 'kept': n, '<reason>': n ...} (reasons with 0 left out)."""
        width = len(REASONS) + 2  # -1 (not candidate) shifted to 0, kept to 1, reasons 2..
        cand = self.reason >= 0
        table = np.bincount(
            self.class_code[cand].astype(np.int64) * width + (self.reason[cand].astype(np.int64) + 1),
            minlength=len(self.classes) * width,
        ).reshape(len(self.classes), width)
        out: dict[str, dict[str, int]] = {}
        for code, name in enumerate(self.classes):
            row = table[code]
            done = int(row[1:].sum())
            if done == 0:
                continue
            entry = {"done": done, "kept": int(row[1])}
            for reason in REASONS:
                n = int(row[_CODE[reason] + 1])
                if n:
                    entry[reason] = n
            out[name] = entry
        return out


# ----------------------------------------------------------------------------------- selection


def select(index: pa.Table, params: FilterSettings) -> FilterResult:
    """Apply the filter to an index table (``RunStore.index()`` or any table with its columns)."""
    missing = [c for c in _NEEDED if c not in index.column_names]
    if missing:
        raise InputError(f"the index lacks columns {missing}; is this a factory run?")
    n = index.num_rows
    status_names, status_code = _codes(index["status"])
    status_n = np.bincount(status_code, minlength=len(status_names))
    status_counts = {
        s: int(status_n[status_names.index(s)]) if s in status_names else 0
        for s in (STATUS_DONE, STATUS_FAILED, STATUS_PLANNED)
    }
    done_code = status_names.index(STATUS_DONE) if STATUS_DONE in status_names else -1
    reason = np.where(status_code == done_code, 0, -1).astype(np.int8)

    def drop(name: str, mask: np.ndarray) -> None:
        reason[(reason == 0) & mask] = _CODE[name]

    gsg = _np_float(index["gsg"], -math.inf)
    if params.min_gsg > 0:
        drop("low_gsg", gsg < params.min_gsg)
    coverage = _np_float(index["alpha_coverage"], math.nan)
    drop("empty_matte", np.isnan(coverage) | (coverage < params.min_coverage))
    drop("full_matte", coverage > params.max_coverage)
    if params.drop_border:
        drop("touches_border", _np_bool(index["touches_border"]))
    if params.drop_key_color:
        drop("key_color", _np_bool(index["contains_key_color"]))
    if params.drop_no_board and "no_board" in index.column_names:
        drop("no_board", _np_bool(index["no_board"]))
    if params.max_residual is not None and "matte_residual" in index.column_names:
        drop("untrusted_matte", _np_float(index["matte_residual"], -math.inf) > params.max_residual)
    if params.min_confidence > 0 and "matte_confidence" in index.column_names:
        drop("untrusted_matte", _np_float(index["matte_confidence"], math.inf) < params.min_confidence)

    # Priority among the samples still in: best GSG first, then lowest plan index (rank 0 is the
    # best). Only compared between samples that passed the tests above, so only they are ranked.
    passed = np.flatnonzero(reason == 0)
    plan_index = index["index"].to_numpy(zero_copy_only=False).astype(np.int64)
    rank = np.full(n, np.iinfo(np.int64).max, np.int64)
    rank[passed[_best_first(gsg[passed], plan_index[passed])]] = np.arange(passed.size)

    duplicate_of = np.full(n, -1, np.int64)
    if params.dedup_distance >= 0:
        phash = index["phash"]
        has_hash = _np_bool(pc.is_valid(phash))
        rows = np.flatnonzero((reason == 0) & has_hash)
        if rows.size > 1:
            hashes = pc.fill_null(phash, 0).to_numpy(zero_copy_only=False)[rows].astype(np.int64)
            dup_local = near_duplicates(hashes, rank[rows], params.dedup_distance)
            is_dup = dup_local >= 0
            reason[rows[is_dup]] = _CODE["near_duplicate"]
            duplicate_of[rows[is_dup]] = rows[dup_local[is_dup]]

    classes, class_code = _codes(index["class_name"])
    if params.per_class_cap is not None:
        rows = np.flatnonzero(reason == 0)
        order = rows[np.lexsort((rank[rows], class_code[rows]))]
        cls = class_code[order]
        starts = np.r_[0, np.flatnonzero(cls[1:] != cls[:-1]) + 1]
        first = np.repeat(starts, np.diff(np.r_[starts, cls.size]))
        within = np.arange(cls.size) - first
        reason[order[within >= params.per_class_cap]] = _CODE["class_cap"]

    return FilterResult(
        reason=reason, duplicate_of=duplicate_of, classes=classes, class_code=class_code, status_counts=status_counts
    )


def _np_bool(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool)


def _np_float(arr: pa.ChunkedArray | pa.Array, fill: float) -> np.ndarray:
    return pc.fill_null(pc.cast(arr, pa.float64()), fill).to_numpy(zero_copy_only=False)


def _codes(arr: pa.ChunkedArray | pa.Array) -> tuple[list[str], np.ndarray]:
    """(distinct values, int32 code per row) of a string column; null reads as "". A column read
    dictionary-encoded (``RunStore.index(..., dictionary=...)``) is used as it is, without decoding."""
    if isinstance(arr, pa.ChunkedArray):
        if pa.types.is_dictionary(arr.type):
            arr = arr.unify_dictionaries()
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type) and (arr.null_count or arr.dictionary.null_count):
        arr = arr.cast(arr.type.value_type)  # rare: decode, so that null and "" share one code
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(pc.fill_null(arr, ""))
    return arr.dictionary.to_pylist(), arr.indices.to_numpy(zero_copy_only=False).astype(np.int32)


def _best_first(gsg: np.ndarray, plan_index: np.ndarray) -> np.ndarray:
    """Positions ordered best first: highest GSG (NaN counts as lowest), ties by lowest plan index.

    When the GSGs are float32 values (the index stores them so) and ``plan_index`` is increasing,
    both keys fit one 64-bit word (GSG bits mapped to an order-preserving integer, then the
    position), and one ``np.sort`` of that word costs half a two-key ``np.lexsort``.
    """
    m = gsg.size
    g32 = gsg.astype(np.float32)
    packable = m < 2**32 and bool(np.all(np.diff(plan_index) > 0)) and bool(
        np.array_equal(g32, gsg, equal_nan=True)
    )
    if not packable:
        key = np.where(np.isnan(gsg), -math.inf, gsg)
        return np.lexsort((plan_index, -key))
    g32 = np.where(np.isnan(g32), np.float32(-np.inf), g32) + np.float32(0.0)  # -0.0 -> 0.0
    bits = g32.view(np.uint32)
    ordered = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x8000_0000))  # ascending in g
    word = ((~ordered).astype(np.uint64) << np.uint64(32)) | np.arange(m, dtype=np.uint64)
    return (np.sort(word) & np.uint64(0xFFFF_FFFF)).astype(np.int64)


# ------------------------------------------------------------------------------ the command


@dataclass
class FilterSummary:
    run: Path
    name: str
    path: Path | None  # None on a dry run
    params: FilterSettings
    total: int
    status_counts: dict[str, int]
    kept: int
    dropped: dict[str, int]
    per_class: dict[str, dict[str, int]]
    problems: list[str] = field(default_factory=list)  # "KEY: corrupt image (...)" with --verify-files
    seconds: float = 0.0
    max_class_lines: int = 40

    def lines(self) -> list[str]:
        done = self.status_counts.get(STATUS_DONE, 0)
        other = ", ".join(f"{v} {k}" for k, v in self.status_counts.items() if k != STATUS_DONE and v)
        out = [f"run {self.run}: {plural(self.total, 'sample')}, {done} done" + (f" ({other} not candidates)" if other else "")]
        out.append(f"filter: {describe(self.params)}")
        share = f" ({100.0 * self.kept / done:.1f} %)" if done else ""
        n_dropped = sum(self.dropped.values())
        out.append(f"kept {self.kept} of {done} done{share}; dropped {n_dropped}")
        for reason in REASONS:
            if self.dropped.get(reason):
                out.append(f"  {reason:<16} {self.dropped[reason]:>9}")
        if self.per_class:
            width = max(12, min(40, max(len(c) for c in self.per_class)))
            out.append(f"{'class':<{width}} {'done':>8} {'kept':>8} {'dropped':>8}  by reason")
            items = sorted(self.per_class.items())
            for name, c in items[: self.max_class_lines]:
                reasons = ", ".join(f"{r} {c[r]}" for r in REASONS if c.get(r))
                out.append(f"{name[:width]:<{width}} {c['done']:>8} {c['kept']:>8} {c['done'] - c['kept']:>8}  {reasons}")
            if len(items) > self.max_class_lines:
                kept = sorted(c["kept"] for c in self.per_class.values())
                out.append(
                    f"... {len(items) - self.max_class_lines} more classes (all {len(items)}: kept per class "
                    f"min {kept[0]}, median {kept[len(kept) // 2]}, max {kept[-1]}; full table in the selection's metadata)"
                )
        if self.path is None:
            out.append("dry run: no selection written")
        else:
            out.append(f"selection '{self.name}' ({plural(self.kept, 'sample')}) written to {self.path}")
        return out


def run_filter(
    run: str | Path | None,
    name: str = DEFAULT_SELECTION,
    dry_run: bool = False,
    verify_files: bool = False,
    verify_progress: Callable[[int], None] | None = None,
    **overrides: Any,
) -> FilterSummary:
    """Filter a run (``--run`` default: the latest made here) and write the selection ``name``.

    ``overrides`` are :class:`~factory.manifest.FilterSettings` fields; ``None`` means the manifest's default.
    """
    start = time.perf_counter()
    check_new_selection_name(name)
    store = RunStore.open(resolve_run(run))
    params = filter_settings(store.manifest().filter, **overrides)
    columns = list(_NEEDED) + list(_OPTIONAL) + (_SIZE_COLUMNS if verify_files else [])
    index = store.index(columns=columns, dictionary=_CATEGORICAL)
    result = select(index, params)
    problems: list[str] = []
    if verify_files:
        problems = _verify_kept(store, index, result, verify_progress)
    kept_rows = index.select(list(SELECTION_COLUMNS)).filter(pa.array(result.kept))
    if not _increasing(kept_rows["index"]):
        kept_rows = kept_rows.sort_by("index")
    summary = FilterSummary(
        run=store.root,
        name=name,
        path=None,
        params=params,
        total=index.num_rows,
        status_counts=result.status_counts,
        kept=kept_rows.num_rows,
        dropped=result.counts_by_reason(),
        per_class=result.per_class(),
        problems=problems,
    )
    if is_locked(store.root / LOCK_FILE):
        summary.problems.insert(
            0,
            f"{store.root} is being written (a `factory generate` is running): this filter read the "
            f"{plural(summary.status_counts.get(STATUS_DONE, 0), 'sample')} done so far of {summary.total} planned; "
            "filter again when the run has finished",
        )
    if not dry_run:
        info = store.info
        meta = {
            "name": name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "run": str(store.root),
            "manifest": info.get("manifest"),
            "fingerprint": info.get("fingerprint"),
            "model": info.get("model"),
            "params": params.model_dump(mode="json"),
            "total": index.num_rows,
            "status": result.status_counts,
            "kept": kept_rows.num_rows,
            "dropped": summary.dropped,
            "per_class": summary.per_class,
        }
        summary.path = save_selection(store.root, name, kept_rows, meta)
    summary.seconds = time.perf_counter() - start
    return summary


def _increasing(arr: pa.ChunkedArray) -> bool:
    values = arr.to_numpy(zero_copy_only=False)
    return bool(np.all(values[1:] > values[:-1]))


def _verify_kept(
    store: RunStore, index: pa.Table, result: FilterResult, progress: Callable[[int], None] | None
) -> list[str]:
    """Check the files of every kept sample (sizes, PNG structure and CRCs); drop the bad ones."""
    problems = []
    rows = np.flatnonzero(result.kept)
    records = index.take(pa.array(rows)).to_pylist()
    for row_number, rec in zip(rows, records, strict=True):
        try:
            check_sample_files(store, rec)
        except CorruptSample as exc:
            problems.append(str(exc))
            result.reason[row_number] = _CODE["corrupt"]
        if progress is not None:
            progress(1)
    return problems
