"""WebDataset shards: ``{split}-%06d.tar`` with ``KEY.png|jpg``, ``KEY.alpha.png``, ``KEY.fg.png``, ``KEY.json``
and ``KEY.txt`` (the caption: the prompt the image was drawn from, as img2dataset and most
training loaders expect).

Each shard is written to ``.tmp-{name}.{pid}`` in the output folder, flushed, fsynced and renamed,
so a file under a final shard name is always a complete tar. Headers are built with ``tarfile``
(POSIX pax format: long names get a pax header) with a fixed mtime (the run's creation time), so
the same export gives the same bytes. Shards roll when the next sample would exceed ``maxcount``
samples or ``maxsize`` bytes of members (a sample bigger than ``maxsize`` gets a shard of its own).

Resume: the plan (rows, splits, order, options) has a fingerprint recorded in ``export.json``. When
an export with the same fingerprint is found, its finished shards are checked by reading their tar
headers (keys in the planned order, one member of each kind, sizes of copied members equal to the
store's) and kept; writing continues after the last good shard. A different plan restarts cleanly.
"""

from __future__ import annotations

import os
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factory.export.card import stats_json, webdataset_loading
from factory.export.members import load_members, load_or_skip, sample_json
from factory.export.options import SLOW_ENV
from factory.export.outdir import OutDir
from factory.export.prepare import Prepared
from factory.export.schema import attributes_of, phash_hex
from factory.export.records import LazyRows, Records, SplitResult, WriteResult, split_rows
from factory.fsutil import atomic_write_text, fsync_path, temp_name
from factory.integrity import CorruptSample, FileReader, OpenFile, copy_file

WIDS_SUFFIX = ".wids.json"

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads archives to a whole record
SHARD_RE = re.compile(r"^(?P<split>[a-z][a-z0-9_]*)-(?P<n>\d{6})\.tar$")
_MEMBER_SUFFIXES = ("alpha.png", "fg.png", "json", "txt")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def _header(name: str, size: int, mtime: int) -> bytes:
    """The tar header of a regular, read-only member; what ``tarfile`` writes, faster.

    ``tarfile.TarInfo.tobuf`` costs ~85 us a member (a quarter of the export loop); the common case
    (an ASCII name of at most 100 bytes) is built directly and is byte-identical to tarfile's
    POSIX (pax) output (tested); anything else goes through tarfile.
    """
    if len(name) <= 100 and name.isascii() and 0 <= size < 8**11 and 0 <= mtime < 8**11:
        head = b"".join(
            (
                name.encode("ascii").ljust(100, b"\0"),
                b"0000444\0",  # mode
                b"0000000\0",  # uid
                b"0000000\0",  # gid
                b"%011o\0" % size,
                b"%011o\0" % mtime,
                b"        ",  # checksum, counted as spaces
                b"0",  # regular file
                bytes(100),  # link name
                b"ustar\x0000",
                bytes(64),  # user and group names: empty
                bytes(16),  # device numbers: empty for regular files
                bytes(167),  # prefix and padding
            )
        )
        return head[:148] + b"%06o\0 " % sum(head) + head[156:]
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o444
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """One ``writev`` for a whole sample (headers, data, padding), looping on short writes."""
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts = parts[1:]
        if parts and written:
            parts = [memoryview(parts[0])[written:], *parts[1:]]


class TarShard:
    """One shard being written: a temporary file, renamed to its final name when complete."""

    def __init__(self, final: Path, mtime: int, fsync: bool = True) -> None:
        self.final = final
        self.tmp = temp_name(final)
        self.mtime = mtime
        self.fsync = fsync
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.count = 0
        self.size = 0  # bytes written so far

    def add(self, members: list[tuple[str, bytes | memoryview | OpenFile]], scratch: bytearray | None = None) -> None:
        """Append one sample's members: bytes in one ``writev``, open files copied by the kernel."""
        parts: list[bytes | memoryview] = []
        for name, data in members:
            header = _header(name, len(data), self.mtime)
            pad = _padding(len(data))
            if isinstance(data, OpenFile):
                _write_all(self.fd, [*parts, header])
                copy_file(data, self.fd, scratch if scratch is not None else bytearray(1 << 16))
                parts = [pad]
            else:
                parts += [header, data, pad]
            self.size += len(header) + len(data) + len(pad)
        _write_all(self.fd, parts)
        self.count += 1

    def close(self) -> int:
        """Finish the archive, make it durable and give it its final name; returns its size."""
        end = b"\0" * (2 * BLOCK)
        total = self.size + len(end)
        end += b"\0" * (-total % RECORD)
        try:
            _write_all(self.fd, [end])
            if self.fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
        os.replace(self.tmp, self.final)
        if self.fsync:
            fsync_path(self.final.parent)
        return self.size + len(end)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def sample_tar_members(
    key: str, image_ext: str, image: Any, alpha: Any, fg: Any, meta: bytes, caption: str
) -> list[tuple[str, Any]]:
    return [
        (f"{key}.{image_ext}", image),
        (f"{key}.alpha.png", alpha),
        (f"{key}.fg.png", fg),
        (f"{key}.json", meta),
        (f"{key}.txt", caption.encode("utf-8")),
    ]


