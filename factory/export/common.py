"""What every export format shares: options, selection loading, splits, shuffle, sample reading.

The export *plan* is decided before anything is written and is a pure function of the run, the
selection and the options:

- **Rows**: the selection's keys that are ``done`` in the run's index (or every done sample with
  ``--all`` or when the run has no selection), in plan-index order.
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

import contextlib
import errno
import hashlib
import io
import json
import math
import mmap
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory import __version__
from factory.errors import InputError, RunError
from factory.filter import Selection, list_selections, load_selection, read_index, run_manifest
from factory.manifest import Manifest
from factory.store import (
    INDEX_SCHEMA,
    STATUS_DONE,
    TMP_PREFIX,
    RunStore,
    atomic_write_text,
    release_lock,
    resolve_run,
    take_lock,
)

FORMATS = ("webdataset", "folder")
IMAGE_FORMATS = ("png", "jpg")
VERIFY_MODES = ("crc", "decode")
TRAIN = "train"
EXPORT_FILE = "export.json"
EXPORT_KIND = "factory-export"
LOCK_FILE = ".lock"
_SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

#: Test hook: seconds to sleep after each written sample (lets a test kill an export mid-way).
SLOW_ENV = "FACTORY_EXPORT_TEST_DELAY_S"


# ------------------------------------------------------------------------------------ options


@dataclass
class ExportOptions:
    """What the CLI passes; ``None`` means the manifest's ``export:`` default (or the documented one)."""

    run: Path | None = None
    format: str | None = None
    out: Path | None = None
    selection: str | None = None
    all_done: bool = False
    image_format: str | None = None
    alpha_bits: int | None = None
    maxcount: int | None = None
    maxsize: int | None = None
    splits: dict[str, float] | None = None
    seed: int | None = None
    jpeg_quality: int = 95
    verify: str = "crc"
    strict: bool = False
    restart: bool = False
    fsync: bool = True
    progress: bool = True


@dataclass(frozen=True)
class ExportSettings:
    """The resolved options that decide the output's content (recorded in export.json)."""

    format: str
    image_format: str
    alpha_bits: int
    maxcount: int
    maxsize: int
    splits: dict[str, float]  # held-out splits; train is the remainder
    seed: int
    jpeg_quality: int

    @property
    def image_ext(self) -> str:
        return self.image_format

    def split_order(self) -> list[str]:
        return [TRAIN, *self.splits]


def parse_splits(values: list[str] | None) -> dict[str, float] | None:
    """``["val=0.05", "test=0.02"]`` or ``["val=0.05,test=0.02"]`` -> {"val": 0.05, "test": 0.02}.

    ``none`` (or ``0``) means no held-out split. ``None`` (option not given) means the manifest's.
    """
    if not values:
        return None
    items = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if items in (["none"], ["0"]):
        return {}
    out: dict[str, float] = {}
    for item in items:
        name, sep, frac = item.partition("=")
        name = name.strip()
        if not sep:
            raise InputError(f"--split {item}: expected NAME=FRACTION, e.g. val=0.05")
        try:
            out[name] = float(frac)
        except ValueError as exc:
            raise InputError(f"--split {item}: fraction must be a number, e.g. val=0.05") from exc
    return check_splits(out)


