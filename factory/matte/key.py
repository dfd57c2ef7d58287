"""Chroma keys: GreenPost's colour-difference key against the local plate, and two plain baselines.

With the compositing model ``I = a F + (1 - a) B`` and a foreground whose colour-difference signal
``e(F) = F_dom - max(F_others)`` is zero or below (greys, skin, hair, most objects), the signal of a
pixel is ``e(I) ~ (1 - a) e(B)``, so ``a ~ 1 - e(I) / e(B)``. Dividing by the *local* plate ``B``
instead of one global key colour keeps shadows, vignetting and lighting gradients on the board out of
the matte.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from factory.matte.canvas import chroma, dot3, key_excess
from factory.matte.fill import push_pull, tile_sums, tiles_to_pixels
from factory.matte.morphology import square_opening, within_distance


def local_difference_key(image: np.ndarray, plate: np.ndarray, key_color: tuple[int, int, int]) -> np.ndarray:
    """``1 - e(I) / e(B)`` against the per-pixel plate, clipped to [0, 1] (float32)."""
    e_i = key_excess(image, key_color)
    e_b = np.maximum(key_excess(plate, key_color), 1.0)
    return np.clip(1.0 - e_i / e_b, 0.0, 1.0).astype(np.float32)


def object_hue_key(image: np.ndarray, plate: np.ndarray, fg: np.ndarray, ridge: float = 5.0) -> np.ndarray:
    """Board content measured across the object's own hue (float32 alpha in [0, 1]).

    In the chroma plane (colours minus their grey part) the compositing equation is
    ``c(I) = a c(F) + (1 - a) c(B)``; a foreground that only changes brightness or saturation
    (shading, highlights, backlit strands) stays on the line of ``c(F)``. Solving
    ``c(I) = u c(F) + v c(B)`` by least squares gives the board's share ``v``, and ``a = 1 - v``,
    whatever ``F``'s brightness. The colour-difference key is the special case of a yellow object
    (``G - R`` vanishes on greys and yellows; cyan where blue exceeds red), which is why it over-rates
    red and pink and under-rates olive; here the hue is ``fg``'s, the colour interpolated from the
    object's core. ``ridge`` (RGB) damps ``u`` so that a greyish ``fg`` (no hue) falls
    back to measuring along the board's chroma."""
    cf, cb, ci = chroma(fg), chroma(plate), chroma(image)
    ff = dot3(cf, cf) + ridge**2
    fb, bb = dot3(cf, cb), dot3(cb, cb)
    fi, bi = dot3(cf, ci), dot3(cb, ci)
    board_share = (ff * bi - fb * fi) / np.maximum(ff * bb - fb * fb, 1e-6)
    return np.clip(1.0 - board_share, 0.0, 1.0).astype(np.float32)


def object_hue_weight(plate: np.ndarray, fg: np.ndarray, contrast: float = 50.0) -> np.ndarray:
    """How far to trust ``object_hue_key`` over the colour-difference key (float32 in [0, 1]):
    ``sin^4`` of the angle between the object's and the board's chroma (an object of the board's
    hue cannot be told from it) times ``|c(F)|^2 / (|c(F)|^2 + contrast^2)`` (a grey has no hue)."""
    cf, cb = chroma(fg), chroma(plate)
    ff, bb, fb = dot3(cf, cf), dot3(cb, cb), dot3(cf, cb)
    sin2 = 1.0 - fb * fb / np.maximum(ff * bb, 1e-6)
    return (sin2**2 * ff / (ff + contrast**2)).astype(np.float32)


def color_difference_key(image: np.ndarray, key_color: tuple[int, int, int]) -> np.ndarray:
    """Baseline: the classic colour-difference key ``1 - e(I) / e(K)`` with one global key colour."""
    e_k = max(float(key_excess(np.asarray(key_color, dtype=np.float32)[None, None], key_color)[0, 0]), 1.0)
    return np.clip(1.0 - key_excess(image, key_color) / e_k, 0.0, 1.0).astype(np.float32)