def members_size(members: list[tuple[str, Any]], mtime: int) -> int:
    """Bytes the members take in a tar (headers, data, padding)."""
    return sum(
        (BLOCK if len(n) <= 100 and n.isascii() else len(_header(n, len(d), mtime))) + len(d) + (-len(d) % BLOCK)
        for n, d in members
    )


def write_webdataset(
    p: Prepared, outdir: OutDir, advance: Callable[[int, int], None], on_problem: Callable[[str], None]
) -> WriteResult:
    """Write every split's shards (resuming finished ones); returns what was written."""
    settings, out = p.settings, outdir.root
    mtime = _run_mtime(p)
    delay = float(os.environ.get(SLOW_ENV, "0") or 0)
    result = WriteResult(records=Records(p.attribute_keys), splits={}, problems=[])
    reader = FileReader(kernel_copy=True)  # checked through a small buffer, copied file to file
    for split in settings.split_order():
        rows = split_rows(p.ordered, split)
        sres = SplitResult(split)
        result.splits[split] = sres
        cursor, number = _resume_split(p, out, split, rows, sres, result, on_problem)
        if cursor:
            advance(cursor, 0)
            result.resumed_samples += cursor
        writer: TarShard | None = None
        try:
            # One thread: a reader thread for the next sample was tried and was slower (GIL
            # hand-offs between the threads cost more than the overlap saved on two cores).
            for rec in rows.iter_from(cursor):
                m = load_or_skip(p, rec, reader, result.problems, on_problem)
                if m is None:
                    advance(1, 0)
                    continue
                try:
                    meta = sample_json(rec, m, split, settings, p)
                    members = sample_tar_members(rec["key"], settings.image_ext, m.image, m.alpha, m.fg, meta, rec.get("prompt") or "")
                    size = members_size(members, mtime)
                    if writer is not None and (writer.count >= settings.maxcount or writer.size + size > settings.maxsize):
                        _finish(writer, sres, result)
                        writer = None
                    if writer is None:
                        writer = TarShard(out / shard_name(split, number), mtime, p.options.fsync)
                        number += 1
                    writer.add(members, reader.scratch)
                finally:
                    m.close()
                result.records.append(_record(p, rec, split, writer.final.name, [len(d) for _, d in members]))
                advance(1, size)
                if delay:
                    time.sleep(delay)
            if writer is not None:
                _finish(writer, sres, result)
                writer = None
        finally:
            if writer is not None:
                writer.abort()
        _remove_shards_from(out, split, number)
    # splits no longer in the plan
    for path in out.glob("*.tar"):
        match = SHARD_RE.match(path.name)
        if match and match["split"] not in result.splits and not path.is_symlink():
            path.unlink()
    return result


def _finish(writer: TarShard, sres: SplitResult, result: WriteResult) -> None:
    size = writer.close()
    sres.shards.append({"url": writer.final.name, "nsamples": writer.count, "filesize": size})
    sres.samples += writer.count
    sres.bytes += size
    result.bytes_written += size


def _record(p: Prepared, rec: dict[str, Any], split: str, shard: str, sizes: list[int]) -> dict[str, Any]:
    """A row of samples.parquet: the exported sample, its shard and member sizes."""
    return {
        "attributes": attributes_of(rec, p.attribute_keys),
        "phash": phash_hex(rec.get("phash")),
        "key": rec["key"],
        "index": rec["index"],
        "split": split,
        "shard": shard,
        "class_name": rec["class_name"],
        "category": rec["category"],
        "gsg": rec.get("gsg"),
        "alpha_coverage": rec.get("alpha_coverage"),
        "image_bytes": sizes[0],
        "alpha_bytes": sizes[1],
        "fg_bytes": sizes[2],
        "json_bytes": sizes[3],
    }


