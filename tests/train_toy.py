"""A toy matting set made in code: coloured shapes with soft edges, for the training tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from factory.imageio import encode_alpha_png, encode_png

SHAPES = ("disc", "square", "ring")
COLOURS = {"red": (220, 40, 30), "blue": (30, 60, 220), "yellow": (230, 210, 40), "white": (240, 240, 240)}


def toy_sample(i: int, size: int = 64, background: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(image on a background, alpha, foreground, class name) of sample ``i``: a soft-edged shape."""
    rng = np.random.default_rng(i)
    shape = SHAPES[i % len(SHAPES)]
    name, colour = list(COLOURS.items())[i % len(COLOURS)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    soft = rng.uniform(1.0, 3.0)
    if shape == "disc":
        d = np.hypot(yy - cy, xx - cx) - r
    elif shape == "square":
        d = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) - r
    else:
        d = np.abs(np.hypot(yy - cy, xx - cx) - r) - r * 0.35
    alpha = np.clip(0.5 - d / (2 * soft), 0.0, 1.0).astype(np.float32)
    shade = 0.8 + 0.2 * (yy / size)
    fg = np.clip(np.array(colour, np.float32)[None, None] * shade[..., None], 0, 255)
    bg = np.array(background if background is not None else rng.integers(0, 256, 3), np.float32)
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg[None, None]
    return image.round().astype(np.uint8), alpha, fg.round().astype(np.uint8), f"{name} {shape}"


def make_toy_folder(root: Path, n: int = 8, size: int = 64, layout: str = "paired", fg: bool = True) -> Path:
    """``paired``: image/ alpha/ fg/ + metadata.jsonl; ``flat``: KEY.png KEY.alpha.png KEY.fg.png KEY.json."""
    root.mkdir(parents=True, exist_ok=True)
    meta = []
    for i in range(n):
        image, alpha, fore, cls = toy_sample(i, size)
        key = f"toy-{i:03d}"
        if layout == "paired":
            for sub in ("image", "alpha", *(("fg",) if fg else ())):
                (root / sub).mkdir(exist_ok=True)
            (root / "image" / f"{key}.png").write_bytes(encode_png(image))
            (root / "alpha" / f"{key}.png").write_bytes(encode_alpha_png(alpha))
            if fg:
                (root / "fg" / f"{key}.png").write_bytes(encode_png(fore))
            meta.append({"file_name": f"image/{key}.png", "key": key, "class_name": cls})
        else:
            (root / f"{key}.png").write_bytes(encode_png(image))
            (root / f"{key}.alpha.png").write_bytes(encode_alpha_png(alpha))
            if fg:
                (root / f"{key}.fg.png").write_bytes(encode_png(fore))
            (root / f"{key}.json").write_text(json.dumps({"prompt": f"a {cls} on a plain green background", "class_name": cls}))
    if layout == "paired":
        (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return root


def make_toy_shards(root: Path, n: int = 6, per_shard: int = 4, size: int = 64) -> list[Path]:
    """WebDataset shards as `factory export` writes them (KEY.png, KEY.alpha.png, KEY.fg.png, KEY.json)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n, per_shard):
        path = root / f"train-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                image, alpha, fore, cls = toy_sample(i, size, background=(0, 255, 0))
                key = f"shard-{i:05d}"
                members = {
                    f"{key}.png": encode_png(image),
                    f"{key}.alpha.png": encode_alpha_png(alpha),
                    f"{key}.fg.png": encode_png(fore),
                    f"{key}.json": json.dumps({"prompt": f"a {cls}, isolated on a pure green background", "class_name": cls}).encode(),
                }
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards

