"""The `factory` command line: parses arguments and calls the package, nothing more.

Every command raises :class:`factory.errors.FactoryError` for problems the user can fix; ``main``
prints them as one line on stderr and exits 2 (bad usage or input) or 1 (a failed run). Any
other exception is an internal error: one line too, and the traceback only with ``--debug``.
"""

from __future__ import annotations

import signal

from factory.errors import exit_on_ctrl_c_while_importing

_imported = exit_on_ctrl_c_while_importing()  # Ctrl-C during the imports below: one line, exit 130

import inspect  # noqa: E402
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from factory.errors import (
    TERMINATED_EXIT,
    FactoryError,
    install_sigint_handler,
    install_sigterm_handler,
    was_interrupted,
    was_terminated,
)
from factory.feedback import NORMAL, QUIET, VERBOSE, set_verbosity

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

app = typer.Typer(
    name="factory",
    help=(
        "Manufacture image-matting datasets with DiffuMatting: Stable Diffusion draws objects on a "
        "green canvas, GreenPost turns each into a matting-level alpha, GSG scores the canvas.\n\n"
        "Typical use: factory generate --manifest manifests/gom.yaml --n 10000; "
        "factory filter --min-gsg 0.8; factory export --format webdataset. "
        "-q, -v and --debug may be given anywhere on the line."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DEBUG_FLAG = "--debug"
_QUIET_FLAGS = ("-q", "--quiet")
_VERBOSE_FLAGS = ("-v", "--verbose")


def _echo(line: str = "") -> None:
    """A result line on stdout (none with -q; warnings and errors still go to stderr)."""
    from factory.feedback import QUIET, verbosity

    if verbosity() > QUIET:
        typer.echo(line)


def _print_version(value: bool) -> None:
    if value:
        import factory

        typer.echo(f"factory {factory.__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only warnings and errors: no status line, progress bar or summary.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also print each phase of a command as a line (start-up, Ray, model loading).")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """Options of every command; main() takes -q, -v and --debug from anywhere on the line."""


# ----------------------------------------------------------------------------------------- plan


@app.command("plan")
def plan_cmd(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Manifest YAML (see manifests/).")],
    n: Annotated[int, typer.Option("--n", help="Number of samples to plan (a positive integer).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the plan as Parquet here.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=2**62, help="Override the manifest's base seed (0..2^62, as in a manifest).")] = None,
) -> None:
    """Expand a manifest into exactly N sample rows (key, class or grid cell, prompt, seed, attributes).

    The same manifest, N and seed give the same plan, byte for byte; a larger N keeps the first
    rows unchanged. Prints a summary: rows, classes or cells, and min/max samples per class.
    """
    from factory.fsutil import check_output_file
    from factory.manifest import load_manifest
    from factory.plan import check_n, check_plan_out, summarize_manifest, write_plan_file

    check_n(n)
    m = load_manifest(manifest)
    if seed is not None:
        m = m.model_copy(update={"seed": seed})
    target = check_plan_out(check_output_file(out)) if out is not None else None
    summary = write_plan_file(m, n, target) if target is not None else summarize_manifest(m, n)
    for line in summary.lines():
        _echo(line)
    if out is not None:
        _echo(f"plan written to {out}")


# ------------------------------------------------------------------------------------- generate


def _parse_lora(values: list[str]) -> list[tuple[str, float]]:
    from factory.errors import InputError

    out = []
    for value in values:
        path, sep, scale = value.rpartition(":")
        if not sep or not path or "/" in scale or scale.endswith(".safetensors"):
            path, scale = value, "1.0"
        try:
            out.append((path, float(scale)))
        except ValueError as exc:
            raise InputError(f"--lora {value}: scale must be a number (PATH[:SCALE])") from exc
    return out


@app.command("generate")
def generate_cmd(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Manifest YAML (see manifests/).")],
    n: Annotated[int, typer.Option("--n", help="Number of samples in the run (a positive integer).")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run directory. Default: runs/<manifest name>.")
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="Override the manifest's model: 'tiny' (random tiny model, non-photographic, for tests), "
            "'toy' (the small shipped model of a toy world, 64 px, docs/toy-model.md), a diffusers folder, a .safetensors file, a DiffuMatting checkpoint folder, or a hub id "
            "(from the local cache only).",
        ),
    ] = None,
    lora: Annotated[
        Optional[list[str]], typer.Option("--lora", help="LoRA weights PATH[:SCALE]; repeatable.")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Also load .bin/.ckpt pickle weights (unsafe: runs code).")
    ] = False,
    safety_checker: Annotated[
        bool, typer.Option("--safety-checker", help="Run the model's NSFW safety checker (off by default).")
    ] = False,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", min=1, help="Images per sampler call. Default: fit to memory.")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", min=1, help="Sampler workers. Default: one per GPU (2 on CPU).")
    ] = None,
    gpus: Annotated[
        Optional[int], typer.Option("--gpus", min=0, help="GPUs to use, one sampler worker each. Default: all; 0: sample on CPU.")
    ] = None,
    address: Annotated[
        Optional[str],
        typer.Option("--address", help="Join a Ray cluster (auto, HOST:PORT or ray://...) instead of starting one."),
    ] = None,
    ray_tmp: Annotated[
        Optional[Path],
        typer.Option(
            "--ray-tmp",
            help="Ray's temporary folder (local Ray only). Default: RUN/ray, or a short path in the temp dir "
            "when that is too long for Ray's sockets.",
        ),
    ] = None,
    no_ray: Annotated[
        bool, typer.Option("--no-ray", help="Run everything in this process (debugging; no fan-out).")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Delete the run's existing samples and start over.")
    ] = False,
    shrink: Annotated[
        bool, typer.Option("--shrink", help="Allow a smaller --n than the run's: its samples beyond leave the plan.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any sample failed.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device the model samples on (cpu, cuda, cuda:1). Default: CUDA where there is a GPU.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (GPU, fixed resolution).")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=2**62, help="Override the manifest's base seed (0..2^62, as in a manifest).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps. Default: the manifest's sampler.steps.")] = None,
    guidance: Annotated[
        Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale. Default: the manifest's.")
    ] = None,
    size: Annotated[
        Optional[str], typer.Option("--size", help="Image size: SIZE or WIDTHxHEIGHT, multiples of 8 (e.g. 512, 768x512).")
    ] = None,
    scheduler: Annotated[
        Optional[str], typer.Option("--scheduler", help="dpmpp, ddim, euler, euler_a, pndm or unipc. Default: the manifest's.")
    ] = None,
    negative_prompt: Annotated[
        Optional[str], typer.Option("--negative-prompt", help="Negative prompt of every sample ('' for none).")
    ] = None,
    writes: Annotated[
        str,
        typer.Option(
            "--writes",
            help="Who writes the sample files: workers (on the node that made them; the run directory must be "
            "shared storage), driver, or auto (workers when every node sees the run directory; printed).",
        ),
    ] = "auto",
) -> None:
    """Plan, sample, matte, score and store N samples; re-running the same command resumes.

    --steps, --guidance, --size, --scheduler and --negative-prompt override the manifest and are
    recorded in the run's copy of it (RUN/manifest.yaml) and its fingerprint: resuming a run with
    other values is refused (pass --restart or another --out).

    Starts a local Ray instance sized to the machine unless --address is given. Failed samples are
    recorded with their error and the run goes on; the exit code is 0 unless --strict.
    """
    from factory.feedback import plural
    from factory.generate import GenerateOptions, run_generate

    summary = run_generate(
        GenerateOptions(
            manifest=manifest,
            n=n,
            out=out,
            model=model,
            loras=_parse_lora(lora or []),
            allow_pickle=allow_pickle,
            safety_checker=safety_checker,
            batch_size=batch_size,
            workers=workers,
            gpus=gpus,
            address=address,
            ray_tmp=ray_tmp,
            use_ray=not no_ray,
            restart=restart,
            device=device,
            compile=compile,
            seed=seed,
            steps=steps,
            guidance=guidance,
            size=size,
            scheduler=scheduler,
            negative_prompt=negative_prompt,
            shrink=shrink,
            writes=writes,
        )
    )
    for line in summary.lines():
        _echo(line)
    if summary.failed:
        typer.echo(f"warning: {summary.failed} of {plural(summary.planned, 'sample')} failed (see the index)", err=True)
        if strict:
            raise typer.Exit(1)


