"""`factory composite`: exact labels, occlusion, COCO, the DIM layout, re-rendering, resume, the
generative ring, and bad input. Objects come from a tiny fake run (32-px discs with soft edges);
backgrounds are procedural or a few small files made here; composites are 64 px."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import main
from factory.composite.backgrounds import load_backgrounds
from factory.composite.blend import quantized
from factory.composite.layouts import baked_members
from factory.composite.objects import load_objects
from factory.composite.part import KILL_ENV
from factory.composite.placement import Placement, place_object
from factory.composite.recipe import frame_side
from factory.composite.render import _edge, render
from factory.imageio import decode_alpha, decode_rgb
from factory.manifest import CompositeSettings
from tests.fake_run import make_run

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("composite-run")
    return make_run(folder, 5).root


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("composite-*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    return samples


def check_exact(image: np.ndarray, alpha: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> None:
    a = alpha.astype(np.float64)[..., None]
    expected = np.rint(a * fg + (1 - a) * bg)
    assert np.abs(image.astype(np.float64) - expected).max() <= 1


def test_baked_shards_with_layers_are_exact_and_rerender_from_recipes(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "baked"
    code, stdout, err = cli(capsys, "composite", "--run", run_dir, "-b", "procedural", "--size", 64, "--layers",
                            "--per-object", 3, "--mix", 0.5, "--harmonize", 0.6, "--shadow", 0.5, "--rotation", 30,
                            "--truncation", 0.3, "--maxcount", 4, "-o", out)
    assert code == 0, err
    assert "wrote 15 composites" in stdout
    samples = shard_samples(out)
    assert len(samples) == 15
    mixed = 0
    for key, m in samples.items():
        recipe = json.loads(m["json"])
        assert recipe["label"] == "exact"
        mixed += len(recipe["objects"]) == 2
        image, alpha = decode_rgb(m["png"]), decode_alpha(m["alpha.png"])
        check_exact(image, alpha, decode_rgb(m["fg.png"]), decode_rgb(m["bg.png"]))
        assert {"fg_original.png", "shadow.png"} <= set(m)
        trimap = np.asarray(Image.open(io.BytesIO(m["trimap.png"])))
        assert set(np.unique(trimap)) <= {0, 128, 255}
        assert (trimap[alpha == 0] != 255).all() and (trimap[(alpha > 0) & (alpha < 1)] == 128).all()
    assert 0 < mixed < 15
    # byte-identical re-render from each recipe alone
    settings = CompositeSettings(backgrounds="procedural", size=64)
    objects = load_objects(run_dir, None, None)
    backgrounds = load_backgrounds("procedural", 16, 64)
    for key, m in samples.items():
        recipe = json.loads(m["json"])
        rendered = render(recipe, objects, backgrounds, frame_side(settings, backgrounds.refs[0]))
        assert dict(baked_members(recipe, rendered, layers=True)) == m, key
    assert (out / "contact_sheet.png").is_file() and "exact | 15" in (out / "README.md").read_text()
    index = json.loads((out / "composites.wids.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == 15


def test_baked_folders_16_bit_are_exact(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "folders"
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", "procedural", "--size", 48, "--layers", "--format", "folder",
                       "--alpha-bits", 16, "--per-object", 1, "-o", out)
    assert code == 0, err
    keys = sorted(p.stem for p in (out / "im").glob("*.png"))
    assert len(keys) == 5
    for key in keys:
        alpha = decode_alpha((out / "gt" / f"{key}.png").read_bytes())
        assert Image.open(out / "gt" / f"{key}.png").mode.startswith("I")
        check_exact(decode_rgb((out / "im" / f"{key}.png").read_bytes()), alpha,
                    decode_rgb((out / "fg" / f"{key}.png").read_bytes()), decode_rgb((out / "bg" / f"{key}.png").read_bytes()))


def make_backgrounds(folder: Path) -> Path:
    folder.mkdir()
    (folder / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.png", "sub/b.jpg", "sub/c.png"]):
        Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "LICENSE").write_text("CC-BY-4.0 test backgrounds\n")
    return folder


def vitmatte_style_sample(root: Path, row: dict[str, str], other: dict[str, str], rng: np.random.Generator, crop: int = 24):
    """What a ViTMatte-style DIM loader does: read fg/alpha/bg, maybe mix a second foreground,
    resize the background to the foreground, crop, composite, trimap by eroding the alpha."""
    from scipy import ndimage

    fg = np.asarray(Image.open(root / row["fg"]).convert("RGB"), np.float32)
    alpha = np.asarray(Image.open(root / row["alpha"]), np.float32) / 255.0
    if rng.random() < 0.5:
        fg2 = np.asarray(Image.open(root / other["fg"]).convert("RGB"), np.float32)
        a2 = np.asarray(Image.open(root / other["alpha"]), np.float32) / 255.0
        mixed = 1 - (1 - alpha) * (1 - a2)
        fg = (alpha[..., None] * fg + ((1 - alpha) * a2)[..., None] * fg2) / np.maximum(mixed, 1e-6)[..., None]
        alpha = mixed
    h, w = alpha.shape
    bg = np.asarray(Image.open(root / row["bg"]).convert("RGB").resize((w, h)), np.float32)
    y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    fg, alpha, bg = fg[y : y + crop, x : x + crop], alpha[y : y + crop, x : x + crop], bg[y : y + crop, x : x + crop]
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    fg_mask = ndimage.binary_erosion(alpha >= 1, iterations=2)
    unknown = ~fg_mask & ndimage.binary_dilation(alpha > 0, iterations=2)
    trimap = np.where(fg_mask, 255, np.where(unknown, 128, 0))
    return image, alpha, trimap


def test_dim_layout_read_by_a_vitmatte_style_loader(run_dir: Path, tmp_path: Path, capsys) -> None:
    bgs = make_backgrounds(tmp_path / "bgs")
    out = tmp_path / "dim"
    code, stdout, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "--layout", "dim", "--per-object", 2, "-o", out)
    assert code == 0, err
    assert "skipped 1 unreadable background file\n" in stdout
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(rows) == 10 and {r["licence"] for r in rows} == {"CC-BY-4.0 test backgrounds"}
    store_alpha = next(run_dir.glob("samples/*/*.alpha.png"))
    assert (out / "alpha" / store_alpha.name.replace(".alpha", "")).read_bytes() == store_alpha.read_bytes()
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        image, alpha, trimap = vitmatte_style_sample(out, row, rows[(i + 3) % len(rows)], rng)
        assert image.shape == (24, 24, 3) and alpha.shape == (24, 24) and set(np.unique(trimap)) <= {0, 128, 255}
        assert 0 <= image.min() and image.max() <= 255
    assert "CC-BY-4.0" in (out / "README.md").read_text()


def test_backgrounds_in_symlinked_folders_are_found_and_a_link_loop_ends(tmp_path: Path) -> None:
    from factory.composite.backgrounds import from_folder

    data = make_backgrounds(tmp_path / "data")
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    (bgs / "linked").symlink_to(data)  # a folder of links to datasets
    (bgs / "loop").symlink_to(bgs)
    (bgs / "gone").symlink_to(tmp_path / "nowhere")
    src = from_folder(bgs)
    assert [r.id for r in src.refs] == ["linked/a.png", "linked/sub/b.jpg", "linked/sub/c.png"]
    assert src.skipped == 1  # linked/broken.jpg
    assert bgs / "linked" in src.roots


def test_dim_gives_two_backgrounds_that_flatten_alike_two_files(run_dir: Path, tmp_path: Path, capsys) -> None:
    """``a/b.png`` flattened is ``a__b.png``, the name of another background at the top."""
    bgs = tmp_path / "bgs"
    (bgs / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(bgs / "a" / "b.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(bgs / "a__b.png")
    out = tmp_path / "dim"
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "--layout", "dim", "-k", 4, "-o", out)
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    assert {r["background"] for r in rows} == {"a/b.png", "a__b.png"}
    for r in rows:
        assert (out / r["bg"]).read_bytes() == (bgs / r["background"]).read_bytes(), r


def test_scenes_occlusion_and_coco_masks(run_dir: Path, tmp_path: Path, capsys) -> None:
    from pycocotools.coco import COCO

    out = tmp_path / "scenes"
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", "procedural", "--layout", "scenes", "--size", 64,
                       "--per-object", 3, "--objects-per-scene", "2,3", "--min-visible", 0.3, "--scale", "0.4,0.7",
                       "--blend", "none", "--blend", "gaussian", "--blend", "motion", "--blend", "poisson", "-o", out)
    assert code == 0, err
    labels = {}
    for path in (out / "recipes").glob("*.json"):
        recipe = json.loads(path.read_text())
        labels[recipe["key"]] = recipe["label"]
        assert recipe["label"] == ("approx" if any(o["edge"]["mode"] == "poisson" for o in recipe["objects"]) else "exact")
    assert set(labels.values()) == {"exact", "approx"}
    coco = COCO(str(out / "annotations.json"))
    assert coco.getImgIds() and coco.getAnnIds()
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} <= {"owl", "fern", "red fox", "wine glass"}
    for ann in coco.loadAnns(coco.getAnnIds()):
        visible = decode_alpha((out / ann["alpha_file"]).read_bytes())
        assert np.array_equal(coco.annToMask(ann).astype(bool), visible >= 0.5)
        assert ann["area"] == float((visible >= 0.5).sum())
    # the occlusion rule, against the placed alphas made independently from each recipe
    objects = load_objects(run_dir, None, None)
    refs = objects.by_key()
    stacked = 0
    for path in sorted((out / "recipes").glob("*.json")):
        recipe = json.loads(path.read_text())
        alphas = []
        for entry in recipe["objects"]:
            fg, alpha = objects.load(refs[entry["key"]])
            _, a, _ = place_object(fg, alpha, Placement.from_dict(entry["placement"]), (64, 64))
            alphas.append(quantized(_edge(a, entry["edge"]), 8))
        stacked += len(alphas) > 1
        for i, a in enumerate(alphas):
            expected = a.astype(np.float64)
            for b in alphas[i + 1 :]:
                expected = expected * (1 - b)
            written = decode_alpha((out / "masks" / f"{recipe['key']}.{i}.png").read_bytes())
            assert np.abs(written - expected).max() <= 0.5 / 255 + 1e-6
            assert written.sum() >= 0.3 * a.sum() - 1
    assert stacked


def test_objects_from_an_export_and_backgrounds_from_shards_with_licences(run_dir: Path, tmp_path: Path, capsys) -> None:
    export = tmp_path / "export"
    assert cli(capsys, "export", "--run", run_dir, "--all", "--split", "none", "-o", export)[0] == 0
    shards = tmp_path / "bg-shards"
    shards.mkdir()
    rng = np.random.default_rng(1)
    with tarfile.open(shards / "bg-000000.tar", "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(buf, format="JPEG")
            members = [(f"img{i}.jpg", buf.getvalue()), (f"img{i}.json", json.dumps({"license": f"CC0 #{i}"}).encode())]
            if i == 2:
                members = [(f"img{i}.jpg", b"broken")]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "baked"
    code, stdout, err = cli(capsys, "composite", "--objects", export, "-b", shards / "bg-000000.tar", "--size", 48,
                            "--per-object", 2, "--format", "folder", "-o", out)
    assert code == 0, err
    assert "skipped 1 unreadable background file\n" in stdout
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(rows) == 10 and {r["licence"] for r in rows} <= {"CC0 #0", "CC0 #1"}
    assert {r["object"] for r in rows} == {p.name.split(".")[0] for p in run_dir.glob("samples/*/*.fg.png")}
    assert "CC0 #" in (out / "README.md").read_text()


@pytest.mark.parametrize("layout", ["dim", "baked", "scenes"])
def test_no_written_file_names_a_path_of_this_machine(
    run_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys, layout: str
) -> None:
    """A dataset is moved and shared: its card, composite.json, COCO file, recipes and tables name
    the sources by name (the run's folder, the export, the backgrounds), never by this machine's path."""
    export = tmp_path / "export"
    assert cli(capsys, "export", "--run", run_dir, "--all", "--split", "none", "-o", export)[0] == 0
    bgs = make_backgrounds(tmp_path / "bgs")
    out = tmp_path / "out"
    size = [] if layout == "dim" else ["--size", 48]
    for objects in (["--objects", export], ["--run", run_dir]):
        code, stdout, err = cli(capsys, "composite", *objects, "-b", bgs, "--layout", layout, "-k", 1, *size, "-o", out)
        assert code == 0, err
        machine = str(tmp_path_factory.getbasetemp().resolve())
        assert machine in stdout  # the terminal shows where things are
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                data = json.dumps(pq.read_table(path).to_pylist()).encode()
            assert machine.encode() not in data, path
        state = json.loads((out / "composite.json").read_text())
        assert state["backgrounds"] == "folder bgs" and state["settings"]["backgrounds"] == "bgs"
        assert state["objects"] == ("export shards export" if objects[0] == "--objects" else f"run {run_dir.name}: all 5 done samples (the run has no selection; see `factory filter`)")
        card = (out / "README.md").read_text()
        assert f"- objects: {state['objects']} (5 objects)" in card and "- backgrounds: folder bgs (3 usable" in card


def test_portable_names_of_sources_and_models(tmp_path: Path) -> None:
    from factory.composite.generative import public_model
    from factory.fsutil import portable_path

    out = tmp_path / "out"
    assert portable_path(str(out / "objects" / "export"), out) == "objects/export"  # inside: relative
    assert portable_path(str(tmp_path / "data" / "BG-20k"), out) == "BG-20k"  # outside: the name only
    assert portable_path(str(tmp_path / "bg-{000000..000009}.tar"), out) == "bg-{000000..000009}.tar"
    assert portable_path("../x/bgs/", out) == "bgs"
    assert public_model(str(tmp_path / "models" / "sd-inpaint")) == "sd-inpaint" and public_model("tiny") == "tiny"


@pytest.fixture
def damaged_export(run_dir: Path, tmp_path: Path, capsys) -> tuple[Path, list[str]]:
    """A folder export of the 5 objects, one with a truncated foreground, one whose alpha is junk."""
    export = tmp_path / "export"
    assert cli(capsys, "export", "--run", run_dir, "--all", "--split", "none", "--format", "folder", "-o", export)[0] == 0
    rows = [json.loads(line) for line in (export / "train" / "metadata.jsonl").read_text().splitlines()]
    fg = export / "train" / rows[1]["fg_file_name"]
    fg.write_bytes(fg.read_bytes()[: fg.stat().st_size // 2])
    (export / "train" / rows[3]["alpha_file_name"]).write_bytes(b"not a png")
    return export, [rows[1]["key"], rows[3]["key"]]


@pytest.mark.parametrize("layout", ["dim", "baked", "scenes"])
def test_a_damaged_object_is_skipped_named_and_counted(damaged_export: tuple[Path, list[str]], tmp_path: Path, capsys, layout: str) -> None:
    """As factory matte skips a damaged image: the run goes on without the object, one warning line
    names it, the summary, composite.json and the card count it; nothing written refers to it."""
    export, bad = damaged_export
    out = tmp_path / "out"
    size = [] if layout == "dim" else ["--size", 48]
    code, stdout, err = cli(capsys, "composite", "--objects", export, "-b", "procedural", "--layout", layout, "-k", 2, *size, "-o", out)
    assert code == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and "Traceback" not in err
    assert warnings[0].startswith(f"warning: object {bad[0]}: corrupt foreground (truncated") and warnings[0].endswith("; skipped")
    assert warnings[1].startswith(f"warning: object {bad[1]}: corrupt alpha (not a PNG")
    assert "skipped 2 damaged objects (listed above and in composite.json)\n" in stdout
    state = json.loads((out / "composite.json").read_text())
    assert state["state"] == "complete" and [line.split(":")[0] for line in state["damaged_objects"]] == bad
    assert "skipped 2 damaged objects" in (out / "README.md").read_text()
    import pyarrow.parquet as pq

    used = {r["object"] for r in pq.read_table(out / "samples.parquet").to_pylist()}
    assert used and not used & set(bad)
    assert not [p for p in out.rglob("*") if any(k in p.name for k in bad)]  # dim copied no damaged file
    if layout == "scenes":
        assert not [a for a in json.loads((out / "annotations.json").read_text())["annotations"] if a["object"] in bad]


def test_objects_all_damaged_is_one_line_exit_2_and_writes_nothing(damaged_export: tuple[Path, list[str]], tmp_path: Path, capsys) -> None:
    export, _ = damaged_export
    for alpha in (export / "train" / "alpha").iterdir():
        alpha.write_bytes(alpha.read_bytes()[:-1])  # the IEND chunk's CRC cut short
    out = tmp_path / "out"
    code, _, err = cli(capsys, "composite", "--objects", export, "-b", "procedural", "-o", out)
    assert code == 2 and not out.exists()
    assert err.strip().splitlines()[-1].startswith(f"error: no readable object: all 5 objects of export folder {export} are damaged (")


@pytest.mark.parametrize("fmt", ["webdataset", "folder"])
def test_objects_from_an_unfinished_export_are_refused(run_dir: Path, tmp_path: Path, capsys, fmt: str) -> None:
    """An interrupted export's finished shards (or files) would pass for the whole export."""
    export = tmp_path / "export"
    args = ["export", "--run", run_dir, "--all", "--split", "none", "--format", fmt, "-o", export]
    assert cli(capsys, *args, *(["--maxcount", 2] if fmt == "webdataset" else []))[0] == 0
    state = json.loads((export / "export.json").read_text())
    (export / "export.json").write_text(json.dumps({**state, "state": "writing"}))  # as a killed export leaves it
    specs = [export, *sorted(export.glob("*.tar"))[:1]]
    for spec in specs:
        out = tmp_path / "out"
        code, _, err = cli(capsys, "composite", "--objects", spec, "-b", "procedural", "--size", 48, "-k", 1, "-o", out)
        assert code == 2 and "an unfinished export" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def _data_files(out: Path) -> dict[str, bytes]:
    skip = {"README.md", "composite.json", ".lock"}
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in skip}


