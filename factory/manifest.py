"""Manifests: what to draw, how, and the defaults for filtering and export.

A manifest is a YAML file validated by the pydantic models below. Relative paths inside it
(class lists, axis files, template files, ControlNet images) are resolved against the manifest's
own folder. ``load_manifest`` returns a :class:`Manifest` whose prompt sources are already read,
so that the rest of the pipeline never touches the YAML or the prompt files again, and so that
the run store can keep an exact, self-contained copy of the manifest as run (``resolved_dict``).

Errors are raised as one-line :class:`~factory.errors.InputError` naming the file, the key and
what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.errors import InputError

#: Pure green: the reference canvas colour when a manifest names none.
DEFAULT_CANVAS_COLOR = (0, 255, 0)

#: Template slots filled by the plan itself rather than by ``slots:`` or a prompt source.
BUILTIN_SLOTS = frozenset({"a", "phrase", "class_name", "category"})

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
#: A sample file's temporary name is ``.tmp-<name>-<8 digits>-<slug of 40 at most>.alpha.png.<pid>.<8
#: hex>``: about 90 bytes beside the name, and file names are limited to 255 bytes.
MAX_NAME_CHARS = 150


def _not_blank(value: str) -> str:
    """Text that goes into every prompt: all whitespace would leave a hole there (a blank class name
    reads "an on green": the article takes the next word)."""
    if value and not value.strip():
        raise ValueError("is blank")
    return value


#: Prompt text that may be empty but not all whitespace.
PromptText = Annotated[str, AfterValidator(_not_blank)]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectClass(_Strict):
    """One object class of a class-list manifest."""

    class_name: PromptText = Field(min_length=1)
    category: str = "object"
    phrase: PromptText = ""  # how the class reads in a prompt; empty means class_name

    @property
    def prompt_phrase(self) -> str:
        return self.phrase or self.class_name


class GridSource(_Strict):
    """A demographic grid: the cartesian product of ``cells`` axes, plus ``extra`` axes drawn per row."""

    axes: dict[str, list[str]]
    cells: list[str] = Field(min_length=1)
    extra: list[str] = []

    @model_validator(mode="after")
    def _check_axes(self) -> GridSource:
        for name in [*self.cells, *self.extra]:
            if name not in self.axes:
                raise ValueError(f"axis '{name}' is not defined under axes")
        for name, values in self.axes.items():
            if not values:
                raise ValueError(f"axis '{name}' has no values")
            if len(set(values)) != len(values):
                raise ValueError(f"axis '{name}' has duplicate values")
        if len(set(self.cells) | set(self.extra)) != len(self.cells) + len(self.extra):
            raise ValueError("an axis is listed twice in cells/extra")
        return self

    @property
    def n_cells(self) -> int:
        n = 1
        for name in self.cells:
            n *= len(self.axes[name])
        return n


class PromptSource(_Strict):
    """Either a class list or a grid, plus templates and slot values."""

    classes: list[ObjectClass] | None = None
    grid: GridSource | None = None
    templates: list[Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]] = Field(min_length=1)
    slots: dict[str, list[str]] = {}

    @model_validator(mode="after")
    def _check(self) -> PromptSource:
        if (self.classes is None) == (self.grid is None):
            raise ValueError("give exactly one of 'classes' or 'grid'")
        if self.classes is not None:
            if not self.classes:
                raise ValueError("the class list is empty")
            seen: set[str] = set()
            for cls in self.classes:
                name = cls.class_name.strip().lower()
                if name in seen:
                    raise ValueError(f"duplicate class '{cls.class_name}'")
                seen.add(name)
        for name, values in self.slots.items():
            if not values:
                raise ValueError(f"slot '{name}' has no values")
        provided = set(BUILTIN_SLOTS) | set(self.slots)
        if self.grid is not None:
            provided |= set(self.grid.axes)
        for template in self.templates:
            for slot in template_slots(template):
                if slot not in provided:
                    raise ValueError(f"template slot '{{{slot}}}' has no values (template: {template!r})")
        return self


class LoraSpec(_Strict):
    path: str
    scale: float = 1.0


class ControlNetSpec(_Strict):
    """A ControlNet and its per-row conditioning images, assigned to rows in turn."""

    model: str
    images: list[str] = Field(min_length=1)
    scale: float = 1.0


class ModelSpec(_Strict):
    """Where the weights come from. ``source``: ``tiny``, a local folder or file, or a hub id."""

    source: str = "tiny"
    loras: list[LoraSpec] = []
    controlnet: ControlNetSpec | None = None
    allow_pickle: bool = False
    safety_checker: bool = False


class SamplerSettings(_Strict):
    steps: int = Field(30, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0.0, le=50.0)
    width: int = Field(512, ge=8, le=4096)
    height: int = Field(512, ge=8, le=4096)
    scheduler: Literal["dpmpp", "ddim", "euler", "euler_a", "pndm", "unipc"] = "dpmpp"
    batch_size: int | None = Field(None, ge=1)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


class CanvasSettings(_Strict):
    """The green canvas: its reference colour (for GSG and GreenPost) and the optional noise shift."""

    color: tuple[int, int, int] = DEFAULT_CANVAS_COLOR
    noise_shift: float = Field(0.0, ge=0.0, le=1.0)  # TKG-DM style initial-noise shift strength
    token: str = "green"  # the prompt word whose cross-attention marks the background

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError("colour components must be 0..255")
        return v


class FilterSettings(_Strict):
    """What ``factory filter`` keeps (docs/filter-export.md). The one source of defaults and limits:
    the manifest's ``filter:`` section and the command's options are both validated here."""

    min_gsg: float = Field(0.8, ge=0.0, le=1.0)
    min_coverage: float = Field(0.01, ge=0.0, le=1.0)
    max_coverage: float = Field(0.95, ge=0.0, le=1.0)
    drop_border: bool = False
    drop_key_color: bool = True
    drop_no_board: bool = True  # drop samples where GreenPost found no green board
    # Matte confidence (docs/matting.md): the recomposition residual over the band, 8-bit levels
    # (None: not tested), and the overall confidence (0: not tested).
    max_residual: float | None = Field(12.0, ge=0.0)
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    dedup_distance: int = Field(4, ge=-1, le=64)  # perceptual-hash Hamming distance; -1 disables
    per_class_cap: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _coverage_range(self) -> FilterSettings:
        if self.min_coverage > self.max_coverage:
            raise ValueError(
                f"min_coverage {self.min_coverage:g} is above max_coverage {self.max_coverage:g}; nothing could pass"
            )
        return self


#: The split every sample not held out goes to.
TRAIN_SPLIT = "train"
_SPLIT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class ExportSettings(_Strict):
    """How ``factory export`` writes (docs/filter-export.md): the manifest's ``export:`` section,
    and the command's options validated by the same fields."""

    format: Literal["webdataset", "folder"] = "webdataset"
    image_format: Literal["png", "jpg"] = "png"
    alpha_bits: Literal[8, 16] = 8
    maxcount: int = Field(1000, ge=1)
    maxsize: int = Field(1_000_000_000, ge=1)
    split: dict[str, float] = {"val": 0.05}  # held-out splits by fraction; train is the remainder
    shuffle_seed: int = 0
    jpeg_quality: int = Field(95, ge=1, le=100)  # with image_format jpg
    #: The dataset card's licence (a Hub licence id such as cc-by-4.0); default: the model's.
    license: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.+-]*$")

    @field_validator("image_format", mode="before")
    @classmethod
    def _jpeg_alias(cls, v: Any) -> Any:
        return "jpg" if isinstance(v, str) and v.lower() == "jpeg" else (v.lower() if isinstance(v, str) else v)

    @field_validator("split")
    @classmethod
    def _splits(cls, splits: dict[str, float]) -> dict[str, float]:
        for name, frac in splits.items():
            if name == TRAIN_SPLIT:
                raise ValueError("'train' is the remainder; give only the held-out splits, e.g. val=0.05")
            if not _SPLIT_NAME_RE.match(name):
                raise ValueError(f"split name {name!r}: lowercase letters, digits or '_'")
            if not 0.0 < frac < 1.0:
                raise ValueError(f"{name}={frac:g}: the fraction must be between 0 and 1")
        if sum(splits.values()) >= 1.0:
            raise ValueError(f"the fractions add up to {sum(splits.values()):g}; leave some for train")
        return splits

    @property
    def image_ext(self) -> str:
        return self.image_format

    def split_order(self) -> list[str]:
        return [TRAIN_SPLIT, *self.split]