# ------------------------------------------------------------------------------ matte / eval


def _parse_rgb(value: str, option: str) -> tuple[int, int, int]:
    from factory.errors import InputError

    try:
        rgb = tuple(int(part) for part in value.replace(" ", "").split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise InputError(f"{option} {value}: give R,G,B as three integers 0..255, e.g. 0,255,0")
    return rgb  # type: ignore[return-value]


def _print_table(table: object) -> None:
    from rich.console import Console

    from factory.feedback import QUIET, verbosity

    if verbosity() == QUIET:
        return
    console = Console()
    if not console.is_terminal:  # piped: as wide as the table needs (at least 160), nothing folded
        console = Console(width=max(160, Console(width=100_000).measure(table).maximum))
    console.print(table)


@app.command("matte")
def matte_cmd(
    in_dir: Annotated[
        Path, typer.Argument(metavar="IN_DIR", help="Folder of images of objects on a green screen (.png .jpg .jpeg .webp).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).")],
    bits: Annotated[int, typer.Option("--bits", help="Alpha bit depth: 8 or 16.")] = 8,
    workers: Annotated[
        Optional[int], typer.Option("--workers", min=1, help="Processes. Default: one per CPU core.")
    ] = None,
    reference: Annotated[
        str, typer.Option("--reference", help="Reference green of the GSG score, as R,G,B.")
    ] = "0,255,0",
    chroma: Annotated[
        str,
        typer.Option(
            "--chroma",
            help="Subsampled JPEG chroma to restore: auto (detected per image), off, 4:2:0 or 4:2:2 "
            "(for images resized after decoding, where detection cannot see it).",
        ),
    ] = "auto",
) -> None:
    """Matte every image of IN_DIR with GreenPost (alpha and green-free foreground) and score its canvas.

    Writes OUT/STEM.alpha.png (single channel, --bits 8 or 16), OUT/STEM.fg.png (RGB foreground,
    despilled) and OUT/matte.csv (per file: status, GSG score and distance, canvas colour,
    background uniformity, key-colour flag, timings). A corrupt or non-RGB file is reported in one
    line and skipped; an image without a green board (all red, any grey image) is reported as
    no_board and gets no outputs. Exit code: 0 if at least one image was matted, 1 if none could be or
    an output could not be written (a full disk stops the run), 2 for bad
    usage (missing folder, no images, unwritable output, an OUT that is IN_DIR or inside it, or one
    holding files of the same names that `factory matte` did not write).
    """
    from factory.feedback import plural
    from factory.errors import RunError
    from factory.matte import GreenPostSettings
    from factory.matte_folder import matte_folder

    settings = GreenPostSettings(chroma=chroma)
    summary = matte_folder(
        in_dir, out, bits=bits, workers=workers, settings=settings, reference=_parse_rgb(reference, "--reference")
    )
    _echo(
        f"matted {summary.processed} of {plural(len(summary.rows), 'file')} in {summary.seconds:.1f} s "
        f"({summary.skipped} skipped, {summary.no_board} without a green board, {summary.failed} failed); "
        f"outputs and {summary.summary_path.name} in {out}"
    )
    if summary.processed == 0:
        raise RunError(
            f"no image in {in_dir} could be matted ({summary.skipped} skipped, "
            f"{summary.no_board} without a green board, {summary.failed} failed)"
        )


@app.command("eval")
def eval_cmd(
    pred: Annotated[
        Path, typer.Option("--pred", help="Predicted mattes: KEY.alpha.png (as `factory matte` writes them) or KEY.png.")
    ],
    gt: Annotated[
        Path,
        typer.Option("--gt", help="Ground-truth mattes: KEY.png, or KEY.alpha.png beside its image (a `factory toy-data` folder)."),
    ],
    trimap: Annotated[
        Optional[Path],
        typer.Option("--trimap", help="Trimaps STEM.png (0 / 128 / 255): metrics on the unknown region only."),
    ] = None,
    json_out: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the per-image metrics and the mean as JSON here.")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", min=1, help="Processes. Default: one per CPU core.")
    ] = None,
) -> None:
    """Matting metrics of predicted mattes against ground truth: per image and the mean, as a table.

    SAD, MSE, Grad and Conn follow the Composition-1k evaluation code (SAD, Grad and Conn divided by
    1000; MSE shown x1000 in the table, raw in the JSON), on the trimap's unknown region when
    --trimap is given and on the whole image otherwise; whole-image SAD and mean absolute
    difference are always added. Files pair up by key (KEY.alpha.png is the matte of KEY; its
    KEY.png and KEY.fg.png are not mattes); a missing or mismatched one is reported and left out
    of the mean. A matte is 8- or 16-bit grey, RGB with equal channels, or RGBA (a cut-out: its
    alpha channel); a colour image is reported as not a matte.
    """
    from factory.evaluate import check_report_file, evaluate_folders
    from factory.fsutil import atomic_write_text, check_output_file

    if json_out is not None:
        check_report_file(json_out, pred, gt, trimap)
        json_out = check_output_file(json_out)
    report = evaluate_folders(pred, gt, trimap, workers=workers)
    for line in report.issues:
        typer.echo(f"warning: {line}", err=True)
    _print_table(report.table())
    if json_out is not None:
        atomic_write_text(json_out, report.to_json())
        _echo(f"metrics written to {json_out}")

