"""The dataset card's YAML header: what the Hugging Face Hub and ``datasets`` read from README.md.

License (the manifest's ``export.license``, else the one the model implies), task categories,
size category, tags, the data files of each split (``configs``) and the declared column types
(``dataset_info.features``, from :func:`factory.export.schema.hf_features`), so that
``datasets.load_dataset(EXPORT_FOLDER)`` loads typed columns without guessing.
"""

from __future__ import annotations

from typing import Any

import yaml

#: The Stable Diffusion 1.x licence (CreativeML OpenRAIL-M), which every model the sampler loads
#: from weights (a hub id, a diffusers folder, a single file, a DiffuMatting checkpoint) carries.
SD_LICENSE = "creativeml-openrail-m"
_SD_KINDS = ("hub", "diffusers", "single_file", "diffumatting")

TASK_CATEGORIES = ["image-segmentation", "text-to-image"]
TAGS = ["image-matting", "alpha-matting", "synthetic", "machine-generated", "green-screen", "diffumatting"]

#: ``datasets``' size categories (datasets/utils/resources/size_categories.json), upper bounds.
_SIZES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]


def size_category(n: int) -> str:
    for bound, name in _SIZES:
        if n < bound:
            return name
    return "1B<n<10B"


def dataset_license(manifest_license: str | None, model_identity: str | None) -> tuple[str, str]:
    """(Hub licence id, where it comes from): the manifest's ``export.license`` wins; a Stable
    Diffusion model gives its licence; anything else (the random test model) is ``other``."""
    if manifest_license:
        return manifest_license, "the manifest's export.license"
    kind = (model_identity or "").partition(":")[0]
    if kind in _SD_KINDS:
        return SD_LICENSE, "the Stable Diffusion 1.5 model it was generated with (CreativeML OpenRAIL-M)"
    return "other", "no licence known for this model: set export.license in the manifest"


def front_matter(
    *,
    pretty_name: str,
    license: str,
    splits: dict[str, int],
    data_files: dict[str, str],
    features: list[dict[str, Any]],
) -> str:
    """The ``---`` YAML block: ``splits`` maps each non-empty split to its sample count and
    ``data_files`` to its file pattern."""
    total = sum(splits.values())
    header: dict[str, Any] = {
        "pretty_name": pretty_name,
        "license": license,
        "task_categories": TASK_CATEGORIES,
        "annotations_creators": ["machine-generated"],
        "source_datasets": ["original"],
        "size_categories": [size_category(total)],
        "tags": TAGS,
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": data_files[name]} for name in splits],
            }
        ],
        "dataset_info": {
            "features": features,
            "splits": [{"name": name, "num_examples": n} for name, n in splits.items()],
        },
    }
    body = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return f"---\n{body}---\n"
