"""The export's order, decided before anything is written: splits by class, shuffle, identity.

The order is a pure function of the rows, the splits and the seed:

- **Split** (by class): within each class, samples are ordered by a keyed hash of (seed, plan
  index); a split of fraction ``f`` takes the next ``round(f * n)`` of them, at least one when the
  class has two samples or more, and ``train`` (the remainder) always keeps at least one. A sample
  is therefore in exactly one split, and the assignment depends only on the seed and which samples
  are in the class.
- **Order** (shuffle): within each split, samples are ordered by another keyed hash of (seed, plan
  index); splits are written train first, then the others in the order given.

The hash is splitmix64, vectorised in numpy: platform-independent, no per-row Python.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.manifest import TRAIN_SPLIT, ExportSettings
from factory.store import RunStore

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic), vectorised."""
    z = np.asarray(x, np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def keyed_hash(plan_index: np.ndarray, seed: int, stream: int) -> np.ndarray:
    salt = mix64(np.array([(seed * 2 + stream) & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    return mix64(np.asarray(plan_index, np.int64).view(np.uint64) ^ salt)


def plan_order(rows: pa.Table, splits: dict[str, float], seed: int) -> pa.Table:
    """Assign splits by class and shuffle: ``rows`` plus a ``split`` column, in writing order."""
    n = rows.num_rows
    names = [TRAIN_SPLIT, *splits]
    if n == 0:
        return rows.append_column("split", pa.array([], pa.string()))
    plan_index = rows["index"].to_numpy(zero_copy_only=False).astype(np.int64)
    encoded = pc.dictionary_encode(pc.fill_null(rows["class_name"], "")).combine_chunks()
    cls = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_classes = len(encoded.dictionary)

    # position of each sample within its class, in keyed-hash order
    h = keyed_hash(plan_index, seed, 1)
    order = np.lexsort((plan_index, h, cls))
    sorted_cls = cls[order]
    starts = np.r_[0, np.flatnonzero(sorted_cls[1:] != sorted_cls[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(n) - first

    # per class: how many go to each held-out split
    class_n = np.bincount(cls, minlength=n_classes)
    counts = np.zeros((len(splits), n_classes), np.int64)
    for i, frac in enumerate(splits.values()):
        counts[i] = np.where(class_n >= 2, np.maximum(1, np.floor(frac * class_n + 0.5)), 0)
    for i in reversed(range(len(splits))):  # train keeps at least one: trim the last splits first
        excess = np.maximum(counts.sum(axis=0) - (class_n - 1), 0)
        counts[i] -= np.minimum(excess, counts[i])
    bounds = np.cumsum(counts, axis=0)  # split i takes positions [bounds[i-1], bounds[i])
    code = np.zeros(n, np.int64)  # 0 = train
    for i in reversed(range(len(splits))):
        code[pos < bounds[i][cls]] = i + 1

    shuffle = keyed_hash(plan_index, seed, 2)
    write_order = np.lexsort((plan_index, shuffle, code))
    out = rows.take(pa.array(write_order))
    split_col = pa.DictionaryArray.from_arrays(pa.array(code[write_order], pa.int32()), pa.array(names))
    return out.append_column("split", split_col.cast(pa.string()))


#: The shape of the exported members (their names and JSON fields): a new shape restarts an
#: export made by an older factory instead of resuming it with samples of two shapes.
MEMBERS_VERSION = 2


def plan_fingerprint(ordered: pa.Table, settings: ExportSettings, store: RunStore) -> str:
    """Identity of an export plan: same fingerprint, same shards (so finished ones can be kept)."""
    info = store.info
    h = hashlib.sha256()
    content = settings.model_dump(mode="json")
    if settings.image_format != "jpg":
        content.pop("jpeg_quality")  # PNG exports do not depend on it
    content.pop("license")  # only the card shows it
    content["members"] = MEMBERS_VERSION
    h.update(json.dumps({"settings": content, "fingerprint": info.get("fingerprint"), "model": info.get("model")}, sort_keys=True).encode())
    for name in ("key", "split"):
        h.update("\n".join(ordered[name].to_pylist()).encode())
        h.update(b"\x00")
    for name in ("image_bytes", "alpha_bytes", "fg_bytes", "meta_bytes", "alpha_bits"):
        h.update(pc.fill_null(ordered[name], -1).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest()[:24]
