"""`factory matte`: GreenPost and GSG over a folder of images, in parallel over CPU cores.

For every ``IN_DIR/STEM.(png|jpg|jpeg|webp)`` (suffix in any case) it writes ``OUT_DIR/STEM.alpha.png``
(single channel, 8- or 16-bit) and ``OUT_DIR/STEM.fg.png`` (RGB, the decontaminated foreground),
turned as the image is shown when its EXIF orientation says so (a camera's portrait photo; GreenPost
itself runs on the pixels as stored), and at the end ``OUT_DIR/matte.csv`` with one row per input: status, GSG, flags and timings.

Rules: a file that cannot be read as an opaque RGB image (corrupt, RGBA, a link to nothing, ...) is
reported in one line and skipped, as is a second file with a stem already seen (``a.png`` and ``a.jpg`` would write the
same outputs); an image without a green board (all one non-green colour; any grey image, 8- or
16-bit) gets the status ``no_board``, is reported in one line and gets no outputs. Files named
``*.alpha.png`` / ``*.fg.png`` (this command's own outputs) are not inputs and are not listed. Outputs
are written to a temporary name and renamed, so an interrupted run leaves no half-written file.

The output folder may not be the input folder or lie inside it, and a folder already holding a name
this run would write is refused unless it is a ``factory matte`` folder: ``matte.csv`` is written
first (again at the end, complete, or at Ctrl-C with the files done so far) and marks it, so a
rerun, even after a kill, may replace it (and removes the temporary files a killed run left). One
run writes a folder at a time (a lock on the folder itself). Ctrl-C stops after the few images queued for the workers.
An output that cannot be written (a full disk, no permission) stops the run with one line and exit
1, ``matte.csv`` holding the rows done so far.
"""

from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.errors import FactoryError, InputError
from factory.feedback import Feedback, plural
from factory.fsutil import TMP_PREFIX, AtomicFile, FolderLock, atomic_write_bytes, check_writable_dir
from factory.imageio import IMAGE_SUFFIXES, encode_alpha_png, encode_png, orient, read_rgb_oriented
from factory.matte.pipeline import GreenPostSettings, MatteResult, greenpost
from factory.score import REFERENCE_GREEN, gsg

SUMMARY_NAME = "matte.csv"
OUTPUT_SUFFIXES = (".alpha.png", ".fg.png")
STATUS_OK, STATUS_SKIPPED, STATUS_FAILED, STATUS_NO_BOARD = "ok", "skipped", "failed", "no_board"
COLUMNS = (
    "stem", "file", "status", "message", "width", "height", "gsg", "gsg_distance", "canvas_color",
    "bg_uniformity", "contains_key_color", "key_colored_fraction", "unknown_fraction", "alpha_coverage",
    "chroma", "seconds",
)  # fmt: skip


@dataclass
class MatteFolderSummary:
    """What ``matte_folder`` did: one row per input file (``COLUMNS``), and where the CSV is."""

    in_dir: Path
    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary_path: Path | None = None
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def processed(self) -> int:
        return self.count(STATUS_OK)

    @property
    def skipped(self) -> int:
        return self.count(STATUS_SKIPPED)

    @property
    def failed(self) -> int:
        return self.count(STATUS_FAILED)

    @property
    def no_board(self) -> int:
        """Images read but without a green board (all one non-green colour, grey): not matted."""
        return self.count(STATUS_NO_BOARD)

    @property
    def issues(self) -> list[str]:
        """One line per skipped or failed file."""
        return [f"{r['status']} {r['file']}: {r['message']}" for r in self.rows if r["status"] != STATUS_OK]