def test_resume_after_kill_9_gives_the_same_bytes(run_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["composite", "--run", str(run_dir), "-b", "procedural", "--size", "48", "--per-object", "2", "--maxcount", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), KILL_ENV: "1"}
    killed = subprocess.run([PY, "-m", "cli", *args, "-o", str(tmp_path / "a")], env=env, cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (tmp_path / "a" / "parts").iterdir()) == ["part-000000.json", "part-000001.json"]
    assert not (tmp_path / "a" / "samples.parquet").exists()
    code, stdout, err = cli(capsys, *args, "-o", tmp_path / "a")
    assert code == 0, err
    assert "resumed: 2 parts" in stdout
    code, _, err = cli(capsys, *args, "-o", tmp_path / "b")
    assert code == 0, err
    assert _data_files(tmp_path / "a") == _data_files(tmp_path / "b")


def test_a_truncated_shard_is_written_again_on_resume(run_dir: Path, tmp_path: Path, capsys) -> None:
    """A committed part whose shard lost its tail (a copy cut short, a damaged disk) is redone, as
    toy-data renders a truncated file again; the others are kept."""
    args = ["composite", "--run", str(run_dir), "-b", "procedural", "--size", "48", "--per-object", "2", "--maxcount", "3"]
    assert cli(capsys, *args, "-o", tmp_path / "a")[0] == 0
    assert cli(capsys, *args, "-o", tmp_path / "b")[0] == 0
    shard = tmp_path / "a" / "composite-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    code, stdout, err = cli(capsys, *args, "-o", tmp_path / "a")
    assert code == 0, err
    parts = len(list((tmp_path / "a" / "parts").iterdir()))
    assert f"resumed: {parts - 1} parts" in stdout, stdout
    assert _data_files(tmp_path / "a") == _data_files(tmp_path / "b")


