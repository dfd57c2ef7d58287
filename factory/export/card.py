"""The dataset card written beside every export: README.md, a GSG histogram and a contact sheet.

Both pictures are drawn with Pillow (no plotting library): ``gsg_histogram.png`` (20 bins over
0..1, one colour per split, stacked) and ``contact_sheet.png`` (for a few samples spread over the
classes: the image on green, the alpha matte, and the foreground composited over a checkerboard).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from factory import __version__
from factory.export.header import dataset_license, front_matter
from factory.export.schema import hf_features, public_model
from factory.feedback import human_bytes, plural
from factory.imageio import decode_alpha, decode_rgb
from factory.manifest import Manifest
from factory.fsutil import atomic_write_bytes, atomic_write_text
from factory.store import RunStore

HISTOGRAM = "gsg_histogram.png"
CONTACT_SHEET = "contact_sheet.png"
README = "README.md"
_COLOURS = [(46, 110, 190), (230, 130, 40), (70, 160, 80), (180, 60, 150), (120, 120, 120)]


@dataclass
class CardInfo:
    format: str
    out: Path
    store: RunStore
    manifest: Manifest
    settings: dict[str, Any]
    source: str
    selection_meta: dict[str, Any] | None
    splits: dict[str, dict[str, Any]]  # split -> {samples, shards, bytes}
    per_class: dict[str, dict[str, int]]  # class -> split -> count
    gsg: dict[str, np.ndarray]  # split -> GSG values
    sheet_rows: list[dict[str, Any]]  # index rows of the samples to show
    problems: list[str] = field(default_factory=list)
    loading: str = ""
    attribute_keys: list[str] = field(default_factory=list)  # the exported attributes struct's fields
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))  # matte confidence of the exported samples
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> samples, from the index


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def histogram_png(values_by_split: dict[str, np.ndarray], bins: int = 20, size: tuple[int, int] = (720, 360)) -> bytes:
    """A stacked histogram of GSG over [0, 1]."""
    width, height = size
    left, right, top, bottom = 60, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = {
        name: np.histogram(np.clip(np.asarray(v, np.float64), 0.0, 1.0), bins=edges)[0] for name, v in values_by_split.items()
    }
    total = sum(counts.values()) if counts else np.zeros(bins, np.int64)
    peak = max(1, int(np.max(total)) if np.size(total) else 1)
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / bins
    for b in range(bins):
        y0 = top + plot_h
        for i, name in enumerate(counts):
            h = counts[name][b] / peak * plot_h
            if h > 0:
                x0 = left + b * bar_w + 1
                draw.rectangle([x0, y0 - h, x0 + bar_w - 2, y0], fill=_COLOURS[i % len(_COLOURS)])
                y0 -= h
    draw.line([left, top, left, top + plot_h, left + plot_w, top + plot_h], fill="black")
    for t in range(6):
        x = left + plot_w * t / 5
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        draw.text((x - 8, top + plot_h + 6), f"{t / 5:.1f}", fill="black", font=small)
    for t in range(5):
        y = top + plot_h - plot_h * t / 4
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{round(peak * t / 4)}", fill="black", font=small)
    n = int(np.sum(total)) if np.size(total) else 0
    draw.text((left, 10), f"GSG of {n} exported samples", fill="black", font=font)
    draw.text((left + plot_w / 2 - 30, height - 22), "GSG score", fill="black", font=small)
    x = left + plot_w - 10
    for i, name in reversed(list(enumerate(counts))):
        label = f"{name} ({int(np.sum(counts[name]))})"
        x -= 16 + draw.textlength(label, font=small)
        draw.rectangle([x, 14, x + 10, 24], fill=_COLOURS[i % len(_COLOURS)])
        draw.text((x + 14, 12), label, fill="black", font=small)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def checkerboard(height: int, width: int, cell: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    light = ((yy // cell + xx // cell) % 2 == 0)[..., None]
    return np.where(light, 204, 153).astype(np.float32) * np.ones(3, np.float32)


def _thumb(arr: np.ndarray, tile: int) -> Image.Image:
    im = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    scale = tile / max(im.width, im.height)
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.resize(size, resample, reducing_gap=2.0 if scale < 1 else None)
    canvas = Image.new("RGB", (tile, tile), (255, 255, 255))
    canvas.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return canvas


def contact_sheet_png(store: RunStore, rows: list[dict[str, Any]], tile: int = 128, columns: int = 2) -> bytes | None:
    """Image | alpha | foreground over a checkerboard, for each row (unreadable samples are skipped).

    Thumbnails are made first and composited at thumbnail size (cheap at any resolution).
    """
    triples = []
    board = checkerboard(tile, tile)
    for rec in rows:
        try:
            rgb = decode_rgb(store.sample_path(rec["index"], rec["key"], ".png").read_bytes())
            alpha = decode_alpha(store.sample_path(rec["index"], rec["key"], ".alpha.png").read_bytes())
            fg = decode_rgb(store.sample_path(rec["index"], rec["key"], ".fg.png").read_bytes())
        except Exception:  # noqa: BLE001 - the sheet shows what it can
            continue
        if alpha.shape != fg.shape[:2]:
            continue
        a_tile = np.asarray(_thumb(np.repeat(alpha[..., None] * 255.0, 3, axis=2), tile), np.float32)[..., :1] / 255.0
        f_tile = np.asarray(_thumb(fg, tile), np.float32)
        comp = f_tile * a_tile + board * (1.0 - a_tile)
        triples.append((rec, [_thumb(rgb, tile), _thumb(alpha * 255.0, tile), Image.fromarray(comp.round().astype(np.uint8))]))
    if not triples:
        return None
    label_h, gap = 16, 8
    cols = min(columns, len(triples))
    rows_n = (len(triples) + cols - 1) // cols
    cell_w, cell_h = 3 * tile + gap, tile + label_h + gap
    sheet = Image.new("RGB", (cols * cell_w + gap, rows_n * cell_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for i, (rec, tiles) in enumerate(triples):
        x0, y0 = gap + (i % cols) * cell_w, gap + (i // cols) * cell_h
        for j, im in enumerate(tiles):
            sheet.paste(im, (x0 + j * tile, y0 + label_h))
            box = [x0 + j * tile, y0 + label_h, x0 + (j + 1) * tile - 1, y0 + label_h + tile - 1]
            draw.rectangle(box, outline=(160, 160, 160))  # a white matte stays visible on white
        label = f"{rec['class_name']}  GSG {rec['gsg']:.2f}" if rec.get("gsg") is not None else str(rec["class_name"])
        draw.text((x0, y0 + 1), label[:60], fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def pick_sheet_rows(records: list[dict[str, Any]], count: int = 8) -> list[dict[str, Any]]:
    """Up to ``count`` samples, one per class first (classes in order of first appearance)."""
    chosen, seen = [], set()
    for rec in records:
        if rec["class_name"] not in seen:
            seen.add(rec["class_name"])
            chosen.append(rec)
            if len(chosen) == count:
                return chosen
    for rec in records:
        if len(chosen) == count:
            break
        if rec not in chosen:
            chosen.append(rec)
    return chosen


_mb = human_bytes


def _license(info: CardInfo) -> tuple[str, str]:
    return dataset_license(info.settings.get("license"), info.store.info.get("model"))


def _front_matter(info: CardInfo) -> str:
    splits = {name: s["samples"] for name, s in info.splits.items() if s["samples"]}
    files = {name: f"{name}-*.tar" if info.format == "webdataset" else f"{name}/**" for name in splits}
    features = hf_features(info.format, info.settings["image_format"], info.attribute_keys)
    pretty = f"{info.manifest.name}: synthetic image-matting dataset"
    return front_matter(pretty_name=pretty, license=_license(info)[0], splits=splits, data_files=files, features=features) + "\n"


def _sizes(sizes: dict[str, int]) -> str:
    if len(sizes) == 1:
        return f"{next(iter(sizes))} pixels (every sample)"
    return ", ".join(f"{size} ({n})" for size, n in sorted(sizes.items(), key=lambda kv: -kv[1]))


def write_card(info: CardInfo) -> Path:
    """Write README.md, gsg_histogram.png and contact_sheet.png into the export folder."""
    out = info.out
    atomic_write_bytes(out / HISTOGRAM, histogram_png(info.gsg), fsync=False)
    sheet = contact_sheet_png(info.store, info.sheet_rows)
    if sheet is not None:
        atomic_write_bytes(out / CONTACT_SHEET, sheet, fsync=False)
    run = info.store.info
    manifest = info.manifest
    total = sum(s["samples"] for s in info.splits.values())
    md: list[str] = [_front_matter(info)]
    md.append(f"# {run.get('manifest')}: image-matting dataset ({info.format})\n")
    md.append(
        f"{plural(total, 'sample')} made by `factory` {__version__} with the DiffuMatting method: "
        "Stable Diffusion draws each object on a green canvas, GreenPost turns it into a matting-level alpha, "
        f"GSG scores the canvas. Exported {datetime.now(UTC).isoformat(timespec='seconds')}.\n"
    )
    md.append("## Contents\n")
    unit = "shards" if info.format == "webdataset" else "files"
    md.append(f"| split | samples | {unit} | size |\n|---|---:|---:|---:|")
    for name, s in info.splits.items():
        count = s.get("shards", s["samples"] * 3)
        md.append(f"| {name} | {s['samples']} | {count} | {_mb(s['bytes'])} |")
    md.append(f"| **all** | **{total}** | | **{_mb(sum(s['bytes'] for s in info.splits.values()))}** |\n")
    md.append("### Samples per class\n")
    names = list(info.splits)
    md.append("| class | " + " | ".join(names) + " | total |\n|---|" + "---:|" * (len(names) + 1))
    classes = sorted(info.per_class)
    for cls in classes[:200]:
        counts = info.per_class[cls]
        md.append(f"| {cls} | " + " | ".join(str(counts.get(n, 0)) for n in names) + f" | {sum(counts.values())} |")
    if len(classes) > 200:
        md.append(f"\n... and {len(classes) - 200} more classes (see samples.parquet).")
    md.append("")
    md.append("## Source\n")
    md.append(f"- run: `{info.store.root.name}` (made {run.get('created')})")
    md.append(f"- manifest: `{run.get('manifest')}`, fingerprint `{run.get('fingerprint')}`"
              + (f": {manifest.description}" if manifest.description else ""))
    md.append(f"- model: `{public_model(run.get('model'))}`")
    s = manifest.sampler
    md.append(f"- sampler: {s.scheduler}, {plural(s.steps, 'step')}, guidance {s.guidance}; canvas colour {tuple(manifest.canvas.color)}")
    if info.image_sizes:
        md.append(f"- image size: {_sizes(info.image_sizes)}")
    license_id, license_why = _license(info)
    md.append(f"- license: `{license_id}`, from {license_why}")
    md.append(f"- samples: {info.source}")
    sel = info.selection_meta
    if sel:
        params = sel.get("params", {})
        md.append(f"- filter (`factory filter --name {sel.get('name')}`, {sel.get('created')}): "
                  + ", ".join(f"{k}={v}" for k, v in params.items()))
        dropped = {k: v for k, v in (sel.get("dropped") or {}).items() if v}
        md.append(f"  kept {sel.get('kept')} of {(sel.get('status') or {}).get('done')} done samples"
                  + ("; dropped: " + ", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else ""))
    else:
        md.append("- filter: none (every done sample)")
    st = info.settings
    md.append(f"- export: image {st['image_format']}, alpha {st['alpha_bits']}-bit, split "
              + (", ".join(f"{k}={v}" for k, v in st["split"].items()) or "none")
              + f" by class, shuffle seed {st['shuffle_seed']}"
              + (f", at most {plural(st['maxcount'], 'sample')} / {_mb(st['maxsize'])} per shard" if info.format == "webdataset" else ""))
    if info.problems:
        md.append(f"- skipped {plural(len(info.problems), 'damaged sample')} (listed in stats.json)")
    md.append("")
    md.append("## Quality\n")
    md.append(f"![GSG histogram]({HISTOGRAM})\n")
    all_gsg = np.concatenate([v for v in info.gsg.values() if v.size]) if any(v.size for v in info.gsg.values()) else np.zeros(0)
    if all_gsg.size:
        q = np.quantile(all_gsg, [0.0, 0.5, 1.0])
        md.append(f"GSG: min {q[0]:.3f}, median {q[1]:.3f}, max {q[2]:.3f}.\n")
    md.extend(confidence_lines(info.confidence))
    if sheet is not None:
        md.append("## Samples\n")
        md.append("Each triple: image on green, alpha matte, foreground over a checkerboard.\n")
        md.append(f"![contact sheet]({CONTACT_SHEET})\n")
    md.append("## Layout and loading\n")
    md.append(info.loading)
    text = "\n".join(md).rstrip() + "\n"
    atomic_write_text(out / README, text)
    return out / README


WEBDATASET_LOADING = """\
Shards `SPLIT-NNNNNN.tar`; each sample has `KEY.IMAGE_EXT` (the image on green), `KEY.alpha.png`
(one channel, 8 or 16 bits), `KEY.fg.png` (decontaminated foreground), `KEY.json` (prompt,
class, attributes, seed, scores, model, sizes, split) and `KEY.txt` (the caption: the prompt). `SPLIT.wids.json` is a `wids-shard-index-v1`
index; `samples.parquet` lists every sample with its shard; `stats.json` has the counts.

