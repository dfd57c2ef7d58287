"""The plan: a manifest expanded into exactly N reproducible sample rows.

Rules that make a plan reproducible and extendable:

- Row ``i`` depends only on the manifest, its seed and ``i``, never on N. Growing N appends rows
  and leaves the first ones unchanged, so a run can be extended.
- Classes (or grid cells) are visited round-robin in an order fixed by the seed, so any N spreads
  them evenly (counts differ by at most one).
- Per-row choices (template, slot values, extra axes) are balanced too: the k-th visit of a class
  or cell takes value ``(k + offset) % len(values)``, where the offset is a keyed hash (BLAKE2b) of
  ``(seed, cell, what)``. Sample seeds are a keyed hash of ``(seed, i)``. Hashes are platform- and
  library-version-independent, unlike a shared RNG stream.
- The Parquet file is written with fixed options and no timestamps, so the same inputs give the
  same bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from factory.errors import InputError, RunError
from factory.fsutil import atomic_parquet_writer, atomic_write_parquet, check_utf8_path, open_parquet
from factory.manifest import Manifest

PLAN_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),  # the class, or the grid cell label
        pa.field("category", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("negative_prompt", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("attributes", pa.string(), nullable=False),  # JSON object, sorted keys
        pa.field("control_image", pa.string(), nullable=True),
    ]
)

#: Keys are ``<manifest>-<index, 8 digits>-<slug>``; the index width is fixed so keys never change.
KEY_INDEX_WIDTH = 8
_SLUG_RE = re.compile(r"[^a-z0-9]+")
_MAX_SLUG = 40
#: Rows per Parquet row group of a run's plan file: a reader holds one group, not the whole plan.
PLAN_ROW_GROUP = 8192


@dataclass(frozen=True)
class PlanRow:
    """One sample to draw. ``attributes`` holds the class or grid-cell values and slot choices."""

    index: int
    key: str
    class_name: str
    category: str
    prompt: str
    negative_prompt: str
    seed: int
    attributes: dict[str, str]
    control_image: str | None = None

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PlanRow:
        attrs = rec["attributes"]
        return cls(
            index=int(rec["index"]),
            key=rec["key"],
            class_name=rec["class_name"],
            category=rec["category"],
            prompt=rec["prompt"],
            negative_prompt=rec["negative_prompt"],
            seed=int(rec["seed"]),
            attributes=json.loads(attrs) if isinstance(attrs, str) else dict(attrs),
            control_image=rec.get("control_image"),
        )


def slugify(text: str) -> str:
    """A lowercase ``[a-z0-9_]`` slug: safe in file names, tar members and webdataset keys."""
    slug = _SLUG_RE.sub("_", text.lower()).strip("_")
    return slug[:_MAX_SLUG].rstrip("_") or "x"


#: What every sample key looks like (see :func:`row_key`): clean-ups delete only files named by one.
KEY_PATTERN = r"[a-z0-9][a-z0-9_-]*-\d{%d}-[a-z0-9_]+" % KEY_INDEX_WIDTH


def row_key(manifest_name: str, index: int, label: str) -> str:
    """The sample key: unique (the index), stable, no dots."""
    return f"{manifest_name}-{index:0{KEY_INDEX_WIDTH}d}-{slugify(label)}"


def _hash_int(*parts: object) -> int:
    """A 63-bit integer from a keyed hash of ``parts``; the building block of every choice."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") & (2**63 - 1)


def _rotate(values: list[str], visit: int, *parts: object) -> str:
    """The value for the ``visit``-th visit of a cell: a round-robin from a hashed offset."""
    return values[(visit + _hash_int(*parts)) % len(values)]


def _fill_articles(text: str) -> str:
    """Replace each ``{a}`` marker (rendered as a sentinel) with 'a' or 'an' for the next word."""

    def article(match: re.Match[str]) -> str:
        word = match.group(1)
        lower = word.lower()
        vowel = lower[:1] in "aeiou" and not lower.startswith(("uni", "use", "usu", "uti", "uku", "eu", "one", "ura", "uri"))
        vowel = vowel or lower.startswith(("hour", "honest", "heir"))
        return ("an " if vowel else "a ") + word

    out = re.sub(r"\x00\s*(\S+)", article, text)
    return out.replace("\x00", "a")


