"""Near-duplicate search (factory.dedup): the exact greedy rule, on random and dense clusters."""

from __future__ import annotations

import numpy as np
import pytest

from factory.dedup import choose_blocks, near_duplicates


def _greedy(h: np.ndarray, rank: np.ndarray, d: int) -> np.ndarray:
    u = h.view(np.uint64)
    out = np.full(h.size, -1)
    kept: list[int] = []
    for i in np.argsort(rank):
        for k in kept:
            if bin(int(u[i] ^ u[k])).count("1") <= d:
                out[i] = k
                break
        else:
            kept.append(int(i))
    return out


@pytest.mark.parametrize("distance", [0, 1, 3, 4, 6, 10])
def test_near_duplicates_equal_greedy_reference(distance: int) -> None:
    rng = np.random.default_rng(distance)
    for _ in range(40):
        centres = rng.integers(-(2**63), 2**63 - 1, size=int(rng.integers(1, 5)), dtype=np.int64).view(np.uint64)
        n = int(rng.integers(2, 90))
        h = centres[rng.integers(0, centres.size, n)].copy()
        for j in range(n):  # flip 0..8 random bits: distances straddle the threshold
            for bit in rng.integers(0, 64, int(rng.integers(0, 9))):
                h[j] ^= np.uint64(1) << np.uint64(bit)
        if rng.random() < 0.3:  # some bits equal in every hash (they are dropped before blocking)
            h &= np.uint64(0xFFFF_FFFF_FFFF_F000)
        rank = rng.permutation(n)
        want = _greedy(h.view(np.int64), rank, distance)
        for budget in (None, 0):  # vectorised pairs, and the sample-by-sample fallback
            got = near_duplicates(h.view(np.int64), rank, distance, pair_budget=budget)
            assert ((got >= 0) == (want >= 0)).all()
            for i in np.flatnonzero(got >= 0):  # each duplicate points at a kept, better, close sample
                j = got[i]
                assert got[j] == -1 and rank[j] < rank[i] and bin(int(h[i] ^ h[j])).count("1") <= distance


def test_near_duplicates_dense_cluster_and_few_varying_bits() -> None:
    rng = np.random.default_rng(5)
    centre = np.uint64(0x0123_4567_89AB_CDEF)
    flips = rng.integers(0, 2**12, 1500, dtype=np.uint64)  # 1500 hashes within 12 bits of each other
    h = (centre ^ flips).view(np.int64)
    rank = rng.permutation(h.size)
    want = _greedy(h, rank, 3)
    got = near_duplicates(h, rank, 3, pair_budget=1000)  # forces the fallback
    assert ((got >= 0) == (want >= 0)).all() and (got >= 0).sum() > 1000
    assert ((near_duplicates(h, rank, 3) >= 0) == (want >= 0)).all()
    # only 12 bits vary: a distance of 12 or more makes everything a duplicate of the best
    got = near_duplicates(h, rank, 12)
    best = int(np.argmin(rank))
    assert got[best] == -1 and (np.delete(got, best) == best).all()


def test_block_choice_grows_tables_with_n() -> None:
    assert choose_blocks(1000, 4) == (5, 1)  # small: one block must match
    m, t = choose_blocks(1_000_000, 4)
    assert t >= 2 and m - t == 4  # large: two blocks must match, fewer collisions
    with pytest.raises(TypeError):
        near_duplicates(np.zeros(3, np.float64), np.arange(3), 4)  # a float array (nulls) is refused