# ---------------------------------------------------------------------------- filter / export

_RUN_HELP = "Run directory. Default: the latest run made by `factory generate` in this directory."


@app.command("check")
def check_cmd(
    run: Annotated[Optional[Path], typer.Option("--run", help=_RUN_HELP)] = None,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Mark damaged samples planned (the next generate redoes them); rebuild a damaged index."),
    ] = False,
) -> None:
    """Check every done sample's files against the index: PNG structure and CRCs, sizes, JSON.

    Prints each damaged sample's key and reason (also with -q) and exits 1 if there is any (0 with
    --repair, once they are marked for the next `factory generate`).
    """
    from factory.check import run_check

    summary = run_check(run, repair=repair)
    for line in summary.problems():
        typer.echo(line)  # what check found is its result: shown with -q too
    for line in summary.report():
        _echo(line)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


@app.command("filter")
def filter_cmd(
    run: Annotated[Optional[Path], typer.Option("--run", help=_RUN_HELP)] = None,
    name: Annotated[
        str, typer.Option("--name", help="Selection name: written to RUN/selections/NAME.parquet (overwritten).")
    ] = "default",
    min_gsg: Annotated[
        Optional[float], typer.Option("--min-gsg", help="Drop samples whose GSG score is below this (0..1).")
    ] = None,
    min_coverage: Annotated[
        Optional[float], typer.Option("--min-coverage", help="Drop near-empty mattes: mean alpha below this.")
    ] = None,
    max_coverage: Annotated[
        Optional[float], typer.Option("--max-coverage", help="Drop near-full mattes: mean alpha above this.")
    ] = None,
    drop_border: Annotated[
        Optional[bool],
        typer.Option("--drop-border/--keep-border", help="Drop objects cut by the image border.", show_default=False),
    ] = None,
    drop_key_color: Annotated[
        Optional[bool],
        typer.Option(
            "--drop-key-color/--keep-key-color",
            help="Drop objects that contain the key colour (green inside the object).",
            show_default=False,
        ),
    ] = None,
    max_residual: Annotated[
        Optional[float],
        typer.Option(
            "--max-residual",
            help="Drop untrusted mattes: recomposition residual over the band above this (8-bit levels); 0 = off.",
        ),
    ] = None,
    min_confidence: Annotated[
        Optional[float],
        typer.Option("--min-confidence", help="Drop mattes whose confidence (0..1) is below this; 0 = off."),
    ] = None,
    drop_no_board: Annotated[
        Optional[bool],
        typer.Option(
            "--drop-no-board/--keep-no-board", help="Drop samples with no green board found.", show_default=False
        ),
    ] = None,
    dedup_distance: Annotated[
        Optional[int],
        typer.Option(
            "--dedup-distance",
            help="Near-duplicates: perceptual-hash Hamming distance (bits) at or below which only the best "
            "sample is kept; 0 = identical hashes only, -1 = off.",
        ),
    ] = None,
    per_class_cap: Annotated[
        Optional[int],
        typer.Option("--per-class-cap", help="Keep at most this many samples per class (the best GSG); 0 = no cap."),
    ] = None,
    verify_files: Annotated[
        bool,
        typer.Option("--verify-files", help="Also read every kept sample's files and drop damaged ones (slow: reads the images)."),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the counts; write no selection.")] = False,
) -> None:
    """Select the good samples of a run into a named selection (no image is copied).

    Options left out take the manifest's `filter:` defaults. Only done samples are candidates; each
    dropped sample is counted under the first reason that applies (low_gsg, empty_matte, full_matte,
    touches_border, key_color, no_board, untrusted_matte, near_duplicate, class_cap; corrupt with
    --verify-files). Re-running overwrites the selection.
    """
    from factory.filter import run_filter

    summary = run_filter(
        run,
        name=name,
        dry_run=dry_run,
        verify_files=verify_files,
        min_gsg=min_gsg,
        min_coverage=min_coverage,
        max_coverage=max_coverage,
        drop_border=drop_border,
        drop_key_color=drop_key_color,
        drop_no_board=drop_no_board,
        max_residual=max_residual,
        min_confidence=min_confidence,
        dedup_distance=dedup_distance,
        per_class_cap=per_class_cap,
    )
    for problem in summary.problems:
        typer.echo(f"warning: {problem}", err=True)
    for line in summary.lines():
        _echo(line)


@app.command("export")
def export_cmd(
    format: Annotated[
        Optional[str],
        typer.Option("--format", "-f", help="webdataset (tar shards) or folder (image/ alpha/ fg/ + metadata.jsonl). "
                     "Default: the manifest's export.format."),
    ] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help=_RUN_HELP)] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: RUN/export/SELECTION-FORMAT.")
    ] = None,
    selection: Annotated[
        Optional[str],
        typer.Option("--selection", "-s", help="Selection to export. Default: the most recent one (all done samples if none)."),
    ] = None,
    all_done: Annotated[bool, typer.Option("--all", help="Export every done sample, ignoring selections.")] = False,
    image_format: Annotated[
        Optional[str], typer.Option("--image-format", help="png (bytes copied) or jpg (re-encoded).")
    ] = None,
    jpeg_quality: Annotated[Optional[int], typer.Option("--jpeg-quality", help="JPEG quality (1..100). Default: the manifest's, 95.")] = None,
    alpha_bits: Annotated[
        Optional[int], typer.Option("--alpha-bits", help="8 or 16; copied when equal to the stored depth, else re-encoded.")
    ] = None,
    maxcount: Annotated[Optional[int], typer.Option("--maxcount", help="Samples per shard at most.")] = None,
    maxsize: Annotated[
        Optional[str], typer.Option("--maxsize", help="Bytes of members per shard at most, e.g. 1G, 512Mi, 3e9.")
    ] = None,
    split: Annotated[
        Optional[list[str]],
        typer.Option("--split", help="Held-out splits by class, e.g. val=0.05 (repeatable or comma-separated; "
                     "'none' for train only). Train is the remainder."),
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the split and the shuffle.")] = None,
    verify: Annotated[
        str, typer.Option("--verify", help="crc: PNG structure, CRCs, size and channels (cheap); decode: also decode every image.")
    ] = "crc",
    strict: Annotated[bool, typer.Option("--strict", help="Stop with exit 1 at the first damaged sample.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an earlier export in --out and start over.")] = False,
    no_fsync: Annotated[
        bool, typer.Option("--no-fsync", help="Do not fsync shards before renaming them (faster, less durable).")
    ] = False,
) -> None:
    """Write the selected samples as WebDataset shards or a folder tree, with a dataset card.

    Options left out take the manifest's `export:` defaults. Shards are written under a temporary
    name and renamed when complete; re-running the same command resumes (or restarts cleanly when the
    plan changed). Damaged samples are reported as `KEY: corrupt ...` and skipped (exit 1 with --strict).
    """
    from factory.export import ExportOptions, parse_size, parse_splits, run_export

    summary = run_export(
        ExportOptions(
            run=run,
            format=format,
            out=out,
            selection=selection,
            all_done=all_done,
            image_format=image_format,
            alpha_bits=alpha_bits,
            maxcount=maxcount,
            maxsize=parse_size(maxsize),
            splits=parse_splits(split),
            seed=seed,
            jpeg_quality=jpeg_quality,
            verify=verify,
            strict=strict,
            restart=restart,
            fsync=not no_fsync,
        ),
        on_problem=lambda line: typer.echo(f"warning: {line}", err=True),
    )
    for line in summary.lines():
        _echo(line)