def check_splits(splits: dict[str, float]) -> dict[str, float]:
    for name, frac in splits.items():
        if name == TRAIN:
            raise InputError("--split: 'train' is the remainder; give only the held-out splits, e.g. val=0.05")
        if not _SPLIT_RE.match(name):
            raise InputError(f"--split {name}: a split name is lowercase letters, digits or '_'")
        if not (0.0 < frac < 1.0) or math.isnan(frac):
            raise InputError(f"--split {name}={frac}: the fraction must be between 0 and 1")
    if sum(splits.values()) >= 1.0:
        raise InputError(f"--split: the fractions add up to {sum(splits.values()):g}; leave some for train")
    return dict(splits)


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """``"1G"`` -> 1_000_000_000, ``"512Mi"`` -> 536870912, ``"3e9"`` -> 3000000000."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InputError(f"--maxsize {text}: expected bytes, e.g. 1000000000, 1G or 512Mi")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise InputError(f"--maxsize {text}: must be at least one byte")
    return int(value)


# ----------------------------------------------------------------------------------- hashing


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


# -------------------------------------------------------------------------------- the samples


@dataclass
class Source:
    """The rows to export and where they came from."""

    store: RunStore
    rows: pa.Table  # index rows (done), plan-index order
    description: str  # for the summary and the card
    selection: Selection | None
    missing: int = 0  # selected keys that are not done in the run any more


def load_source(store: RunStore, selection: str | None, all_done: bool) -> Source:
    """The selection's rows joined with the run's index (only done samples)."""
    index = read_index(store, INDEX_SCHEMA.names)
    done = index.filter(pc.equal(index["status"], STATUS_DONE))
    if all_done and selection:
        raise InputError("give either --selection or --all, not both")
    if all_done:
        return Source(store, done, f"all {done.num_rows} done samples (--all)", None)
    if selection is None:
        found = list_selections(store.root)
        if not found:
            return Source(store, done, f"all {done.num_rows} done samples (the run has no selection; see `factory filter`)", None)
        selection = found[-1].stem
        how = "the most recent"
    else:
        how = "given"
    sel = load_selection(store.root, selection)
    info = store.info
    if sel.meta.get("fingerprint") not in (None, info.get("fingerprint")) or sel.meta.get("model") not in (None, info.get("model")):
        raise InputError(
            f"{sel.path}: made on a different run (manifest or model changed since); re-run `factory filter --name {selection}`"
        )
    keys = sel.table["key"]
    rows = done.filter(pc.is_in(done["key"], value_set=keys))
    missing = len(keys) - rows.num_rows
    desc = f"selection '{selection}' ({how}; {len(keys)} samples"
    desc += f", {missing} no longer done in the run)" if missing else ")"
    return Source(store, rows, desc, sel, missing)


def plan_order(rows: pa.Table, splits: dict[str, float], seed: int) -> pa.Table:
    """Assign splits by class and shuffle: ``rows`` plus a ``split`` column, in writing order."""
    n = rows.num_rows
    names = [TRAIN, *splits]
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


def plan_fingerprint(ordered: pa.Table, settings: ExportSettings, store: RunStore) -> str:
    """Identity of an export plan: same fingerprint, same shards (so finished ones can be kept)."""
    info = store.info
    h = hashlib.sha256()
    h.update(json.dumps({"settings": asdict(settings), "fingerprint": info.get("fingerprint"), "model": info.get("model")}, sort_keys=True).encode())
    for name in ("key", "split"):
        h.update("\n".join(ordered[name].to_pylist()).encode())
        h.update(b"\x00")
    for name in ("image_bytes", "alpha_bytes", "fg_bytes", "meta_bytes", "alpha_bits"):
        h.update(pc.fill_null(ordered[name], -1).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- integrity checks


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

try:  # zlib-ng's CRC-32 (PCLMUL) runs ~10x faster than zlib 1.2's; same values
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - optional speed-up
    _crc32 = zlib.crc32


class PngError(ValueError):
    pass


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    bit_depth: int
    color_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA

    @property
    def channels(self) -> int:
        return {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(self.color_type, 0)


def check_png(data: bytes | memoryview) -> PngInfo:
    """Walk a PNG's chunks: signature, IHDR first, every CRC, at least one IDAT, IEND present.

    Catches truncation, bit flips and foreign files without decompressing (zlib.crc32 runs at
    several GB/s); ``--verify decode`` additionally decodes every pixel.
    """
    view = memoryview(data)
    return _walk_png(len(view), lambda pos, n: view[pos : pos + n], lambda a, b: _crc32(view[a:b]))


def check_png_fd(fd: int, size: int, scratch: bytearray) -> PngInfo:
    """:func:`check_png` on an open file, read through ``scratch`` (a small reused buffer).

    Reading a file whole into memory and writing it out again moves every byte through main
    memory twice; passing it through a cache-sized buffer for the check, then copying it file to
    file in the kernel, was steadier and faster than ``tar cf`` on a busy machine.
    """
    buf = memoryview(scratch)

    def read_at(pos: int, n: int) -> bytes:
        return os.pread(fd, n, pos)

    def crc_of(start: int, stop: int) -> int:
        crc = 0
        while start < stop:
            got = os.preadv(fd, [buf[: min(len(buf), stop - start)]], start)
            if got <= 0:
                raise PngError(f"truncated at byte {start}")
            crc = _crc32(buf[:got], crc)
            start += got
        return crc

    return _walk_png(size, read_at, crc_of)


def _walk_png(size: int, read_at: Callable[[int, int], bytes | memoryview], crc_of: Callable[[int, int], int]) -> PngInfo:
    """The chunk walk of :func:`check_png` over any byte source: ``read_at(pos, n)`` returns bytes,
    ``crc_of(start, stop)`` the CRC-32 of a range."""
    if bytes(read_at(0, 8)) != PNG_SIGNATURE:
        raise PngError("not a PNG (bad signature)")
    pos = 8
    info: PngInfo | None = None
    idat = False
    while True:
        if pos + 12 > size:
            raise PngError(f"truncated at byte {size} (no IEND chunk)")
        head = bytes(read_at(pos, 8 + (13 if info is None else 0)))
        length = int.from_bytes(head[:4], "big")
        ctype = head[4:8]
        end = pos + 12 + length
        if end > size:
            raise PngError(f"truncated in a {ctype.decode('latin-1')} chunk at byte {size}")
        if crc_of(pos + 4, end - 4) != int.from_bytes(bytes(read_at(end - 4, 4)), "big"):
            raise PngError(f"CRC mismatch in the {ctype.decode('latin-1')} chunk at byte {pos}")
        if info is None:
            if ctype != b"IHDR" or length != 13:
                raise PngError("the first chunk is not IHDR")
            w, h = int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")
            info = PngInfo(w, h, head[16], head[17])
        elif ctype == b"IDAT":
            idat = True
        elif ctype == b"IEND":
            break
        pos = end
    if not idat:
        raise PngError("no image data (IDAT)")
    return info


def decode_check(data: bytes | memoryview) -> None:
    """Full decode with Pillow (``--verify decode``)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad file
        raise PngError(f"does not decode ({type(exc).__name__}: {exc})") from exc