def test_a_start_killed_before_its_first_state_write_is_taken_over(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_bytes(b"")  # what a composite killed before composite.json leaves
    (out / ".tmp-composite.json.123.abc").write_text("{")
    args = ["composite", "--run", run_dir, "-b", "procedural", "--size", 48, "--per-object", 1, "-o", out]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert (out / "composite.json").is_file() and not list(out.rglob(".tmp-*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / ".lock").symlink_to(tmp_path / "elsewhere")  # a link is never debris
    (other / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, *args[:-1], other)
    assert code == 2 and "is not a factory composite" in err and len(err.strip().splitlines()) == 1
    assert (other / "notes.txt").read_text() == "mine"


@pytest.fixture
def ray_local():
    """A small local Ray instance for one test; ``factory composite --workers`` uses it as it is."""
    import shutil
    import tempfile

    import ray

    from factory.ray_session import worker_env_vars

    tmp = tempfile.mkdtemp(prefix="fray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": worker_env_vars()})
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_generative_ring_changes_only_the_background_and_ray_writes_the_same_bytes(
    tmp_path: Path, capsys, ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path, 2).root  # two objects: even the tiny model is slow on a busy CPU
    common = ["composite", "--run", run, "-b", "procedural", "--size", 64, "--layers", "--per-object", 1,
              "--shadow", 0.4, "--scale", "0.4,0.5", "--maxcount", 1]
    generative = ["--generative", "tiny", "--steps", 1, "--ring", 6]
    assert cli(capsys, *common, "-o", tmp_path / "plain")[0] == 0
    # 'tiny': the tiny inpainting pipeline (UNet of 9 input channels) built in code
    code, _, err = cli(capsys, *common, *generative, "-o", tmp_path / "gen")
    assert code == 0, err
    plain, gen = shard_samples(tmp_path / "plain"), shard_samples(tmp_path / "gen")
    assert plain.keys() == gen.keys()
    changed = 0
    for key in plain:
        alpha = decode_alpha(gen[key]["alpha.png"])
        assert np.array_equal(alpha, decode_alpha(plain[key]["alpha.png"]))
        p_img, g_img = decode_rgb(plain[key]["png"]), decode_rgb(gen[key]["png"])
        assert np.array_equal(p_img[alpha > 0], g_img[alpha > 0])
        changed += int((p_img != g_img).any(axis=-1).sum())
        check_exact(g_img, alpha, decode_rgb(gen[key]["fg.png"]), decode_rgb(gen[key]["bg.png"]))
    assert changed > 0
    # The Ray fan-out (two parts at once as CPU tasks; rings repainted by painter actors that hold
    # the model) writes the same bytes as this process, plain and generative.
    from factory.composite import fanout

    painters: list = []  # the painter actors, kept alive after the run to ask what they did
    real_start = fanout.start_painters
    monkeypatch.setattr(fanout, "start_painters", lambda *a: painters.extend(real_start(*a)) or list(painters))
    monkeypatch.setattr(fanout.ray, "kill", lambda actor: None)
    for name, extra in [("plain", []), ("gen", generative)]:
        code, _, err = cli(capsys, *common, *extra, "--workers", 2, "-o", tmp_path / f"{name}-ray")
        assert code == 0, err
        here, there = _data_files(tmp_path / name), _data_files(tmp_path / f"{name}-ray")
        assert len([n for n in here if n.startswith("composite-")]) == 2
        assert here == there
    # one CPU painter per sampler slot (two here, no GPU), each used by one part, one ring each
    infos = ray_local.get([p.info.remote() for p in painters])
    assert [(i["device"], i["error"], i["repaints"]) for i in infos] == [("cpu", None, 1), ("cpu", None, 1)]
    monkeypatch.undo()
    for p in painters:
        ray_local.kill(p)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no objects"),
        ("unreadable", "no readable background"),
        ("small", "smaller than the minimum object size"),
        ("procedural-small", "smaller than the minimum object size 600 px"),
        ("order", "out of order"),
        ("objects", "--objects-per-scene (5, 2): "),
        ("not-inpainting", "not an inpainting model"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir: Path, tmp_path: Path, capsys, case: str, message: str) -> None:
    out = tmp_path / "out"
    args = ["composite", "--run", run_dir, "-b", "procedural", "-o", out]
    if case == "empty":  # a run of its own: the empty selection would be every later test's default
        own = make_run(tmp_path, 2).root
        assert cli(capsys, "filter", "--run", own, "--min-gsg", 1.0, "--name", "none")[0] == 0
        args += ["--run", own, "--selection", "none"]
    elif case == "unreadable":
        (tmp_path / "bgs").mkdir()
        (tmp_path / "bgs" / "x.jpg").write_bytes(b"junk")
        args += ["-b", tmp_path / "bgs"]
    elif case == "small":
        (tmp_path / "bgs").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "bgs" / "tiny.png")
        args += ["-b", tmp_path / "bgs", "--size", 0]
    elif case == "procedural-small":  # procedural backgrounds at their own size are 512 px
        args += ["--size", 0, "--min-size", 600]
    elif case == "order":
        args += ["--scale", "0.8,0.3"]
    elif case == "objects":  # the option's own name, not the manifest field's (objects)
        args += ["--layout", "scenes", "--objects-per-scene", "5,2"]
    else:
        (tmp_path / "sd" / "unet").mkdir(parents=True)  # a text-to-image SD1.5 folder: 4 input channels
        (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        (tmp_path / "sd" / "unet" / "config.json").write_text('{"in_channels": 4}')
        args += ["--generative", tmp_path / "sd"]
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "scenes", "--layers"], "--layers is for the baked layout, not --layout scenes"),
        (["--layout", "scenes", "--mix", "0.5"], "--mix is for the baked layout"),
        (["--layout", "dim", "--alpha-bits", "16"], "--alpha-bits is for the baked and scenes layouts, not --layout dim"),
        (["--layout", "dim", "--format", "folder"], "--format is for the baked layout"),
        (["--layout", "baked", "--objects-per-scene", "1,2"], "--objects-per-scene is for the scenes layout"),
        (["--layout", "baked", "--blend", "none"], "--blend is for the scenes layout"),
        (["--ring", "5"], "--ring is for --generative"),
    ],
)
def test_an_option_the_layout_does_not_use_is_refused(run_dir: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    """Given for a layout that ignores it, an option would change nothing without a word."""
    out = tmp_path / "out"
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", "procedural", "--size", 48, "-k", 1, "-o", out, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("where", ["inside", "same", "above"])
def test_an_output_folder_overlapping_the_backgrounds_is_refused(run_dir: Path, tmp_path: Path, capsys, where: str) -> None:
    """Composites written among the backgrounds would be read back as backgrounds by a re-run,
    whose restart (a changed plan) would then delete files it is reading."""
    bgs = make_backgrounds(tmp_path / "bgs")
    before = sorted(p.relative_to(bgs) for p in bgs.rglob("*"))
    out = {"inside": bgs / "sub" / "out", "same": bgs, "above": tmp_path}[where]
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "--layout", "dim", "-k", 1, "-o", out)
    assert code == 2, err
    assert "overlaps --backgrounds" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(bgs) for p in bgs.rglob("*")) == before