# ------------------------------------------------------------------------------------ composite


@app.command("composite")
def composite_cmd(
    backgrounds: Annotated[
        Optional[str],
        typer.Option("--backgrounds", "-b", help="A folder of images (recursive), WebDataset shards (.tar, a {000..009} "
                     "pattern or a folder of .tar), or 'procedural'. Default: the manifest's composite.backgrounds."),
    ] = None,
    layout: Annotated[
        Optional[str], typer.Option("--layout", "-l", help="dim (fg/ alpha/ bg/ + pairs.csv), baked (K composites per "
                                    "object with alpha, trimap, recipe) or scenes (several objects, COCO JSON). Default: baked.")
    ] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help=_RUN_HELP)] = None,
    selection: Annotated[
        Optional[str], typer.Option("--selection", "-s", help="The run's selection to use. Default: the most recent one.")
    ] = None,
    objects: Annotated[
        Optional[str], typer.Option("--objects", help="Take the objects from an export (shards or folder) instead of a run.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: RUN/composite/LAYOUT (composite/LAYOUT here with --objects).")] = None,
    per_object: Annotated[Optional[int], typer.Option("--per-object", "-k", help="Composites (dim: pairings) per object. Default: 4.")] = None,
    size: Annotated[
        Optional[int], typer.Option("--size", help="Square output side in px (backgrounds scaled and cropped); 0: the background's own size. Default: 512.")
    ] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="baked: webdataset (shards) or folder (im/ gt/ ...).")] = None,
    layers: Annotated[
        Optional[bool], typer.Option("--layers/--no-layers", help="baked: also write KEY.fg.png and KEY.bg.png.", show_default=False)
    ] = None,
    alpha_bits: Annotated[Optional[int], typer.Option("--alpha-bits", help="8 or 16.")] = None,
    maxcount: Annotated[Optional[int], typer.Option("--maxcount", help="Units per shard and per committed part. Default: 1000.")] = None,
    scale: Annotated[Optional[str], typer.Option("--scale", help="LOW,HIGH: object's longer side / background's shorter side.")] = None,
    rotation: Annotated[Optional[float], typer.Option("--rotation", help="Largest rotation, degrees.")] = None,
    flip: Annotated[Optional[float], typer.Option("--flip", help="Probability of a horizontal flip.")] = None,
    truncation: Annotated[Optional[float], typer.Option("--truncation", help="Largest fraction of the object outside the frame.")] = None,
    min_visible: Annotated[Optional[float], typer.Option("--min-visible", help="scenes: smallest visible fraction of an instance.")] = None,
    min_size: Annotated[Optional[int], typer.Option("--min-size", help="Smallest placed object (longer side, px).")] = None,
    objects_per_scene: Annotated[Optional[str], typer.Option("--objects-per-scene", help="scenes: LOW,HIGH objects per scene.")] = None,
    blend: Annotated[
        Optional[list[str]], typer.Option("--blend", help="scenes: blend modes drawn per instance: none, gaussian, motion, poisson (approx). Repeatable.")
    ] = None,
    mix: Annotated[Optional[float], typer.Option("--mix", help="baked: probability of mixing in a second foreground.")] = None,
    harmonize: Annotated[Optional[float], typer.Option("--harmonize", help="Reinhard colour transfer strength in Lab (0: off).")] = None,
    shadow: Annotated[Optional[float], typer.Option("--shadow", help="Shadow opacity (0: off).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="scenes: visible alpha threshold of the COCO masks.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of every draw.")] = None,
    generative: Annotated[
        Optional[str], typer.Option("--generative", help="An SD1.5 inpainting model (diffusers folder; 'tiny' for tests) repainting a ring around each object.")
    ] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="generative: the prompt.")] = None,
    ring: Annotated[Optional[int], typer.Option("--ring", help="generative: ring width, px.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="generative: inpainting steps.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel parts as Ray CPU tasks (1: in this process); --generative adds painter actors, one per GPU.")] = 1,
    address: Annotated[Optional[str], typer.Option("--address", help="Join this Ray cluster (auto, HOST:PORT).")] = None,
    ray_tmp: Annotated[
        Optional[Path], typer.Option("--ray-tmp", help="With --workers 2 or more: Ray's temporary folder (local Ray only). Default: one in the system temp dir.")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="generative: torch device (cpu, cuda).")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an earlier composite in --out and start over.")] = False,
) -> None:
    """Paste generated objects into backgrounds, keeping their alpha exact (docs/composite.md).

    Options left out take the manifest's `composite:` defaults. Every composite is drawn from
    (seed, object key, k) and re-renders byte for byte from its recipe; re-running the same command
    resumes after the last committed part. A damaged object (a truncated PNG, a file that is not one) is
    named in one warning line and skipped (exit 0); none left is an error (exit 2).
    """
    from factory.composite import CompositeOptions, parse_range, run_composite

    overrides = {
        "backgrounds": backgrounds, "layout": layout, "per_object": per_object, "format": format, "layers": layers,
        "alpha_bits": alpha_bits, "maxcount": maxcount, "scale": parse_range(scale, "--scale"), "rotation": rotation,
        "flip": flip, "truncation": truncation, "min_visible": min_visible, "min_size": min_size,
        "objects": parse_range(objects_per_scene, "--objects-per-scene", int), "blend": blend, "mix": mix,
        "harmonize": harmonize, "shadow": shadow, "threshold": threshold, "seed": seed, "generative": generative,
        "prompt": prompt, "ring": ring, "steps": steps,
    }
    overrides["size"] = size
    summary = run_composite(CompositeOptions(run=run, selection=selection, objects=objects, out=out, overrides=overrides,
                                             restart=restart, workers=workers, address=address, ray_tmp=ray_tmp, device=device),
                            on_problem=lambda line: typer.echo(f"warning: {line}", err=True))
    for line in summary.lines():
        _echo(line)


# ------------------------------------------------------------------------------------- train


@app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option("--output_dir", "--out", "-o", help="Run folder: checkpoints, logs, validation images. "
                                      "It is itself the latest model: a diffusers pipeline folder "
                                      "(StableDiffusionPipeline.from_pretrained) and `factory generate --model OUT`.")],
    data: Annotated[
        Optional[list[str]],
        typer.Option("--train_data_dir", "--data", "-d", help="Matting set: a folder (image/ + alpha/ [+ fg/], or KEY.png + "
                     "KEY.alpha.png [+ KEY.fg.png, KEY.json]) or WebDataset shards (a .tar, a {000..009} pattern, or a "
                     "folder of .tar). Repeatable."),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option("--pretrained_model_name_or_path", "--model", help="Base model: 'tiny' (random test model), 'toy' (the "
                     "packaged toy-world model), a diffusers SD1.5 folder or cached hub id, or a DiffuMatting checkpoint to continue (its head too). Default: tiny."),
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--max_train_steps", "--steps", min=1, help="Optimizer steps in total. Default: 10000.")] = None,
    stage: Annotated[
        Optional[str],
        typer.Option("--stage", help="generator (UNet: L_noise + L_g + L_detail), joint (UNet + matting head, all "
                     "losses), or both: generator for half the steps, then joint (the paper). Default: both."),
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--train_batch_size", "--batch-size", min=1, help="Samples per device per micro-batch. Default: 2.")
    ] = None,
    accumulation: Annotated[
        Optional[int], typer.Option("--gradient_accumulation_steps", min=1, help="Micro-batches per optimizer step. Default: 1.")
    ] = None,
    resolution: Annotated[
        Optional[int], typer.Option("--resolution", min=16, help="Square training size in pixels (SD1.5: a multiple of 64). "
                     "Default: the model's native size (512 for SD1.5, 64 for tiny and toy).")
    ] = None,
    lr: Annotated[Optional[float], typer.Option("--learning_rate", "--lr", help="UNet learning rate. Default: 2e-6 (the paper).")] = None,
    lr_scheduler: Annotated[Optional[str], typer.Option("--lr_scheduler", help="diffusers lr schedule name. Default: constant_with_warmup.")] = None,
    lr_warmup_steps: Annotated[Optional[int], typer.Option("--lr_warmup_steps", min=0, help="Warm-up steps of the lr schedule. Default: 100.")] = None,
    mixed_precision: Annotated[
        Optional[str], typer.Option("--mixed_precision", help="no, fp16, bf16 (autocast; trainable weights stay float32) or auto. "
                                    "Default: auto, which is bf16 on CUDA and no on CPU.")
    ] = None,
    checkpoint_every: Annotated[
        Optional[int], typer.Option("--checkpointing_steps", "--checkpoint-every", min=1,
                                    help="Checkpoint (and validation samples) every K steps. Default: 500.")
    ] = None,
    keep: Annotated[Optional[int], typer.Option("--checkpoints_total_limit", min=1, help="Checkpoints kept on disk. Default: 2.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out exactly from its latest checkpoint "
                           "(optimizer, lr schedule, step, RNG, data order).")
    ] = False,
    resume_from: Annotated[
        Optional[str], typer.Option("--resume_from_checkpoint", help="'latest' (as --resume; a folder with no run starts one) "
                                    "or a checkpoint of the run (a path, or a name such as step-00000500): later ones are deleted.")
    ] = None,
    report_to: Annotated[
        Optional[str], typer.Option("--report_to", help="tensorboard (OUT/logs), wandb or none; log.jsonl is always written. "
                                    "Default: tensorboard.")
    ] = None,
    use_ema: Annotated[bool, typer.Option("--use_ema", help="Keep an EMA of the UNet and head; checkpoints hold it.")] = False,
    gradient_checkpointing: Annotated[
        Optional[bool], typer.Option("--gradient_checkpointing/--no_gradient_checkpointing", help="Recompute UNet activations "
                                     "in backward (less memory). Default: on.", show_default=False)
    ] = None,
    data_workers: Annotated[Optional[int], typer.Option("--dataloader_num_workers", min=0, help="Data loader processes. Default: 2.")] = None,
    empty_prompts: Annotated[
        Optional[float], typer.Option("--proportion_empty_prompts", min=0.0, max=1.0, help="Share of samples trained with the "
                                      "empty prompt (classifier-free guidance's unconditional branch; ~0.1 from scratch). Default: 0.")
    ] = None,
    captions: Annotated[
        Optional[Path], typer.Option("--captions", help="Captions file: .jsonl ({\"key\", \"caption\"}), .json (key -> caption) "
                                     "or .tsv (KEY<TAB>caption), e.g. from `factory caption`. Wins over the samples' metadata.")
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML of training settings (docs/train.md); options given here win.")
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of data order, augmentation, noise and a new head. Default: 0.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (cpu, cuda, cuda:1). Default: CUDA if available.")] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Data-parallel training processes on Ray Train (one GPU each, or CPU "
                          "processes without GPU). 1 = this process only.")
    ] = 1,
    address: Annotated[
        Optional[str], typer.Option("--address", help="With --workers: join this Ray cluster (auto, HOST:PORT) for multi-node training.")
    ] = None,
    stop_at: Annotated[
        Optional[int], typer.Option("--stop-at", min=1, help="Stop (with a checkpoint) after this step; continue later with --resume.")
    ] = None,
) -> None:
    """Fine-tune a Stable Diffusion 1.5 model into a DiffuMatting model (green canvas + matting head).

    Objects from the matting sets are composited on the fly onto greens, and the model learns the
    denoising loss, green background control (the "green" token's cross-attention vs the background),
    boundary detail (Sobel features in the transition band) and, with the matting head, a coarse
    alpha (Dice + L1). Option names follow diffusers' training scripts (the short ones are aliases).
    See docs/train.md for every setting and its default.
    """
    from factory.train import TrainOptions, run_train

    overrides = {
        "data": data or None,
        "model": model,
        "steps": steps,
        "stage": stage,
        "batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "resolution": resolution,
        "lr": lr,
        "lr_scheduler": lr_scheduler,
        "lr_warmup_steps": lr_warmup_steps,
        "mixed_precision": mixed_precision,
        "checkpoint_every": checkpoint_every,
        "keep_checkpoints": keep,
        "report_to": report_to,
        "ema": True if use_ema else None,
        "gradient_checkpointing": gradient_checkpointing,
        "data_workers": data_workers,
        "captions": str(captions) if captions is not None else None,
        "proportion_empty_prompts": empty_prompts,
        "seed": seed,
        "device": device,
    }
    summary = run_train(
        TrainOptions(out=out, overrides={k: v for k, v in overrides.items() if v is not None}, config_file=config,
                     resume=resume, resume_from=resume_from, stop_at=stop_at, workers=workers, address=address)
    )
    for line in summary.lines():
        _echo(line)