def list_inputs(in_dir: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """(images to matte, rows for files skipped by name) in name order."""
    images: list[Path] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for path in sorted(p for p in in_dir.iterdir() if p.is_file() or p.is_symlink()):
        name = path.name.lower()
        if not name.endswith(IMAGE_SUFFIXES) or name.endswith(OUTPUT_SUFFIXES) or path.is_dir():
            continue
        if not path.is_file():
            skipped.append(_row(path, STATUS_SKIPPED, "a symbolic link to nothing (its target is missing, or it loops)"))
            continue
        stem = path.stem
        if stem in seen:
            skipped.append(_row(path, STATUS_SKIPPED, f"same stem as {seen[stem]}; its outputs would collide"))
            continue
        seen[stem] = path.name
        images.append(path)
    return images, skipped


def _row(path: Path, status: str, message: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row.update(stem=path.stem, file=path.name, status=status, message=message)
    return row


def matte_one(
    path: Path, out_dir: Path, bits: int, settings: GreenPostSettings, reference: tuple[int, int, int]
) -> dict[str, Any]:
    """Matte one file and write its outputs; a bad input becomes a 'skipped' row, an unexpected
    error a 'failed' row (one bad file never stops the folder). An output that cannot be written
    (a full disk, no permission) raises ``RunError``: the next image would fail the same way."""
    start = time.perf_counter()
    try:
        image, orientation = read_rgb_oriented(path)
        result = greenpost(image, None, settings)
        score = gsg(image, reference=reference)
        alpha = orient(result.alpha, orientation)  # the outputs face the way the photo is shown
        if result.no_board:
            return _no_board_row(path, result, alpha.shape, score.score, start)
        files = {".alpha.png": encode_alpha_png(alpha, bits), ".fg.png": encode_png(orient(result.fg, orientation))}
    except FactoryError as exc:
        return _row(path, STATUS_SKIPPED, str(exc).replace(f"{path}: ", ""))
    except Exception as exc:  # noqa: BLE001 - reported per file, the run goes on
        return _row(path, STATUS_FAILED, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    for suffix, data in files.items():
        atomic_write_bytes(out_dir / f"{path.stem}{suffix}", data, fsync=False)
    row = _row(path, STATUS_OK)
    h, w = alpha.shape
    row.update(
        width=w,
        height=h,
        gsg=round(score.score, 6),
        gsg_distance=round(score.distance, 3),
        canvas_color="#{:02x}{:02x}{:02x}".format(*result.canvas_color),
        bg_uniformity=round(score.uniformity, 6),
        contains_key_color=result.contains_key_color,
        key_colored_fraction=round(result.key_colored_fraction, 6),
        unknown_fraction=round(result.unknown_fraction, 6),
        chroma=result.chroma,
        alpha_coverage=round(float(result.alpha.mean()), 6),
        seconds=round(time.perf_counter() - start, 4),
    )
    return row


def _no_board_row(
    path: Path, result: MatteResult, shape: tuple[int, ...], gsg_score: float, start: float
) -> dict[str, Any]:
    """The row of an image without a green board: reported, no outputs written (a matte of it
    would be all 0 or all 1 and mean nothing)."""
    canvas = "#{:02x}{:02x}{:02x}".format(*result.canvas_color)
    row = _row(
        path,
        STATUS_NO_BOARD,
        f"no green board found ({result.no_board_reason}); not matted",
    )
    h, w = shape[:2]
    row.update(width=w, height=h, gsg=round(gsg_score, 6), canvas_color=canvas, chroma=result.chroma,
               seconds=round(time.perf_counter() - start, 4))  # fmt: skip
    return row


def _single_thread_worker() -> None:
    """Pool initialiser: one BLAS/OpenMP thread per worker, the pool supplies the parallelism."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def _check_dirs(in_dir: Path) -> None:
    if not in_dir.exists():
        raise InputError(f"input folder {in_dir} does not exist")
    if not in_dir.is_dir():
        raise InputError(f"{in_dir} is not a folder")


def check_out_dir(in_dir: Path, out_dir: Path, images: list[Path]) -> None:
    """Refuse an output folder whose writes would replace files this command did not write: the
    input folder or one inside it, or a folder holding an output name of these images (or
    ``matte.csv``) without being a ``factory matte`` folder, which its ``matte.csv`` marks."""
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src:
        raise InputError(f"--out {out_dir} is the input folder; choose a folder outside it")
    if src in dst.parents:
        raise InputError(f"--out {out_dir} is inside the input folder {in_dir}; choose a folder outside it")
    if not out_dir.is_dir() or is_matte_summary(out_dir / SUMMARY_NAME):
        return
    names = [SUMMARY_NAME, *(f"{p.stem}{suffix}" for p in images for suffix in OUTPUT_SUFFIXES)]
    taken = [name for name in names if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if taken:
        more = f" (and {plural(len(taken) - 1, 'other file')})" if len(taken) > 1 else ""
        raise InputError(
            f"--out {out_dir} holds {taken[0]}{more}, which factory matte would replace but did not write "
            f"(the folder has no {SUMMARY_NAME} of factory matte's); choose another folder"
        )


def is_matte_summary(path: Path) -> bool:
    """Whether ``path`` is a ``matte.csv`` this command wrote (its header is ``COLUMNS``)."""
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            return next(csv.reader(fh), None) == list(COLUMNS)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """The per-file CSV (``COLUMNS``), in name order."""
    with AtomicFile(path, "w", fsync=False, encoding="utf-8") as fh:
        writer = csv.DictWriter(fh.fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["file"]))


def matte_folder(
    in_dir: Path,
    out_dir: Path,
    bits: int = 8,
    workers: int | None = None,
    settings: GreenPostSettings | None = None,
    reference: tuple[int, int, int] = REFERENCE_GREEN,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> MatteFolderSummary:
    """Matte every image of ``in_dir`` into ``out_dir`` (see the module doc).

    ``workers``: processes (default: the CPU count; 1 runs in this process). ``log`` receives one line
    per skipped or failed file as it happens (default: printed above the progress bar when
    ``progress`` is on, else nothing; the lines are in ``summary.issues`` anyway). Raises
    ``InputError`` for a missing input folder, one with no image, an unwritable output folder or a
    bad ``bits``/``workers``."""
    start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if bits not in (8, 16):
        raise InputError(f"--bits must be 8 or 16, not {bits}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    _check_dirs(in_dir)
    images, rows = list_inputs(in_dir)
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {in_dir}")
    check_out_dir(in_dir, out_dir, images)
    check_writable_dir(out_dir)  # created only once there is something to write
    with FolderLock(out_dir, f"{out_dir}: another factory matte is writing here; wait for it or choose another --out"):
        remove_stale_temporaries(out_dir)
        return _matte_all(in_dir, out_dir, images, rows, bits, workers, settings, reference, progress, log, start)


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files a killed run left in ``out_dir`` (call it holding the folder's
    lock): only the names this command writes through a temporary, ``.tmp-STEM.alpha.png.*``,
    ``.tmp-STEM.fg.png.*`` and ``.tmp-matte.csv.*``; anything else in the folder is the user's."""
    removed = 0
    for path in out_dir.glob(f"{TMP_PREFIX}*"):
        final = path.name[len(TMP_PREFIX) :]
        ours = any(f"{suffix}." in final for suffix in OUTPUT_SUFFIXES) or final.startswith(f"{SUMMARY_NAME}.")
        if ours and path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def _matte_all(
    in_dir: Path,
    out_dir: Path,
    images: list[Path],
    rows: list[dict[str, Any]],
    bits: int,
    workers: int | None,
    settings: GreenPostSettings | None,
    reference: tuple[int, int, int],
    progress: bool,
    log: Callable[[str], None] | None,
    start: float,
) -> MatteFolderSummary:
    """The run itself, the output folder locked."""
    summary_path = out_dir / SUMMARY_NAME
    write_summary(rows, summary_path)  # marks the folder as this command's before any output
    settings = settings or GreenPostSettings()
    n_workers = min(workers or os.cpu_count() or 1, len(images))
    try:
        with _Progress(progress, len(images), log) as bar:
            for row in rows:
                bar.log(f"{row['status']} {row['file']}: {row['message']}")

            def record(row: dict[str, Any]) -> None:
                rows.append(row)
                if row["status"] != STATUS_OK:
                    bar.log(f"{row['status']} {row['file']}: {row['message']}")
                bar.advance()

            if n_workers == 1:
                for path in images:
                    record(matte_one(path, out_dir, bits, settings, reference))
            else:
                context = multiprocessing.get_context("spawn")  # safe beside threads, same on every OS
                with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_single_thread_worker) as pool:
                    futures = [pool.submit(matte_one, p, out_dir, bits, settings, reference) for p in images]
                    try:
                        for future in as_completed(futures):
                            record(future.result())
                    except BaseException:
                        # Ctrl-C (or any error): drop the images not started, else leaving the block
                        # would matte every one of them before the command could stop.
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
    except BaseException:
        with contextlib.suppress(FactoryError):
            write_summary(rows, summary_path)  # interrupted: the rows of the files done so far
        raise
    write_summary(rows, summary_path)
    return MatteFolderSummary(in_dir, out_dir, rows, summary_path, time.perf_counter() - start)


class _Progress:
    """The command's progress bar (``factory.feedback``: on a terminal only, none with ``-q``) over
    ``total`` items, and a line logger that prints above it; a caller's ``log`` takes the lines
    instead. Without ``enabled``, neither bar nor lines."""

    def __init__(self, enabled: bool, total: int, log: Callable[[str], None] | None) -> None:
        self.enabled, self.total, self._log = enabled, total, log
        self._feedback: Feedback | None = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._feedback = Feedback("matte").__enter__()
            self._task = self._feedback.bar(self.total)
        return self

    def advance(self) -> None:
        if self._feedback is not None:
            self._feedback.advance(self._task)

    def log(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
        elif self._feedback is not None:
            self._feedback.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, *exc: object) -> None:
        if self._feedback is not None:
            self._feedback.__exit__(*exc)
