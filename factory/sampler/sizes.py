"""The size a model actually renders: the one asked for, or scaled down to a model's native size
(the tiny and toy models draw at most 64 px). Torch-free, so that ``generate`` can size a run
(its disk-space check) before any model is loaded."""

from __future__ import annotations

from factory.sampler.tiny import TINY_SAMPLE_SIZE
from factory.toy import TOY_SAMPLE_SIZE

#: Native sizes known from the model's name alone (other models' come from their files, on loading).
NATIVE_BY_SOURCE = {"tiny": (TINY_SAMPLE_SIZE, TINY_SAMPLE_SIZE), "toy": (TOY_SAMPLE_SIZE, TOY_SAMPLE_SIZE)}


def render_size(width: int, height: int, native: tuple[int, int] | None) -> tuple[int, int]:
    """The size actually rendered: as asked, or scaled down (aspect kept, multiples of 8) to fit ``native``."""
    if native is None or (width <= native[0] and height <= native[1]):
        return width, height
    scale = min(native[0] / width, native[1] / height)
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)