# -------------------------------------------------------------------------------------- toy-data


@app.command("caption")
def caption_cmd(
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Training set to caption: what `factory train --data` "
                                "reads (folders or WebDataset shards). Repeatable.")
    ],
    model: Annotated[
        str, typer.Option("--model", help="transformers image-to-text model: a local folder or a cached hub id "
                          "(BLIP, BLIP-2, InstructBLIP, Florence-2, ...). Never downloaded.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Captions file (.jsonl) for `factory train --captions`; "
                                      "samples already in it are skipped.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")] = 8,
    prompt: Annotated[
        Optional[str], typer.Option("--prompt", help="Text given with each image (BLIP: a prefix such as 'a photo of'; "
                                    "Florence-2: a task token). Default: the model family's own (<CAPTION> for Florence-2).")
    ] = None,
    class_prefix: Annotated[bool, typer.Option("--class-prefix", help="Start captions with the sample's class name.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest caption, in tokens.")] = 40,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device. Default: CUDA if available.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Caption on Ray actors (one model each, one GPU each where there are GPUs).")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="With --ray: the number of actors.")] = 1,
    address: Annotated[Optional[str], typer.Option("--address", help="With --ray: join this Ray cluster.")] = None,
    ray_tmp: Annotated[
        Optional[Path], typer.Option("--ray-tmp", help="With --ray: Ray's temporary folder (local Ray only). Default: one in the system temp dir.")
    ] = None,
) -> None:
    """Caption a training set with an image-to-text model, for `factory train --captions`.

    Resumable: stop it at any time, run it again, and only the samples not captioned are done.
    """
    from factory.caption import CaptionOptions, run_caption

    summary = run_caption(
        CaptionOptions(data=data, out=out, model=model, batch_size=batch_size, prompt=prompt, class_prefix=class_prefix,
                       max_new_tokens=max_new_tokens, device=device, ray=ray, workers=workers, address=address, ray_tmp=ray_tmp)
    )  # fmt: skip
    for line in summary.lines():
        _echo(line)