def _rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = image.astype(np.float32) / 255.0
    mx, mn = x.max(axis=-1), x.min(axis=-1)
    delta = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(
        mx == r, (g - b) / safe % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    h = np.where(delta > 0, h * 60.0, 0.0)
    s = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s, mx


def hsv_threshold_key(
    image: np.ndarray,
    key_color: tuple[int, int, int],
    hue_tolerance_deg: float = 30.0,
    min_saturation: float = 0.25,
    min_value: float = 0.15,
) -> np.ndarray:
    """Baseline: a hard HSV key. Background (0) where the hue is within the tolerance of the key's
    hue and the pixel is saturated and bright enough; foreground (1) elsewhere."""
    h, s, v = _rgb_to_hsv(image)
    hk, _, _ = _rgb_to_hsv(np.asarray(key_color, dtype=np.uint8)[None, None])
    dh = np.abs((h - float(hk[0, 0]) + 180.0) % 360.0 - 180.0)
    background = (dh <= hue_tolerance_deg) & (s >= min_saturation) & (v >= min_value)
    return (~background).astype(np.float32)


def board_chromaticity_distance(
    image: np.ndarray, outer_board: np.ndarray, pixels: tuple[np.ndarray, np.ndarray], block: int = 16, step: int = 4
) -> tuple[np.ndarray, float, np.ndarray]:
    """How far the chromaticity of the given ``pixels`` (row and column indices) is from the
    board's, the board's own spread of it, and their brightness over the board's.

    Chromaticity ``rgb / (r + g + b)`` is what stays when light is scaled: a gradient, a vignette
    or a shadow leaves it alone, so the board keeps one chromaticity (drifting slowly with its hue)
    while a green *object* of another saturation or hue does not, even when its chroma points
    exactly the board's way (``(20, 240, 20)`` on ``(0, 255, 0)``, which every chroma-angle test
    takes for board). The reference is the mean over ``outer_board`` pixels per ``block`` tile,
    push-pull filled and interpolated (smooth, so it follows the drift but not the noise), all on
    every ``step``-th pixel (the field is smooth; 16 times less work). Returns the distance and the
    brightness ratio at ``pixels`` (float32) and the 99th percentile of the distance on the board."""
    x = image[::step, ::step].astype(np.float32)
    board = outer_board[::step, ::step]
    total = x[..., 0] + x[..., 1] + x[..., 2]
    c = np.concatenate([x / np.maximum(total, 1.0)[..., None], total[..., None]], axis=-1)
    tile = max(1, block // step)
    num, den = tile_sums(c, board, tile)
    grid = push_pull(num / np.maximum(den, 1e-9)[..., None], den / (tile * tile), min_weight=0.25)
    ref = tiles_to_pixels(grid, tile, board.shape)
    diff = c[..., :3] - ref[..., :3]
    on_board = np.sqrt(dot3(diff, diff))[board]
    spread = float(np.quantile(on_board, 0.99)) if on_board.size else 0.0
    ys, xs = pixels
    r = ref[np.minimum(ys // step, ref.shape[0] - 1), np.minimum(xs // step, ref.shape[1] - 1)]
    xp = image[ys, xs].astype(np.float32)
    tp = xp[:, 0] + xp[:, 1] + xp[:, 2]
    dp = xp / np.maximum(tp, 1.0)[:, None] - r[:, :3]
    return np.sqrt(dot3(dp, dp)), spread, tp / np.maximum(r[:, 3], 1.0)


def outer_board(background: np.ndarray) -> np.ndarray:
    """The background pixels connected to the image's border: the board around the object. Enclosed
    background (a hole through the object, or a key-coloured part of it) is left out. When no
    background touches the border (an object filling the frame), all of it."""
    labels, _ = ndimage.label(background)
    rim = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    rim = rim[rim > 0]
    return np.isin(labels, rim) if rim.size else background


def mixing_explained(
    image: np.ndarray,
    plate: np.ndarray,
    fg_guess: np.ndarray,
    max_angle_deg: float = 15.0,
    min_contrast: float = 50.0,
    min_offset: float = 10.0,
) -> np.ndarray:
    """Which pixels (any shape, RGB last) a mix of the board and the object's colour explains: the
    offset ``I - B`` points, within ``max_angle_deg``, the way of ``F - B`` (``F`` interpolated from
    the foreground core, at least ``min_contrast`` from the board). Hair over the board is such a
    mix, whatever its alpha; a key-coloured part of an object is not (its colour is not on the line
    from the board to the object's). An offset under ``min_offset`` (RGB) has no direction to test
    (noise): a region that the plate took for board is not explained by it."""
    x = np.asarray(image, dtype=np.float32)
    d = np.asarray(fg_guess, dtype=np.float32) - plate
    o = x - plate
    dd, od, oo = dot3(d, d), dot3(o, d), dot3(o, o)
    aligned = (od > 0) & (oo >= min_offset**2) & (od * od >= np.cos(np.deg2rad(max_angle_deg)) ** 2 * oo * dd)
    return aligned & (dd >= min_contrast**2)


def key_colored_pixels(
    image: np.ndarray,
    alpha: np.ndarray,
    background: np.ndarray,
    key_alpha: np.ndarray,
    object_core: np.ndarray | None = None,
    plate: np.ndarray | None = None,
    fg_guess: np.ndarray | None = None,
    core: np.ndarray | None = None,
    spill: np.ndarray | None = None,
    solid_alpha: float = 0.9,
    spread_factor: float = 2.0,
    min_distance: float = 0.02,
    brighter: float = 1.15,
    rim_width: float = 6.0,
    opening: int = 5,
) -> np.ndarray:
    """Object pixels that the matte took for board: the object contains the key colour (Smith and
    Blinn's hard case), and its alpha there is wrong by construction.

    Such a pixel has a matte below ``solid_alpha`` (it was keyed as partly or wholly board) although
    its chromaticity is not the board's: farther from the board's local chromaticity than
    ``spread_factor`` times the board's own spread (99th percentile over the board around the
    object) and at least ``min_distance``, or brighter than the board there by ``brighter`` (a green
    of the board's own chromaticity, lit more than the board can be; darker is not a test: the
    board in the object's shadow is darker), and no mix of the board with the nearby object's colour
    explains it (:func:`mixing_explained`, given ``plate``, ``fg_guess`` and the foreground ``core``;
    with the rim's ``spill`` ``s`` the object's colour is the one the camera saw, ``F + s B``: a
    strand lit green by the board is a mix of the board and that colour, not a key colour).
    The board around the object is the background connected to the image border
    (:func:`outer_board`); a region enclosed by the object or attached to it is judged by its colour,
    so a hole that shows the board is not flagged and a disc of ``(20, 240, 20)`` inside a red ring
    on ``(0, 255, 0)`` is. An ``opening`` x ``opening`` opening keeps solid regions only (thin
    strands mixed with the board differ from it too). With a coarse alpha, its object core where
    the key calls it mostly board (``key_alpha < 0.5``) counts as well."""
    board = outer_board(background)
    found = np.zeros(alpha.shape, dtype=bool)
    candidates = (alpha < solid_alpha) & ~board
    box = _box(candidates, rim_width + opening)
    if board.any() and box is not None:
        sub = candidates[box]
        if rim_width > 0:  # spill lights the rim next to the board: not evidence of a key colour
            sub &= ~within_distance(board[box], rim_width)
        ys, xs = np.nonzero(sub)
        ys_full, xs_full = ys + box[0].start, xs + box[1].start
        dist, spread, brightness = board_chromaticity_distance(image, board, (ys_full, xs_full))
        keep = (dist > max(spread_factor * spread, min_distance)) | (brightness > brighter)
        if plate is not None and fg_guess is not None and core is not None and keep.any() and core.any():
            at = (ys_full[keep], xs_full[keep])
            seen = fg_guess[at] if spill is None else fg_guess[at] + spill[at][:, None] * plate[at]
            keep[keep] = ~mixing_explained(image[at], plate[at], seen)
        sub[:] = False
        sub[ys[keep], xs[keep]] = True
        found[box] = square_opening(sub, opening)
    if object_core is not None:
        found |= (key_alpha < 0.5) & object_core
    return found


def _box(mask: np.ndarray, margin: float) -> tuple[slice, slice] | None:
    """The bounding box of ``mask`` grown by ``margin`` px (None when it is empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    m, (h, w) = int(np.ceil(margin)) + 1, mask.shape
    return slice(max(0, rows[0] - m), min(h, rows[-1] + m + 1)), slice(max(0, cols[0] - m), min(w, cols[-1] + m + 1))