```python
import io
import webdataset as wds
from PIL import Image

def one_channel(data):  # keep the matte single-channel; a generic "pil" decoder makes it RGB
    return Image.open(io.BytesIO(data))

ds = (wds.WebDataset("train-{000000..LAST}.tar", shardshuffle=False)
      .decode(wds.handle_extension("alpha.png", one_channel), "pil")
      .to_tuple("IMAGE_EXT", "alpha.png", "fg.png", "txt", "json"))
```

With HF `datasets` (the column types are declared in this card's header):

```python
from datasets import load_dataset
ds = load_dataset("THIS_FOLDER")  # columns IMAGE_EXT, alpha.png, fg.png (images), json (a struct), txt
```
"""


def webdataset_loading(image_ext: str, last_train_shard: int) -> str:
    return WEBDATASET_LOADING.replace("IMAGE_EXT", image_ext).replace("LAST", f"{max(last_train_shard, 0):06d}")


FOLDER_LOADING = """\
`{split}/image/KEY.png` (or `.jpg`), `{split}/alpha/KEY.png`, `{split}/fg/KEY.png` and
`{split}/metadata.jsonl` (one line per sample: `file_name`, `alpha_file_name`, `fg_file_name`,
key, class, prompt, seed, attributes (an object), model, scores, phash). `samples.parquet` lists every
sample; `stats.json` has the counts.

```python
from datasets import load_dataset
ds = load_dataset("THIS_FOLDER")  # typed as this card's header declares: image, alpha, fg + metadata
```
"""




def confidence_lines(values: np.ndarray) -> list[str]:
    """The matte confidence of the exported samples (docs/matting.md, "Matte confidence"): its
    quantiles and a 10-bin count table over 0..1. Nothing for a run made before it was recorded."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return []
    q = np.quantile(v, [0.0, 0.1, 0.5, 1.0])
    counts = np.histogram(np.clip(v, 0.0, 1.0), bins=10, range=(0.0, 1.0))[0]
    return [
        f"Matte confidence (1: the matte explains the image; see the factory's docs/matting.md): min {q[0]:.3f}, "
        f"10th percentile {q[1]:.3f}, median {q[2]:.3f}, max {q[3]:.3f}; {int((v < 0.5).sum())} of {v.size} below 0.5.\n",
        "| confidence | " + " | ".join(f"{b / 10:.1f}-{(b + 1) / 10:.1f}" for b in range(10)) + " |",
        "|---|" + "---:|" * 10,
        "| samples | " + " | ".join(str(int(c)) for c in counts) + " |\n",
    ]


def stats_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