class CorruptSample(Exception):
    """A sample whose files are missing or damaged: reported as ``KEY: corrupt <what> (<why>)``."""

    def __init__(self, key: str, what: str, why: str) -> None:
        self.key, self.what, self.why = key, what, " ".join(why.split())
        super().__init__(f"{key}: {what} ({self.why})")


_KIND = {".png": "image", ".alpha.png": "alpha", ".fg.png": "foreground", ".json": "metadata"}
_SIZE_COL = {".png": "image_bytes", ".alpha.png": "alpha_bytes", ".fg.png": "fg_bytes", ".json": "meta_bytes"}


class OpenFile:
    """A checked sample file left open, so the exporter copies it file to file in the kernel
    (:func:`copy_file`) instead of reading it into Python. Close it after use."""

    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def __len__(self) -> int:
        return self.size

    def read_all(self) -> bytes:
        return os.pread(self.fd, self.size, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def close_all(*items: Any) -> None:
    for item in items:
        if isinstance(item, OpenFile):
            item.close()


_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}


def copy_file(src: OpenFile, dst_fd: int, scratch: bytearray) -> None:
    """Append ``src`` to ``dst_fd`` at its position: ``copy_file_range`` (in the kernel), else
    ``pread``/``write`` through ``scratch`` where the file systems cannot."""
    done = 0
    kernel = hasattr(os, "copy_file_range")
    while done < src.size:
        if kernel:
            try:
                n = os.copy_file_range(src.fd, dst_fd, src.size - done, done)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
                continue
        else:
            n = os.preadv(src.fd, [memoryview(scratch)[: src.size - done]], done)
            if n > 0:
                _write_fully(dst_fd, memoryview(scratch)[:n])
        if n <= 0:
            raise OSError(errno.EIO, f"a sample file shrank while it was copied ({done} of {src.size} bytes)")
        done += n


def _write_fully(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class FileReader:
    """Reads sample files without a fresh allocation per file.

    ``Path.read_bytes`` for every file ran at a quarter of ``tar cf``'s speed: each new buffer is
    fresh memory that the kernel zeroes and maps. Three modes avoid that:

    - ``kernel_copy=True`` (the WebDataset exporter): :meth:`open` leaves a file open for a
      check through :attr:`scratch` (64 KiB, stays in the CPU cache) and a kernel-side copy.
    - ``reuse_buffers=True`` (the folder exporter): each ``slot`` (image, alpha, ...) has one
      buffer that every read of that slot refills, like ``tar``'s read buffer. A view is valid
      until the next read of the same slot, so the caller consumes a sample before the next.
    - otherwise files of 64 KiB or more are memory-mapped (``MAP_POPULATE``), small ones read;
      views stay valid as long as they are referenced. Mapping costs kernel time that varied
      from 0.7 to 4.6 s for the same 2.4 GB here, with the page cache's state.
    """

    MMAP_MIN = 64 << 10
    SCRATCH = 64 << 10

    def __init__(self, reuse_buffers: bool = False, kernel_copy: bool = False) -> None:
        self.reuse_buffers = reuse_buffers
        self.kernel_copy = kernel_copy
        self.scratch = bytearray(self.SCRATCH)
        self._buffers: dict[str, bytearray] = {}

    def open(self, path: Path | str) -> OpenFile:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return OpenFile(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise

    def read(self, path: Path | str, slot: str = "") -> memoryview:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if self.reuse_buffers:
                return self._read_into(fd, size, slot)
            if size >= self.MMAP_MIN:
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                return memoryview(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ))
            chunks = []
            while True:
                chunk = os.read(fd, max(size + 1, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
            return memoryview(b"".join(chunks))
        finally:
            os.close(fd)

    def _read_into(self, fd: int, size: int, slot: str) -> memoryview:
        """Read the whole file into the slot's buffer (grown when too small; the file may have grown)."""
        buf = self._buffers.get(slot)
        if buf is None or len(buf) <= size:
            buf = self._buffers[slot] = bytearray(max(size + 1, 2 * len(buf or b""), 1 << 16))
        got = 0
        while True:
            n = os.readv(fd, [memoryview(buf)[got:]])
            if n == 0:
                return memoryview(buf)[:got]
            got += n
            if got == len(buf):  # larger than fstat said: move to a bigger buffer and go on
                bigger = bytearray(2 * len(buf))
                bigger[:got] = buf
                buf = self._buffers[slot] = bigger


_DEFAULT_READER = FileReader()


def _sample_path(store: RunStore, rec: dict[str, Any], suffix: str) -> str:
    """``store.sample_path`` as a string, the sample's folder computed once (pathlib is slow)."""
    folder = rec.get("_folder")
    if folder is None:
        folder = rec["_folder"] = str(store.sample_dir(rec["index"]))
    return os.path.join(folder, rec["key"] + suffix)


def read_file(store: RunStore, rec: dict[str, Any], suffix: str, reader: FileReader | None = None, open_only: bool = False) -> Any:
    """A sample file's bytes (or, with ``open_only``, an :class:`OpenFile`), checked against the
    size the index recorded."""
    key = rec["key"]
    path = _sample_path(store, rec, suffix)
    name = key + suffix
    reader = reader or _DEFAULT_READER
    try:
        data = reader.open(path) if open_only else reader.read(path, suffix)
    except FileNotFoundError as exc:
        raise CorruptSample(key, f"missing {_KIND[suffix]}", f"{name} not found") from exc
    except OSError as exc:
        raise CorruptSample(key, f"unreadable {_KIND[suffix]}", f"{name}: {exc.strerror or exc}") from exc
    expected = rec.get(_SIZE_COL[suffix])
    if expected is not None and len(data) != expected:
        close_all(data)
        raise CorruptSample(key, f"corrupt {_KIND[suffix]}", f"{name}: {len(data)} bytes, the index says {expected}")
    return data


def checked_png(
    store: RunStore, rec: dict[str, Any], suffix: str, verify: str = "crc", reader: FileReader | None = None
) -> tuple[memoryview, PngInfo]:
    """Read one of a sample's PNGs and check it: structure and CRCs, size, channels, bit depth.

    With a ``kernel_copy`` reader and the CRC check, the file comes back as an :class:`OpenFile`
    (checked through the reader's scratch buffer), which the caller closes.
    """
    open_only = reader is not None and reader.kernel_copy and verify != "decode"
    data = read_file(store, rec, suffix, reader, open_only=open_only)
    try:
        return data, _check_png_member(data, rec, suffix, verify, reader)
    except BaseException:
        close_all(data)
        raise


def _check_png_member(data: Any, rec: dict[str, Any], suffix: str, verify: str, reader: FileReader | None) -> PngInfo:
    key = rec["key"]
    name = f"{key}{suffix}"
    what = f"corrupt {_KIND[suffix]}"
    try:
        if isinstance(data, OpenFile):
            info = check_png_fd(data.fd, data.size, reader.scratch if reader else bytearray(FileReader.SCRATCH))
        else:
            info = check_png(data)
        if verify == "decode":
            decode_check(data)
    except PngError as exc:
        raise CorruptSample(key, what, f"{name}: {exc}") from exc
    except OSError as exc:
        raise CorruptSample(key, f"unreadable {_KIND[suffix]}", f"{name}: {exc.strerror or exc}") from exc
    width, height = rec.get("width"), rec.get("height")
    if (width is not None and info.width != width) or (height is not None and info.height != height):
        raise CorruptSample(key, what, f"{name}: {info.width}x{info.height}, the index says {width}x{height}")
    if suffix == ".alpha.png":
        if info.color_type != 0 or info.bit_depth not in (8, 16):
            raise CorruptSample(key, what, f"{name}: not a single-channel 8- or 16-bit PNG")
        bits = rec.get("alpha_bits")
        if bits is not None and info.bit_depth != bits:
            raise CorruptSample(key, what, f"{name}: {info.bit_depth}-bit, the index says {bits}")
    elif info.color_type not in (2, 6) or info.bit_depth != 8:
        raise CorruptSample(key, what, f"{name}: not an 8-bit RGB PNG")
    return info


def check_sample_files(store: RunStore, rec: dict[str, Any], verify: str = "crc") -> None:
    """Check every file of a sample (used by ``factory filter --verify-files``)."""
    for suffix in (".png", ".alpha.png", ".fg.png"):
        checked_png(store, rec, suffix, verify)
    stored_metadata(store, rec)


def stored_metadata(store: RunStore, rec: dict[str, Any], reader: FileReader | None = None) -> dict[str, Any]:
    data = bytes(read_file(store, rec, ".json", reader))
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptSample(rec["key"], "corrupt metadata", f"{rec['key']}.json: {exc}") from exc
    if not isinstance(meta, dict):
        raise CorruptSample(rec["key"], "corrupt metadata", f"{rec['key']}.json: not a JSON object")
    return meta


# ------------------------------------------------------------------------------ sample members


@dataclass
class Members:
    """The encoded files of one exported sample."""

    key: str
    image: bytes | memoryview | OpenFile  # views point into the reader's buffers: use before the next
    alpha: bytes | memoryview | OpenFile  # read; open files are closed by the caller (close())
    fg: bytes | memoryview | OpenFile
    meta: dict[str, Any]
    image_copied: bool
    alpha_copied: bool

    def close(self) -> None:
        close_all(self.image, self.alpha, self.fg)


def load_members(
    store: RunStore, rec: dict[str, Any], settings: ExportSettings, verify: str, reader: FileReader | None = None
) -> Members:
    """Read, check and (only where the format changes) re-encode one sample's files."""
    from factory.imageio import decode_alpha, decode_rgb, encode_alpha_png, encode_jpeg

    key = rec["key"]
    opened: list[Any] = []
    try:
        image, _ = checked_png(store, rec, ".png", verify, reader)
        opened.append(image)
        alpha, alpha_info = checked_png(store, rec, ".alpha.png", verify, reader)
        opened.append(alpha)
        fg, _ = checked_png(store, rec, ".fg.png", verify, reader)
        opened.append(fg)
        meta = stored_metadata(store, rec, reader)
        image_copied = alpha_copied = True
        if settings.image_format == "jpg":
            try:
                image = encode_jpeg(decode_rgb(_bytes_of(image)), quality=settings.jpeg_quality)
            except InputError as exc:
                raise CorruptSample(key, "corrupt image", f"{key}.png: {exc}") from exc
            image_copied = False
        if alpha_info.bit_depth != settings.alpha_bits:
            try:
                alpha = encode_alpha_png(decode_alpha(_bytes_of(alpha)), settings.alpha_bits)
            except InputError as exc:
                raise CorruptSample(key, "corrupt alpha", f"{key}.alpha.png: {exc}") from exc
            alpha_copied = False
    except BaseException:
        close_all(*opened)
        raise
    close_all(*(f for f in opened if f is not image and f is not alpha and f is not fg))  # re-encoded ones
    return Members(key, image, alpha, fg, meta, image_copied, alpha_copied)


def _bytes_of(data: Any) -> bytes:
    return data.read_all() if isinstance(data, OpenFile) else bytes(data)


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def sample_json(rec: dict[str, Any], m: Members, split: str, settings: ExportSettings) -> bytes:
    """The exported metadata: the stored JSON (prompt, class, attributes, seed, scores, model,
    sampler), completed from the index row where it lacks a field, with the exported sizes."""
    attributes = rec.get("attributes")
    with contextlib.suppress(TypeError, ValueError):
        attributes = json.loads(attributes) if isinstance(attributes, str) else attributes
    phash = rec.get("phash")
    base = {
        "key": rec["key"],
        "index": rec["index"],
        "class_name": rec.get("class_name"),
        "category": rec.get("category"),
        "prompt": rec.get("prompt"),
        "negative_prompt": rec.get("negative_prompt"),
        "attributes": attributes,
        "seed": rec.get("seed"),
        "model": rec.get("model"),
        "alpha_source": rec.get("alpha_source"),
        "size": {"width": rec.get("width"), "height": rec.get("height")},
        "scores": {
            "gsg": _round(rec.get("gsg")),
            "gsg_distance": _round(rec.get("gsg_distance")),
            "bg_uniformity": _round(rec.get("bg_uniformity")),
            "canvas_color": rec.get("canvas_color"),
            "alpha_coverage": _round(rec.get("alpha_coverage")),
            "touches_border": rec.get("touches_border"),
            "contains_key_color": rec.get("contains_key_color"),
            "phash": None if phash is None else f"{phash & ((1 << 64) - 1):016x}",
        },
    }
    meta = {**base, **m.meta}
    meta["alpha_bits"] = settings.alpha_bits
    meta["file_bytes"] = {"image": len(m.image), "alpha": len(m.alpha), "fg": len(m.fg)}
    meta["export"] = {
        "split": split,
        "image_format": settings.image_format,
        "image_copied": m.image_copied,
        "alpha_copied": m.alpha_copied,
        "factory_version": __version__,
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str).encode()


# ---------------------------------------------------------------------------- output folder


@dataclass
class OutDir:
    """An export's output folder: locked while written; ``export.json`` says what it holds."""

    root: Path
    _lock: Any = None

    def open(self) -> dict[str, Any] | None:
        """Create or check the folder, take its lock, return the previous export.json (if any)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise InputError(f"{root}: exists and is not a directory; choose another --out")
        previous = None
        if (root / EXPORT_FILE).is_file():
            try:
                previous = json.loads((root / EXPORT_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                previous = {"kind": EXPORT_KIND, "plan": None}
            if previous.get("kind") != EXPORT_KIND:
                raise InputError(f"{root}: {EXPORT_FILE} is not a factory export's; choose another --out")
        elif root.is_dir() and any(p.name != LOCK_FILE for p in root.iterdir()):
            raise InputError(f"{root}: exists, is not empty and is not a factory export; choose another --out")
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock = take_lock(root / LOCK_FILE, f"{root}: another factory export is writing here")
        except OSError as exc:
            raise InputError(f"{root}: cannot create the output folder ({exc.strerror or exc})") from exc
        return previous

    def close(self) -> None:
        release_lock(self._lock)
        self._lock = None

    def remove_temporaries(self) -> int:
        """Delete temporary files left by a killed export (we hold the lock, so none is live)."""
        removed = 0
        for path in self.root.rglob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        return removed

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.root / EXPORT_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------- resolution


@dataclass
class Prepared:
    store: RunStore
    manifest: Manifest
    settings: ExportSettings
    source: Source
    ordered: pa.Table
    out: Path
    fingerprint: str
    options: ExportOptions
    notes: list[str] = field(default_factory=list)


def prepare(options: ExportOptions) -> Prepared:
    """Resolve the run, defaults, selection, split and order: everything but the writing."""
    store = RunStore.open(resolve_run(options.run))
    manifest = run_manifest(store)
    defaults = manifest.export
    fmt = options.format or defaults.format
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    image_format = (options.image_format or defaults.image_format).lower()
    image_format = "jpg" if image_format == "jpeg" else image_format
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"--image-format {image_format}: choose png or jpg")
    alpha_bits = options.alpha_bits or defaults.alpha_bits
    if alpha_bits not in (8, 16):
        raise InputError(f"--alpha-bits {alpha_bits}: choose 8 or 16")
    maxcount = options.maxcount or defaults.maxcount
    maxsize = options.maxsize or defaults.maxsize
    if maxcount < 1 or maxsize < 1:
        raise InputError("--maxcount and --maxsize must be positive")
    if options.verify not in VERIFY_MODES:
        raise InputError(f"--verify {options.verify}: choose one of {', '.join(VERIFY_MODES)}")
    if not 1 <= options.jpeg_quality <= 100:
        raise InputError(f"--jpeg-quality {options.jpeg_quality}: must be within 1..100")
    splits = check_splits(dict(defaults.split) if options.splits is None else options.splits)
    settings = ExportSettings(
        format=fmt,
        image_format=image_format,
        alpha_bits=int(alpha_bits),
        maxcount=int(maxcount),
        maxsize=int(maxsize),
        splits=splits,
        seed=defaults.shuffle_seed if options.seed is None else int(options.seed),
        jpeg_quality=options.jpeg_quality if image_format == "jpg" else 0,
    )
    source = load_source(store, options.selection, options.all_done)
    if source.rows.num_rows == 0:
        hint = ""
        if source.selection is not None:
            dropped = {k: v for k, v in (source.selection.meta.get("dropped") or {}).items() if v}
            top = sorted(dropped.items(), key=lambda kv: -kv[1])[:3]
            relax = "; ".join(f"{n} {reason} ({_RELAX.get(reason, 'see factory filter --help')})" for reason, n in top)
            hint = f"; the filter dropped {relax}" if relax else ""
            hint += "; re-run `factory filter` with looser options, or export every done sample with --all"
        raise InputError(f"{store.root}: nothing to export: {source.description}{hint}")
    ordered = plan_order(source.rows, splits, settings.seed)
    name = source.selection.name if source.selection is not None else "all"
    out = Path(options.out) if options.out is not None else store.root / "export" / f"{name}-{fmt}"
    return Prepared(store, manifest, settings, source, ordered, out, plan_fingerprint(ordered, settings, store), options)


#: The option that relaxes each filter reason (for the "nothing to export" hint).
_RELAX = {
    "low_gsg": "--min-gsg",
    "empty_matte": "--min-coverage",
    "full_matte": "--max-coverage 1",
    "touches_border": "--keep-border",
    "key_color": "--keep-key-color",
    "near_duplicate": "--dedup-distance -1",
    "class_cap": "--per-class-cap 0",
    "corrupt": "damaged files",
}


def export_state(p: Prepared, state: str, **extra: Any) -> dict[str, Any]:
    info = p.store.info
    return {
        "kind": EXPORT_KIND,
        "version": 1,
        "state": state,
        "format": p.settings.format,
        "plan": p.fingerprint,
        "settings": asdict(p.settings),
        "run": str(p.store.root),
        "manifest": info.get("manifest"),
        "fingerprint": info.get("fingerprint"),
        "model": info.get("model"),
        "selection": p.source.selection.name if p.source.selection is not None else None,
        "samples": p.ordered.num_rows,
        "factory_version": __version__,
        **extra,
    }




def fail_strict(problem: str) -> RunError:
    return RunError(f"{problem}; stopped (--strict). Finished shards are kept: re-run to resume")


def load_or_skip(
    p: Prepared, rec: dict[str, Any], reader: FileReader, problems: list[str], on_problem: Callable[[str], None]
) -> Members | None:
    """:func:`load_members`, or None for a damaged sample: reported by key and skipped, or the end
    of the export with ``--strict``."""
    try:
        return load_members(p.store, rec, p.settings, p.options.verify, reader)
    except CorruptSample as exc:
        if p.options.strict:
            raise fail_strict(str(exc)) from exc
        problems.append(str(exc))
        on_problem(str(exc))
        return None


# ------------------------------------------------------------------------------- bookkeeping


class LazyRows:
    """Sequential-friendly row access to an Arrow table: converts 1024 rows at a time to dicts,
    so a million-row export never holds a million Python dicts."""

    def __init__(self, table: pa.Table, batch: int = 1024) -> None:
        self.table = table
        self.batch = batch
        self._start = -1
        self._rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.table.num_rows:
            raise IndexError(i)
        start = i - i % self.batch
        if start != self._start:
            self._rows = self.table.slice(start, self.batch).to_pylist()
            self._start = start
        return self._rows[i - start]

    def iter_from(self, first: int):
        for i in range(first, len(self)):
            yield self[i]


RECORD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("index", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("path", pa.string()),
        pa.field("class_name", pa.string()),
        pa.field("category", pa.string()),
        pa.field("gsg", pa.float32()),
        pa.field("alpha_coverage", pa.float32()),
        pa.field("image_bytes", pa.int64()),
        pa.field("alpha_bytes", pa.int64()),
        pa.field("fg_bytes", pa.int64()),
        pa.field("json_bytes", pa.int64()),
    ]
)


class Records:
    """The exported samples (rows of samples.parquet), kept column by column."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}

    def __len__(self) -> int:
        return len(self.cols["key"])

    def append(self, row: dict[str, Any]) -> None:
        for name, values in self.cols.items():
            values.append(row.get(name))

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=RECORD_SCHEMA)


def split_rows(ordered: pa.Table, split: str) -> LazyRows:
    return LazyRows(ordered.filter(pc.equal(ordered["split"], split)))

