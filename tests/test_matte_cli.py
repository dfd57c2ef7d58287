"""`factory matte` and `factory eval` on folders of fixtures made in code."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matte_fixtures import composite, shaded_board, soft_disc, strands
from PIL import Image

from factory.matte_folder import matte_folder
from factory.metrics import evaluate_pair


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """in/: two good images (PNG, JPEG), a corrupt file, an RGBA image, a text file;
    gt/ and trimap/: the true alphas and trimaps of the two good ones."""
    root = tmp_path_factory.mktemp("matte")
    d = {name: root / name for name in ("in", "gt", "trimap")}
    for p in d.values():
        p.mkdir()
    cases = {"disc": (soft_disc(), (150, 150, 150)), "hair": (strands(seed=2), (200, 80, 45))}
    for stem, (alpha, color) in cases.items():
        image = composite(alpha, color, shaded_board(alpha))
        if stem == "disc":
            Image.fromarray(image).save(d["in"] / "disc.png")
        else:
            Image.fromarray(image).save(d["in"] / "hair.JPG", quality=95, subsampling=0)
        Image.fromarray(np.rint(alpha * 255).astype(np.uint8)).save(d["gt"] / f"{stem}.png")
        tri = np.where(alpha >= 1, 255, np.where(alpha <= 0, 0, 128)).astype(np.uint8)
        Image.fromarray(tri).save(d["trimap"] / f"{stem}.png")
    (d["in"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGBA", (16, 16), (0, 255, 0, 128)).save(d["in"] / "glass.png")
    (d["in"] / "notes.txt").write_text("not an image")
    return d


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


def test_matte_writes_alpha_fg_and_summary(cli, folders, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cli(["matte", folders["in"], "--out", out, "--workers", "1"])
    assert res.code == 0, res.err
    assert "matted 2 of 4 files" in res.out
    # One line per bad file, naming it.
    bad_lines = [line for line in res.err.splitlines() if line.startswith("skipped")]
    assert len(bad_lines) == 2
    assert any("broken.png" in x for x in bad_lines) and any("glass.png" in x for x in bad_lines)
    for stem in ("disc", "hair"):
        with Image.open(out / f"{stem}.alpha.png") as im:
            assert im.mode == "L" and im.size == (128, 128)
        with Image.open(out / f"{stem}.fg.png") as im:
            assert im.mode == "RGB" and im.size == (128, 128)
    rows = read_csv(out / "matte.csv")
    assert set(rows) == {"broken.png", "disc.png", "glass.png", "hair.JPG"}
    assert rows["disc.png"]["status"] == "ok" and rows["glass.png"]["status"] == "skipped"
    assert 0.0 < float(rows["disc.png"]["gsg"]) <= 1.0
    assert rows["disc.png"]["contains_key_color"] == "False"
    assert rows["disc.png"]["chroma"] == rows["hair.JPG"]["chroma"] == "4:4:4"  # PNG; JPEG saved 4:4:4
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_matte_16_bit_in_parallel(folders, tmp_path: Path) -> None:
    summary = matte_folder(folders["in"], tmp_path / "out16", bits=16, workers=2, progress=False)
    assert summary.processed == 2 and summary.skipped == 2 and summary.failed == 0
    assert len(summary.issues) == 2
    with Image.open(tmp_path / "out16" / "disc.alpha.png") as im:
        assert im.mode.startswith("I;16")
        a16 = np.asarray(im, dtype=np.float64) / 65535
    truth = soft_disc()
    assert evaluate_pair(a16, truth)["mad"] < 0.01


def test_eval_table_and_json(cli, folders, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    assert cli(["matte", folders["in"], "--out", out, "--workers", "1"]).code == 0
    report = tmp_path / "metrics.json"
    res = cli(["eval", "--pred", out, "--gt", folders["gt"], "--trimap", folders["trimap"], "--json", report])
    assert res.code == 0, res.err
    assert "disc" in res.out and "mean" in res.out and "SAD" in res.out
    data = json.loads(report.read_text())
    assert data["region"] == "trimap unknown region" and data["count"] == 2
    by_image = {r["image"]: r for r in data["images"]}
    pred = np.asarray(Image.open(out / "hair.alpha.png"))
    truth = np.asarray(Image.open(folders["gt"] / "hair.png"))
    trimap = np.asarray(Image.open(folders["trimap"] / "hair.png"))
    expected = evaluate_pair(pred, truth, trimap)
    assert by_image["hair"] == pytest.approx({"image": "hair", **expected})
    assert data["mean"]["sad"] == pytest.approx((by_image["hair"]["sad"] + by_image["disc"]["sad"]) / 2)
    assert by_image["hair"]["sad_whole"] < 0.3


def test_eval_reports_missing_predictions(cli, folders, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.open(folders["gt"] / "disc.png").save(pred / "disc.png")  # perfect, plain name
    res = cli(["eval", "--pred", pred, "--gt", folders["gt"]])
    assert res.code == 0
    assert "missing prediction for hair" in res.err
    assert "whole image" in res.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["matte", "MISSING", "--out", "OUT"], "does not exist"),
        (["matte", "IN", "--out", "OUT", "--bits", "12"], "8 or 16"),
        (["matte", "IN", "--out", "OUT", "--reference", "0,255"], "R,G,B"),
        (["matte", "IN", "--out", "GT/disc.png"], "gt/disc.png: exists and is not a folder"),
        (["eval", "--pred", "MISSING", "--gt", "GT"], "does not exist"),
        (["eval", "--pred", "GT", "--gt", "GT", "--json", "GT/disc.png"], "names an image in"),
        (["eval", "--pred", "GT", "--gt", "GT", "--json", "GT/new.PNG"], "names an image in"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(cli, folders, tmp_path: Path, args, message) -> None:
    subst = {"IN": folders["in"], "OUT": tmp_path / "o", "GT": folders["gt"], "MISSING": tmp_path / "nope"}
    head = lambda a: a.partition("/")[0]  # noqa: E731 - "GT/disc.png": a file in a substituted folder
    before = _snapshot(folders["gt"])
    res = cli([subst[head(a)] / a.partition("/")[2] if head(a) in subst and "/" in a else subst.get(a, a) for a in args])
    assert _snapshot(folders["gt"]) == before  # --json naming a ground truth leaves it alone
    assert res.code == 2
    assert res.err.count("\n") == 1 and res.err.startswith("error:") and message in res.err


def test_nothing_matted_is_exit_1(cli, tmp_path: Path) -> None:
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.png").write_bytes(b"garbage")
    res = cli(["matte", src, "--out", tmp_path / "o", "--workers", "1"])
    assert res.code == 1
    assert "skipped a.png" in res.err and "error: no image" in res.err


def test_empty_folder_is_exit_2(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = cli(["matte", tmp_path / "empty", "--out", tmp_path / "o"])
    assert res.code == 2 and "no images" in res.err


def test_matte_chroma_option(cli, folders, tmp_path: Path) -> None:
    res = cli(["matte", folders["in"], "--out", tmp_path / "o", "--workers", "1", "--chroma", "4:2:0"])
    assert res.code == 0, res.err
    rows = read_csv(tmp_path / "o" / "matte.csv")
    assert rows["disc.png"]["chroma"] == "4:2:0"  # forced, though the PNG was never subsampled
    bad = cli(["matte", folders["in"], "--out", tmp_path / "o2", "--chroma", "4:1:1"])
    assert bad.code == 2 and "chroma must be one of" in bad.err and "Traceback" not in bad.err
    assert not (tmp_path / "o2").exists() or not list((tmp_path / "o2").iterdir())


def _png16_rgb(rgb: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_images_without_a_green_board_are_reported_not_matted(cli, tmp_path: Path) -> None:
    """All red, 8-bit grey, 16-bit grey: status no_board, one line each, no outputs. A 16-bit RGB
    PNG of a green screen is read at 8 bits per channel and matted."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src / "red.png")
    Image.new("L", (64, 64), 128).save(src / "grey.png")
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(src / "grey16.png")
    alpha = soft_disc(96, radius=24)
    image = composite(alpha, (190, 70, 50), shaded_board(alpha)).astype(np.uint16) * 257
    (src / "deep.png").write_bytes(_png16_rgb(image))
    res = cli(["matte", src, "--out", out, "--workers", "1"])
    assert res.code == 0, res.err
    assert "matted 1 of 4 files" in res.out and "3 without a green board" in res.out
    rows = read_csv(out / "matte.csv")
    for name in ("red.png", "grey.png", "grey16.png"):
        assert rows[name]["status"] == "no_board" and "no green board" in rows[name]["message"]
        assert "is not a green" in rows[name]["message"] and "% board" not in rows[name]["message"]
        assert not (out / name.replace(".png", ".alpha.png")).exists()
        assert sum(f"no_board {name}:" in line for line in res.err.splitlines()) == 1
    assert rows["deep.png"]["status"] == "ok"
    truth = evaluate_pair(np.asarray(Image.open(out / "deep.alpha.png"), np.float32) / 255.0, alpha)
    assert truth["sad_whole"] < 0.5
    only_red = tmp_path / "red_only"
    only_red.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(only_red / "red.png")
    none = cli(["matte", only_red, "--out", tmp_path / "o2", "--workers", "1"])
    assert none.code == 1 and "error: no image" in none.err
    # the error line gives the reason: the one image had no green board
    assert none.err.splitlines()[-1] == f"error: no image in {only_red} could be matted (0 skipped, 1 without a green board, 0 failed)"