@app.command("toy-data")
def toy_data_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (KEY.png, KEY.alpha.png, KEY.fg.png, KEY.json).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of samples.")] = 100,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**62, help="World seed (0..2^62): the same seed gives the same bytes.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, help="Image size in pixels: a multiple of 8, 16..1024.")] = 64,
    start: Annotated[int, typer.Option("--start", min=0, help="Index of the first sample (disjoint sets from one seed).")] = 0,
) -> None:
    """Render the toy world: procedural objects (fur, feathers, leaves, glass, nets, smoke, stars...)
    with exact fractional alpha on green canvases, as a matting set for train, matte and eval.
    Re-running the same command resumes."""
    from factory.toy.dataset import write_toy_set

    summary = write_toy_set(out, n=n, seed=seed, size=size, start=start)
    for line in summary.lines():
        _echo(line)


# ----------------------------------------------------------------------------------------- main


def _tidy_help(command: object) -> None:
    """Help without noise: each paragraph of a command's text wrapped to the terminal (not broken
    where the docstring's lines end), flags show no ``<bool>`` type (they take no value) and arguments read
    ``IN_DIR`` in the usage line, not ``{in_dir}``. Uses typer's parameter classes; a typer that
    lacks these hooks keeps its own rendering."""
    from typer.core import TyperArgument, TyperOption

    class Argument(TyperArgument):
        def get_usage_pieces(self, ctx: object) -> list[str]:
            name = (self.metavar or self.name or "").upper()
            return [name if self.required else f"[{name}]"]

    def flag_help(get_help_option: Any) -> Any:
        def wrapped(ctx: object) -> Any:
            option = get_help_option(ctx)
            if option is not None:
                option.metavar = ""
            return option

        return wrapped

    for sub in [command, *getattr(command, "commands", {}).values()]:
        if getattr(sub, "help", None):  # typer keeps a docstring's line breaks after its first paragraph
            sub.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(sub.help).split("\n\n"))
        if hasattr(sub, "get_help_option"):
            sub.get_help_option = flag_help(sub.get_help_option)
        for param in getattr(sub, "params", []):
            if isinstance(param, TyperOption) and param.is_flag:
                param.metavar = ""
            elif type(param) is TyperArgument:
                param.__class__ = Argument