def test_an_output_folder_that_is_a_symlink_loop_is_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    bgs = make_backgrounds(tmp_path / "bgs")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "-k", 1, "-o", loop)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err


def test_composite_shards_are_not_backgrounds_of_their_own_folder(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "baked"
    assert cli(capsys, "composite", "--run", run_dir, "-b", "procedural", "--size", 48, "-k", 1, "-o", out)[0] == 0
    shards = sorted(out.glob("composite-*.tar"))
    data = {p: p.read_bytes() for p in shards}
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", shards[0], "--size", 48, "-k", 1, "-o", out)
    assert code == 2 and "overlaps --backgrounds" in err
    assert {p: p.read_bytes() for p in shards} == data


def test_a_16_bit_grey_background_keeps_its_grey_levels(run_dir: Path, tmp_path: Path, capsys) -> None:
    """Pillow's convert("RGB") clips a 16-bit grey image at 255 (nearly white everywhere)."""
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    levels = np.array([[0, 257 * 40, 257 * 128, 65535]], np.uint16).repeat(4, axis=1).repeat(64, axis=0)
    Image.fromarray(np.ascontiguousarray(np.tile(levels, (1, 4)))).save(bgs / "grey16.png")
    assert Image.open(bgs / "grey16.png").mode in ("I;16", "I")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "--size", 64, "--layers", "--format", "folder",
                       "-k", 1, "-o", out)
    assert code == 0, err
    for path in sorted((out / "bg").glob("*.png")):
        bg = decode_rgb(path.read_bytes())
        assert set(np.unique(bg).tolist()) <= {0, 40, 128, 255}  # scaled, not clipped
        assert (bg == 255).mean() < 0.5


