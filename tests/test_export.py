"""`factory export`: shards read back with webdataset, folder layout with HF imagefolder, splits,
re-encoding, damaged samples, and an export killed mid-way."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.export.options import ExportOptions, parse_size, parse_splits, resolve_settings
from factory.export.ordering import plan_order
from factory.integrity import check_png
from factory.manifest import ExportSettings
from factory.errors import InputError
from tests.fake_run import make_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(tmp_path: Path):
    # 40 samples, 10 per class; three have a low GSG so the selection differs from "all done"
    store = make_run(tmp_path, 40, fields=lambda r: {"gsg": 0.4} if r.index in (5, 6, 7) else {"gsg": 0.8 + r.index / 400})
    return store


def store_files(store, key: str) -> dict[str, bytes]:
    rec = [r for r in store.index().to_pylist() if r["key"] == key][0]
    return {s: store.sample_path(rec["index"], key, s).read_bytes() for s in (".png", ".alpha.png", ".fg.png", ".json")}


def read_shards(paths: list[Path]) -> list[dict]:
    import webdataset as wds

    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    return list(ds)


def test_webdataset_export_reads_back_exactly(cli, run, tmp_path: Path) -> None:
    assert cli(["filter", "--run", run.root, "--min-gsg", "0.8"]).code == 0
    res = cli(["export", "--run", run.root, "--format", "webdataset", "--maxcount", "8", "--split", "val=0.2"])
    assert res.code == 0, res.err
    out = run.root / "export" / "default-webdataset"
    assert f"to {out}" in res.out
    selected = set(pq.read_table(run.root / "selections" / "default.parquet")["key"].to_pylist())
    assert len(selected) == 37

    names = sorted(p.name for p in out.iterdir())
    shards = sorted(out.glob("*.tar"))
    assert all(p.name.split("-")[0] in ("train", "val") and len(p.stem.split("-")[1]) == 6 for p in shards)
    assert not [n for n in names if n.startswith(".tmp-")]
    keys_by_split: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_shards = sorted(out.glob(f"{split}-*.tar"))
        samples = read_shards(split_shards)
        keys_by_split[split] = [s["__key__"] for s in samples]
        for s in samples:
            key = s["__key__"]
            files = store_files(run, key)
            assert set(s) >= {"png", "alpha.png", "fg.png", "json", "txt"}
            assert s["png"] == files[".png"] and s["alpha.png"] == files[".alpha.png"] and s["fg.png"] == files[".fg.png"]
            with Image.open(io.BytesIO(s["alpha.png"])) as im:
                assert im.mode == "L" and len(im.getbands()) == 1
            meta = json.loads(s["json"])
            stored = json.loads(files[".json"])
            assert meta["key"] == key and meta["prompt"] == stored["prompt"] and meta["seed"] == stored["seed"]
            assert meta["class_name"] == stored["class_name"] and meta["attributes"] == stored["attributes"]
            assert meta["model"] == "fake:1" and meta["scores"]["gsg"] >= 0.8 and meta["size"] == {"width": 32, "height": 32}
            assert meta["export"]["split"] == split and meta["file_bytes"]["image"] == len(s["png"])
            assert s["txt"] == stored["prompt"].encode()  # the caption member
        # the wids index describes the shards as they are
        index = json.loads((out / f"{split}.wids.json").read_text())
        assert index["__kind__"] == "wids-shard-index-v1"
        assert [e["url"] for e in index["shardlist"]] == [p.name for p in split_shards]
        for entry in index["shardlist"]:
            path = out / entry["url"]
            assert entry["filesize"] == path.stat().st_size
            assert entry["nsamples"] == len(read_shards([path])) <= 8
    # the caption as a training loader reads it: webdataset's decoder gives str
    import webdataset as wds

    decoded = wds.WebDataset([str(p) for p in sorted(out.glob("val-*.tar"))], shardshuffle=False).decode().to_tuple("txt", "json")
    captions = list(decoded)
    assert len(captions) == 8 and all(isinstance(t, str) and t == m["prompt"] and "green" in t for t, m in captions)
    train, val = keys_by_split["train"], keys_by_split["val"]
    assert set(train) | set(val) == selected and not set(train) & set(val)
    assert len(train) + len(val) == len(selected) == len(set(train + val))
    # 20 % of each class (9 or 10 samples) -> 2 per class
    assert len(val) == 8 and {k.rsplit("-", 1)[1] for k in val} == {"red_fox", "wine_glass", "fern", "owl"}
    rows = pq.read_table(out / "samples.parquet")
    assert rows.num_rows == 37 and sorted(rows["key"].to_pylist()) == sorted(selected)
    for rec in rows.to_pylist():
        member_names = tarfile.open(out / rec["shard"]).getnames()
        assert f"{rec['key']}.json" in member_names
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["samples"] == 29 and stats["splits"]["val"]["samples"] == 8
    assert json.loads((out / "export.json").read_text())["state"] == "complete"


def test_dataset_card(cli, run) -> None:
    assert cli(["filter", "--run", run.root, "--min-gsg", "0.8"]).code == 0
    assert cli(["export", "--run", run.root, "--split", "val=0.2"]).code == 0
    out = run.root / "export" / "default-webdataset"
    card = (out / "README.md").read_text()
    assert "| train | 29 |" in card and "| val | 8 |" in card
    assert "| red fox |" in card and "fake:1" in card and "min_gsg=0.8" in card and "low_gsg 3" in card
    # the true size of the images (32x32), not the manifest's sampler size (64x64)
    assert "image size: 32x32 pixels" in card and "64x64" not in card and "512x512" not in card
    assert "gsg_histogram.png" in card and "contact_sheet.png" in card
    assert "Matte confidence" in card and "| confidence | 0.0-0.1 |" in card  # the distribution of the exported samples
    with Image.open(out / "gsg_histogram.png") as im:
        assert im.size == (720, 360)
        assert len(set(im.convert("RGB").getdata())) > 3  # bars, axes, text
    with Image.open(out / "contact_sheet.png") as im:
        w, h = im.size
        assert w >= 3 * 128 and h >= 4 * 128  # 8 samples in two columns of triples


def test_selection_choice(cli, run, tmp_path: Path) -> None:
    res = cli(["export", "--run", run.root, "--out", tmp_path / "e0", "--split", "none"])
    assert res.code == 0 and "all 40 done samples (the run has no selection" in res.out
    assert cli(["filter", "--run", run.root, "--name", "loose", "--min-gsg", "0"]).code == 0
    time.sleep(0.01)
    assert cli(["filter", "--run", run.root, "--name", "strict", "--min-gsg", "0.85"]).code == 0
    res = cli(["export", "--run", run.root, "--out", tmp_path / "e1", "--split", "none"])
    assert "selection 'strict' (the most recent" in res.out
    n_strict = pq.read_table(tmp_path / "e1" / "samples.parquet").num_rows
    assert n_strict == len(pq.read_table(run.root / "selections" / "strict.parquet"))
    res = cli(["export", "--run", run.root, "--out", tmp_path / "e2", "--selection", "loose", "--split", "none"])
    assert pq.read_table(tmp_path / "e2" / "samples.parquet").num_rows == 40
    res = cli(["export", "--run", run.root, "--out", tmp_path / "e3", "--selection", "nope"])
    assert res.code == 2 and "no selection named 'nope'" in res.err


def test_reencode_jpg_and_16_bit_alpha(cli, run, tmp_path: Path) -> None:
    out = tmp_path / "e"
    res = cli(["export", "--run", run.root, "--all", "--out", out, "--image-format", "jpg", "--alpha-bits", "16", "--split", "none"])
    assert res.code == 0, res.err
    samples = read_shards(sorted(out.glob("train-*.tar")))
    assert len(samples) == 40
    for s in samples[:5]:
        files = store_files(run, s["__key__"])
        assert "png" not in s and s["jpg"][:2] == b"\xff\xd8"
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
        info = check_png(s["alpha.png"])
        assert info.color_type == 0 and info.bit_depth == 16
        with Image.open(io.BytesIO(s["alpha.png"])) as a16, Image.open(io.BytesIO(files[".alpha.png"])) as a8:
            assert np.array_equal(np.asarray(a16, np.int64), np.asarray(a8, np.int64) * 257)
        assert s["fg.png"] == files[".fg.png"]  # unchanged format: copied
        meta = json.loads(s["json"])
        assert meta["alpha_bits"] == 16 and meta["export"]["image_copied"] is False and meta["export"]["image_format"] == "jpg"


def test_maxsize_rolls_shards(cli, run, tmp_path: Path) -> None:
    out = tmp_path / "e"
    res = cli(["export", "--run", run.root, "--all", "--out", out, "--maxsize", "20k", "--split", "none"])
    assert res.code == 0, res.err
    index = json.loads((out / "train.wids.json").read_text())["shardlist"]
    assert len(index) > 2 and sum(e["nsamples"] for e in index) == 40
    for e in index:
        with tarfile.open(out / e["url"]) as tar:
            member_bytes = sum(512 + m.size + (-m.size % 512) for m in tar.getmembers())
        assert member_bytes <= 20_000 or e["nsamples"] == 1


def test_damaged_samples_are_reported_and_skipped(cli, run, tmp_path: Path) -> None:
    recs = {r["index"]: r for r in run.index().to_pylist()}

    def path(i: int, suffix: str) -> Path:
        return run.sample_path(i, recs[i]["key"], suffix)

    data = bytearray(path(10, ".png").read_bytes())
    data[60] ^= 0x01  # a bit flip: same size, CRC mismatch
    path(10, ".png").write_bytes(bytes(data))
    path(11, ".alpha.png").write_bytes(path(11, ".alpha.png").read_bytes()[:-20])  # truncated
    path(12, ".fg.png").unlink()  # missing
    path(13, ".json").write_bytes(b"{not json" + b" " * (recs[13]["meta_bytes"] - 9))  # same size, not JSON
    out = tmp_path / "e"
    fds = len(os.listdir("/proc/self/fd"))
    res = cli(["export", "--run", run.root, "--all", "--out", out, "--split", "none", "--maxcount", "10"])
    assert res.code == 0, res.err
    assert len(os.listdir("/proc/self/fd")) == fds  # damaged samples' open files are closed too
    err = res.err
    assert f"{recs[10]['key']}: corrupt image ({recs[10]['key']}.png: CRC mismatch" in err
    assert f"{recs[11]['key']}: corrupt alpha ({recs[11]['key']}.alpha.png:" in err and "the index says" in err
    assert f"{recs[12]['key']}: missing foreground" in err
    assert f"{recs[13]['key']}: corrupt metadata" in err
    assert "skipped 4 damaged samples" in res.out
    keys = [s["__key__"] for s in read_shards(sorted(out.glob("train-*.tar")))]
    assert len(keys) == 36 and not {recs[i]["key"] for i in (10, 11, 12, 13)} & set(keys)
    assert len(json.loads((out / "stats.json").read_text())["skipped"]) == 4
    # --strict: exit 1 naming the key; finished shards are complete, no temporary left
    out2 = tmp_path / "strict"
    res = cli(["export", "--run", run.root, "--all", "--out", out2, "--split", "none", "--maxcount", "4", "--strict"])
    assert res.code == 1 and ": corrupt" in res.err and "--strict" in res.err
    assert not list(out2.glob(".tmp-*"))
    for shard in out2.glob("*.tar"):
        assert len(read_shards([shard])) == 4
    # the same command without --strict resumes and completes
    res = cli(["export", "--run", run.root, "--all", "--out", out2, "--split", "none", "--maxcount", "4"])
    assert res.code == 0 and len(read_shards(sorted(out2.glob("train-*.tar")))) == 36


def _export_cmd(run_root: Path, out: Path) -> list[str]:
    return ["export", "--run", str(run_root), "--all", "--out", str(out), "--maxcount", "5", "--split", "val=0.1", "--no-fsync"]


def test_killed_export_leaves_no_partial_shard_and_resumes(cli, run, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "FACTORY_EXPORT_TEST_DELAY_S": "0.05", "PYTHONPATH": str(REPO)}
    code = f"import sys; sys.argv[1:] = {_export_cmd(run.root, out)!r}; from cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train-000001.tar").exists():  # two shards done, the third in progress
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finals = sorted(out.glob("*.tar"))
    assert finals and len(finals) < 8
    for shard in finals:  # every final-named shard is a complete tar of whole samples
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert len(names) == 5 * 5 and len({n.split(".")[0] for n in names}) == 5
    assert list(out.glob(".tmp-*.tar.*")), "the shard in progress stays under its temporary name"
    state = json.loads((out / "export.json").read_text())
    assert state["state"] == "writing"

    res = cli(_export_cmd(run.root, out))
    assert res.code == 0, res.err
    assert "resumed:" in res.out and not list(out.glob(".tmp-*"))
    fresh = tmp_path / "fresh"
    assert cli(_export_cmd(run.root, fresh)).code == 0
    resumed_files = sorted(p.name for p in out.glob("*.tar"))
    assert resumed_files == sorted(p.name for p in fresh.glob("*.tar"))
    for name in resumed_files:  # byte-identical to an uninterrupted export
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
    assert pq.read_table(out / "samples.parquet").equals(pq.read_table(fresh / "samples.parquet"))


def test_changed_plan_restarts_cleanly(cli, run, tmp_path: Path) -> None:
    out = tmp_path / "e"
    base = ["export", "--run", run.root, "--all", "--out", out, "--split", "none"]
    assert cli([*base, "--maxcount", "10"]).code == 0
    assert len(list(out.glob("train-*.tar"))) == 4
    res = cli([*base, "--maxcount", "25"])
    assert res.code == 0 and "restarted: the folder held an export of another plan" in res.out
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    res = cli([*base, "--maxcount", "25"])  # same plan again: everything kept
    assert res.code == 0 and "resumed: 40 samples" in res.out
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    res = cli(["export", "--run", run.root, "--all", "--out", tmp_path / "foreign"])
    assert res.code == 2 and "not a factory export" in res.err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_folder_export_rules(cli, run, tmp_path: Path) -> None:
    assert cli(["filter", "--run", run.root, "--min-gsg", "0.8"]).code == 0
    res = cli(["export", "--run", run.root, "--format", "folder", "--split", "val=0.2"])
    assert res.code == 0, res.err
    out = run.root / "export" / "default-folder"
    selected = set(pq.read_table(run.root / "selections" / "default.parquet")["key"].to_pylist())
    seen: dict[str, set[str]] = {}
    for split in ("train", "val"):
        lines = [json.loads(x) for x in (out / split / "metadata.jsonl").read_text().splitlines()]
        seen[split] = {x["key"] for x in lines}
        for sub in ("image", "alpha", "fg"):  # matching names, nothing else
            assert sorted(p.stem for p in (out / split / sub).iterdir()) == sorted(seen[split])
        for x in lines:
            files = store_files(run, x["key"])
            assert x["file_name"] == f"image/{x['key']}.png" and x["alpha_file_name"] == f"alpha/{x['key']}.png"
            assert (out / split / x["file_name"]).read_bytes() == files[".png"]
            assert (out / split / x["alpha_file_name"]).read_bytes() == files[".alpha.png"]
            assert (out / split / x["fg_file_name"]).read_bytes() == files[".fg.png"]
            assert x["attributes"] == json.loads(files[".json"])["attributes"]  # an object, not JSON text
    assert seen["train"] | seen["val"] == selected and not seen["train"] & seen["val"] and len(seen["val"]) == 8


def test_folder_export_loads_with_hf_imagefolder(cli, run, tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")  # the `hf` extra; the rules are checked above either way
    assert cli(["filter", "--run", run.root, "--min-gsg", "0.8"]).code == 0
    assert cli(["export", "--run", run.root, "--format", "folder", "--split", "val=0.2"]).code == 0
    out = run.root / "export" / "default-folder"
    seen = {s: {json.loads(x)["key"] for x in (out / s / "metadata.jsonl").read_text().splitlines()} for s in ("train", "val")}
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf" / "datasets"))
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows == len(seen["train"]) and ds["validation"].num_rows == 8
    row = ds["validation"][0]
    assert {"image", "alpha", "fg", "key", "class_name", "gsg"} <= set(row)
    assert row["alpha"].mode == "L" and row["image"].size == (32, 32) and row["key"] in seen["val"]


def test_folder_export_resume_keeps_written_files(cli, run, tmp_path: Path) -> None:
    out = tmp_path / "f"
    cmd = ["export", "--run", run.root, "--all", "--format", "folder", "--out", out, "--split", "none"]
    assert cli(cmd).code == 0
    victim = next((out / "train" / "fg").iterdir())
    victim.unlink()
    (out / "train" / "metadata.jsonl").unlink()
    res = cli(cmd)
    assert res.code == 0 and "resumed: 39 samples" in res.out
    assert victim.exists() and len((out / "train" / "metadata.jsonl").read_text().splitlines()) == 40


def test_plan_order_split_rules() -> None:
    classes = ["a"] * 10 + ["b"] * 2 + ["c"] * 1 + ["d"] * 40
    table = pa.table({"index": np.arange(len(classes), dtype=np.int64), "key": [f"k{i}" for i in range(len(classes))], "class_name": classes})
    ordered = plan_order(table, {"val": 0.05, "test": 0.1}, seed=3)
    split = dict(zip(ordered["key"].to_pylist(), ordered["split"].to_pylist()))
    per = {}
    for key, cls in zip(table["key"].to_pylist(), classes):
        per.setdefault(cls, {}).setdefault(split[key], 0)
        per[cls][split[key]] += 1
    assert per["a"] == {"val": 1, "test": 1, "train": 8}  # 5 % of 10 rounds to 0 -> at least 1
    assert per["b"] == {"val": 1, "train": 1}  # train keeps one: test is trimmed
    assert per["c"] == {"train": 1}  # a single sample stays in train
    assert per["d"] == {"val": 2, "test": 4, "train": 34}
    assert ordered["split"].to_pylist() == sorted(ordered["split"].to_pylist(), key=["train", "val", "test"].index)
    again = plan_order(table, {"val": 0.05, "test": 0.1}, seed=3)
    assert again.equals(ordered)
    other = plan_order(table, {"val": 0.05, "test": 0.1}, seed=4)
    assert other["key"].to_pylist() != ordered["key"].to_pylist()


def test_the_progress_bar_rate_shows_a_slow_export_in_a_unit_that_is_not_zero() -> None:
    from factory.export.run import bar_rate

    assert bar_rate(150e3) == "150 kB/s" and bar_rate(2.5e6) == "2.5 MB/s" and bar_rate(0.0) == "0 B/s"


def test_option_parsing() -> None:
    assert parse_splits(["val=0.05", "test=0.1"]) == {"val": 0.05, "test": 0.1}
    assert parse_splits(["val=0.05,test=0.1"]) == {"val": 0.05, "test": 0.1}
    assert parse_splits(["none"]) == {} and parse_splits(None) is None
    for twice in (["val=0.1", "val=0.2"], ["val=0.1,val=0.1"]):
        with pytest.raises(InputError, match="split 'val' is given twice"):
            parse_splits(twice)
    for bad in (["train=0.1"], ["val"], ["val=1.5"], ["val=0.6", "test=0.5"], ["Val=0.1"]):
        with pytest.raises(InputError, match="--split"):
            resolve_settings(ExportOptions(splits=parse_splits(bad)), ExportSettings())
    for option, value in (("format", "zip"), ("image_format", "gif"), ("alpha_bits", 12), ("maxcount", 0), ("jpeg_quality", 101)):
        with pytest.raises(InputError, match="--" + option.replace("_", "-")):
            resolve_settings(ExportOptions(**{option: value}), ExportSettings())
    assert resolve_settings(ExportOptions(image_format="JPEG"), ExportSettings()).image_format == "jpg"
    # an option the resolved format would ignore is refused, not dropped without a word
    with pytest.raises(InputError, match="--jpeg-quality is for --image-format jpg"):
        resolve_settings(ExportOptions(jpeg_quality=80), ExportSettings())
    assert resolve_settings(ExportOptions(jpeg_quality=80, image_format="jpg"), ExportSettings()).jpeg_quality == 80
    for option, value in (("maxcount", 10), ("maxsize", 10**6)):
        with pytest.raises(InputError, match=f"--{option} limits WebDataset shards; --format folder"):
            resolve_settings(ExportOptions(format="folder", **{option: value}), ExportSettings())
    assert resolve_settings(ExportOptions(format="folder"), ExportSettings(maxcount=10)).maxcount == 10  # the manifest's
    assert parse_size("1G") == 10**9 and parse_size("512Mi") == 512 * 2**20 and parse_size("3e9") == 3 * 10**9
    with pytest.raises(InputError):
        parse_size("lots")


def test_png_check_catches_damage(tmp_path: Path) -> None:
    """The in-memory check and the on-disk one (read through a small buffer, as the WebDataset
    export does) agree on good files and give the same error on damaged ones."""
    from factory.integrity import PngError, check_png_fd
    from factory.imageio import encode_png

    rng = np.random.default_rng(0)
    good = encode_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # several KB: crosses the scratch
    assert check_png(good).channels == 3

    def on_disk(data: bytes):
        path = tmp_path / "x.png"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            return check_png_fd(fd, len(data), bytearray(1000))
        finally:
            os.close(fd)

    assert on_disk(good) == check_png(good)
    no_iend = good[: good.rindex(b"IEND") - 4]
    for bad in (good[:-5], b"GIF89a" + good[6:], good[:40] + bytes([good[40] ^ 1]) + good[41:], good[:-100] + bytes(100), no_iend):
        with pytest.raises(PngError) as in_memory:
            check_png(bad)
        with pytest.raises(PngError) as streamed:
            on_disk(bad)
        assert str(streamed.value) == str(in_memory.value)


def test_shards_are_the_same_without_kernel_copy(cli, run, tmp_path: Path, monkeypatch) -> None:
    """Where copy_file_range is refused (other file systems, old kernels) the export falls back to
    read/write and writes the same bytes; no file descriptor is left open either way."""
    import errno

    def open_fds() -> list[str]:
        """Descriptors on files of the run or the exports; other threads of the test process
        (Ray, torch, earlier tests) may open and close their own at any time."""
        ours = (str(run.root), str(tmp_path))
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed between listdir and readlink
                continue
            if target.startswith(ours):
                targets.append(target)
        return sorted(targets)

    args = ["export", "--run", run.root, "--all", "--split", "none", "--no-fsync", "--maxcount", "16"]
    assert open_fds() == []
    assert cli([*args, "--out", tmp_path / "kernel"]).code == 0
    assert open_fds() == []

    def refuse(*_a, **_k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    assert cli([*args, "--out", tmp_path / "plain"]).code == 0
    assert open_fds() == []
    shards = sorted(p.name for p in (tmp_path / "kernel").glob("*.tar"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "plain").glob("*.tar"))
    for name in shards:
        assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_empty_selection_and_empty_split(cli, tmp_path: Path) -> None:
    store = make_run(tmp_path, 4, fields=lambda r: {"gsg": 0.5})  # one sample per class
    assert cli(["filter", "--run", store.root, "--min-gsg", "0.9"]).code == 0
    res = cli(["export", "--run", store.root])
    assert res.code == 2 and "nothing to export" in res.err and "dropped 4 low_gsg (--min-gsg)" in res.err
    assert not (store.root / "export").exists() or not any((store.root / "export").rglob("*.tar"))
    # a class of one sample stays in train: the val split is empty, and gets no folder or index
    for fmt in ("webdataset", "folder"):
        out = tmp_path / fmt
        res = cli(["export", "--run", store.root, "--all", "--format", fmt, "--out", out, "--split", "val=0.5"])
        assert res.code == 0, res.err
        assert "val" in res.out and "empty: classes of one sample stay in train" in res.out
        assert not (out / "val").exists() and not (out / "val.wids.json").exists() and not list(out.glob("val-*"))
        assert pq.read_table(out / "samples.parquet")["split"].to_pylist() == ["train"] * 4
        assert 'path: "val' not in (out / "README.md").read_text()


# ------------------------------------------------------------------------ Hub-ready exports


def _load_offline(datasets, path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    return datasets.load_dataset(str(path), cache_dir=str(tmp_path / "hf" / "datasets"))


@pytest.mark.parametrize("fmt", ["webdataset", "folder"])
def test_card_header_is_valid_and_datasets_loads_typed_columns(cli, run, tmp_path: Path, monkeypatch, fmt: str) -> None:
    datasets = pytest.importorskip("datasets")
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    out = tmp_path / fmt
    assert cli(["export", "--run", run.root, "--all", "--format", fmt, "--out", out, "--split", "val=0.2"]).code == 0
    card = DatasetCard.load(out / "README.md")
    data = card.data
    assert isinstance(data, DatasetCardData)
    resources = Path(datasets.__file__).parent / "utils" / "resources"
    assert data.license == "other"  # the fake model implies no licence
    assert data.size_categories == ["n<1K"] and set(data.size_categories) <= set(json.loads((resources / "size_categories.json").read_text()))
    assert set(data.annotations_creators) <= set(json.loads((resources / "creators.json").read_text())["annotations"])
    assert "image-segmentation" in data.task_categories and {"synthetic", "machine-generated", "image-matting"} <= set(data.tags)
    configs = MetadataConfigs.from_dataset_card_data(data)
    assert [f["split"] for f in configs["default"]["data_files"]] == ["train", "val"]
    declared = DatasetInfosDict.from_dataset_card_data(data)["default"].features
    assert declared is not None

    ds = _load_offline(datasets, out, tmp_path, monkeypatch)
    assert set(ds) == {"train", "val"} and ds["train"].num_rows == 32 and ds["val"].num_rows == 8
    assert ds["train"].features == declared  # the card tells the loader the columns and their types
    index = {r["key"]: r for r in run.index().to_pylist()}
    row = ds["val"][0]
    meta = row["json"] if fmt == "webdataset" else row
    key = meta["key"]
    assert isinstance(meta["attributes"], dict) and meta["attributes"] == json.loads(index[key]["attributes"])
    # phash: imagehash's 16 hex digits, the same in the loaded columns and in samples.parquet
    phash = meta["scores"]["phash"] if fmt == "webdataset" else meta["phash"]
    assert phash == f"{index[key]['phash'] & (2**64 - 1):016x}"
    parquet = pq.read_table(out / "samples.parquet")
    assert pa.types.is_struct(parquet.schema.field("attributes").type) and parquet.schema.field("phash").type == pa.string()
    rec = next(r for r in parquet.to_pylist() if r["key"] == key)
    assert rec["phash"] == phash and rec["attributes"] == meta["attributes"]
    image = row["png"] if fmt == "webdataset" else row["image"]
    assert image.size == (32, 32)


def test_exported_files_name_no_local_path(cli, tmp_path: Path) -> None:
    """Every exported file, tar members and Parquet cells included, is free of this machine's
    absolute paths (the temp dir, home, cwd), even for a model loaded from a local folder."""
    model = f"diffusers:{tmp_path}/models/sd15#0123456789abcdef +lora:{tmp_path}/loras/style.safetensors@0.8#feedbeef"
    store = make_run(tmp_path, 12, model=model)
    victim = store.sample_path(3, store.index()["key"][3].as_py(), ".fg.png")
    victim.write_bytes(victim.read_bytes()[:40])  # a damaged sample: its problem goes into stats.json
    forbidden = {str(tmp_path), str(tmp_path.resolve()), str(Path.home()), os.getcwd()} - {"/", ""}
    for fmt in ("webdataset", "folder"):
        out = tmp_path / "exports" / fmt
        res = cli(["export", "--run", store.root, "--all", "--format", fmt, "--out", out, "--split", "none"])
        assert res.code == 0 and "skipped 1 damaged sample " in res.out, res.err
        texts: dict[str, str] = {}
        for path in out.rglob("*"):
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    for m in tar.getmembers():
                        if not m.name.endswith(".png"):
                            texts[f"{path.name}/{m.name}"] = tar.extractfile(m).read().decode()
            elif path.suffix == ".parquet":
                texts[path.name] = json.dumps(pq.read_table(path).to_pylist(), default=str)
            elif path.is_file() and path.suffix != ".png":
                texts[str(path.relative_to(out))] = path.read_text()
        assert {"README.md", "export.json", "stats.json", "samples.parquet"} <= set(texts)
        leaks = [(name, p) for name, text in texts.items() for p in forbidden if p in text]
        assert not leaks, leaks[:3]
        assert json.loads(texts["export.json"])["run"] == "run" and json.loads(texts["stats.json"])["run"] == "run"
        assert "diffusers:sd15#0123456789abcdef +lora:style.safetensors@0.8#feedbeef" in texts["export.json"]
        assert "license: creativeml-openrail-m" in texts["README.md"]  # a Stable Diffusion model's licence


def test_out_through_a_dangling_symlink_says_so_in_one_line(cli, run, tmp_path: Path) -> None:
    """``--out`` a symlink to nothing (or inside one): it said 'cannot create the output folder (File
    exists)'; nothing is created through the link."""
    link = tmp_path / "dang"
    link.symlink_to(tmp_path / "gone" / "export")
    for out in (link, link / "sub"):
        res = cli(["export", "--run", run.root, "--all", "--out", out])
        assert res.code == 2 and res.err.count("\n") == 1, res.err
        assert f"{link}: is a symlink to {tmp_path / 'gone' / 'export'}, which does not exist" in res.err, res.err
    assert not (tmp_path / "gone").exists() and link.is_symlink()
