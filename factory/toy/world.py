"""The toy world: procedural objects chosen for matting, with exact fractional alpha, on green.

Every object is painted as a stack of layers at ``SUPERSAMPLE`` times the output size (each layer
a coverage mask in [0, 1] with an opacity and a colour, composited with "over" in premultiplied
colour), then box-averaged down: the alpha of a pixel is exactly the mean coverage-times-opacity of
its sub-pixels, so hair-thin strands, mesh holes and glass come out fractional, as in real mattes.

A sample is a pure function of ``(seed, index, size)``: the object's class cycles through
:data:`CLASSES` with the index, everything else (colour, pose, size, shading, the green canvas, its
gradient and soft shadow) is drawn from ``numpy.random.default_rng([seed, index])``.

The composite is made from the 8-bit alpha and foreground, so the image on disk equals
``a F + (1 - a) G`` (a = alpha / 255, F the foreground, G the canvas, shadow included) to 8-bit
rounding.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Sub-pixels per pixel side.
SUPERSAMPLE = 4
#: Output size (px) of the toy model's training images.
DEFAULT_SIZE = 64

#: (name, RGB in [0, 1], near green): the colour words of the captions. The near-green ones are
#: there on purpose: objects the key must not eat.
PALETTE: tuple[tuple[str, tuple[float, float, float], bool], ...] = (
    ("red", (0.85, 0.12, 0.10), False),
    ("orange", (0.95, 0.50, 0.08), False),
    ("yellow", (0.95, 0.85, 0.15), False),
    ("blue", (0.15, 0.30, 0.90), False),
    ("purple", (0.55, 0.20, 0.75), False),
    ("pink", (0.95, 0.45, 0.70), False),
    ("white", (0.93, 0.93, 0.93), False),
    ("black", (0.10, 0.10, 0.11), False),
    ("gray", (0.50, 0.50, 0.52), False),
    ("brown", (0.50, 0.30, 0.15), False),
    ("lime", (0.65, 0.90, 0.20), True),
    ("olive", (0.45, 0.50, 0.15), True),
    ("teal", (0.10, 0.60, 0.55), True),
)
#: Share of objects drawn in a near-green colour.
NEAR_GREEN_SHARE = 0.12


@dataclass
class ToySample:
    """One rendered sample: 8-bit image, foreground, alpha and canvas (H, W[, 3]) and its words."""

    image: np.ndarray
    fg: np.ndarray
    alpha: np.ndarray
    canvas: np.ndarray
    caption: str
    class_name: str
    colour: str
    meta: dict[str, Any] = field(default_factory=dict)


class Painter:
    """Layers composited "over" each other at high resolution, premultiplied."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.premult = np.zeros((n, n, 3), np.float32)
        self.alpha = np.zeros((n, n), np.float32)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
        self.xx, self.yy = xx, yy

    def canvas(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        im = Image.new("L", (self.n, self.n), 0)
        return im, ImageDraw.Draw(im)

    def over(self, mask: Image.Image | np.ndarray, color: Any, opacity: float | np.ndarray = 1.0) -> None:
        """Composite a layer: ``mask`` coverage (L image or float array) times ``opacity``, in ``color``
        ((3,) or (n, n, 3) in [0, 1])."""
        m = np.asarray(mask, np.float32)
        if m.dtype != np.float32 or m.max(initial=0.0) > 1.0:
            m = m / 255.0
        a = np.clip(m * opacity, 0.0, 1.0)
        c = np.clip(np.asarray(color, np.float32), 0.0, 1.0)
        self.premult = c * a[..., None] + self.premult * (1.0 - a[..., None])
        self.alpha = a + self.alpha * (1.0 - a)

    def downsample(self, ss: int, base_color: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(foreground RGB, alpha) at 1/ss: box means; the foreground is un-premultiplied and is
        the object's base colour where nothing covers the pixel."""
        s = self.n // ss
        a = self.alpha.reshape(s, ss, s, ss).mean(axis=(1, 3))
        p = self.premult.reshape(s, ss, s, ss, 3).mean(axis=(1, 3))
        fg = np.where(a[..., None] > 1e-6, p / np.maximum(a[..., None], 1e-6), base_color)
        return np.clip(fg, 0.0, 1.0), np.clip(a, 0.0, 1.0)


# ------------------------------------------------------------------------------ geometry helpers


def _rot(points: np.ndarray, theta: float, center: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    p = np.asarray(points, np.float64)
    x, y = p[..., 0], p[..., 1]
    return np.stack([center[0] + c * x - s * y, center[1] + s * x + c * y], axis=-1)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, steps: int = 16) -> np.ndarray:
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _line(draw: ImageDraw.ImageDraw, pts: np.ndarray, width: float, value: int = 255) -> None:
    draw.line([tuple(map(float, p)) for p in pts], fill=value, width=max(1, int(round(width))), joint="curve")


def _shade(color: np.ndarray, k: float) -> np.ndarray:
    return np.clip(color * k, 0.0, 1.0)


def _radial(p: Painter, cx: float, cy: float) -> np.ndarray:
    return np.hypot(p.xx - cx, p.yy - cy)


# ------------------------------------------------------------------------------ the classes
# Each painter gets (painter, rng, centre, radius, rotation, colour) in high-resolution pixels.

Pose = tuple[tuple[float, float], float, float]


def fur_tuft(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """Many thin curved strands of varying opacity fanning out from a dense base."""
    (cx, cy), r, theta = pose
    base = np.array([0.0, 0.7 * r])
    im, d = p.canvas()
    d.ellipse([cx - 0.35 * r, cy + 0.45 * r, cx + 0.35 * r, cy + 0.85 * r], fill=255)
    p.over(np.asarray(Image.fromarray(np.asarray(im)).rotate(-math.degrees(theta), center=(cx, cy))), _shade(color, 0.8))
    for _ in range(int(rng.integers(70, 120))):
        ang = rng.normal(0.0, 0.55)
        length = r * rng.uniform(0.9, 1.6)
        tip = base + length * np.array([math.sin(ang), -math.cos(ang)])
        ctrl = (base + tip) / 2 + rng.normal(0, 0.25 * r, 2)
        pts = _rot(_bezier(base + rng.normal(0, 0.1 * r, 2), ctrl, tip), theta, (cx, cy))
        im, d = p.canvas()
        _line(d, pts, rng.uniform(1.0, 2.5))
        p.over(im, _shade(color, rng.uniform(0.7, 1.25)), rng.uniform(0.45, 1.0))


def hair_lock(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """Long wavy strands, roughly parallel, thinning out at the sides and the ends."""
    (cx, cy), r, theta = pose
    waves, phase = rng.uniform(1.0, 2.5), rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.08, 0.2) * r
    for _ in range(int(rng.integers(50, 90))):
        off = rng.normal(0.0, 0.25 * r)
        top, bottom = -r * rng.uniform(0.85, 1.0), r * rng.uniform(0.5, 1.0)
        y = np.linspace(top, bottom, 24)
        x = off + amp * np.sin(waves * 2 * math.pi * (y - top) / (2 * r) + phase + rng.normal(0, 0.2)) * (1 + (y - top) / r)
        pts = _rot(np.stack([x, y], -1), theta, (cx, cy))
        im, d = p.canvas()
        _line(d, pts, rng.uniform(1.0, 2.2))
        p.over(im, _shade(color, rng.uniform(0.75, 1.2)), rng.uniform(0.5, 1.0) * math.exp(-abs(off) / (0.5 * r)))


def feather(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A curved shaft with barbs on both sides; downy, half-transparent barbs near the base."""
    (cx, cy), r, theta = pose
    bend = rng.uniform(-0.25, 0.25) * r
    shaft = _bezier(np.array([0.0, r]), np.array([bend, 0.0]), np.array([0.0, -r]), 40)
    width = r * rng.uniform(0.4, 0.6)
    for i in range(2, len(shaft) - 1):
        u = i / (len(shaft) - 1)
        tangent = shaft[min(i + 1, len(shaft) - 1)] - shaft[i - 1]
        tangent /= np.linalg.norm(tangent) + 1e-9
        normal = np.array([-tangent[1], tangent[0]])
        length = width * math.sin(math.pi * min(1.0, 1.1 * (1 - u) + 0.05)) ** 0.7
        downy = u < 0.25
        for side in (-1.0, 1.0):
            end = shaft[i] + side * normal * length + tangent * (-0.6 * length)
            pts = _rot(np.stack([shaft[i], end]), theta, (cx, cy))
            im, d = p.canvas()
            _line(d, pts, rng.uniform(1.0, 2.0))
            p.over(im, _shade(color, rng.uniform(0.85, 1.15)), rng.uniform(0.35, 0.6) if downy else rng.uniform(0.75, 0.95))
    im, d = p.canvas()
    _line(d, _rot(shaft, theta, (cx, cy)), 3)
    p.over(im, _shade(color, 1.3))


def serrated_leaf(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A leaf with a toothed edge, a midrib and side veins, on a short stem."""
    (cx, cy), r, theta = pose
    teeth = int(rng.integers(7, 14))
    u = np.linspace(0.0, 1.0, 160)
    half = r * rng.uniform(0.35, 0.55) * np.sin(math.pi * u) ** 0.8
    saw = 1.0 + rng.uniform(0.15, 0.3) * ((u * teeth) % 1.0)
    y = r * (0.8 - 1.7 * u)
    left = np.stack([-half * saw, y], -1)
    right = np.stack([half * saw, y], -1)[::-1]
    im, d = p.canvas()
    d.polygon([tuple(q) for q in _rot(np.concatenate([left, right]), theta, (cx, cy))], fill=255)
    yy = (p.yy - cy) / max(r, 1)
    p.over(im, color[None, None, :] * (0.85 + 0.25 * yy[..., None]))
    veins, vd = p.canvas()
    _line(vd, _rot(np.array([[0.0, r], [0.0, -0.9 * r]]), theta, (cx, cy)), 3)
    for k in range(1, teeth):
        v = k / teeth
        y0 = r * (0.8 - 1.7 * v)
        w = r * 0.45 * math.sin(math.pi * v) ** 0.8
        for side in (-1, 1):
            _line(vd, _rot(np.array([[0.0, y0], [side * w * 0.9, y0 - 0.3 * w]]), theta, (cx, cy)), 2)
    p.over(veins, _shade(color, 0.6), 0.8)


def seed_head(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A dandelion clock: thin radial filaments with little fans at their tips, a small core."""
    (cx, cy), r, theta = pose
    for _ in range(int(rng.integers(45, 75))):
        ang = rng.uniform(0, 2 * math.pi)
        length = r * rng.uniform(0.75, 1.0)
        dirv = np.array([math.cos(ang), math.sin(ang)])
        tip = length * dirv
        im, d = p.canvas()
        _line(d, _rot(np.stack([0.12 * r * dirv, tip]), theta, (cx, cy)), 1)
        for k in range(int(rng.integers(4, 8))):
            a2 = ang + rng.uniform(-0.7, 0.7)
            end = tip + 0.22 * r * np.array([math.cos(a2), math.sin(a2)])
            _line(d, _rot(np.stack([tip, end]), theta, (cx, cy)), 1)
        p.over(im, _shade(color, rng.uniform(0.9, 1.15)), rng.uniform(0.45, 0.8))
    im, d = p.canvas()
    d.ellipse([cx - 0.14 * r, cy - 0.14 * r, cx + 0.14 * r, cy + 0.14 * r], fill=255)
    p.over(im, _shade(color, 0.6))


def glass_sphere(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A transparent ball: thin in the middle, denser towards the rim, an opaque highlight."""
    (cx, cy), r, theta = pose
    rad = _radial(p, cx, cy) / r
    inside = np.clip((1.0 - rad) * r, 0.0, 1.0)  # one-sub-pixel ramp at the outline
    opacity = rng.uniform(0.15, 0.3) + 0.6 * np.clip(rad, 0, 1) ** 4
    p.over(inside, color[None, None, :] * (0.8 + 0.3 * (1 - rad[..., None])), opacity)
    _highlight(p, rng, cx, cy, r, theta)


def soap_bubble(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """An almost invisible bubble: iridescent rim, clear centre, a highlight."""
    (cx, cy), r, theta = pose
    rad = _radial(p, cx, cy) / r
    inside = np.clip((1.0 - rad) * r, 0.0, 1.0)
    angle = np.arctan2(p.yy - cy, p.xx - cx)
    hue = (angle / (2 * math.pi) + rng.uniform()) % 1.0
    iris = np.stack([0.5 + 0.5 * np.cos(2 * math.pi * (hue + k / 3)) for k in range(3)], -1)
    tint = 0.5 * iris + 0.5 * color[None, None, :]
    p.over(inside, tint, 0.05 + 0.7 * np.clip(rad, 0, 1) ** 8)
    _highlight(p, rng, cx, cy, r, theta)


def _highlight(p: Painter, rng: np.random.Generator, cx: float, cy: float, r: float, theta: float) -> None:
    im, d = p.canvas()
    hx, hy = _rot(np.array([-0.4 * r, -0.4 * r]), theta * 0.3, (cx, cy))
    d.ellipse([hx - 0.14 * r, hy - 0.09 * r, hx + 0.14 * r, hy + 0.09 * r], fill=255)
    p.over(im, np.ones(3), rng.uniform(0.7, 0.95))


def net_disc(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A round net: a grid of thin cords clipped to a disc, with an opaque rim."""
    (cx, cy), r, theta = pose
    im, d = p.canvas()
    spacing = r * rng.uniform(0.12, 0.2)
    k = int(r / spacing) + 2
    for i in range(-k, k + 1):
        for pts in (np.array([[i * spacing, -r], [i * spacing, r]]), np.array([[-r, i * spacing], [r, i * spacing]])):
            _line(d, _rot(pts, theta, (cx, cy)), rng.uniform(1.5, 2.5))
    disc = np.clip((r - _radial(p, cx, cy)), 0.0, 1.0)
    p.over(np.asarray(im, np.float32) / 255.0 * disc, color)
    rim, rd = p.canvas()
    rd.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, int(0.07 * r)))
    p.over(rim, _shade(color, 0.8))


def lace_doily(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A lace disc: scalloped edge and rings of holes."""
    (cx, cy), r, theta = pose
    im, d = p.canvas()
    d.ellipse([cx - 0.88 * r, cy - 0.88 * r, cx + 0.88 * r, cy + 0.88 * r], fill=255)
    scallops = int(rng.integers(12, 20))
    for k in range(scallops):
        a = theta + 2 * math.pi * k / scallops
        sx, sy = cx + 0.88 * r * math.cos(a), cy + 0.88 * r * math.sin(a)
        s = 0.14 * r
        d.ellipse([sx - s, sy - s, sx + s, sy + s], fill=255)
    for ring, count in ((0.25, 6), (0.5, 12), (0.72, 18)):
        hole = r * rng.uniform(0.05, 0.08)
        for k in range(count):
            a = theta + 2 * math.pi * (k + 0.5 * (ring > 0.4)) / count
            hx, hy = cx + ring * r * math.cos(a), cy + ring * r * math.sin(a)
            d.ellipse([hx - hole, hy - hole, hx + hole, hy + hole], fill=0)
    p.over(im, color, rng.uniform(0.85, 1.0))


def smoke_puff(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A soft cloud: a sum of Gaussian blobs, fractional alpha everywhere, no hard edge."""
    (cx, cy), r, theta = pose
    field_ = np.zeros((p.n, p.n), np.float32)
    for _ in range(int(rng.integers(5, 10))):
        bx, by = _rot(rng.normal(0, 0.25 * r, 2), theta, (cx, cy))
        s = r * rng.uniform(0.18, 0.32)
        field_ += rng.uniform(0.5, 1.0) * np.exp(-((p.xx - bx) ** 2 + (p.yy - by) ** 2) / (2 * s * s))
    alpha = np.clip(field_, 0.0, 1.0) ** 1.5
    p.over(alpha, color[None, None, :] * (0.85 + 0.15 * alpha[..., None]), rng.uniform(0.55, 0.9))


def star(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A hard-edged star with 4 to 7 points, shaded top to bottom."""
    (cx, cy), r, theta = pose
    n = int(rng.integers(4, 8))
    inner = rng.uniform(0.38, 0.55)
    ang = theta + np.arange(2 * n) * math.pi / n
    rr = np.where(np.arange(2 * n) % 2 == 0, r, inner * r)
    pts = np.stack([cx + rr * np.cos(ang), cy + rr * np.sin(ang)], -1)
    im, d = p.canvas()
    d.polygon([tuple(q) for q in pts], fill=255)
    p.over(im, color[None, None, :] * (1.1 - 0.3 * ((p.yy - cy) / r)[..., None].clip(-1, 1)))


def cube(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A solid cube in parallel projection: three faces of different brightness."""
    (cx, cy), r, theta = pose
    yaw = rng.uniform(0, math.pi / 2)
    s = r * 0.62
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64) * s
    c, si = math.cos(yaw), math.sin(yaw)
    x = c * corners[:, 0] - si * corners[:, 2]
    z = si * corners[:, 0] + c * corners[:, 2]
    tilt = 0.5
    proj = np.stack([x, corners[:, 1] * math.cos(tilt) + z * math.sin(tilt)], -1)
    depth = -corners[:, 1] * math.sin(tilt) + z * math.cos(tilt)
    proj = _rot(proj, theta * 0.2, (cx, cy))
    faces = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]
    order = sorted(faces, key=lambda f: depth[list(f)].mean())[:3]  # the three nearest faces
    for i, f in enumerate(reversed(order)):
        im, d = p.canvas()
        d.polygon([tuple(proj[k]) for k in f], fill=255)
        p.over(im, _shade(color, (0.6, 0.85, 1.1)[i]))


def ring(p: Painter, rng: np.random.Generator, pose: Pose, color: np.ndarray) -> None:
    """A flat ring (annulus) with a shaded band: a hard outline and a hole."""
    (cx, cy), r, theta = pose
    rad = _radial(p, cx, cy)
    inner = r * rng.uniform(0.45, 0.7)
    cover = np.clip(r - rad, 0.0, 1.0) * np.clip(rad - inner, 0.0, 1.0)
    t = ((rad - inner) / max(r - inner, 1e-3)).clip(0, 1)
    p.over(cover, color[None, None, :] * (0.7 + 0.5 * np.sin(math.pi * t))[..., None])


#: class name -> painter. The order fixes which class an index draws.
CLASSES: dict[str, Callable[[Painter, np.random.Generator, Pose, np.ndarray], None]] = {
    "fur tuft": fur_tuft,
    "hair lock": hair_lock,
    "feather": feather,
    "serrated leaf": serrated_leaf,
    "seed head": seed_head,
    "glass sphere": glass_sphere,
    "soap bubble": soap_bubble,
    "net disc": net_disc,
    "lace doily": lace_doily,
    "smoke puff": smoke_puff,
    "star": star,
    "cube": cube,
    "ring": ring,
}
CLASS_NAMES = tuple(CLASSES)


# ------------------------------------------------------------------------------ canvas and sample


def green_canvas(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A green background (H, W, 3) in [0, 1]: a green from a range, optionally a linear gradient."""
    h, s, v = rng.uniform(100, 140) / 360.0, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)
    base = np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)
    canvas = np.broadcast_to(base, (size, size, 3)).copy()
    gradient = 0.0
    if rng.uniform() < 0.5:
        gradient = float(rng.uniform(0.04, 0.15))
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
        ramp = 1.0 + gradient * 2 * (xx * math.cos(ang) + yy * math.sin(ang))
        canvas = canvas * ramp[..., None]
    meta = {"green_hsv": [round(h * 360, 2), round(s, 4), round(v, 4)], "gradient": round(gradient, 4)}
    return np.clip(canvas, 0.0, 1.0), meta


def soft_shadow(alpha: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A darkening factor (H, W) in (0, 1]: the blurred, offset alpha (or all ones, half the time)."""
    if rng.uniform() < 0.5:
        return np.ones_like(alpha), {"shadow": 0.0}
    size = alpha.shape[0]
    dx, dy = (int(v) for v in rng.integers(-size // 16, size // 16 + 1, 2))
    strength = float(rng.uniform(0.15, 0.4))
    shifted = np.roll(np.roll(alpha, dy, axis=0), dx, axis=1)
    im = Image.fromarray(np.rint(shifted * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 24))
    return 1.0 - strength * np.asarray(im, np.float32) / 255.0, {"shadow": round(strength, 4), "shadow_offset": [dx, dy]}


def pick_colour(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    near = [c for c in PALETTE if c[2]]
    far = [c for c in PALETTE if not c[2]]
    pool = near if rng.uniform() < NEAR_GREEN_SHARE else far
    name, rgb, _ = pool[int(rng.integers(len(pool)))]
    jitter = rng.normal(0.0, 0.04, 3)
    return name, np.clip(np.array(rgb) + jitter, 0.0, 1.0).astype(np.float32)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render_sample(seed: int, index: int, size: int = DEFAULT_SIZE, class_name: str | None = None) -> ToySample:
    """The sample ``index`` of the world ``seed`` at ``size`` px (deterministic).

    ``class_name`` overrides the class the index would draw (for demos and tests).
    """
    if size < 16 or size % 8:
        raise ValueError(f"size must be a multiple of 8, at least 16; got {size}")
    rng = np.random.default_rng([seed, index])
    name = class_name or CLASS_NAMES[index % len(CLASS_NAMES)]
    if name not in CLASSES:
        raise ValueError(f"unknown toy class {name!r}; one of {', '.join(CLASS_NAMES)}")
    colour, rgb = pick_colour(rng)
    n = size * SUPERSAMPLE
    radius = n * rng.uniform(0.26, 0.4)
    margin = radius * 1.05
    center = (float(rng.uniform(margin, n - margin)), float(rng.uniform(margin, n - margin)))
    theta = float(rng.uniform(-0.6, 0.6)) if name in ("fur tuft", "hair lock", "feather", "serrated leaf") else float(rng.uniform(0, 2 * math.pi))
    painter = Painter(n)
    CLASSES[name](painter, rng, (center, radius, theta), rgb)
    fg, alpha = painter.downsample(SUPERSAMPLE, rgb)
    canvas, meta = green_canvas(rng, size)
    shadow, shadow_meta = soft_shadow(alpha, rng)
    a8 = np.rint(alpha * 255).astype(np.uint8)
    f8 = np.rint(fg * 255).astype(np.uint8)
    g8 = np.rint(canvas * shadow[..., None] * 255).astype(np.uint8)
    a = a8.astype(np.float64)[..., None] / 255.0
    image = np.rint(a * f8 + (1.0 - a) * g8).astype(np.uint8)
    caption = f"{article(colour)} {colour} {name}"
    meta.update(shadow_meta)
    meta.update({"seed": seed, "index": index, "size": size})
    return ToySample(image=image, fg=f8, alpha=a8, canvas=g8, caption=caption, class_name=name, colour=colour, meta=meta)