def _run_mtime(p: Prepared) -> int:
    """A fixed member mtime (the run's creation time) so the same export gives the same bytes."""
    from datetime import datetime

    created = p.store.info.get("created")
    try:
        return int(datetime.fromisoformat(created).timestamp()) if created else 0
    except ValueError:
        return 0


def _remove_shards_from(out: Path, split: str, number: int) -> None:
    """Delete final-named shards of ``split`` numbered ``number`` or above (left by another plan)."""
    for path in out.glob(f"{split}-*.tar"):
        match = SHARD_RE.match(path.name)
        if match and match["split"] == split and int(match["n"]) >= number and not path.is_symlink():
            path.unlink()


def scan_shard(path: Path) -> list[tuple[str, list[tuple[str, int]]]]:
    """The samples of a finished shard from its headers: [(key, [(suffix, size), ...]), ...]."""
    samples: list[tuple[str, list[tuple[str, int]]]] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key, _, suffix = info.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((suffix, info.size))
    return samples


def _resume_split(
    p: Prepared,
    out: Path,
    split: str,
    rows: LazyRows,
    sres: SplitResult,
    result: WriteResult,
    on_problem: Callable[[str], None],
) -> tuple[int, int]:
    """Keep the finished shards that match the plan; returns (rows consumed, next shard number)."""
    settings = p.settings
    cursor = number = 0
    expected_suffixes = [settings.image_ext, *_MEMBER_SUFFIXES]
    while True:
        path = out / shard_name(split, number)
        if not path.is_file():
            break
        try:
            samples = scan_shard(path)
        except (tarfile.TarError, OSError):
            break
        consumed, problems, records, ok = cursor, [], [], bool(samples)
        for key, members in samples:
            # planned samples skipped as corrupt by the earlier run must still be corrupt now
            while ok and consumed < len(rows) and rows[consumed]["key"] != key:
                try:
                    load_members(p.store, rows[consumed], settings, p.options.verify)
                    ok = False  # a good sample was skipped: the shard is not what the plan makes
                except CorruptSample as exc:
                    problems.append(str(exc))
                    consumed += 1
            if not ok or consumed >= len(rows) or [s for s, _ in members] != expected_suffixes:
                ok = False
                break
            rec = rows[consumed]
            sizes = dict(members)
            if (settings.image_format == "png" and sizes["png"] != rec["image_bytes"]) or (
                settings.alpha_bits == rec["alpha_bits"] and sizes["alpha.png"] != rec["alpha_bytes"]
            ) or sizes["fg.png"] != rec["fg_bytes"]:
                ok = False
                break
            records.append(_record(p, rec, split, path.name, [sizes[s] for s in expected_suffixes]))
            consumed += 1
        if not ok or len(samples) > settings.maxcount:
            break
        for problem in problems:
            result.problems.append(problem)
            on_problem(problem)
        for rec in records:
            result.records.append(rec)
        size = path.stat().st_size
        sres.shards.append({"url": path.name, "nsamples": len(samples), "filesize": size})
        sres.samples += len(samples)
        sres.bytes += size
        cursor, number = consumed, number + 1
    _remove_shards_from(out, split, number)
    return cursor, number


class WebDatasetFormat:
    """The ``webdataset`` output format: tar shards per split and a wids index per split."""

    name = "webdataset"

    def write(self, p: Prepared, outdir: OutDir, advance: Callable[[int, int], None], on_problem: Callable[[str], None]) -> WriteResult:
        return write_webdataset(p, outdir, advance, on_problem)

    def sidecars(self, out: Path, result: WriteResult) -> None:
        """A ``wids-shard-index-v1`` JSON per split that has shards; stale ones removed."""
        for name, s in result.splits.items():
            if s.shards:  # an empty split (every class too small) gets no index
                index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": s.shards}
                atomic_write_text(out / f"{name}{WIDS_SUFFIX}", stats_json(index))
        for path in out.glob(f"*{WIDS_SUFFIX}"):
            split = path.name[: -len(WIDS_SUFFIX)]
            if (split not in result.splits or not result.splits[split].shards) and not path.is_symlink():
                path.unlink()

    def clean(self, out: Path) -> None:
        """Delete the shards and indexes an earlier export wrote (known names only)."""
        for path in out.iterdir():
            if path.is_file() and not path.is_symlink() and (SHARD_RE.match(path.name) or path.name.endswith(WIDS_SUFFIX)):
                path.unlink()

    def loading(self, p: Prepared, result: WriteResult) -> str:
        train = result.splits.get("train")
        return webdataset_loading(p.settings.image_ext, len(train.shards) - 1 if train else 0)
