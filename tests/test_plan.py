"""The plan: exact N, even spread, stable keys, byte-identical files, extendable."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.manifest import load_manifest
from factory.plan import _fill_articles, build_plan, build_rows, read_plan, row_key, slugify, write_plan

REPO = Path(__file__).resolve().parent.parent
KEY_RE = re.compile(r"^[a-z0-9_-]+$")


def test_exact_rows_unique_keys_even_spread(small_manifest: Path) -> None:
    m = load_manifest(small_manifest)
    table = build_plan(m, 23)
    assert table.num_rows == 23
    keys = table["key"].to_pylist()
    assert len(set(keys)) == 23
    assert all(KEY_RE.match(k) and "." not in k for k in keys)
    counts = Counter(table["class_name"].to_pylist())
    assert set(counts) == {"red fox", "wine glass", "fern", "owl"}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert table["index"].to_pylist() == list(range(23))
    assert len(set(table["seed"].to_pylist())) == 23


def test_prompts_are_filled(small_manifest: Path) -> None:
    rows = build_rows(load_manifest(small_manifest), 8)
    for row in rows:
        assert "{" not in row.prompt and "\x00" not in row.prompt
        assert row.negative_prompt == "blurry, green tint"
        assert row.attributes["view"] in row.prompt
        assert row.attributes["class_name"] == row.class_name
    owl = next(r for r in rows if r.class_name == "owl")
    assert "snowy owl" in owl.prompt


def test_articles() -> None:
    assert _fill_articles("\x00 owl on green") == "an owl on green"
    assert _fill_articles("\x00 fox") == "a fox"
    assert _fill_articles("\x00 unicorn and \x00 hour") == "a unicorn and an hour"
    assert _fill_articles("\x00 urn, \x00 usual day") == "an urn, a usual day"


def test_keys_are_stable_and_safe() -> None:
    assert row_key("gom", 12, "Red Fox (arctic)") == "gom-00000012-red_fox_arctic"
    assert slugify("St. Bernard's dog") == "st_bernard_s_dog"
    assert "." not in slugify("a.b.c")


def test_same_inputs_same_bytes(small_manifest: Path, tmp_path: Path) -> None:
    m = load_manifest(small_manifest)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_plan(build_plan(m, 50), a)
    write_plan(build_plan(load_manifest(small_manifest), 50), b)
    assert a.read_bytes() == b.read_bytes()
    assert read_plan(a).equals(build_plan(m, 50))


def test_growing_n_keeps_first_rows(small_manifest: Path) -> None:
    m = load_manifest(small_manifest)
    small, big = build_plan(m, 10), build_plan(m, 37)
    assert big.slice(0, 10).equals(small)


def test_seed_changes_plan(small_manifest: Path) -> None:
    m = load_manifest(small_manifest)
    other = m.model_copy(update={"seed": 8})
    assert build_plan(m, 10)["seed"].to_pylist() != build_plan(other, 10)["seed"].to_pylist()


def test_grid_covers_cells_evenly(grid_manifest: Path) -> None:
    m = load_manifest(grid_manifest)
    table = build_plan(m, 20)  # 6 cells: 4 or 3 each
    counts = Counter(table["class_name"].to_pylist())
    assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 1
    for attrs, prompt in zip(table["attributes"].to_pylist(), table["prompt"].to_pylist()):
        a = json.loads(attrs)
        assert {"age_group", "gender", "hair_style"} <= set(a)
        assert f"{a['age_group']} {a['gender']} with {a['hair_style']} hair" in prompt
    assert set(table["category"].to_pylist()) == {"portrait"}


def test_gom_10000(tmp_path: Path) -> None:
    m = load_manifest(REPO / "manifests" / "gom.yaml")
    table = build_plan(m, 10000)
    counts = Counter(table["class_name"].to_pylist())
    assert table.num_rows == 10000 and len(counts) == 500
    assert set(counts.values()) == {20}
    assert len(set(table["key"].to_pylist())) == 10000


def test_portrait_grid_1000() -> None:
    m = load_manifest(REPO / "manifests" / "portrait.yaml")
    table = build_plan(m, 1000)
    counts = Counter(table["class_name"].to_pylist())
    cells = m.prompts.grid.n_cells
    assert len(counts) == min(cells, 1000)
    assert max(counts.values()) - min(counts.values()) <= 1
    # every value of every axis appears, and extra axes rotate within each cell (balanced)
    attrs = [json.loads(a) for a in table["attributes"].to_pylist()]
    for axis in [*m.prompts.grid.cells, *m.prompts.grid.extra]:
        values = Counter(a[axis] for a in attrs)
        assert set(values) == set(m.prompts.grid.axes[axis])
    nationality = Counter(a["nationality"] for a in attrs)
    assert max(nationality.values()) <= 1.5 * min(nationality.values())
    per_cell: dict[str, list[str]] = {}
    for a, cell in zip(attrs, table["class_name"].to_pylist()):
        per_cell.setdefault(cell, []).append(a["nationality"])
    assert all(len(set(v)) == len(v) for v in per_cell.values())  # no repeats before the list is used up


# ---------------------------------------------------------------------------------- the command


def test_plan_command(cli, small_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    res = cli(["plan", "--manifest", small_manifest, "--n", 9, "--out", out])
    assert res.code == 0, res.err
    assert "rows: 9" in res.out and "classes: 4 of 4" in res.out and "min 2, max 3" in res.out
    assert pq.read_table(out).num_rows == 9


@pytest.mark.parametrize(
    "n, expected",
    [
        ("0", "--n must be a positive integer"),
        ("-3", "--n must be a positive integer"),
        ("abc", "Invalid value for '--n'"),
        # a key's index has 8 digits: row 100,000,000 would get a 9-digit key that the store and export take for a foreign file
        ("100000001", "--n 100000001: at most 100000000 samples"),
    ],
)
def test_plan_bad_n(cli, small_manifest: Path, tmp_path: Path, n: str, expected: str) -> None:
    out = tmp_path / "p.parquet"
    res = cli(["plan", "--manifest", small_manifest, "--n", n, "--out", out])
    assert res.code == 2
    assert expected in res.err and res.err.count("\n") == 1 and "Traceback" not in res.err
    assert not out.exists()


def test_plan_out_through_a_symbolic_link_keeps_the_link(cli, small_manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    link, dangling = tmp_path / "link.parquet", tmp_path / "dangling.parquet"
    link.symlink_to(tmp_path / "keep" / "old.parquet")
    pq.write_table(pa.table({"old": [1]}), tmp_path / "keep" / "old.parquet")  # a Parquet file: replaced
    dangling.symlink_to(tmp_path / "keep" / "new.parquet")
    for path, target in ((link, "old.parquet"), (dangling, "new.parquet")):
        assert cli(["plan", "--manifest", small_manifest, "--n", 3, "--out", path]).code == 0
        assert path.is_symlink() and path.resolve() == tmp_path / "keep" / target
        assert pq.read_table(path).num_rows == 3


def test_plan_bad_manifest_writes_nothing(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbogus: 1\n")
    out = tmp_path / "p.parquet"
    res = cli(["plan", "--manifest", bad, "--n", 5, "--out", out])
    assert res.code == 2 and res.err.startswith("error: ") and res.err.count("\n") == 1
    assert not out.exists()


def test_plan_unwritable_output(cli, small_manifest: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli(["plan", "--manifest", small_manifest, "--n", 5, "--out", blocker / "sub" / "p.parquet"])
    assert res.code == 2 and "is not writable" in res.err and res.err.count("\n") == 1


def test_plan_out_never_overwrites_a_file_that_is_not_a_plan(cli, small_manifest: Path, tmp_path: Path) -> None:
    """``--out`` the manifest itself (a slip of the shell's completion) replaced it with Parquet;
    any existing file that is not Parquet is refused, a plan written before is replaced."""
    before = small_manifest.read_bytes()
    notes = tmp_path / "notes.csv"
    notes.write_text("class_name\nfox\n")
    for target in (small_manifest, notes):
        res = cli(["plan", "--manifest", small_manifest, "--n", 3, "--out", target])
        assert res.code == 2 and res.err.count("\n") == 1, res.err
        assert f"{target}: exists and is not a Parquet file" in res.err, res.err
    assert small_manifest.read_bytes() == before and notes.read_text() == "class_name\nfox\n"
    plan = tmp_path / "plan.parquet"
    assert cli(["plan", "--manifest", small_manifest, "--n", 3, "--out", plan]).code == 0
    assert cli(["plan", "--manifest", small_manifest, "--n", 5, "--out", plan]).code == 0
    assert pq.read_table(plan).num_rows == 5
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert cli(["plan", "--manifest", small_manifest, "--n", 2, "--out", tmp_path / "empty.parquet"]).code == 0


def test_plan_out_whose_name_is_not_utf8_is_a_one_line_error(cli, small_manifest: Path, tmp_path: Path) -> None:
    """Parquet's writer cannot open such a path: it was an internal error (UnicodeEncodeError)."""
    import os

    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/plan-\xff.parquet"))
    res = cli(["plan", "--manifest", small_manifest, "--n", 2, "--out", out])
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "the path is not valid UTF-8" in res.err, res.err
    assert [p.name for p in tmp_path.iterdir()] == [small_manifest.name]  # nothing written