class _Cells:
    """The groups visited round-robin: classes, or the cells of a grid."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        seed = manifest.seed
        if manifest.prompts.classes is not None:
            items = [
                {"class_name": c.class_name, "category": c.category, "phrase": c.prompt_phrase}
                for c in manifest.prompts.classes
            ]
            labels = [c.class_name for c in manifest.prompts.classes]
        else:
            grid = manifest.prompts.grid
            assert grid is not None
            items = []
            labels = []
            for combo in itertools.product(*(grid.axes[a] for a in grid.cells)):
                attrs = dict(zip(grid.cells, combo))
                items.append(attrs)
                labels.append("-".join(combo))
        # A seeded order, fixed for the manifest: sort by a keyed hash of the label.
        order = sorted(range(len(items)), key=lambda i: (_hash_int(seed, "order", labels[i]), i))
        self.items = [items[i] for i in order]
        self.labels = [labels[i] for i in order]

    def __len__(self) -> int:
        return len(self.items)


#: The most rows a plan has: a key holds its row's index in KEY_INDEX_WIDTH digits.
MAX_N = 10**KEY_INDEX_WIDTH


def check_n(n: int) -> int:
    """N, the number of samples of a plan or run: a positive integer up to :data:`MAX_N`, or a
    one-line error (row ``MAX_N`` would get a longer key, which the store and export take for a
    file that is not a sample's)."""
    if n <= 0:
        raise InputError(f"--n must be a positive integer, got {n}")
    if n > MAX_N:
        raise InputError(
            f"--n {n}: at most {MAX_N} samples per plan (a key's index has {KEY_INDEX_WIDTH} digits); "
            "make several runs, each with its own manifest name"
        )
    return n


def build_rows(manifest: Manifest, n: int, start: int = 0) -> list[PlanRow]:
    """Rows ``start .. n-1`` of the manifest's plan."""
    check_n(n)
    return RowMaker(manifest).rows(range(start, n))


class RowMaker:
    """Plan rows as a pure function of the manifest and the row index.

    Everything that depends only on the class or grid cell (its hashed offsets for the template,
    the slots and the extra axes) is computed once here, so a row costs one hash (its seed) and
    its string formatting: any row can be made without the rows before it.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.cells = _Cells(manifest)
        prompts = manifest.prompts
        seed = manifest.seed
        self._images = manifest.model.controlnet.images if manifest.model.controlnet else None
        self._template_offset = [_hash_int(seed, label, "template") for label in self.cells.labels]
        self._slugs = [slugify(label) for label in self.cells.labels]
        grid = prompts.grid
        #: per cell: (axis or slot, its values, its offset, "extra" | "axis" | "slot")
        self._choices: list[list[tuple[str, list[str], int, str]]] = []
        for cell, label in enumerate(self.cells.labels):
            item = self.cells.items[cell]
            choices: list[tuple[str, list[str], int, str]] = []
            known = set(item)
            if grid is not None:
                for axis in grid.extra:
                    choices.append((axis, grid.axes[axis], _hash_int(seed, label, axis), "extra"))
                    known.add(axis)
                for axis, axis_values in grid.axes.items():  # axes used by a template but in neither list
                    if axis not in known:
                        choices.append((axis, axis_values, _hash_int(seed, label, axis), "axis"))
                        known.add(axis)
                known.update({"class_name", "category", "phrase"})
            for slot, slot_values in prompts.slots.items():
                if slot not in known:
                    choices.append((slot, slot_values, _hash_int(seed, label, slot), "slot"))
            self._choices.append(choices)

    def row(self, i: int) -> PlanRow:
        manifest = self.manifest
        prompts = manifest.prompts
        cells = self.cells
        cell, visit = i % len(cells), i // len(cells)
        item = cells.items[cell]
        label = cells.labels[cell]
        template_id = (visit + self._template_offset[cell]) % len(prompts.templates)
        values: dict[str, str] = dict(item)
        if prompts.classes is not None:
            attributes = {"class_name": item["class_name"], "category": item["category"]}
            class_name, category = item["class_name"], item["category"]
        else:
            attributes = dict(item)
            class_name, category = label, "portrait"
        for name, options, offset, kind in self._choices[cell]:
            value = options[(visit + offset) % len(options)]
            if kind == "axis":
                values.setdefault(name, value)
            else:
                values[name] = value
                attributes[name] = value
        if prompts.classes is None:
            values.update({"class_name": label, "category": category, "phrase": label})
        values["a"] = "\x00"
        prompt = " ".join(_fill_articles(prompts.templates[template_id].format(**values)).split())
        attributes["template"] = str(template_id)
        images = self._images
        return PlanRow(
            index=i,
            key=f"{manifest.name}-{i:0{KEY_INDEX_WIDTH}d}-{self._slugs[cell]}",  # row_key, the slug made once
            class_name=class_name,
            category=category,
            prompt=prompt,
            negative_prompt=manifest.negative_prompt,
            seed=_hash_int(manifest.seed, i, "seed"),
            attributes=attributes,
            control_image=images[i % len(images)] if images else None,
        )

    def rows(self, indices: Iterable[int]) -> list[PlanRow]:
        return [self.row(int(i)) for i in indices]


def rows_to_table(rows: list[PlanRow]) -> pa.Table:
    return pa.table(
        {
            "index": [r.index for r in rows],
            "key": [r.key for r in rows],
            "class_name": [r.class_name for r in rows],
            "category": [r.category for r in rows],
            "prompt": [r.prompt for r in rows],
            "negative_prompt": [r.negative_prompt for r in rows],
            "seed": [r.seed for r in rows],
            "attributes": [json.dumps(r.attributes, sort_keys=True) for r in rows],
            "control_image": [r.control_image for r in rows],
        },
        schema=PLAN_SCHEMA,
    )


def build_plan(manifest: Manifest, n: int) -> pa.Table:
    """The plan of ``n`` rows as an Arrow table (schema :data:`PLAN_SCHEMA`)."""
    return rows_to_table(build_rows(manifest, n))


def plan_chunks(manifest: Manifest, n: int, size: int = PLAN_ROW_GROUP, start: int = 0) -> Iterator[pa.Table]:
    """Plan rows ``start .. n-1`` as tables of ``size`` rows: a large plan is never whole in memory."""
    maker = RowMaker(manifest)
    for lo in range(start, n, size):
        yield rows_to_table(maker.rows(range(lo, min(n, lo + size))))


def check_plan_out(path: Path) -> Path:
    """``plan --out``: a new file, an empty one, or a Parquet file (a plan written before) is
    replaced; any other file (the manifest itself, a class list) is refused in one line, and so is
    a path that is not UTF-8 (Parquet's writer cannot open it)."""
    check_utf8_path(path, "--out")
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise InputError(f"{path}: cannot read it to check what it is ({exc.strerror or exc})") from exc
    if head and head != b"PAR1":
        raise InputError(f"{path}: exists and is not a Parquet file (the plan would replace it); choose another --out")
    return path


def write_plan_file(
    manifest: Manifest,
    n: int,
    path: str | Path,
    stop: Any = None,
    start: int = 0,
    on_rows: Callable[[int], None] | None = None,
    group: int = PLAN_ROW_GROUP,
) -> PlanSummary:
    """Write plan rows ``start .. n-1`` to ``path`` a row group at a time (memory flat in N),
    atomically, and return their summary. ``stop`` (a ``threading.Event``) abandons the write when
    set; ``on_rows(k)`` is called as each group of k rows is written."""
    check_n(n)
    counts: Counter[str] = Counter()
    with atomic_parquet_writer(Path(path), PLAN_SCHEMA) as writer:
        for chunk in plan_chunks(manifest, n, group, start=start):
            if stop is not None and stop.is_set():
                raise PlanAbandoned(str(path))
            writer.write_table(chunk, row_group_size=group)
            counts.update(chunk["class_name"].to_pylist())
            if on_rows is not None:
                on_rows(chunk.num_rows)
    return _summary(counts, n - start, manifest)


def summarize_manifest(manifest: Manifest, n: int) -> PlanSummary:
    """The summary of the plan of ``n`` rows without building it: the class of row ``i`` is cell
    ``i mod cells``, so the counts follow from N alone."""
    check_n(n)
    cells = _Cells(manifest)
    k = len(cells)
    counts = Counter({cells.labels[c]: n // k + (1 if c < n % k else 0) for c in range(min(k, n))})
    return _summary(counts, n, manifest)


class PlanAbandoned(Exception):
    """A plan file's write was stopped before the end (the file was not written)."""


class ManifestPlan:
    """The plan of ``n`` rows made from the manifest on demand: the same rows as its plan file
    (row ``i`` is a pure function of the manifest and ``i``), without reading or writing one."""

    def __init__(self, manifest: Manifest, n: int) -> None:
        self.maker = RowMaker(manifest)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def take(self, indices: np.ndarray | Sequence[int]) -> pa.Table:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"plan index out of range 0..{self.n - 1}")
        return rows_to_table(self.maker.rows(idx.tolist())) if idx.size else PLAN_SCHEMA.empty_table()

    def rows(self, indices: np.ndarray | Sequence[int]) -> list[PlanRow]:
        return self.maker.rows(np.asarray(indices, dtype=np.int64).tolist())


def table_rows(table: pa.Table) -> list[PlanRow]:
    return [PlanRow.from_record(rec) for rec in table.to_pylist()]


def write_plan(table: pa.Table, path: str | Path) -> None:
    """Write a plan atomically, with options that make the bytes a function of the content."""
    atomic_write_parquet(table, Path(path))


def plan_group(file: pq.ParquetFile, group: int) -> pa.Table:
    """Row group ``group`` of a plan file as ``PLAN_SCHEMA`` rows. Raises (``OSError``,
    ``KeyError``, ``pa.ArrowException``) when the file is damaged: a page whose checksum fails
    (with ``open_parquet``), a plan column missing or of another type (a flip in the footer)."""
    table = file.read_row_group(group)
    for f in PLAN_SCHEMA:
        if not table.schema.field(f.name).type.equals(f.type):
            raise pa.ArrowInvalid(f"column {f.name!r} is {table.schema.field(f.name).type}, a plan's is {f.type}")
    return table.select(PLAN_SCHEMA.names)


class PlanReader:
    """Rows of a plan file by plan index, read one row group at a time.

    A plan's row ``i`` has plan index ``i``. Run stores write plans in row groups of
    :data:`PLAN_ROW_GROUP` rows, so a driver working through a million-row plan in order holds one
    group (a few MB), not the plan; the last group read is kept for the next request.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], fallback: Callable[[], ManifestPlan] | None = None) -> None:
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        # A damaged row group (a page whose checksum fails, a plan column renamed or retyped in
        # the footer) is made from the manifest by ``fallback`` (a plan row is a pure function of
        # the manifest and its index) and its file noted in ``damaged``; without one it is an error.
        self._fallback = fallback
        self._manifest_plan: ManifestPlan | None = None
        self.damaged: list[Path] = []
        self.path = self.paths[0]
        self._files: list[pq.ParquetFile] = []
        self._where: list[tuple[int, int]] = []  # row group -> (file, its row group in the file)
        sizes: list[int] = []
        for path in self.paths:  # files read in order as one plan (a run's plan and its extensions)
            try:
                file = open_parquet(path)
            except (OSError, pa.ArrowInvalid) as exc:
                raise InputError(f"{path}: not a readable plan ({exc})") from exc
            meta = file.metadata
            sizes.extend(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            self._where.extend((len(self._files), g) for g in range(meta.num_row_groups))
            self._files.append(file)
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self._cached: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _group(self, g: int) -> pa.Table:
        if self._cached is None or self._cached[0] != g:
            f, local = self._where[g]
            try:
                table = plan_group(self._files[f], local)
            except (OSError, KeyError, pa.ArrowException) as exc:
                if self._fallback is None:
                    raise RunError(f"{self.paths[f]}: damaged plan file ({type(exc).__name__}: {exc})") from exc
                if self.paths[f] not in self.damaged:
                    self.damaged.append(self.paths[f])
                if self._manifest_plan is None:
                    self._manifest_plan = self._fallback()
                table = self._manifest_plan.take(np.arange(self._starts[g], self._starts[g + 1]))
            self._cached = (g, table)
        return self._cached[1]

    def take(self, indices: np.ndarray | Sequence[int]) -> pa.Table:
        """The plan rows at ``indices`` (plan indices, any order), as a table in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return PLAN_SCHEMA.empty_table()
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"plan index out of range 0..{len(self) - 1}")
        groups = np.searchsorted(self._starts, idx, side="right") - 1
        parts = []
        start = 0
        # runs of consecutive requests in the same row group (one read each when sorted)
        breaks = np.flatnonzero(np.diff(groups)) + 1
        for stop in [*breaks.tolist(), idx.size]:
            g = int(groups[start])
            local = idx[start:stop] - self._starts[g]
            parts.append(self._group(g).take(pa.array(local)))
            start = stop
        return pa.concat_tables(parts)

    def rows(self, indices: np.ndarray | Sequence[int]) -> list[PlanRow]:
        return table_rows(self.take(indices))


class PlanRows(Sequence[PlanRow]):
    """Plan rows at the given plan indices, made on demand: N rows cost N integers, not N objects."""

    def __init__(self, reader: PlanReader | ManifestPlan, indices: np.ndarray | Sequence[int]) -> None:
        self.reader = reader
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    @overload
    def __getitem__(self, i: int) -> PlanRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[PlanRow]: ...
    def __getitem__(self, i: int | slice) -> PlanRow | list[PlanRow]:
        if isinstance(i, slice):
            return self.reader.rows(self.indices[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.reader.rows(self.indices[i : i + 1])[0]

    def table(self) -> pa.Table:
        """All these rows as one table (materialised: for small sets and tests)."""
        return self.reader.take(self.indices)

    @property
    def keys(self) -> list[str]:
        return self.table()["key"].to_pylist()


def read_plan(path: str | Path) -> pa.Table:
    try:
        table = open_parquet(Path(path)).read()  # pages' checksums verified: a bit flip is an error, not other seeds
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: not a readable plan ({exc})") from exc
    return table.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA)


@dataclass(frozen=True)
class PlanSummary:
    rows: int
    groups: int
    kind: str
    min_per_group: int
    max_per_group: int
    groups_total: int  # classes or cells in the manifest (more than ``groups`` when N is small)

    def lines(self) -> list[str]:
        plural, single = ("classes", "class") if self.kind == "classes" else ("grid cells", "grid cell")
        return [
            f"rows: {self.rows}",
            f"{plural}: {self.groups} of {self.groups_total}",
            f"per {single}: min {self.min_per_group}, max {self.max_per_group}",
        ]


def summarize(table: pa.Table, manifest: Manifest) -> PlanSummary:
    return _summary(Counter(table.column("class_name").to_pylist()), table.num_rows, manifest)


def _summary(counts: Counter[str], rows: int, manifest: Manifest) -> PlanSummary:
    total = len(manifest.prompts.classes) if manifest.prompts.classes is not None else manifest.prompts.grid.n_cells  # type: ignore[union-attr]
    return PlanSummary(
        rows=rows,
        groups=len(counts),
        kind=manifest.kind,
        min_per_group=min(counts.values()) if counts else 0,
        max_per_group=max(counts.values()) if counts else 0,
        groups_total=total,
    )