def _grey_alpha(size: int = 32) -> np.ndarray:
    """An 8-bit matte with every level from 0 to 255 in it."""
    return (np.arange(size * size) % 256).astype(np.uint8).reshape(size, size)


def test_eval_reads_an_rgba_cut_out_by_its_alpha_channel(cli, tmp_path: Path) -> None:
    """A cut-out's matte is its alpha channel, for --pred and --gt alike; its colour is ignored."""
    truth = _grey_alpha()
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    colour = np.dstack([np.full_like(truth, 200), np.full_like(truth, 50), np.full_like(truth, 50)])
    Image.fromarray(truth).save(gt / "grey.png")
    Image.fromarray(np.dstack([colour, truth]), "RGBA").save(pred / "grey.png")
    Image.fromarray(np.dstack([colour, truth]), "RGBA").save(gt / "cutout.png")
    Image.fromarray(np.dstack([truth] * 3)).save(pred / "cutout.png")  # grey saved as RGB
    report = tmp_path / "m.json"
    res = cli(["eval", "--pred", pred, "--gt", gt, "--workers", "1", "--json", report])
    assert res.code == 0, res.err
    data = json.loads(report.read_text())
    assert data["count"] == 2 and data["issues"] == []
    assert all(row["sad_whole"] == 0 and row["mad"] == 0 for row in data["images"])


