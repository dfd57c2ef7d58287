"""PNG encoding for composites: the rows filtered with PNG's "up" filter in numpy and deflated by
zlib-ng at level 2. On the benchmark's 512-px composites this is about 2.5x faster than Pillow's
encoder at level 1 and gives slightly smaller files (bench/composite.py); Pillow decodes the result
(tested through every composite the tests read back)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from zlib_ng import zlib_ng

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR = {1: 0, 3: 2, 4: 6}  # grey, RGB, RGBA


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(arr: np.ndarray, level: int = 2) -> bytes:
    """A PNG of a uint8 or uint16 array, (H, W) grey or (H, W, 3|4) colour."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG rows must be uint8 or uint16, not {arr.dtype}")
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    raw = (arr if arr.dtype == np.uint8 else arr.astype(">u2")).view(np.uint8).reshape(h, -1)
    rows = np.empty((h, raw.shape[1] + 1), np.uint8)
    rows[:, 0] = 2  # "up": each byte minus the byte above it
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8 * arr.dtype.itemsize, _COLOUR[channels], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib_ng.compress(rows.data, level)) + _chunk(b"IEND", b"")


def alpha_png(alpha: np.ndarray, bits: int) -> bytes:
    """A [0, 1] alpha already quantised to ``bits`` as a one-channel PNG of that depth."""
    top = 255.0 if bits == 8 else 65535.0
    q = alpha * np.float32(top) + np.float32(0.5)
    return encode(q.astype(np.uint8 if bits == 8 else np.uint16))
