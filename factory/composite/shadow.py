"""A soft shadow cast from the object's alpha: shifted, blurred, darkening the background only.

The shadow is part of the background (as in the matting benchmarks): the object's alpha is
unchanged, the written background layer is the darkened one, and the shadow itself is kept as a
layer (``KEY.shadow.png``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Shadow:
    opacity: float  # darkening where the shadow is full
    angle: float  # direction the shadow falls, degrees (0: right, 90: up)
    offset: float  # distance, pixels
    blur: float  # Gaussian sigma, pixels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shadow:
        return cls(float(d["opacity"]), float(d["angle"]), float(d["offset"]), float(d["blur"]))


def draw_shadow(rng: np.random.Generator, opacity: float, object_size: float) -> Shadow:
    """Direction, offset and blur drawn for an object whose longer side is ``object_size`` px."""
    angle = float(rng.uniform(200.0, 340.0))  # light from above: the shadow falls downwards
    offset = float(rng.uniform(0.02, 0.08)) * object_size
    blur = float(rng.uniform(0.01, 0.04)) * object_size + 1.0
    return Shadow(round(opacity, 4), round(angle, 3), round(offset, 3), round(blur, 3))


def shadow_layer(alpha: np.ndarray, s: Shadow) -> np.ndarray:
    """The shadow's strength per pixel (float32 in [0, opacity])."""
    dx = s.offset * math.cos(math.radians(s.angle))
    dy = -s.offset * math.sin(math.radians(s.angle))
    moved = ndimage.shift(alpha, (dy, dx), order=1, mode="constant", cval=0.0)
    return np.clip(ndimage.gaussian_filter(moved, s.blur, mode="constant") * s.opacity, 0.0, 1.0).astype(np.float32)


def cast(bg: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """The background darkened by the shadow layer (uint8)."""
    out = bg.astype(np.float32) * (1.0 - layer[..., None])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