class _EscapedEOF(Exception):
    """An ``EOFError`` a command let escape, carried past typer (see :func:`_carry_eof_past_typer`)."""

    def __init__(self, error: EOFError) -> None:
        super().__init__(str(error))
        self.error = error


def _carry_eof_past_typer(command: Any) -> None:
    """typer turns an ``EOFError`` escaping a command into ``Abort`` (after a blank line), which
    would read as Ctrl-C's "aborted", exit 130. Carried past it, main reports it as the unexpected
    error it is; a Ctrl-D at a prompt is still an ``Abort`` (click raises that one itself)."""
    invoke = command.invoke

    def carried(ctx: Any) -> Any:
        try:
            return invoke(ctx)
        except EOFError as exc:
            raise _EscapedEOF(exc) from exc

    command.invoke = carried


def _internal_error(exc: BaseException) -> int:
    """An exception no command expected: one line (the traceback is --debug's), exit 1."""
    first = " ".join(str(exc).split())[:300]
    typer.echo(f"error: internal error: {type(exc).__name__}: {first} (re-run with --debug for details)", err=True)
    return 1


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning every error into one line and an exit code."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    install_sigint_handler()  # remembered: an interrupt a library turns into another error is still Ctrl-C
    install_sigterm_handler()  # SIGTERM takes Ctrl-C's path (commit, stop workers), then exits 143
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _DEBUG_FLAG in args
    quiet = any(a in _QUIET_FLAGS for a in args)
    verbose = any(a in _VERBOSE_FLAGS for a in args)
    args = [a for a in args if a not in (_DEBUG_FLAG, *_QUIET_FLAGS, *_VERBOSE_FLAGS)]
    set_verbosity(QUIET if quiet else VERBOSE if verbose else NORMAL)
    try:
        command = typer.main.get_command(app)
        _tidy_help(command)
        _carry_eof_past_typer(command)
        code = command.main(args=args, prog_name="factory", standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt no command caught into a silent 130
            typer.echo("error: terminated (SIGTERM)" if was_terminated() else "error: interrupted", err=True)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 130
    except click_exceptions.ClickException as exc:
        if debug:
            raise
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        code = exc.exit_code
    except FactoryError as exc:
        if debug:
            raise
        message = str(exc)
        if was_terminated() and message.startswith("interrupted"):
            message = "terminated (SIGTERM)" + message[len("interrupted") :]
        typer.echo(f"error: {message}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        typer.echo("error: terminated (SIGTERM)" if was_terminated() else "error: interrupted", err=True)
        code = 130
    except _EscapedEOF as exc:
        if debug:
            raise exc.error from exc.error.__cause__  # its own traceback, not the carrier's
        code = _internal_error(exc.error)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        if was_interrupted() or was_terminated():  # a library caught the interrupt and failed in its own way
            typer.echo("error: terminated (SIGTERM)" if was_terminated() else "error: interrupted", err=True)
            code = 130
        else:
            code = _internal_error(exc)
    finally:
        set_verbosity(NORMAL)  # -q / -v hold for this command only (main may be called again in-process)
    code = code if isinstance(code, int) else 0
    if code == 130 and was_terminated():
        code = TERMINATED_EXIT
    # The command is over: a SIGTERM or Ctrl-C now must not turn its exit into a traceback (the
    # process ignores them while it exits); called in-process (tests), the caller's handlers come back.
    for sig, handler in previous.items():
        signal.signal(sig, signal.SIG_IGN if argv is None else handler if handler is not None else signal.SIG_DFL)
    sys.exit(code)


_imported()  # from here Ctrl-C raises KeyboardInterrupt again (main installs its own handler)

if __name__ == "__main__":
    main()
