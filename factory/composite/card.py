"""The dataset card of a composite folder: README.md (counts by layout, label tier, background
source and licence; how to load it) and ``contact_sheet.png`` (composites beside their alpha)."""

from __future__ import annotations

import tarfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from factory import __version__
from factory.composite.backgrounds import PROCEDURAL, BackgroundSource
from factory.composite.blend import composite
from factory.composite.encode import encode
from factory.composite.generative import public_model
from factory.composite.objects import ObjectSource
from factory.export.card import _font
from factory.feedback import plural
from factory.fsutil import atomic_write_bytes, atomic_write_text, portable_path
from factory.imageio import decode_alpha, decode_rgb, to_rgb8
from factory.manifest import CompositeSettings

CONTACT_SHEET = "contact_sheet.png"
README = "README.md"
#: How many damaged objects the card names (``composite.json`` lists them all).
DAMAGED_LISTED = 20


def public_settings(s: CompositeSettings, out: Path) -> dict[str, Any]:
    """The settings as the files in ``out`` record them: no path of this machine (the backgrounds
    by :func:`portable_path`, the model by :func:`public_model`); every other value as it is."""
    settings = s.model_dump(mode="json")
    if settings["backgrounds"] and settings["backgrounds"] != PROCEDURAL:
        settings["backgrounds"] = portable_path(settings["backgrounds"], out)
    settings["generative"] = public_model(settings["generative"])
    return settings


def _thumb(arr: np.ndarray, tile: int) -> Image.Image:
    """A thumbnail on a white ``tile`` square: a box reduction by an integer factor first (cheap on
    1024-px composites), then bilinear."""
    im = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    factor = max(1, max(im.width, im.height) // tile)
    if factor > 1:
        im = im.reduce(factor)
    scale = tile / max(im.width, im.height)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (tile, tile), (255, 255, 255))
    canvas.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return canvas


