"""What an exported sample's metadata holds, in one fixed shape, and its types.

The same fields go into the WebDataset ``KEY.json`` member, the folder format's
``metadata.jsonl`` and ``samples.parquet``, and the dataset card declares their types for HF
``datasets`` (:func:`hf_features`), so a loader gets typed columns instead of guessing:

- ``attributes`` is an object (a struct in Parquet and in ``datasets``) with every attribute key of
  the export's rows (a key a row lacks is null), never JSON text;
- ``phash`` is everywhere the 16-hex-digit string ``imagehash`` prints (the index keeps a signed
  int64 for the dedup search; :func:`phash_hex` is the one conversion);
- ``model`` is the run's model identity with local folders reduced to their names
  (:func:`public_model`), so no exported file holds a path of the machine that made it.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

#: An absolute local path inside a model identity (``diffusers:/models/sd15#fp``,
#: ``+lora:/x/y.safetensors@0.8#fp``): up to the fingerprint, scale, a space or a bracket.
_LOCAL_PATH = re.compile(r"(?<=[:=])(?:/|~/)[^#@\s()]*")


def public_model(identity: str | None) -> str | None:
    """A model identity with every local path reduced to its last component."""
    if identity is None:
        return None
    return _LOCAL_PATH.sub(lambda m: PurePosixPath(m.group()).name or m.group(), identity)


def phash_hex(value: int | None) -> str | None:
    """The index's signed int64 perceptual hash as imagehash's 16 hex digits."""
    return None if value is None else f"{value & ((1 << 64) - 1):016x}"


def attribute_keys(table: pa.Table) -> list[str]:
    """Every attribute key of the rows' ``attributes`` (JSON text in the index), sorted."""
    keys: set[str] = set()
    for text in pc.unique(table["attributes"]).to_pylist():
        if text:
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                keys.update(str(k) for k in value)
    return sorted(keys)


def attributes_of(rec: dict[str, Any], keys: list[str]) -> dict[str, str | None]:
    """The row's attributes as an object with exactly ``keys`` (missing ones null)."""
    value = rec.get("attributes")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = {}
    value = value if isinstance(value, dict) else {}
    return {k: None if value.get(k) is None else str(value[k]) for k in keys}


# ------------------------------------------------------------------------- HF datasets features


def _value(dtype: str) -> dict[str, str]:
    return {"dtype": dtype}


def _struct(fields: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return {"struct": [{"name": name, **feature} for name, feature in fields]}


def attributes_feature(keys: list[str]) -> dict[str, Any]:
    return _struct([(k, _value("string")) for k in keys])


SCORES_FIELDS: list[tuple[str, str]] = [
    ("gsg", "float64"),
    ("gsg_distance", "float64"),
    ("bg_uniformity", "float64"),
    ("canvas_color", "string"),
    ("alpha_coverage", "float64"),
    ("touches_border", "bool"),
    ("contains_key_color", "bool"),
    ("phash", "string"),
]


def sample_json_feature(keys: list[str]) -> dict[str, Any]:
    """The ``datasets`` type of the WebDataset ``.json`` member (:func:`members.sample_json`)."""
    return _struct(
        [
            ("alpha_bits", _value("int64")),
            ("alpha_source", _value("string")),
            ("attributes", attributes_feature(keys)),
            ("category", _value("string")),
            ("class_name", _value("string")),
            ("export", _struct([(n, _value(t)) for n, t in (("alpha_copied", "bool"), ("factory_version", "string"),
                                                           ("image_copied", "bool"), ("image_format", "string"),
                                                           ("split", "string"))])),
            ("file_bytes", _struct([(n, _value("int64")) for n in ("alpha", "fg", "image")])),
            ("index", _value("int64")),
            ("key", _value("string")),
            ("model", _value("string")),
            ("negative_prompt", _value("string")),
            ("prompt", _value("string")),
            ("sampler", _struct([(n, _value(t)) for n, t in (("guidance", "float64"), ("height", "int64"),
                                                            ("scheduler", "string"), ("steps", "int64"),
                                                            ("width", "int64"))])),
            ("scores", _struct([(n, _value(t)) for n, t in SCORES_FIELDS])),
            ("seed", _value("int64")),
            ("size", _struct([(n, _value("int64")) for n in ("height", "width")])),
        ]
    )


#: The folder format's ``metadata.jsonl`` columns after the three image columns, with their types.
FOLDER_COLUMNS: list[tuple[str, str]] = [
    ("key", "string"),
    ("index", "int64"),
    ("class_name", "string"),
    ("category", "string"),
    ("prompt", "string"),
    ("negative_prompt", "string"),
    ("seed", "int64"),
    ("attributes", "struct"),
    ("model", "string"),
    ("width", "int64"),
    ("height", "int64"),
    ("alpha_bits", "int64"),
    *SCORES_FIELDS,
]


def hf_features(fmt: str, image_ext: str, keys: list[str]) -> list[dict[str, Any]]:
    """The ``dataset_info.features`` list of the card's YAML header for an export of ``fmt``."""
    if fmt == "webdataset":
        fields: list[tuple[str, dict[str, Any]]] = [
            (image_ext, _value("image")),
            ("alpha.png", _value("image")),
            ("fg.png", _value("image")),
            ("json", sample_json_feature(keys)),
            ("txt", _value("string")),  # the caption
            ("__key__", _value("string")),
            ("__url__", _value("string")),
        ]
    else:
        fields = [("image", _value("image")), ("alpha", _value("image")), ("fg", _value("image"))]
        fields += [(name, attributes_feature(keys) if dtype == "struct" else _value(dtype)) for name, dtype in FOLDER_COLUMNS]
    return [{"name": name, **feature} for name, feature in fields]
