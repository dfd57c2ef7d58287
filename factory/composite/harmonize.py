"""Colour harmonisation: Reinhard colour transfer in CIE Lab of the object towards the
background's statistics around it, with a strength (0: none, 1: full transfer).

Only the foreground's colours change; its alpha does not, and the composite is made from the
harmonised foreground (written as the foreground layer), so the label stays exact. The original
foreground is kept beside it.
"""

from __future__ import annotations

import numpy as np

_M = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
_M_INV = np.linalg.inv(_M)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, D65) -> CIE Lab, float32."""
    c = np.asarray(rgb, np.float32) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _M.T.astype(np.float32) / _WHITE.astype(np.float32)
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab -> sRGB float32 in 0..255 (clipped)."""
    fy = (lab[..., 0] + 16) / 116
    fx = fy + lab[..., 1] / 500
    fz = fy - lab[..., 2] / 200
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f**3 > 216 / 24389, f**3, (116 * f - 16) / (24389 / 27)) * _WHITE.astype(np.float32)
    lin = np.clip(xyz @ _M_INV.T.astype(np.float32), 0.0, 1.0)
    c = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.clip(c * 255.0, 0.0, 255.0).astype(np.float32)


def weighted_stats(lab: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = float(w.sum())
    if total <= 0:
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    mean = (lab * w[..., None]).reshape(-1, 3).sum(0) / total
    var = (((lab - mean) ** 2) * w[..., None]).reshape(-1, 3).sum(0) / total
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 1e-6)).astype(np.float32)


def harmonize(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray, strength: float, margin: float = 0.5) -> np.ndarray:
    """The foreground (float32 HxWx3, full frame) moved towards the background's Lab statistics in
    the object's box grown by ``margin`` of its size; pixels with alpha 0 are left as they are."""
    if strength <= 0:
        return fg
    ys, xs = np.nonzero(alpha > 0)
    if ys.size == 0:
        return fg
    H, W = alpha.shape
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    my, mx = int((y1 - y0) * margin), int((x1 - x0) * margin)
    wy0, wy1, wx0, wx1 = max(y0 - my, 0), min(y1 + my, H), max(x0 - mx, 0), min(x1 + mx, W)
    b_lab = rgb_to_lab(bg[wy0:wy1, wx0:wx1])
    b_mean, b_std = weighted_stats(b_lab, 1.0 - alpha[wy0:wy1, wx0:wx1])
    o_lab = rgb_to_lab(fg[y0:y1, x0:x1])
    o_mean, o_std = weighted_stats(o_lab, alpha[y0:y1, x0:x1])
    t_mean = o_mean + strength * (b_mean - o_mean)
    t_std = o_std * (b_std / o_std) ** strength
    moved = lab_to_rgb((o_lab - o_mean) * (t_std / o_std) + t_mean)
    out = fg.copy()
    box = out[y0:y1, x0:x1]
    box[:] = np.where(alpha[y0:y1, x0:x1, None] > 0, moved, box)
    return out