def test_eval_refuses_colour_images_as_mattes(cli, tmp_path: Path) -> None:
    """RGB with unequal channels, and an opaque RGBA over grey levels, are left out in one line each."""
    truth = _grey_alpha()
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    for stem in ("good", "colour", "opaque"):
        Image.fromarray(truth).save(gt / f"{stem}.png")
    Image.fromarray(truth).save(pred / "good.png")
    Image.fromarray(np.dstack([truth, truth // 2, np.full_like(truth, 9)])).save(pred / "colour.png")
    Image.fromarray(np.dstack([truth] * 3 + [np.full_like(truth, 255)]), "RGBA").save(pred / "opaque.png")
    res = cli(["eval", "--pred", pred, "--gt", gt, "--workers", "1"])
    assert res.code == 0, res.err
    warnings = res.err.splitlines()
    assert len(warnings) == 2 and all(line.startswith("warning: skipped") for line in warnings)
    assert "colour.png: a colour image" in warnings[0] and "opaque.png: RGBA with an opaque alpha" in warnings[1]
    assert "1 image" in res.out
    only_colour = cli(["eval", "--pred", pred, "--gt", pred, "--workers", "1"])  # as ground truth too
    assert only_colour.code == 0 and sum("a colour image" in line for line in only_colour.err.splitlines()) == 1


def test_eval_prints_a_long_image_name_whole(cli, tmp_path: Path) -> None:
    """A name wider than the table's share of the line is printed on one line, not folded or cut."""
    truth = _grey_alpha()
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    long_name = "method-with-a-long-name_" + "_".join(f"setting{i}" for i in range(16))
    for stem in (long_name, "short"):
        Image.fromarray(truth).save(gt / f"{stem}.png")
        Image.fromarray(truth).save(pred / f"{stem}.png")
    res = cli(["eval", "--pred", pred, "--gt", gt, "--workers", "1"])
    assert res.code == 0, res.err
    assert len(long_name) > 160 and any(long_name in line for line in res.out.splitlines()), res.out


def test_matte_then_eval_on_a_toy_set(cli, tmp_path: Path) -> None:
    """The documented flow: each matte is paired with the toy set's KEY.alpha.png, never with its
    image or foreground (KEY.png, KEY.fg.png), in either folder."""
    toy, mattes, report = tmp_path / "toy", tmp_path / "mattes", tmp_path / "m.json"
    assert cli(["toy-data", "--n", "3", "--size", "32", "--out", toy]).code == 0
    assert cli(["matte", toy, "--out", mattes, "--workers", "1"]).code == 0
    res = cli(["eval", "--pred", mattes, "--gt", toy, "--workers", "1", "--json", report])
    assert res.code == 0, res.err
    data = json.loads(report.read_text())
    keys = sorted(p.name[: -len(".alpha.png")] for p in toy.glob("*.alpha.png"))
    assert len(keys) == 3 and [row["image"] for row in data["images"]] == keys
    assert data["issues"] == [] and res.err == ""
    for row in data["images"]:
        pred = np.asarray(Image.open(mattes / f"{row['image']}.alpha.png"))
        truth = np.asarray(Image.open(toy / f"{row['image']}.alpha.png"))
        assert row == pytest.approx({"image": row["image"], **evaluate_pair(pred, truth)})
    swapped = cli(["eval", "--pred", toy, "--gt", mattes, "--workers", "1"])
    assert swapped.code == 0 and "3 images" in swapped.out and swapped.err == ""


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_matte_refuses_an_out_that_would_replace_other_files(cli, tmp_path: Path) -> None:
    """--out the input folder, inside it, or a folder holding the same names (a copy of the toy
    set, a foreign matte.csv): one line, exit 2, nothing written. A factory matte folder is reused."""
    toy, copy = tmp_path / "toy", tmp_path / "copy"
    assert cli(["toy-data", "--n", "2", "--size", "32", "--out", toy]).code == 0
    assert cli(["toy-data", "--n", "2", "--size", "32", "--seed", "1", "--out", copy]).code == 0
    before, copy_before = _snapshot(toy), _snapshot(copy)
    for out, message in (
        (toy, "is the input folder"),
        (toy / ".." / "toy", "is the input folder"),
        (toy / "mattes", "is inside the input folder"),
        (copy, "holds toy-000000.alpha.png (and 3 other files), which factory matte would replace"),
    ):
        res = cli(["matte", toy, "--out", out, "--workers", "1"])
        assert res.code == 2, res.err
        assert res.err.count("\n") == 1 and res.err.startswith("error:") and message in res.err
    assert _snapshot(toy) == before and _snapshot(copy) == copy_before
    mattes = tmp_path / "mattes"
    assert cli(["matte", toy, "--out", mattes, "--workers", "1"]).code == 0
    assert cli(["matte", toy, "--out", mattes, "--workers", "1"]).code == 0  # its own folder: rerun
    (mattes / "matte.csv").write_text("my notes\n")
    res = cli(["matte", toy, "--out", mattes, "--workers", "1"])
    assert res.code == 2 and "holds matte.csv" in res.err
    assert (mattes / "matte.csv").read_text() == "my notes\n"


def test_matte_messages_are_one_line_off_a_terminal(cli, folders, tmp_path: Path) -> None:
    """A per-file message is one line however long, when stderr is not a terminal (80 columns)."""
    src = tmp_path / "in"
    src.mkdir()
    Image.open(folders["in"] / "disc.png").save(src / "disc.png")
    name = "a_rather_long_file_name_for_a_green_screen_photo_0001" * 2 + ".jpg"
    (src / name).write_bytes(bytes(range(256)))
    res = cli(["matte", src, "--out", tmp_path / "out", "--workers", "1"])
    assert res.code == 0, res.err
    lines = res.err.splitlines()  # no progress bar off a terminal
    assert len(lines) == 1 and lines[0].startswith(f"skipped {name}: not a readable image")
    assert lines[0].endswith(f"'{src / name}')")


def test_matte_bar_on_a_terminal_none_with_quiet_and_the_skipped_line_always(cli, folders, tmp_path: Path, monkeypatch) -> None:
    import io

    from rich.console import Console

    import factory.feedback as feedback

    src = tmp_path / "in"
    src.mkdir()
    Image.open(folders["in"] / "disc.png").save(src / "disc.png")
    (src / "junk.jpg").write_bytes(b"junk")
    for flags, bar in (([], True), (["-q"], False)):
        screen = io.StringIO()
        monkeypatch.setattr(feedback, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=160))
        res = cli([*flags, "matte", src, "--out", tmp_path / f"out{len(flags)}", "--workers", "1"])
        assert res.code == 0, res.err
        assert ("2/2" in screen.getvalue()) is bar, screen.getvalue()
        assert "skipped junk.jpg: not a readable image" in screen.getvalue()


def test_ctrl_c_stops_the_pool_and_keeps_the_rows_done(tmp_path: Path) -> None:
    """Ctrl-C (a KeyboardInterrupt from the line logger when the first file, a corrupt one, comes
    back) drops the images not yet handed to a worker, instead of matting the whole folder before
    stopping; matte.csv lists the files done so far."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "0-broken.png").write_bytes(b"not an image")
    image = composite(soft_disc(), (150, 150, 150), shaded_board(soft_disc()))
    for i in range(40):
        Image.fromarray(image).save(src / f"disc{i:02d}.png")

    def ctrl_c(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        matte_folder(src, out, workers=2, progress=False, log=ctrl_c)
    matted = {p.name.removesuffix(".alpha.png") for p in out.glob("*.alpha.png")}
    assert len(matted) < 20  # the two in the workers and the few queued for them, not all 40
    rows = read_csv(out / "matte.csv")
    assert rows["0-broken.png"]["status"] == "skipped"
    assert {name.removesuffix(".png") for name, row in rows.items() if row["status"] == "ok"} <= matted


def test_eval_keeps_keys_that_differ_only_in_case(cli, tmp_path: Path) -> None:
    """a.png and A.png are two ground truths (factory matte writes a.alpha.png and A.alpha.png for
    two such images): each pairs with its own prediction and neither is dropped. A key that differs
    only in case from the one prediction spelt that way still pairs with it."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
    for name in ("a.png", "A.png", "IMG_1.png"):
        Image.fromarray(ramp).save(gt / name)
    Image.fromarray(ramp).save(pred / "a.alpha.png")
    Image.fromarray(255 - ramp).save(pred / "A.alpha.png")
    Image.fromarray(ramp).save(pred / "img_1.alpha.png")
    report = tmp_path / "metrics.json"
    res = cli(["eval", "--pred", pred, "--gt", gt, "--json", report, "--workers", "1"])
    assert res.code == 0 and res.err == "", res.err
    data = json.loads(report.read_text())
    by_image = {r["image"]: r for r in data["images"]}
    assert data["count"] == 3 and set(by_image) == {"A", "IMG_1", "a"}
    assert by_image["a"]["mad"] == 0 and by_image["IMG_1"]["mad"] == 0
    assert by_image["A"]["mad"] == pytest.approx(np.abs(255 - 2 * ramp.astype(float)).mean() / 255)


def test_matte_outputs_face_the_way_an_exif_turned_photo_is_shown(tmp_path: Path) -> None:
    """A camera stores a portrait photo's pixels sideways with an EXIF orientation; its alpha and
    foreground are turned the same way, so they line up with the photo as viewers (and
    ``PIL.ImageOps.exif_transpose``) show it. GreenPost runs on the stored pixels: the outputs are
    exactly those of the unturned image, turned."""
    from PIL import ImageOps

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    alpha = soft_disc(96, radius=20, center=(30, 60))  # off centre: every turn moves it
    image = Image.fromarray(composite(alpha, (200, 80, 45), shaded_board(alpha))[:, :80])  # 80x96
    image.save(src / "plain.png")
    for orientation in range(2, 9):
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(src / f"turned{orientation}.png", exif=exif)
    summary = matte_folder(src, out, workers=1, progress=False)
    assert summary.processed == 8
    rows = read_csv(out / "matte.csv")
    plain = {kind: Image.open(out / f"plain.{kind}.png") for kind in ("alpha", "fg")}
    for orientation in range(2, 9):
        with Image.open(src / f"turned{orientation}.png") as im:
            shown = ImageOps.exif_transpose(im)
        for kind in ("alpha", "fg"):
            with Image.open(out / f"turned{orientation}.{kind}.png") as im:
                assert im.size == shown.size
                expected = np.asarray(ImageOps.exif_transpose(_with_orientation(plain[kind], orientation)))
                assert np.array_equal(np.asarray(im), expected)
        row = rows[f"turned{orientation}.png"]
        assert (int(row["width"]), int(row["height"])) == shown.size


def _with_orientation(im: Image.Image, orientation: int) -> Image.Image:
    """A copy of ``im`` whose EXIF says ``orientation``."""
    copy = im.copy()
    copy.getexif()[0x0112] = orientation
    return copy


def test_broken_symbolic_links_are_reported_not_ignored(cli, folders, tmp_path: Path) -> None:
    """An image name that is a link to nothing (a missing target, a loop) is a file the user meant:
    matte lists it as skipped, eval reports it; a link to an image is read through, a link to a
    folder is a folder (not an image)."""
    src, gt = tmp_path / "in", tmp_path / "gt"
    src.mkdir(), gt.mkdir()
    Image.open(folders["in"] / "disc.png").save(src / "disc.png")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (src / "loop1.png").symlink_to("loop2.png")
    (src / "loop2.png").symlink_to("loop1.png")
    (src / "same.png").symlink_to("disc.png")
    (src / "folder.png").symlink_to(tmp_path)
    out = tmp_path / "out"
    res = cli(["matte", src, "--out", out, "--workers", "1"])
    assert res.code == 0, res.err
    rows = read_csv(out / "matte.csv")
    assert {name: row["status"] for name, row in rows.items()} == {
        "disc.png": "ok", "same.png": "ok", "gone.png": "skipped", "loop1.png": "skipped", "loop2.png": "skipped"
    }  # fmt: skip
    assert "skipped gone.png: a symbolic link to nothing" in res.err

    Image.open(folders["gt"] / "disc.png").save(gt / "disc.png")
    (gt / "hair.png").symlink_to(tmp_path / "nowhere.png")  # a ground truth that is not there
    Image.open(folders["gt"] / "hair.png").save(out / "hair.alpha.png")
    res = cli(["eval", "--pred", out, "--gt", gt, "--workers", "1"])
    assert res.code == 0 and "1 image" in res.out
    assert "skipped hair:" in res.err and "not a readable alpha matte" in res.err


def test_a_full_disk_stops_matte_with_one_line_and_keeps_the_rows_done(cli, folders, tmp_path: Path, monkeypatch) -> None:
    """The first image's outputs are written, the disk is then full: the run stops there (exit 1,
    one line), not marking every later image 'skipped' with exit 0; matte.csv keeps the first row."""
    import errno

    import factory.matte_folder as mf
    from factory.fsutil import write_error

    written: list[str] = []
    real_write = mf.atomic_write_bytes

    def filling_write(path: Path, data: bytes, fsync: bool = True) -> None:
        if len(written) >= 2:  # the first image's alpha and foreground fit
            raise write_error(OSError(errno.ENOSPC, "No space left on device"), path)
        written.append(Path(path).name)
        real_write(path, data, fsync=fsync)

    monkeypatch.setattr(mf, "atomic_write_bytes", filling_write)
    out = tmp_path / "o"
    res = cli(["matte", folders["in"], "--out", out, "--workers", "1"])
    assert res.code == 1 and res.err.count("error:") == 1 and "error: disk full while writing" in res.err, res.err
    first = written[0].removesuffix(".alpha.png")
    assert written == [f"{first}.alpha.png", f"{first}.fg.png"]
    ok = [row for row in read_csv(out / "matte.csv").values() if row["status"] == "ok"]
    assert [Path(row["file"]).stem for row in ok] == [first]


def test_one_matte_run_per_output_folder_and_a_killed_runs_temporaries_are_removed(cli, folders, tmp_path: Path) -> None:
    from factory.fsutil import FolderLock

    out = tmp_path / "o"
    assert cli(["matte", folders["in"], "--out", out, "--workers", "1"]).code == 0
    killed = [out / ".tmp-disc.alpha.png.999.abcd1234", out / ".tmp-matte.csv.999.abcd1234"]
    users = [out / ".tmp-notes.txt", out / "sub" / ".tmp-disc.alpha.png.1.a"]
    (out / "sub").mkdir()
    for path in killed + users:
        path.write_bytes(b"x")
    with FolderLock(out, "busy"):  # another run holds the folder
        res = cli(["matte", folders["in"], "--out", out, "--workers", "1"])
        assert res.code == 2 and res.err == f"error: {out}: another factory matte is writing here; wait for it or choose another --out\n"
        assert all(path.exists() for path in killed)  # a live run's temporaries are left alone
    assert cli(["matte", folders["in"], "--out", out, "--workers", "1"]).code == 0
    assert not any(path.exists() for path in killed) and all(path.exists() for path in users)


def test_eval_leaves_out_an_image_whose_trimap_has_no_unknown_pixel(cli, folders, tmp_path: Path) -> None:
    """A binary mask passed as a trimap scores 0 (perfect) on an empty region: reported, not averaged."""
    trimap = tmp_path / "trimap"
    trimap.mkdir()
    Image.open(folders["trimap"] / "hair.png").save(trimap / "hair.png")
    mask = (np.asarray(Image.open(folders["gt"] / "disc.png").convert("L")) >= 128).astype(np.uint8) * 255
    Image.fromarray(mask).save(trimap / "disc.png")
    res = cli(["eval", "--pred", folders["gt"], "--gt", folders["gt"], "--trimap", trimap, "--json", tmp_path / "r.json"])
    assert res.code == 0, res.err
    assert "skipped disc: disc.png has no unknown pixel (only 0 and 255: a mask, not a trimap?)" in res.err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["count"] == 1 and [row["image"] for row in data["images"]] == ["hair"]