def _pair(out: Path, s: CompositeSettings, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(composite, alpha) of one row, read back from what was written."""
    key = row["key"]
    if s.layout == "dim":
        fg, alpha = decode_rgb((out / row["fg"]).read_bytes()), decode_alpha((out / row["alpha"]).read_bytes())
        bg = to_rgb8(Image.open(out / row["bg"])).resize((fg.shape[1], fg.shape[0]))
        return composite(fg, alpha, np.asarray(bg)), alpha
    if s.layout == "scenes":
        masks = [decode_alpha(p.read_bytes()) for p in sorted((out / "masks").glob(f"{key}.*.png"))]
        alpha = np.clip(np.sum(masks, axis=0), 0, 1) if masks else None  # visible alphas add up to the union
        image = decode_rgb((out / row["file"]).read_bytes())
        return image, alpha if alpha is not None else np.zeros(image.shape[:2], np.float32)
    if s.format == "webdataset":
        with tarfile.open(out / row["file"]) as tar:
            image = tar.extractfile(f"{key}.png").read()
            alpha = tar.extractfile(f"{key}.alpha.png").read()
        return decode_rgb(image), decode_alpha(alpha)
    return decode_rgb((out / "im" / f"{key}.png").read_bytes()), decode_alpha((out / "gt" / f"{key}.png").read_bytes())


def contact_sheet(out: Path, s: CompositeSettings, rows: list[dict[str, Any]], count: int = 8, tile: int = 160) -> bytes | None:
    chosen, seen = [], set()
    for r in rows:  # one per class first
        if r["class_name"] not in seen:
            seen.add(r["class_name"])
            chosen.append(r)
    chosen += [r for r in rows if r not in chosen][: max(0, count - len(chosen))]
    chosen = chosen[:count]
    pairs = []
    for r in chosen:
        try:
            pairs.append((r, _pair(out, s, r)))
        except Exception:  # noqa: BLE001 - the sheet shows what it can
            continue
    if not pairs:
        return None
    label_h, gap, cols = 16, 8, 2
    rows_n = (len(pairs) + cols - 1) // cols
    cell_w, cell_h = 2 * tile + gap, tile + label_h + gap
    sheet = Image.new("RGB", (cols * cell_w + gap, rows_n * cell_h + gap), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for i, (r, (image, alpha)) in enumerate(pairs):
        x0, y0 = gap + (i % cols) * cell_w, gap + (i // cols) * cell_h
        for j, im in enumerate([_thumb(image, tile), _thumb(np.repeat(alpha[..., None] * 255.0, 3, axis=2), tile)]):
            sheet.paste(im, (x0 + j * tile, y0 + label_h))
            draw.rectangle([x0 + j * tile, y0 + label_h, x0 + (j + 1) * tile - 1, y0 + label_h + tile - 1], outline=(160, 160, 160))
        draw.text((x0, y0 + 1), f"{r['key']}  {r['class_name']}  {r['label']}"[:48], fill="black", font=font)
    return encode(np.asarray(sheet))


LOADING = {
    "dim": """\
`fg/KEY.png` (foreground), `alpha/KEY.png` (one-channel alpha), `bg/` (backgrounds) and
`pairs.csv` (`fg,alpha,bg,...`: one row per pairing). Nothing is composited: a trimap-based
trainer (ViTMatte, MatteFormer, AEMatter) composites on the fly. See docs/composite.md for a loader.
""",
    "baked": """\
Each composite: `KEY.png`, `KEY.alpha.png`, `KEY.trimap.png` (0/128/255), `KEY.json` (the recipe),
and with `--layers` `KEY.fg.png`, `KEY.bg.png` (`I = round(a F + (1 - a) B)` on every `exact`
sample). Shards `composite-NNNNNN.tar` with `composites.wids.json`, or folders `im/`, `gt/`,
`trimap/`, `recipe/` (BiRefNet/MODNet style).
""",
    "scenes": """\
`images/KEY.png`, one visible alpha per instance `masks/KEY.I.png` (`a_i * prod_{j above i} (1 - a_j)`),
`recipes/KEY.json`, and `annotations.json` (COCO instances: RLE masks of the visible alpha at the
threshold, boxes, areas, categories from the class names, `alpha_file` naming the soft alpha).

```python
from pycocotools.coco import COCO
coco = COCO("annotations.json")
mask = coco.annToMask(coco.loadAnns(coco.getAnnIds())[0])
```
""",
}


def write_card(
    out: Path, s: CompositeSettings, rows: list[dict[str, Any]], objects: ObjectSource,
    backgrounds: BackgroundSource, records: list[dict[str, Any]],
) -> Path:
    sheet = contact_sheet(out, s, rows)
    if sheet is not None:
        atomic_write_bytes(out / CONTACT_SHEET, sheet, fsync=False)
    what = {"dim": "pairing", "baked": "composite", "scenes": "scene"}[s.layout]
    md = [f"# Composites ({s.layout}): {plural(len(rows), what)}\n",
          f"Made by `factory composite` {__version__} on {datetime.now(UTC).isoformat(timespec='seconds')}: generated "
          "objects (foreground and matting-level alpha) pasted into backgrounds.\n", "## Sources\n",
          f"- objects: {objects.described(out)} ({plural(len(objects.refs), 'object')})",
          f"- backgrounds: {backgrounds.described(out)} ({len(backgrounds.refs)} usable"
          + (f", {plural(backgrounds.skipped, 'unreadable file')} skipped" if backgrounds.skipped else "") + ")"]
    if objects.damaged:
        shown = objects.damaged[:DAMAGED_LISTED]
        md.append(f"- skipped {plural(len(objects.damaged), 'damaged object')} (left out before drawing; all in `composite.json`): "
                  + "; ".join(f"`{line}`" for line in shown) + ("; ..." if len(objects.damaged) > len(shown) else ""))
    if backgrounds.kind == "procedural":
        md.append("- **the backgrounds are procedural** (gradients, noise, shapes drawn in code): for demos and tests, not photographs")
    md.append("- settings: " + ", ".join(f"{k}={v}" for k, v in public_settings(s, out).items() if v is not None) + "\n")
    md.append("## Counts\n")
    for title, column in (("label tier", "label"), ("background source", "bg_source"), ("licence", "licence"), ("class", "class_name")):
        counts = Counter(r[column] for r in rows)
        md.append(f"| {title} | {what} |\n|---|---:|")
        md += [f"| {k} | {n} |" for k, n in sorted(counts.items())[:100]]
        md.append("")
    md.append("`exact`: the written image equals `round(a F + (1 - a) B)` of the written alpha, foreground and "
              "background; `approx`: Poisson-blended (no alpha explains its pixels).\n")
    if s.layout == "scenes":
        n_inst = sum(len(sc["instances"]) for rec in records for sc in rec["scenes"])
        md.append(f"{n_inst} annotated instances in `annotations.json`.\n")
    if sheet is not None:
        md += ["## Samples\n", "Each pair: the composite and its alpha.\n", f"![contact sheet]({CONTACT_SHEET})\n"]
    md += ["## Layout and loading\n", LOADING[s.layout]]
    atomic_write_text(out / README, "\n".join(md).rstrip() + "\n")
    return out / README
