"""GreenPost: a generated image on green (plus an optional coarse alpha) to a matting-level alpha
and a foreground with the green removed.

Steps (docs/matting.md has the reasoning):
1. canvas colour by K-Means; where the image was decoded from subsampled chroma (a 4:2:0 or 4:2:2
   JPEG), full-resolution chroma restored from luma;
2. background plate: the board's colour at every pixel (gradients, vignetting, hue drift, shadows);
   rebuilt once the first alpha is known, without the faint hair that passed for board and with
   the shadow hidden behind the object's band;
3. colour-difference key against the plate;
4. trimap: background, a foreground core (key-solid pixels that no neighbour shows to be mixed with
   the board), the unknown band (and the coarse alpha where given);
5. the band: the foreground colour interpolated from the core (then refitted once from the band's
   well-covered pixels), alpha by un-mixing against the plate
   (falling back to a key across the object's hue, and to the colour-difference key, where that
   colour does not fit), clip black / clip white, and optionally the closed-form matting Laplacian
   as a regulariser;
6. foreground colour by un-mixing the plate, then despill;
7. the flag for objects that contain the key colour: object regions the matte took for board.
An image without a green board (all red, grey) is reported (``no_board``), not matted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from factory.errors import InputError
from factory.matte.canvas import (
    background_plate,
    board_without_object,
    estimate_canvas_color,
    key_excess,
    strict_canvas,
)
from factory.matte.chroma import ChromaLayout, detect_chroma_layout, restore_chroma
from factory.matte.foreground import (
    despill,
    interpolate_foreground,
    ml_foreground,
    refit_foreground,
    unmix_foreground,
)
from factory.matte.key import key_colored_pixels, local_difference_key, object_hue_key, object_hue_weight
from factory.matte.refine import clip_levels, laplacian_refine, projected_alpha
from factory.matte.shadow import hidden_shadow
from factory.matte.spill import spill_field, spilled_colour
from factory.matte.trimap import Trimap, board_mix_ratio, make_trimap


_CHROMA_LAYOUTS = {
    "off": ChromaLayout(vertical=False, horizontal=False),
    "4:2:0": ChromaLayout(vertical=True, horizontal=True),
    "4:2:2": ChromaLayout(vertical=False, horizontal=True),
}


@dataclass(frozen=True)
class GreenPostSettings:
    """Every knob of GreenPost. The defaults are the ones bench/matte.py chose."""

    key_color: tuple[int, int, int] | None = None  # None: estimate the canvas colour with K-Means
    chroma: str = "auto"  # subsampled chroma to restore: "auto" (detect), "off", "4:2:0", "4:2:2"
    kmeans_clusters: int = 4  # colours clustered to find the canvas
    kmeans_samples: int = 4096  # pixels sampled (grid) for K-Means
    hue_tolerance_deg: float = 30.0  # loose test: chroma angle from the key colour for "canvas-like"
    strict_deg: float = 4.0  # strict test: angle from the board's local chroma for "board for sure"
    plate_block: int = 8  # tile size (px) of the background plate
    plate_object_alpha: float | None = 0.02  # rebuild the plate without pixels of at least this first alpha (None: off) ...
    plate_core_gap: float = 10.0  # ... farther than this (px) from the foreground core
    shadow_floor: float | None = 0.6  # darken the plate behind the band by the shadow it hides, at most to this (None: off)
    key_lo: float = 0.04  # key alpha at or below: background in the trimap
    key_hi: float = 0.85  # key alpha at or above (not mixed, core_depth inside): foreground core
    core_depth: float = 1.0  # px inside the solid, unmixed region where the foreground core starts
    mix_max: float | None = 0.9  # pixel at under this fraction of a neighbour's offset, on its ray: mixed (None: off)
    mix_radius: int = 12  # px searched for such a neighbour ...
    mix_step: int = 3  # ... every this many px
    mix_tolerance: float = 5.0  # RGB distance from the neighbour's ray still counted as on it (+5 % of |I - B|)
    object_hue_contrast: float | None = 50.0  # chroma |c(F)| at which the object-hue key gets half weight (None: off)
    projection_sharpness: float = 2.0  # how strictly I - B must point along F - B to trust un-mixing
    min_contrast: float = 50.0  # |F - B| (RGB) at which un-mixing gets half weight
    shading_mix: float = 0.5  # share of the brightness-invariant estimate in un-mixing (0: projection only)
    refit_min_alpha: float | None = 0.6  # refit the band's colour from pixels with alpha >= this (None: off)
    spill_block: int | None = 4  # tile (px) over which rim spill is pooled; None: spill read as transparency
    spill_min_coverage: float = 0.3  # band pixels with at least this coverage measure the spill
    spill_min_sin2: float = 0.1  # sin^2(F - B, B) below which spill and coverage cannot be told apart
    spill_max: float = 0.8  # most board light (share of B) taken for spill
    spill_reach: float = 16.0  # px from the board within which the key-colour flag takes spill for an explanation ...
    spill_falloff: float = 3.0  # ... fading beyond as exp(-(d - reach) / falloff)
    clip_black: float = 0.03  # alpha at or below -> 0
    clip_white: float = 0.96  # alpha at or above -> 1
    adaptive_clip: bool = True  # clip black from the board's measured noise (at most clip_black)
    laplacian_weight: float = 0.0  # > 0: closed-form Laplacian regularisation with this data weight
    foreground: str = "unmix"  # "unmix" (with the plate) or "ml" (pymatting multi-level)
    despill_width: float = 6.0  # px into the solid object over which despill fades out
    coarse_core: float = 8.0  # px inside the coarse alpha's object that are foreground for sure
    coarse_far: float | None = None  # px outside the coarse object beyond which all is background (None: off)
    flag_fraction: float = 0.005  # key-coloured object pixels (share of the image) that raise the flag
    flag_min_pixels: int = 64  # ... and at least this many
    min_board_fraction: float = 0.02  # board-for-sure pixels (share of the image) below which: no board
    min_board_excess: float = 20.0  # a canvas colour whose G - max(R, B) is below this is no green board

    def __post_init__(self) -> None:
        if self.key_color is not None and (
            len(self.key_color) != 3 or not all(0 <= int(v) <= 255 for v in self.key_color)
        ):
            raise InputError(f"key colour must be three integers 0..255, got {self.key_color!r}")
        if self.chroma not in _CHROMA_LAYOUTS and self.chroma != "auto":
            raise InputError(f"chroma must be one of auto, {', '.join(_CHROMA_LAYOUTS)}; got {self.chroma!r}")
        if self.foreground not in ("unmix", "ml"):
            raise InputError(f"foreground must be 'unmix' or 'ml', got {self.foreground!r}")
        if not 0.0 <= self.clip_black < self.clip_white <= 1.0:
            raise InputError(f"need 0 <= clip_black < clip_white <= 1, got {self.clip_black}, {self.clip_white}")
        if not 0.0 <= self.key_lo < self.key_hi <= 1.0:
            raise InputError(f"need 0 <= key_lo < key_hi <= 1, got {self.key_lo}, {self.key_hi}")
        if self.spill_block is not None and self.spill_block < 2:
            raise InputError(f"spill_block must be at least 2 or None, got {self.spill_block}")
        if self.spill_reach < 0 or self.spill_falloff <= 0:
            raise InputError(f"need spill_reach >= 0 and spill_falloff > 0, got {self.spill_reach}, {self.spill_falloff}")
        if self.plate_block < 2 or self.kmeans_clusters < 1:
            raise InputError("plate_block must be at least 2 and kmeans_clusters at least 1")
        if self.refit_min_alpha is not None and not 0.0 < self.refit_min_alpha <= 1.0:
            raise InputError(f"refit_min_alpha must be within (0, 1] or None, got {self.refit_min_alpha}")
        if not 0.0 <= self.shading_mix <= 1.0:
            raise InputError(f"shading_mix must be within 0..1, got {self.shading_mix}")
        if self.mix_radius < 1 or self.mix_step < 1:
            raise InputError("mix_radius and mix_step must be at least 1")
        if self.plate_object_alpha is not None and not 0.0 <= self.plate_object_alpha < 1.0:
            raise InputError(f"plate_object_alpha must be within [0, 1) or None, got {self.plate_object_alpha}")
        if self.shadow_floor is not None and not 0.0 < self.shadow_floor <= 1.0:
            raise InputError(f"shadow_floor must be within (0, 1] or None, got {self.shadow_floor}")


@dataclass
class MatteResult:
    """GreenPost's output for one image."""

    alpha: np.ndarray  # float32 (H, W) in [0, 1]
    fg: np.ndarray  # uint8 (H, W, 3), decontaminated foreground colour (meaningful where alpha > 0)
    canvas_color: tuple[int, int, int]  # estimated (or given) key colour, RGB
    contains_key_color: bool  # the object itself contains the key colour (Smith-Blinn hard case)
    unknown_fraction: float  # share of pixels refined (neither background nor foreground core)
    chroma: str = "4:4:4"  # chroma layout the input was found (or said) to have; restored if not 4:4:4
    key_colored_fraction: float = 0.0  # share of pixels counted as key-coloured object
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    key_colored: np.ndarray | None = None  # bool (H, W): the key-coloured object region
    no_board: bool = False  # no green board found: nothing was matted (alpha 0, fg the image)
    no_board_reason: str = ""  # why, in words: the main colour is not green, or too little of the image is board
    board_fraction: float = 0.0  # share of the image that is board for sure
    plate: np.ndarray | None = None  # float32 (H, W, 3): the board's colour behind every pixel
    fg_guess: np.ndarray | None = None  # float32 (H, W, 3): the object's colour from its core
    band: np.ndarray | None = None  # bool (H, W): the trimap's unknown band
    spill: np.ndarray | None = None  # float32 (H, W): rim spill s (board light F + s B) found in the band
    spill_ambiguous: np.ndarray | None = None  # bool (H, W): band pixels where spill and coverage are one