def turned_photo(path: Path, orientation: int) -> np.ndarray:
    """A photo stored as a camera stores it (pixels unturned, EXIF ``orientation``); returns it as shown."""
    from PIL import ImageOps

    stored = np.zeros((60, 100, 3), np.uint8)
    stored[:, :50], stored[:, 50:] = (250, 0, 0), (0, 0, 250)  # red left half, blue right half
    stored[:30, :10] = (0, 250, 0)  # and a green corner: every turn and flip looks different
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, **({"quality": 100, "subsampling": 0} if path.suffix == ".jpg" else {}))
    with Image.open(path) as saved:
        return np.asarray(ImageOps.exif_transpose(saved).convert("RGB"))


@pytest.mark.parametrize(("name", "orientation"), [("phone.jpg", 6), ("scan.png", 8), ("upside.jpg", 3)])
def test_a_background_photo_is_used_as_its_exif_orientation_shows_it(
    run_dir: Path, tmp_path: Path, capsys, name: str, orientation: int
) -> None:
    """A phone stores a portrait photo's pixels sideways with EXIF orientation 6; every layout uses it
    upright, as factory matte does its inputs (and as PIL.ImageOps.exif_transpose shows it)."""
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    shown = turned_photo(bgs / name, orientation)
    own = tmp_path / "own"  # --size 0: the composite takes the photo's own size, so its shape shows the turn
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "--size", 0, "--min-size", 8, "--layers",
                       "--format", "folder", "-k", 1, "-o", own)
    assert code == 0, err
    for path in sorted((own / "bg").glob("*.png")):
        assert np.array_equal(decode_rgb(path.read_bytes()), shown), path
    cropped = tmp_path / "cropped"  # scaled and cropped (a JPEG drafted at a reduced scale)
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "--size", 16, "--min-size", 8, "--layers",
                       "--format", "folder", "-k", 1, "-o", cropped)
    assert code == 0, err
    for path in sorted((cropped / "bg").glob("*.png")):
        recipe = json.loads((cropped / "recipe" / f"{path.stem}.json").read_text())["background"]
        rw, rh = recipe["resize"]
        assert (rw, rh) == ((16, round(16 * 100 / 60)) if orientation >= 5 else (round(16 * 100 / 60), 16))
        x, y = recipe["crop"]
        expected = np.asarray(Image.fromarray(shown).resize((rw, rh), Image.Resampling.BILINEAR))[y : y + 16, x : x + 16]
        assert np.abs(decode_rgb(path.read_bytes()).astype(int) - expected).max() <= 40, path  # resampling aside, the same picture
    dim = tmp_path / "dim"  # the trainer reads bg/ with a plain Image.open: the file is written upright
    code, _, err = cli(capsys, "composite", "--run", run_dir, "-b", bgs, "--layout", "dim", "-k", 1, "-o", dim)
    assert code == 0, err
    rows = list(csv.DictReader((dim / "pairs.csv").open()))
    assert rows and {r["background"] for r in rows} == {name}
    assert np.array_equal(np.asarray(Image.open(dim / rows[0]["bg"]).convert("RGB")), shown)


