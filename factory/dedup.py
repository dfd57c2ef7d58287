"""Near-duplicate search over 64-bit perceptual hashes: exact multi-index hashing, vectorised.

:func:`near_duplicates` gives, for each hash, the better kept hash it duplicates (or -1): exactly
the result of the greedy rule "visit hashes best first; keep one unless it is within the distance
of one already kept". On a synthetic 1,000,000-row index it takes a fraction of the time pyarrow
needs to read that index (``bench/export.py``; BENCHMARKS.md).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np


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