def _check_inputs(image: np.ndarray, coarse_alpha: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"GreenPost needs an 8-bit RGB image (H, W, 3) uint8, got {img.shape} {img.dtype}")
    if min(img.shape[:2]) < 8:
        raise InputError(f"image too small for matting: {img.shape[1]}x{img.shape[0]}")
    if coarse_alpha is None:
        return img, None
    c = np.asarray(coarse_alpha)
    if c.ndim == 3 and c.shape[2] == 1:
        c = c[..., 0]
    if c.shape != img.shape[:2]:
        raise InputError(f"coarse alpha shape {c.shape} does not match the image's {img.shape[:2]}")
    c = c.astype(np.float32) / 255.0 if c.dtype == np.uint8 else np.clip(c.astype(np.float32), 0.0, 1.0)
    return img, c


class _Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = now - self._t
        self._t = now


def _board_mix(img: np.ndarray, plate: np.ndarray, key: np.ndarray, s: GreenPostSettings) -> np.ndarray | None:
    """The board mix ratio of the key-solid pixels (None when the test is off)."""
    if s.mix_max is None:
        return None
    offset = img.astype(np.float32) - plate
    return board_mix_ratio(offset, key >= s.key_hi, s.mix_radius, s.mix_step, s.mix_tolerance)


def _fallback_key(
    img: np.ndarray, plate: np.ndarray, fg_guess: np.ndarray, key: np.ndarray, s: GreenPostSettings
) -> np.ndarray:
    """What the band falls back to where un-mixing is not trusted: the object-hue key where the
    object's colour has a hue clearly apart from the board's, the colour-difference key elsewhere."""
    if s.object_hue_contrast is None:
        return key
    w = object_hue_weight(plate, fg_guess, s.object_hue_contrast)
    return w * object_hue_key(img, plate, fg_guess) + (1.0 - w) * key


