"""`factory filter`: choose the good samples of a run and record them as a named selection.

A selection is a small Parquet file, ``<run>/selections/<name>.parquet``, listing the kept samples
(plan index, key, class, GSG, coverage) sorted by plan index; the filter parameters, the counts by
reason and per class are in its Parquet metadata under ``factory.selection``. No image is copied or
read: the filter works on the index alone (``--verify-files`` is the one opt-in exception).

Candidates are the ``done`` samples. Each candidate is dropped for the *first* reason that applies,
in this order (so the dropped counts add up to the number of dropped samples):

1. ``low_gsg``: GSG below ``min_gsg`` (a missing GSG counts as failing when ``min_gsg > 0``);
2. ``empty_matte``: alpha coverage below ``min_coverage`` (missing coverage counts as empty);
3. ``full_matte``: alpha coverage above ``max_coverage``;
4. ``touches_border``: the object is cut by the frame (only with ``drop_border``);
5. ``key_color``: the object contains the key colour (Smith and Blinn's hard case; ``drop_key_color``);
6. ``near_duplicate``: perceptual hash within ``dedup_distance`` bits of a better kept sample;
7. ``class_cap``: beyond ``per_class_cap`` kept samples of its class;
8. ``corrupt``: a file failed the integrity check (only with ``verify_files``).

Near-duplicates and the class cap only look at samples that passed the earlier tests, and both
prefer the *best* sample: highest GSG, ties broken by the lowest plan index. Within a cluster of
near-duplicates the result is exactly that of the greedy rule "visit samples best first; keep one
unless it is within the distance of a sample already kept" (so of a chain A~B~C where A and C are
far apart, A and C are both kept).

Everything is vectorised (Arrow compute and numpy); the near-duplicate search is multi-index
hashing (see :func:`near_duplicates`). On a synthetic 1,000,000-row index the whole command takes
about 1.2x the time pyarrow needs to read that index (``bench/export.py``; BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from factory.errors import InputError
from factory.manifest import FilterDefaults, Manifest, manifest_from_dict
from factory.store import (
    INDEX_FILE,
    INDEX_SCHEMA,
    JOURNAL_DIR,
    MANIFEST_FILE,
    PLAN_FILE,
    SELECTIONS_DIR,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PLANNED,
    RunStore,
    atomic_write_parquet,
    resolve_run,
)

#: Drop reasons, in the order they are tested. Code 0 means kept; reason ``i`` has code ``i + 1``.
REASONS = (
    "low_gsg",
    "empty_matte",
    "full_matte",
    "touches_border",
    "key_color",
    "near_duplicate",
    "class_cap",
    "corrupt",
)
_CODE = {name: i + 1 for i, name in enumerate(REASONS)}

SELECTION_META_KEY = "factory.selection"
DEFAULT_SELECTION = "default"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

#: Columns of a selection file (kept rows, sorted by plan index).
SELECTION_COLUMNS = ("index", "key", "class_name", "category", "gsg", "alpha_coverage")

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


@dataclass(frozen=True)
class FilterParams:
    """What to keep. Defaults come from the manifest's ``filter:`` section (``FilterDefaults``)."""

    min_gsg: float = 0.8
    min_coverage: float = 0.01
    max_coverage: float = 0.95
    drop_border: bool = False
    drop_key_color: bool = True
    dedup_distance: int = 4  # Hamming distance on the 64-bit phash; -1 disables, 0 = identical hashes
    per_class_cap: int | None = None

    @classmethod
    def from_defaults(cls, defaults: FilterDefaults, **overrides: Any) -> FilterParams:
        values = defaults.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("per_class_cap") == 0:  # 0 on the command line: no cap
            values["per_class_cap"] = None
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        if not 0.0 <= self.min_gsg <= 1.0:
            raise InputError(f"--min-gsg must be within 0..1, got {self.min_gsg}")
        for name in ("min_coverage", "max_coverage"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"--{name.replace('_', '-')} must be within 0..1, got {value}")
        if self.min_coverage > self.max_coverage:
            raise InputError(
                f"--min-coverage {self.min_coverage} is above --max-coverage {self.max_coverage}; nothing could pass"
            )
        if not -1 <= self.dedup_distance <= 64:
            raise InputError(f"--dedup-distance must be within -1..64 (-1 disables), got {self.dedup_distance}")
        if self.per_class_cap is not None and self.per_class_cap < 1:
            raise InputError(f"--per-class-cap must be a positive integer (0 for none), got {self.per_class_cap}")

    def describe(self) -> str:
        cap = "none" if self.per_class_cap is None else str(self.per_class_cap)
        dedup = "off" if self.dedup_distance < 0 else f"{self.dedup_distance} bits"
        return (
            f"min GSG {self.min_gsg:g}; coverage {self.min_coverage:g}..{self.max_coverage:g}; "
            f"drop border-touching {'yes' if self.drop_border else 'no'}; "
            f"drop key colour {'yes' if self.drop_key_color else 'no'}; "
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


def select(index: pa.Table, params: FilterParams) -> FilterResult:
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
    dictionary-encoded (``read_index(..., dictionary=...)``) is used as it is, without decoding."""
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


# ----------------------------------------------------------------------------- near duplicates


#: Candidate pairs the vectorised search may list; beyond it (hashes in dense clusters), the greedy
#: rule runs sample by sample over the same block tables, whose cost grows with the kept samples
#: a bucket holds rather than with the square of the cluster.
PAIR_BUDGET = 30_000_000


def near_duplicates(hashes: np.ndarray, rank: np.ndarray, distance: int, pair_budget: int | None = None) -> np.ndarray:
    """For each hash, the position of the better kept hash it duplicates, or -1 if it is kept.

    ``hashes``: 64-bit perceptual hashes (int64 or uint64); ``rank``: priority, lower is better
    (distinct values). Two hashes are near-duplicates when their Hamming distance is at most
    ``distance``. The result equals the greedy rule: visit best first, keep a hash unless it is
    within ``distance`` of one already kept.

    Method (multi-index hashing, exact):

    1. identical hashes are grouped (:func:`_repeated`); the best of each group represents it;
    2. bits that are the same in every hash are dropped (they never add to a distance); the
       remaining ``L`` bits are cut into ``m`` blocks; two hashes within distance ``d`` differ in
       at most ``d`` blocks, so they agree exactly on some ``t = m - d`` blocks. For each of the
       ``C(m, t)`` choices of ``t`` blocks, hashes are bucketed by those blocks (a counting pass
       drops singleton buckets, a sort groups the rest) and pairs inside a bucket are candidates,
       kept when a vectorised popcount says they are close; ``m`` is chosen by a cost model;
    3. the greedy rule is resolved in rounds over the edge list (a sample is decided once all its
       better neighbours are). If the buckets would list more than ``pair_budget`` candidate pairs
       (a dense cluster of distinct but close hashes), steps 2-3 are replaced by the greedy rule
       run sample by sample against the kept samples of its buckets (same result).
    """
    hashes = np.asarray(hashes)
    if hashes.dtype not in (np.int64, np.uint64):
        raise TypeError(f"perceptual hashes must be int64 or uint64, not {hashes.dtype}")
    h = np.ascontiguousarray(hashes).view(np.uint64)
    rank = np.asarray(rank, np.int64)
    n = h.size
    out = np.full(n, -1, np.int64)
    if n < 2 or distance < 0:
        return out

    # 1. identical hashes: keep the best of each group (groups are handled apart, so a large
    #    group of equal hashes never produces a quadratic number of pairs below).
    rep_of_row = np.arange(n, dtype=np.int64)
    in_group = _repeated(h)  # rows whose hash occurs more than once
    if in_group.any():
        rows = np.flatnonzero(in_group)
        rows = rows[np.lexsort((rank[rows], h[rows]))]
        hs = h[rows]
        first = np.r_[True, hs[1:] != hs[:-1]]
        best = rows[np.flatnonzero(first)][np.cumsum(first) - 1]
        rep_of_row[rows] = best
        out[rows[~first]] = best[~first]
        reps = np.concatenate([np.flatnonzero(~in_group), rows[first]])
    else:
        reps = rep_of_row.copy()
    if distance == 0 or reps.size < 2:
        return out

    # 2. and 3. among the distinct hashes: dup_rep[i] = the kept representative i duplicates
    uh, bits = _varying_bits(h[reps])
    rrank = rank[reps]
    m = reps.size
    if distance >= bits:  # every pair is within the distance: only the best is kept
        best_rep = int(np.argmin(rrank))
        dup_rep = np.full(m, best_rep, np.int64)
        dup_rep[best_rep] = -1
    else:
        tables = _block_tables(uh.size, bits, distance)
        budget = PAIR_BUDGET if pair_budget is None else pair_budget
        try:
            dup_rep = _greedy_from_pairs(uh, rrank, distance, tables, budget)
        except _TooDense:
            dup_rep = _greedy_indexed(uh, rrank, distance, tables)

    # every row whose representative was dropped points at the representative's keeper
    target = np.full(m, -1, np.int64)
    dropped = np.flatnonzero(dup_rep >= 0)
    target[dropped] = reps[dup_rep[dropped]]
    pos = np.full(n, -1, np.int64)
    pos[reps] = np.arange(m)
    row_target = target[pos[rep_of_row]]
    moved = row_target >= 0
    out[moved] = row_target[moved]
    return out


def _repeated(h: np.ndarray) -> np.ndarray:
    """Mask of the hashes that occur more than once.

    A counting pass on a 21-bit fold of each hash keeps the rows that share a fold (about a fifth
    at a million rows; equal hashes always do), and only those are sorted: about half the time of
    sorting all the rows.
    """
    n = h.size
    width = min(21, max(1, int(n).bit_length()))
    mask = np.uint64((1 << width) - 1)
    fold = h ^ (h >> np.uint64(21)) ^ (h >> np.uint64(42))
    fold = (fold & mask).astype(np.int64)
    rows = np.flatnonzero((np.bincount(fold, minlength=1 << width) > 1)[fold])
    out = np.zeros(n, bool)
    if rows.size < 2:
        return out
    order = rows[np.argsort(h[rows])]
    s = h[order]
    equal = s[1:] == s[:-1]
    out[order[1:][equal]] = True
    out[order[:-1][equal]] = True
    return out


def _varying_bits(h: np.ndarray) -> tuple[np.ndarray, int]:
    """Drop the bits that are equal in every hash: (hashes packed on the L varying bits, L)."""
    varying = int(np.bitwise_or.reduce(h ^ h[0]))
    bits = varying.bit_count()
    if bits == 64:
        return h, 64
    packed = np.zeros(h.size, np.uint64)
    j = 0
    for b in range(64):
        if varying >> b & 1:
            packed |= ((h >> np.uint64(b)) & np.uint64(1)) << np.uint64(j)
            j += 1
    return packed, bits


#: A block table: the (shift, width) of each block whose values, side by side, make its bucket key.
TableSpec = tuple[tuple[int, int], ...]


def _block_tables(n: int, bits: int, distance: int) -> list[TableSpec]:
    """The C(m, t) block tables for ``n`` hashes of ``bits`` varying bits."""
    m, t = choose_blocks(n, distance, bits)
    bounds = _block_bounds(m, bits)
    return [tuple(bounds[i] for i in chosen) for chosen in combinations(range(m), t)]


def _block_values(h: np.ndarray, tables: list[TableSpec]) -> dict[tuple[int, int], np.ndarray]:
    """Each block's value for every hash (int64), computed once for all the tables that use it."""
    blocks = {block for spec in tables for block in spec}
    return {(shift, w): ((h >> np.uint64(shift)) & np.uint64((1 << w) - 1)).view(np.int64) for shift, w in blocks}


def _table_key(blocks: dict[tuple[int, int], np.ndarray], spec: TableSpec) -> tuple[np.ndarray, int]:
    """The bucket key of every hash in one table (int64, non-negative) and its width in bits."""
    key = blocks[spec[0]]
    width = spec[0][1]
    for block in spec[1:]:
        key = (key << block[1]) | blocks[block]
        width += block[1]
    return key, width


class _TooDense(Exception):
    """The buckets would list more candidate pairs than the budget allows."""


def _greedy_from_pairs(
    h: np.ndarray, rank: np.ndarray, distance: int, tables: list[TableSpec], budget: int
) -> np.ndarray:
    """Vectorised: list close pairs bucket by bucket, then resolve the greedy rule in rounds."""
    m = h.size
    a, b = _candidate_pairs(h, distance, tables, budget)
    dup_rep = np.full(m, -1, np.int64)
    if a.size == 0:
        return dup_rep
    # orient every edge better -> worse and drop repeats (a pair can share several block sets)
    ra, rb = rank[a], rank[b]
    better = np.where(ra < rb, a, b)
    worse = np.where(ra < rb, b, a)
    pair_ids = np.unique(better.astype(np.int64) * m + worse)
    better, worse = pair_ids // m, pair_ids % m

    undecided_, kept_, dropped_ = 0, 1, 2
    state = np.zeros(m, np.int8)
    state[np.bincount(worse, minlength=m) == 0] = kept_  # no better neighbour at all
    while True:
        undecided = state == undecided_
        if not undecided.any():
            break
        live = state[better] != dropped_
        eb, ew = better[live], worse[live]
        kept_edge = state[eb] == kept_
        hit = np.zeros(m, bool)
        hit[ew[kept_edge]] = True
        keeper = np.full(m, -1, np.int64)
        keeper[ew[kept_edge]] = eb[kept_edge]  # one kept better neighbour
        waiting = np.zeros(m, bool)
        waiting[ew[state[eb] == undecided_]] = True
        newly_dropped = undecided & hit
        newly_kept = undecided & ~hit & ~waiting
        if not (newly_dropped.any() or newly_kept.any()):  # cannot happen with distinct ranks
            raise RuntimeError("near-duplicate resolution did not progress")
        state[newly_dropped] = dropped_
        dup_rep[newly_dropped] = keeper[newly_dropped]
        state[newly_kept] = kept_
    return dup_rep


def _greedy_indexed(h: np.ndarray, rank: np.ndarray, distance: int, tables: list[TableSpec]) -> np.ndarray:
    """The greedy rule sample by sample (best first): a sample is compared with the kept samples
    that share one of its buckets. Used for dense clusters, where listing all pairs would not end."""
    m = h.size
    hs = h.tolist()
    blocks = _block_values(h, tables)
    keys = [_table_key(blocks, spec)[0].tolist() for spec in tables]
    kept_in: list[dict[int, list[int]]] = [{} for _ in tables]
    dup_rep = [-1] * m
    for i in np.argsort(rank, kind="stable").tolist():
        hi = hs[i]
        found = -1
        for t, kt in enumerate(keys):
            bucket = kept_in[t].get(kt[i])
            if bucket:
                for j in bucket:
                    if (hi ^ hs[j]).bit_count() <= distance:
                        found = j
                        break
                if found >= 0:
                    break
        if found >= 0:
            dup_rep[i] = found
        else:
            for t, kt in enumerate(keys):
                kept_in[t].setdefault(kt[i], []).append(i)
    return np.asarray(dup_rep, np.int64)


def _block_bounds(m: int, bits: int = 64) -> list[tuple[int, int]]:
    """Cut ``bits`` bits into ``m`` nearly equal blocks: (shift, width) of each."""
    widths = [bits // m + (1 if i < bits % m else 0) for i in range(m)]
    bounds, shift = [], 0
    for w in widths:
        bounds.append((shift, w))
        shift += w
    return bounds


def choose_blocks(n: int, distance: int, bits: int = 64) -> tuple[int, int]:
    """(m, t) minimising an estimate of the work: tables x rows + expected candidate pairs."""
    best: tuple[float, int, int] | None = None
    for m in range(distance + 1, min(bits, distance + 6) + 1):
        t = m - distance
        widths = sorted(w for _, w in _block_bounds(m, bits))
        key_bits = sum(widths[:t])  # the narrowest tables collide the most
        tables = math.comb(m, t)
        pairs = tables * n * n / 2.0 / 2.0**key_bits
        per_row = 35e-9 if key_bits <= 24 else 90e-9  # counting pass vs. a full sort per table
        cost = tables * n * per_row + pairs * 60e-9
        if best is None or cost < best[0]:
            best = (cost, m, t)
    assert best is not None
    return best[1], best[2]


def _candidate_pairs(
    h: np.ndarray, distance: int, tables: list[TableSpec], budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that share a bucket in some table and are within ``distance``; raises ``_TooDense``
    before any table lists more than its share of ``budget`` candidates.

    Tables are independent and numpy's sorts release the GIL, so they run on a thread per core.
    """
    n = h.size
    id_bits = max(1, int(n - 1).bit_length())
    share = max(1, budget // max(1, len(tables)))

    blocks = _block_values(h, tables)

    def one_table(spec: TableSpec) -> tuple[np.ndarray, np.ndarray] | None:
        key, width = _table_key(blocks, spec)
        if width <= 24:  # a counting pass drops singleton buckets before sorting
            rows = np.flatnonzero((np.bincount(key, minlength=1 << width) > 1)[key])
            key = key[rows]
        else:
            rows = np.arange(n, dtype=np.int64)
        if rows.size < 2:
            return None
        if width + id_bits <= 64:  # sort (key, row) packed in one word: faster than argsort
            packed = np.sort((key.astype(np.uint64) << np.uint64(id_bits)) | rows.astype(np.uint64))
            ks = packed >> np.uint64(id_bits)
            ids = (packed & np.uint64((1 << id_bits) - 1)).astype(np.int64)
        else:
            order = np.argsort(key, kind="stable")
            ks, ids = key[order], rows[order]
        listed = _pairs_in_runs(ks, ids, share)
        if listed is None:
            raise _TooDense
        a, b = listed
        close = np.bitwise_count(h[a] ^ h[b]) <= distance
        return a[close], b[close]

    workers = min(len(tables), os.cpu_count() or 1)
    if workers > 1 and n >= 50_000:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="factory-dedup") as pool:
            found = [r for r in pool.map(one_table, tables) if r is not None]
    else:
        found = [r for r in map(one_table, tables) if r is not None]
    if not found:
        empty = np.zeros(0, np.int64)
        return empty, empty
    return np.concatenate([a for a, _ in found]), np.concatenate([b for _, b in found])


def _pairs_in_runs(keys: np.ndarray, ids: np.ndarray, budget: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """All pairs of ``ids`` whose (sorted) ``keys`` are equal; work proportional to the pairs.
    ``None`` (nothing listed) when there would be more than ``budget`` pairs."""
    n = keys.size
    starts_mask = np.r_[True, keys[1:] != keys[:-1]]
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    sizes = np.diff(np.r_[starts, n])
    if budget is not None and int(np.sum(sizes * (sizes - 1) // 2)) > budget:
        return None
    pos = np.arange(n) - starts[group]
    size = sizes[group]
    active = np.flatnonzero(size > 1)
    firsts, seconds = [], []
    k = 1
    while active.size:
        active = active[pos[active] + k < size[active]]
        if not active.size:
            break
        firsts.append(ids[active])
        seconds.append(ids[active + k])
        k += 1
    if not firsts:
        empty = np.zeros(0, np.int64)
        return empty, empty
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)


# ------------------------------------------------------------------------------ the command


def run_manifest(store: RunStore) -> Manifest:
    """``store.manifest()`` with libyaml's C loader when available: the pure-Python loader takes
    about 0.5 s for a 500-class manifest, more than filtering 100,000 rows."""
    path = store.root / MANIFEST_FILE
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: unreadable manifest copy ({exc})") from exc
    return manifest_from_dict(data, str(path))



@dataclass
class FilterSummary:
    run: Path
    name: str
    path: Path | None  # None on a dry run
    params: FilterParams
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
        out = [f"run {self.run}: {self.total} samples, {done} done" + (f" ({other} not candidates)" if other else "")]
        out.append(f"filter: {self.params.describe()}")
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
            out.append(f"selection '{self.name}' ({self.kept} samples) written to {self.path}")
        return out


def check_selection_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InputError(f"selection name {name!r}: use lowercase letters, digits, '-' or '_' (at most 64)")
    return name


def run_filter(
    run: str | Path | None,
    name: str = DEFAULT_SELECTION,
    dry_run: bool = False,
    verify_files: bool = False,
    verify_progress: Callable[[int], None] | None = None,
    **overrides: Any,
) -> FilterSummary:
    """Filter a run (``--run`` default: the latest made here) and write the selection ``name``.

    ``overrides`` are :class:`FilterParams` fields; ``None`` means the manifest's default.
    """
    import time

    start = time.perf_counter()
    check_selection_name(name)
    store = RunStore.open(resolve_run(run))
    params = FilterParams.from_defaults(run_manifest(store).filter, **overrides)
    columns = list(_NEEDED) + (_size_columns() if verify_files else [])
    index = read_index(store, columns, dictionary=_CATEGORICAL)
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
    if not dry_run:
        folder = store.root / SELECTIONS_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.parquet"
        info = store.info
        meta = {
            "name": name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "run": str(store.root),
            "manifest": info.get("manifest"),
            "fingerprint": info.get("fingerprint"),
            "model": info.get("model"),
            "params": asdict(params),
            "total": index.num_rows,
            "status": result.status_counts,
            "kept": kept_rows.num_rows,
            "dropped": summary.dropped,
            "per_class": summary.per_class,
        }
        atomic_write_parquet(
            kept_rows,
            path,
            metadata={SELECTION_META_KEY: json.dumps(meta, sort_keys=True)},
            # dictionaries only where values repeat (a dictionary attempt on the unique keys costs
            # a third of the write), statistics only on the plan index
            use_dictionary=[c for c in _CATEGORICAL if c in SELECTION_COLUMNS],
            write_statistics=["index"],
        )
        summary.path = path
    summary.seconds = time.perf_counter() - start
    return summary


def _increasing(arr: pa.ChunkedArray) -> bool:
    values = arr.to_numpy(zero_copy_only=False)
    return bool(np.all(values[1:] > values[:-1]))


def read_index(store: RunStore, columns: list[str], dictionary: tuple[str, ...] = ()) -> pa.Table:
    """``store.index(columns=columns)``, read in one call when the run's journal is fully folded.

    Columns named in ``dictionary`` come dictionary-encoded (few distinct strings, such as the
    class and the status: reading them so skips decoding a million strings).

    ``RunStore.index()`` merges index.parquet, the journal and the plan a step at a time (0.15 s
    for these columns of a million rows here, 0.6 s for all). When no journal chunk is newer than
    what index.parquet covers and index.parquet holds exactly the plan's rows (plan index 0..N-1,
    in order), index.parquet *is* the index (the store's fold writes it that way), so the columns
    are read in one call (0.04 s for the filter's columns of a million rows, as dictionaries).
    Anything else (a run being written, N changed since the fold) takes the store's path.
    ``tests/test_filter.py`` checks both give the same rows.
    """
    path = store.root / INDEX_FILE
    try:
        if path.is_file():
            pf = pq.ParquetFile(path)
            covers = int((pf.schema_arrow.metadata or {}).get(b"covers", b"0"))
            journal = store.root / JOURNAL_DIR
            pending = [
                p for p in journal.glob("chunk-*.parquet") if p.stem.split("-")[-1].isdigit() and int(p.stem.split("-")[-1]) > covers
            ] if journal.is_dir() else []
            n_plan = pq.read_metadata(store.root / PLAN_FILE).num_rows
            if not pending and pf.metadata.num_rows == n_plan and set(columns) <= set(pf.schema_arrow.names):
                encoded = [c for c in dictionary if c in columns]
                table = pq.ParquetFile(path, read_dictionary=encoded).read(columns=columns) if encoded else pf.read(columns=columns)
                index = table["index"].to_numpy(zero_copy_only=False)
                if np.array_equal(index, np.arange(n_plan)):
                    return _with_types(table, columns, encoded)
    except (OSError, ValueError, pa.ArrowException):
        pass  # the store's own reader reports real problems
    table = store.index(columns=columns)
    encoded = [c for c in dictionary if c in columns]
    for c in encoded:
        table = table.set_column(table.column_names.index(c), c, pc.dictionary_encode(table[c]))
    return _with_types(table, columns, encoded)


def _with_types(table: pa.Table, columns: list[str], encoded: list[str]) -> pa.Table:
    """``table`` with the index schema's types (dictionary<int32, string> for ``encoded``)."""
    fields = [
        pa.field(c, pa.dictionary(pa.int32(), pa.string())) if c in encoded else INDEX_SCHEMA.field(c) for c in columns
    ]
    return pa.Table.from_arrays([table[f.name].cast(f.type) for f in fields], schema=pa.schema(fields))


def _size_columns() -> list[str]:
    return ["width", "height", "alpha_bits", "image_bytes", "alpha_bytes", "fg_bytes", "meta_bytes"]


def _verify_kept(
    store: RunStore, index: pa.Table, result: FilterResult, progress: Callable[[int], None] | None
) -> list[str]:
    """Check the files of every kept sample (sizes, PNG structure and CRCs); drop the bad ones."""
    from factory.export.common import CorruptSample, check_sample_files

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


# ------------------------------------------------------------------------------ reading back


@dataclass(frozen=True)
class Selection:
    name: str
    path: Path
    table: pa.Table  # SELECTION_COLUMNS
    meta: dict[str, Any]


def selection_path(run_root: Path, name: str) -> Path:
    return Path(run_root) / SELECTIONS_DIR / f"{check_selection_name(name)}.parquet"


def list_selections(run_root: Path) -> list[Path]:
    """Selections of a run, oldest first (by modification time)."""
    folder = Path(run_root) / SELECTIONS_DIR
    if not folder.is_dir():
        return []
    paths = [p for p in folder.glob("*.parquet") if not p.name.startswith(".")]
    return sorted(paths, key=lambda p: (p.stat().st_mtime_ns, p.name))


def load_selection(run_root: Path, name: str) -> Selection:
    path = selection_path(run_root, name)
    if not path.is_file():
        known = ", ".join(p.stem for p in list_selections(run_root)) or "none"
        raise InputError(f"{run_root}: no selection named '{name}' (selections: {known}); make one with `factory filter`")
    try:
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(SELECTION_META_KEY.encode(), b"{}")
        meta = json.loads(raw)
    except (OSError, pa.ArrowException, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable selection ({exc}); re-run `factory filter --name {name}`") from exc
    if "key" not in table.column_names:
        raise InputError(f"{path}: not a selection (no key column)")
    return Selection(name=name, path=path, table=table, meta=meta)
