"""The `factory` command line: parses arguments and calls the package, nothing more.

Every command raises :class:`factory.errors.FactoryError` for problems the user can fix; ``main``
prints them as one line on stderr and exits 2 (bad usage or input) or 1 (a failed run). Any
other exception is an internal error: one line too, and the traceback only with ``--debug``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

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
        "Add --debug anywhere for a traceback on errors."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DEBUG_FLAG = "--debug"


def _echo(line: str = "") -> None:
    typer.echo(line)


# ----------------------------------------------------------------------------------------- plan


@app.command("plan")
def plan_cmd(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Manifest YAML (see manifests/).")],
    n: Annotated[int, typer.Option("--n", help="Number of samples to plan (a positive integer).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the plan as Parquet here.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Override the manifest's base seed.")] = None,
) -> None:
    """Expand a manifest into exactly N sample rows (key, class or grid cell, prompt, seed, attributes).

    The same manifest, N and seed give the same plan, byte for byte; a larger N keeps the first
    rows unchanged. Prints a summary: rows, classes or cells, and min/max samples per class.
    """
    from factory.manifest import load_manifest
    from factory.plan import build_plan, summarize, write_plan
    from factory.errors import InputError

    if n <= 0:
        raise InputError(f"--n must be a positive integer, got {n}")
    m = load_manifest(manifest)
    if seed is not None:
        m = m.model_copy(update={"seed": seed})
    table = build_plan(m, n)
    if out is not None:
        _check_output_file(out)
        write_plan(table, out)
    for line in summarize(table, m).lines():
        _echo(line)
    if out is not None:
        _echo(f"plan written to {out}")


def _check_output_file(path: Path) -> None:
    from factory.errors import InputError

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file name for --out")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"{parent}: cannot create output directory ({exc.strerror or exc})") from exc
    import os

    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: output directory is not writable")


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
            "a diffusers folder, a .safetensors file, a DiffuMatting checkpoint folder, or a hub id "
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
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=0, help="GPUs to use. Default: all.")] = None,
    address: Annotated[
        Optional[str],
        typer.Option("--address", help="Join a Ray cluster (auto, HOST:PORT or ray://...) instead of starting one."),
    ] = None,
    ray_tmp: Annotated[
        Optional[Path], typer.Option("--ray-tmp", help="Ray's temporary folder. Default: under the run directory.")
    ] = None,
    no_ray: Annotated[
        bool, typer.Option("--no-ray", help="Run everything in this process (debugging; no fan-out).")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Delete the run's existing samples and start over.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any sample failed.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device for --no-ray (cpu, cuda).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (GPU, fixed resolution).")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Override the manifest's base seed.")] = None,
) -> None:
    """Plan, sample, matte, score and store N samples; re-running the same command resumes.

    Starts a local Ray instance sized to the machine unless --address is given. Failed samples are
    recorded with their error and the run goes on; the exit code is 0 unless --strict.
    """
    from factory.errors import InputError
    from factory.generate import GenerateOptions, run_generate

    if n <= 0:
        raise InputError(f"--n must be a positive integer, got {n}")
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
        )
    )
    for line in summary.lines():
        _echo(line)
    if summary.failed:
        typer.echo(f"warning: {summary.failed} of {summary.planned} samples failed (see the index)", err=True)
        if strict:
            raise typer.Exit(1)


# --- matte / eval commands (issue 3) ---

# --- filter / export commands (issue 6) ---

# --- train command (issue 7) ---


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning every error into one line and an exit code."""
    from factory.errors import FactoryError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = _DEBUG_FLAG in args
    args = [a for a in args if a != _DEBUG_FLAG]
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="factory", standalone_mode=False)
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
        typer.echo(f"error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        code = 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        first = " ".join(str(exc).split())[:300]
        typer.echo(f"error: internal error: {type(exc).__name__}: {first} (re-run with --debug for details)", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