def _band_alpha(
    img: np.ndarray,
    plate: np.ndarray,
    fg_guess: np.ndarray,
    key: np.ndarray,
    band: np.ndarray,
    s: GreenPostSettings,
    spill: np.ndarray | None = None,
) -> np.ndarray:
    """Alpha by un-mixing (and the fallback keys) on the unknown band's pixels only; 0 elsewhere
    (the core and the background get 1 and 0 at the end). The band is a fifth of a typical image,
    and these are the pipeline's heaviest per-pixel steps. With the rim's ``spill``, the object's
    colour is the one the camera saw, ``F + s B``."""
    alpha = np.zeros(band.shape, dtype=np.float32)
    if not band.any():
        return alpha
    x, b, f = img[band][None], plate[band][None], fg_guess[band][None]
    if spill is not None:
        f = spilled_colour(f, b, spill[band][None])
    fallback = _fallback_key(x, b, f, key[band][None], s)
    alpha[band] = projected_alpha(x, b, f, fallback, s.projection_sharpness, s.min_contrast, s.shading_mix)[0]
    return alpha


def _plate_without_hair(
    img: np.ndarray,
    key_color: tuple[int, int, int],
    board: np.ndarray,
    alpha: np.ndarray,
    tri: Trimap,
    s: GreenPostSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """(board, plate) rebuilt without the faint hair that the first alpha finds on the board."""
    seen = np.where(tri.bg, 0.0, clip_levels(alpha, s.clip_black, s.clip_white))
    board = board_without_object(board, seen, tri.core, s.plate_object_alpha or 0.0, s.plate_core_gap)
    return board, background_plate(img, key_color, board, s.plate_block)


def greenpost(
    image: np.ndarray, coarse_alpha: np.ndarray | None = None, settings: GreenPostSettings | None = None
) -> MatteResult:
    """Matte an RGB uint8 image of an object on a green (key-coloured) canvas.

    ``coarse_alpha`` (float in [0, 1] or uint8, same height and width; e.g. the matting head's
    output) is optional: it keeps the object out of the canvas estimate and marks a foreground core
    that may be key-coloured (and, with ``coarse_far``, clears far-away background). Pure and
    deterministic."""
    s = settings or GreenPostSettings()
    img, coarse = _check_inputs(image, coarse_alpha)
    clock = _Clock()
    obj = None if coarse is None else coarse >= 0.5
    key_color = s.key_color or estimate_canvas_color(img, obj, s.kmeans_clusters, s.kmeans_samples).color
    clock.lap("canvas")
    layout = detect_chroma_layout(img) if s.chroma == "auto" else _CHROMA_LAYOUTS[s.chroma]
    img = restore_chroma(img, layout)
    clock.lap("chroma")
    board = strict_canvas(img, key_color, s.hue_tolerance_deg, s.strict_deg)
    reason = _no_board_reason(key_color, board, s)
    if reason:
        return _no_board_result(img, key_color, board, layout.name, clock, reason)
    if obj is not None and (board & ~obj).sum() >= 0.25 * board.sum():  # ignore a mask that covers it all
        board &= ~obj
    plate = background_plate(img, key_color, board, s.plate_block)
    key = local_difference_key(img, plate, key_color)
    clock.lap("plate_key")
    mix = _board_mix(img, plate, key, s)
    tri = make_trimap(
        key, coarse, s.key_lo, s.key_hi, 1, s.core_depth, s.coarse_core, s.coarse_far, board, mix, s.mix_max or 0.0
    )
    fg_guess = interpolate_foreground(img, tri.core)
    alpha = _band_alpha(img, plate, fg_guess, key, tri.unknown, s)
    clock.lap("alpha")
    # With a first alpha: the plate again (without faint hair, with the shadow hidden behind the
    # band), the object's colour refitted from the band, and alpha un-mixed once more.
    new_plate = s.plate_object_alpha is not None or s.shadow_floor is not None
    if s.plate_object_alpha is not None:
        board, plate = _plate_without_hair(img, key_color, board, alpha, tri, s)
    if s.refit_min_alpha is not None:
        fg_guess = refit_foreground(img, plate, alpha, tri.core, s.refit_min_alpha)
    if s.shadow_floor is not None:
        shade = hidden_shadow(img, plate, fg_guess, tri.unknown, board, s.plate_block, s.shadow_floor)
        plate = plate * shade[..., None]
    if new_plate:
        key = local_difference_key(img, plate, key_color)
    spill = np.zeros(img.shape[:2], dtype=np.float32)
    ambiguous = np.zeros(img.shape[:2], dtype=bool)
    near_board = np.ones(img.shape[:2], dtype=np.float32)
    if s.spill_block is not None:
        field = spill_field(
            img, plate, fg_guess, tri.unknown, s.spill_block, s.spill_min_coverage, s.spill_min_sin2, s.spill_max,
            background=tri.bg, reach=s.spill_reach, falloff=s.spill_falloff,
        )  # fmt: skip
        spill, ambiguous, near_board = field.strength, field.ambiguous, field.near_board
    if new_plate or s.refit_min_alpha is not None or s.spill_block is not None:
        alpha = _band_alpha(img, plate, fg_guess, key, tri.unknown, s, spill)
        clock.lap("second_pass")
    alpha[tri.core], alpha[tri.bg] = 1.0, 0.0
    alpha = clip_levels(alpha, _clip_black(img, plate, board, key_color, s), s.clip_white)
    if s.laplacian_weight > 0:
        alpha = laplacian_refine(img, alpha, s.laplacian_weight)
        clock.lap("laplacian")
    if s.foreground == "ml":
        fg = ml_foreground(img, alpha)
        fg[tri.unknown] -= spill[tri.unknown][:, None] * plate[tri.unknown]  # the despilled colour
        fg = np.clip(fg, 0.0, 255.0)
    else:
        fg = unmix_foreground(img, plate, alpha, fg_guess, spill=spill)
    fg = despill(fg, alpha, key_color, s.despill_width)
    clock.lap("foreground")
    flagged = key_colored_pixels(
        img, alpha, tri.bg, key, tri.coarse_core, plate=plate, fg_guess=fg_guess, core=tri.core, spill=spill * near_board
    )
    n_flag = int(flagged.sum())
    clock.lap("flag")
    return MatteResult(
        alpha=alpha,
        fg=np.clip(np.rint(fg), 0, 255).astype(np.uint8),
        canvas_color=key_color,
        contains_key_color=n_flag >= max(s.flag_min_pixels, s.flag_fraction * flagged.size),
        unknown_fraction=float(tri.unknown.mean()),
        chroma=layout.name,
        key_colored_fraction=n_flag / flagged.size,
        timings=clock.times,
        key_colored=flagged,
        board_fraction=float(board.mean()),
        plate=plate,
        fg_guess=fg_guess,
        band=tri.unknown,
        spill=spill,
        spill_ambiguous=ambiguous,
    )


def _clip_black(
    img: np.ndarray, plate: np.ndarray, board: np.ndarray, key_color: tuple[int, int, int], s: GreenPostSettings
) -> float:
    """Clip black: ``s.clip_black``, or with ``adaptive_clip`` three times the board's noise in alpha
    units (the median distance of board pixels from the plate over the board's key signal), at
    least 0.004 and at most ``s.clip_black``: a clean image keeps its faint strands, a noisy one is
    still cleaned."""
    if not s.adaptive_clip or not board.any():
        return s.clip_black
    step = max(1, int(board.sum()) // 20000)
    ys, xs = np.nonzero(board)
    ys, xs = ys[::step], xs[::step]
    spread = float(np.median(np.abs(img[ys, xs].astype(np.float32) - plate[ys, xs]).max(axis=-1)))
    signal = float(np.median(key_excess(plate[ys, xs], key_color)))
    return float(np.clip(3.0 * spread / max(signal, 1.0), 0.004, s.clip_black))


def _no_board_reason(key_color: tuple[int, int, int], board: np.ndarray, s: GreenPostSettings) -> str:
    """Why there is no green board, or "" when there is one: the canvas colour must be green
    (unless the key colour was given) and enough pixels board for sure. An all-red or a grey image
    has none."""
    canvas = "#{:02x}{:02x}{:02x}".format(*key_color)
    if s.key_color is None and float(key_excess(np.asarray(key_color, np.float32), (0, 255, 0))) < s.min_board_excess:
        return f"the image's main colour {canvas} is not a green"
    if float(board.mean()) < s.min_board_fraction:
        return f"only {100 * float(board.mean()):.1f} % of the image is board of colour {canvas} (at least {100 * s.min_board_fraction:g} % needed)"
    return ""


def _no_board_result(
    img: np.ndarray, key_color: tuple[int, int, int], board: np.ndarray, chroma_name: str, clock: _Clock, reason: str
) -> MatteResult:
    """What an image without a green board gets: no matte (alpha 0), the image as foreground, and
    ``no_board`` set, so that callers report it instead of writing a meaningless matte."""
    return MatteResult(
        alpha=np.zeros(img.shape[:2], dtype=np.float32),
        fg=img.copy(),
        canvas_color=key_color,
        contains_key_color=False,
        unknown_fraction=0.0,
        chroma=chroma_name,
        timings=clock.times,
        no_board=True,
        no_board_reason=reason,
        board_fraction=float(board.mean()),
    )