def _ordered_pair(name: str, pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} range {pair[0]:g},{pair[1]:g} is out of order (give LOW,HIGH)")
    return pair


class CompositeSettings(_Strict):
    """How ``factory composite`` pastes objects into scenes (docs/composite.md): the manifest's
    ``composite:`` section, and the command's options validated by the same fields."""

    layout: Literal["dim", "baked", "scenes"] = "baked"
    backgrounds: str | None = None  # a folder, WebDataset shards, or "procedural"
    per_object: int = Field(4, ge=1, le=10_000)  # composites (or pairings) per object
    size: int | None = Field(512, ge=16, le=8192)  # square output side; None: the background's size
    format: Literal["webdataset", "folder"] = "webdataset"  # baked: shards, or im/ + gt/ folders
    maxcount: int = Field(1000, ge=1)  # composites per shard (baked) and per committed part
    alpha_bits: Literal[8, 16] = 8
    layers: bool = False  # baked: also write the placed foreground and background
    scale: tuple[float, float] = (0.35, 0.8)  # object's longer side / background's shorter side
    rotation: float = Field(0.0, ge=0.0, le=180.0)  # degrees, drawn in [-rotation, rotation]
    flip: float = Field(0.5, ge=0.0, le=1.0)  # probability of a horizontal flip
    truncation: float = Field(0.0, ge=0.0, lt=1.0)  # largest fraction of the object left outside
    min_visible: float = Field(0.3, ge=0.0, le=1.0)  # scenes: an instance shows at least this much
    min_size: int = Field(16, ge=1)  # the placed object's longer side, pixels
    objects: tuple[int, int] = (2, 4)  # scenes: objects per scene
    blend: list[Literal["none", "gaussian", "motion", "poisson"]] = ["none", "gaussian", "motion"]
    mix: float = Field(0.0, ge=0.0, le=1.0)  # baked: probability of mixing in a second foreground
    harmonize: float = Field(0.0, ge=0.0, le=1.0)  # Reinhard colour transfer strength (0: off)
    shadow: float = Field(0.0, ge=0.0, le=1.0)  # shadow opacity (0: off)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # scenes: visible alpha -> COCO mask
    seed: int = Field(0, ge=0, le=2**62)
    generative: str | None = None  # an SD1.5 inpainting model (folder) for ring repainting
    prompt: str = "a photo of an object in a scene, natural light, soft contact shadow"
    ring: int = Field(12, ge=1, le=256)  # repainted ring width around the object, pixels
    steps: int = Field(20, ge=1, le=200)  # inpainting steps

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] <= 0:
            raise ValueError("scale must be above 0")
        return _ordered_pair("scale", v)

    @field_validator("objects")
    @classmethod
    def _objects(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1:
            raise ValueError("a scene holds at least one object")
        return _ordered_pair("objects", v)

    @field_validator("blend")
    @classmethod
    def _blend(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one blend mode")
        return list(dict.fromkeys(v))


class Manifest(_Strict):
    name: str
    description: str = ""
    prompts: PromptSource
    negative_prompt: str = ""
    model: ModelSpec = ModelSpec()
    sampler: SamplerSettings = SamplerSettings()
    canvas: CanvasSettings = CanvasSettings()
    seed: int = Field(0, ge=0, le=2**62)
    filter: FilterSettings = FilterSettings()
    export: ExportSettings = ExportSettings()
    composite: CompositeSettings = CompositeSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (it names runs and keys)")
        if len(v) > MAX_NAME_CHARS:
            raise ValueError(
                f"{len(v)} characters, at most {MAX_NAME_CHARS}: it starts every sample's file name, "
                "which file systems limit to 255 bytes"
            )
        return v

    @property
    def kind(self) -> Literal["classes", "grid"]:
        return "classes" if self.prompts.classes is not None else "grid"

    def resolved_dict(self) -> dict[str, Any]:
        """The manifest with every prompt source inlined: a self-contained copy of what was run."""
        return self.model_dump(mode="json", exclude_defaults=False)

    def fingerprint(self) -> str:
        """Hash of what decides the samples (prompts, sampler, canvas, seed); not model, filter, export.

        The model is checked separately (the run store compares model identities) and filter or
        export defaults may change without invalidating generated samples.
        """
        data = self.model_dump(mode="json", include={"name", "prompts", "negative_prompt", "sampler", "canvas", "seed"})
        data["sampler"].pop("batch_size", None)  # batch size never changes an image
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def template_slots(template: str) -> list[str]:
    """The ``{slot}`` names a template uses (format-string syntax)."""
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r} is not a valid format string: {exc}") from exc


# --------------------------------------------------------------------------------------- loading


def load_manifest(path: str | Path) -> Manifest:
    """Read, resolve and validate a manifest file. Every failure is a one-line ``InputError``."""
    path = Path(path)
    raw = _read_yaml(path, "manifest")
    if raw is None:
        raise InputError(f"{path}: the file is empty; a manifest is a YAML mapping (see manifests/)")
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a manifest must be a YAML mapping, got {type(raw).__name__}")
    raw = _resolve_sources(raw, path)
    return _validate(raw, path)


def manifest_from_dict(data: dict[str, Any], origin: str = "<manifest>") -> Manifest:
    """Validate an already resolved manifest (e.g. the copy kept in a run directory)."""
    return _validate(data, Path(origin))


def _validate(raw: dict[str, Any], path: Path) -> Manifest:
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise InputError(f"{path}: {where}: {msg}{more}") from exc


_Settings = TypeVar("_Settings", bound=BaseModel)


def with_overrides(settings: _Settings, overrides: dict[str, Any], options: dict[str, str] | None = None) -> _Settings:
    """``settings`` with the command line's ``overrides`` (``None``: not given), validated by the
    same model, so the manifest's fields are the one source of defaults and limits. A bad value is
    a one-line ``InputError`` naming the option: ``--`` and the field's name (``--min-gsg``), or
    ``options[field]`` where the option is named otherwise."""
    values = settings.model_dump()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return type(settings).model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            raise InputError(msg) from exc
        name = str(err["loc"][0])
        option = (options or {}).get(name, "--" + name.replace("_", "-"))
        raise InputError(f"{option} {values.get(err['loc'][0])!r}: {msg}") from exc


def _read_yaml(path: Path, what: str) -> Any:
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read {what} ({exc})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: not valid YAML{where}: {problem}") from exc


def _resolve_sources(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Replace file references (class CSV, axes YAML, template YAML) with their content."""
    raw = dict(raw)
    base = path.parent
    prompts = raw.get("prompts")
    if not isinstance(prompts, dict):
        return raw  # validation reports it
    prompts = dict(prompts)
    if isinstance(prompts.get("classes"), str):
        prompts["classes"] = _read_classes(_rel(base, prompts["classes"]), path)
    grid = prompts.get("grid")
    if isinstance(grid, dict) and isinstance(grid.get("axes"), str):
        grid = dict(grid)
        axes_path = _rel(base, grid["axes"])
        axes = _read_yaml(axes_path, "axes")
        if not isinstance(axes, dict):
            raise InputError(f"{axes_path}: axes file must map axis names to lists of values")
        grid["axes"] = axes
        prompts["grid"] = grid
    if isinstance(prompts.get("templates"), str):
        tpath = _rel(base, prompts["templates"])
        tdata = _read_yaml(tpath, "templates")
        if not isinstance(tdata, dict) or "templates" not in tdata:
            raise InputError(f"{tpath}: a templates file needs a 'templates:' list")
        prompts["templates"] = tdata["templates"]
        file_slots = tdata.get("slots") or {}
        inline_slots = prompts.get("slots") or {}
        if isinstance(file_slots, dict) and isinstance(inline_slots, dict):
            prompts["slots"] = {**file_slots, **inline_slots}
        if "negative_prompt" not in raw and "negative_prompt" in tdata:
            raw["negative_prompt"] = tdata["negative_prompt"]
    raw["prompts"] = prompts
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("controlnet"), dict):
        model = dict(model)
        cn = dict(model["controlnet"])
        if isinstance(cn.get("images"), list):
            cn["images"] = [str(_rel(base, p)) if isinstance(p, str) else p for p in cn["images"]]
        if isinstance(cn.get("model"), str) and _looks_local(cn["model"]):
            cn["model"] = str(_rel(base, cn["model"]))
        model["controlnet"] = cn
        raw["model"] = model
    return raw


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".safetensors")


def _rel(base: Path, ref: str) -> Path:
    p = Path(ref).expanduser()
    return p if p.is_absolute() else (base / p)


def _read_classes(path: Path, manifest: Path) -> list[dict[str, str]]:
    """The rows of a class-list CSV. A UTF-8 BOM (a spreadsheet's "CSV UTF-8") is dropped; a row
    whose quoted field runs over several lines is refused, since a quote left open takes every
    later row into one class name."""
    if not path.exists():
        raise InputError(f"{manifest}: prompts.classes: class list {path} not found")
    if not path.is_file():
        raise InputError(f"{manifest}: prompts.classes: class list {path} is not a file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, strict=True)
            if reader.fieldnames is None or "class_name" not in reader.fieldnames:
                raise InputError(f"{path}: a class list is a CSV with a 'class_name' column")
            rows = []
            while True:
                first = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return rows
                except csv.Error as exc:
                    raise InputError(f"{path}: line {first}: {exc} (a quote left open?)") from exc
                if reader.line_num > first:
                    raise InputError(
                        f"{path}: line {first}: a quoted field runs over lines {first}-{reader.line_num} "
                        "(a quote left open?)"
                    )
                item = {k: (v or "").strip() for k, v in row.items() if k in ("class_name", "category", "phrase")}
                if not item.get("class_name"):
                    raise InputError(f"{path}: line {reader.line_num}: empty class_name")
                if not item.get("category"):
                    item.pop("category", None)
                rows.append(item)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read class list ({exc})") from exc
