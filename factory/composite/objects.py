"""Where the objects come from: a run's selection (the default: the latest run's most recent
selection), or an export (WebDataset shards or a folder export). Always the green-free foreground
``fg`` with its alpha, never the image on green.

An :class:`ObjectSource` is a picklable list of :class:`ObjectRef` (key, class, where its files
are); :meth:`ObjectSource.load` decodes one object, cropped to its alpha's box.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factory.composite.placement import crop_to_alpha
from factory.composite.shards import Member, index_shards, is_shards, shard_paths
from factory.errors import InputError
from factory.feedback import plural
from factory.fsutil import portable_path
from factory.imageio import decode_alpha, decode_rgb
from factory.integrity import PngError, check_png


@dataclass(frozen=True)
class ObjectRef:
    key: str
    class_name: str
    fg: str | Member  # a file path, or a shard member
    alpha: str | Member


def read_bytes(where: str | Member) -> bytes:
    """The bytes of an object's file, from a path or a shard member."""
    return where.read() if isinstance(where, Member) else Path(where).read_bytes()


@dataclass
class ObjectSource:
    refs: list[ObjectRef]
    origin: str  # "run", "export shards", "export folder"
    location: str  # the run folder or the export, as this machine names it
    detail: str = ""  # what of it: the run's selection
    damaged: list[str] = field(default_factory=list)  # "KEY: corrupt alpha (why)" of the objects left out
    _cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def description(self) -> str:
        """For the terminal: where the objects come from, with this machine's path."""
        return f"{self.origin} {self.location}{self.detail}"

    def described(self, out: Path) -> str:
        """For the files written in ``out``: the location as :func:`portable_path` names it."""
        return f"{self.origin} {portable_path(self.location, out)}{self.detail}"

    def by_key(self) -> dict[str, ObjectRef]:
        if getattr(self, "_keys", None) is None:
            self._keys = {r.key: r for r in self.refs}
        return self._keys

    def load(self, ref: ObjectRef) -> tuple[np.ndarray, np.ndarray]:
        """(foreground uint8, alpha float32) cropped to the alpha's box; the last few are cached."""
        hit = self._cache.get(ref.key)
        if hit is not None:
            return hit
        try:
            fg, alpha = decode_rgb(read_bytes(ref.fg)), decode_alpha(read_bytes(ref.alpha))
        except (InputError, OSError) as exc:
            raise InputError(f"object {ref.key}: unreadable foreground or alpha ({exc})") from exc
        if fg.shape[:2] != alpha.shape:
            raise InputError(f"object {ref.key}: foreground {fg.shape[1]}x{fg.shape[0]} and alpha sizes differ")
        out = crop_to_alpha(fg, alpha)
        if len(self._cache) >= 8:
            self._cache.pop(next(iter(self._cache)))
        self._cache[ref.key] = out
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k not in ("_cache", "_keys")}, "_cache": {}, "_keys": None}


def from_run(run: Path | None, selection: str | None) -> ObjectSource:
    """The done samples of a run's selection (the most recent one when not named)."""
    from factory.export.prepare import load_source
    from factory.store import RunStore, resolve_run

    store = RunStore.open(resolve_run(run))
    src = load_source(store, selection, all_done=False)
    refs = [
        ObjectRef(
            rec["key"],
            rec["class_name"],
            str(store.sample_path(rec["index"], rec["key"], ".fg.png")),
            str(store.sample_path(rec["index"], rec["key"], ".alpha.png")),
        )
        for rec in src.rows.select(["key", "index", "class_name"]).to_pylist()
    ]
    return ObjectSource(refs, "run", str(store.root), f": {src.description}")


def _check_finished(spec: str) -> None:
    """Refuse an export that ``factory export`` has not finished (see ``check_export_finished``)."""
    from factory.export.outdir import check_export_finished

    folder = Path(spec) if Path(spec).is_dir() else shard_paths(spec)[0].parent if is_shards(spec) else None
    if folder is not None:
        check_export_finished(folder, f"--objects {spec}")


def from_export(spec: str) -> ObjectSource:
    """An export: WebDataset shards (``KEY.fg.png``, ``KEY.alpha.png``, ``KEY.json``) or a folder
    export (``SPLIT/fg/``, ``SPLIT/alpha/``, ``SPLIT/metadata.jsonl``), finished."""
    _check_finished(spec)
    if is_shards(spec):
        refs = []
        for key, members in sorted(index_shards(spec).items()):
            if "fg.png" not in members or "alpha.png" not in members:
                continue
            meta = json.loads(members["json"].read()) if "json" in members else {}
            refs.append(ObjectRef(key.rsplit("/", 1)[-1], str(meta.get("class_name", "object")), members["fg.png"], members["alpha.png"]))
        return ObjectSource(refs, "export shards", spec)
    root = Path(spec)
    if not root.is_dir():
        raise InputError(f"--objects {spec}: not an export (a folder export, or WebDataset shards)")
    refs = []
    for meta_path in sorted(root.glob("*/metadata.jsonl")):
        split = meta_path.parent
        for line in meta_path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            fg, alpha = split / row["fg_file_name"], split / row["alpha_file_name"]
            refs.append(ObjectRef(str(row["key"]), str(row.get("class_name", "object")), str(fg), str(alpha)))
    if not refs and not list(root.glob("*/metadata.jsonl")):
        raise InputError(f"--objects {spec}: not an export (no SPLIT/metadata.jsonl and no .tar shards)")
    return ObjectSource(refs, "export folder", spec)


def damage(ref: ObjectRef) -> str | None:
    """Why an object cannot be used (``corrupt alpha (truncated ...)``), or None: its foreground and
    alpha are whole PNGs of one size. The check of ``factory export --verify crc`` (structure and
    CRCs, nothing decoded): cheap enough to run on every object before anything is written."""
    sizes = []
    for what, where in (("foreground", ref.fg), ("alpha", ref.alpha)):
        try:
            info = check_png(read_bytes(where))
        except PngError as exc:
            return f"corrupt {what} ({exc})"
        except OSError as exc:
            return f"unreadable {what} ({exc.strerror or exc})"
        sizes.append(f"{info.width}x{info.height}")
    return None if sizes[0] == sizes[1] else f"foreground {sizes[0]} and alpha {sizes[1]} sizes differ"


def load_objects(run: Path | None, selection: str | None, export: str | None) -> ObjectSource:
    """The objects to paste; a damaged one (:func:`damage`) is left out and listed in ``damaged``,
    as ``factory matte`` skips a damaged image and goes on. None left is an error."""
    if export is not None and (run is not None or selection is not None):
        raise InputError("give either --objects EXPORT or --run/--selection, not both")
    src = from_export(export) if export is not None else from_run(run, selection)
    if not src.refs:
        raise InputError(f"no objects: {src.description} is empty")
    healthy = []
    for ref in src.refs:
        why = damage(ref)
        if why is None:
            healthy.append(ref)
        else:
            src.damaged.append(f"{ref.key}: {why}")
    if not healthy:
        which = "the only object" if len(src.refs) == 1 else f"all {plural(len(src.refs), 'object')}"
        raise InputError(f"no readable object: {which} of {src.description} {'is' if len(src.refs) == 1 else 'are'} "
                         f"damaged ({src.damaged[0]}{', ...' if len(src.damaged) > 1 else ''})")
    src.refs = healthy
    return src
