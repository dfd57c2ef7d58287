"""COCO instance annotations of scenes: RLE masks (pycocotools) of each instance's visible alpha at
a threshold, boxes and areas from the mask, categories from the class names; each instance also
names its soft visible alpha (``alpha_file``), the exact label the binary mask is cut from."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def instance_annotation(visible: np.ndarray, threshold: float) -> dict[str, Any] | None:
    """``segmentation`` (compressed RLE, counts as text), ``area``, ``bbox`` of ``visible >=
    threshold``; None when no pixel reaches it."""
    binary = np.asfortranarray(visible >= threshold, dtype=np.uint8)
    if not binary.any():
        return None
    rle = mask_utils.encode(binary)
    rle["counts"] = rle["counts"].decode("ascii")
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {"segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0,
            "soft_area": float(visible.sum())}


def coco_document(scenes: list[dict[str, Any]], description: str) -> dict[str, Any]:
    """The COCO JSON of every scene: ``scenes`` holds {key, width, height, file_name, instances}."""
    names = sorted({inst["class_name"] for sc in scenes for inst in sc["instances"]})
    category = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for image_id, sc in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": sc["file_name"], "width": sc["width"], "height": sc["height"],
                       "key": sc["key"], "label": sc["label"]})
        for inst in sc["instances"]:
            ann = {k: v for k, v in inst.items() if k != "class_name"}
            ann.update({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[inst["class_name"]]})
            annotations.append(ann)
    return {
        "info": {"description": description, "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "object"} for n, i in category.items()],
    }