def test_a_full_disk_while_writing_a_shard_is_one_line_and_the_rerun_completes(
    run_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from tests.full_disk import fill_disk_at_shard_add

    out = tmp_path / "baked"
    args = ["composite", "--run", run_dir, "-b", "procedural", "--size", 48, "-k", 2, "--maxcount", 4, "-o", out]
    fill_disk_at_shard_add(monkeypatch, 6)  # the second composite of the second part
    code, _, err = cli(capsys, *args)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "disk full while writing" in err and "internal error" not in err
    assert sorted(p.name for p in out.glob("composite-*.tar")) == ["composite-000000.tar"]
    assert not list(out.rglob(".tmp*"))
    monkeypatch.undo()
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert len(shard_samples(out)) == 10


@pytest.mark.parametrize("text", ["[]", "3", '{"part": 0}', "{broken"])
def test_a_part_record_of_the_wrong_shape_means_the_part_is_redone(tmp_path: Path, text: str) -> None:
    from factory.composite.part import part_record_path, read_record

    path = part_record_path(tmp_path, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    assert read_record(tmp_path, 1) is None


def test_the_progress_bar_shows_on_a_terminal_and_never_with_quiet(monkeypatch) -> None:
    """composite's and export's bar (feedback.rate_bar): drawn on a terminal with the rate, nothing
    with -q, nothing off a terminal."""
    import io

    from rich.console import Console

    from factory import feedback

    for level, terminal, shown in ((feedback.NORMAL, True, True), (feedback.QUIET, True, False), (feedback.NORMAL, False, False)):
        screen = io.StringIO()
        monkeypatch.setattr(feedback, "stderr_console", lambda: Console(file=screen, force_terminal=terminal, width=120))
        feedback.set_verbosity(level)
        try:
            with feedback.rate_bar("composite (scenes)", 3, True, lambda r: f"{r:.1f}/s") as advance:
                advance(3, 3)
        finally:
            feedback.set_verbosity(feedback.NORMAL)
        text = screen.getvalue()
        assert ("composite (scenes)" in text and "3/3" in text and "/s" in text) is shown, text


def test_ray_tmp_reaches_ray_and_is_refused_without_it(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """--ray-tmp is Ray's temporary folder for the fan-out (--workers 2+); with one worker the parts
    run in this process and the option would be ignored, so it is refused."""
    from factory.composite import fanout
    from factory.errors import RunError

    run = make_run(tmp_path, 2).root
    common = ["composite", "--run", run, "-b", "procedural", "--size", 48, "-k", 1]
    code, _, err = cli(capsys, *common, "--ray-tmp", tmp_path / "rt", "-o", tmp_path / "one")
    assert code == 2 and err == "error: --ray-tmp is for Ray (--workers 2 or more); with one worker the parts run in this process\n", err
    seen: list = []

    def no_ray(run_dir, address, ray_tmp, gpus, workers):
        seen.append(ray_tmp)
        raise RunError("no Ray in this test")

    monkeypatch.setattr(fanout, "start_ray", no_ray)
    code, _, err = cli(capsys, *common, "--workers", 2, "--ray-tmp", tmp_path / "rt", "-o", tmp_path / "two")
    assert code == 1 and "no Ray in this test" in err and seen == [tmp_path / "rt"], err
