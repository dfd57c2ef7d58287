"""`factory filter`: each drop reason, near-duplicate search, selections on disk, CLI defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.errors import InputError
from factory.filter import REASONS, filter_settings, select
from factory.manifest import FilterSettings
from factory.selection import list_selections, load_selection
from factory.store import remember_latest_run
from tests.fake_run import make_run

CODE = {name: i + 1 for i, name in enumerate(REASONS)}


def index_table(rows: list[dict]) -> pa.Table:
    """A minimal index table: defaults for a good sample, overridden per row."""
    full = []
    for i, r in enumerate(rows):
        base = {
            "index": i,
            "key": f"k-{i:08d}-x",
            "class_name": "a",
            "category": "c",
            "status": "done",
            "gsg": 0.9,
            "alpha_coverage": 0.3,
            "touches_border": False,
            "contains_key_color": False,
            "phash": (i + 1) * 0x0F0F0F0F0F0F0F,  # far apart from each other
        }
        base.update(r)
        full.append(base)
    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("key", pa.string()),
            ("class_name", pa.string()),
            ("category", pa.string()),
            ("status", pa.string()),
            ("gsg", pa.float32()),
            ("alpha_coverage", pa.float32()),
            ("touches_border", pa.bool_()),
            ("contains_key_color", pa.bool_()),
            ("phash", pa.int64()),
        ]
    )
    return pa.Table.from_pylist(full, schema=schema)


def reasons_of(table: pa.Table, params: FilterSettings) -> list[str]:
    result = select(table, params)
    names = {0: "kept", -1: "not_candidate", **{v: k for k, v in CODE.items()}}
    return [names[int(c)] for c in result.reason]


def test_each_reason_with_first_reason_wins() -> None:
    table = index_table(
        [
            {},  # 0 kept
            {"gsg": 0.5},  # 1 low_gsg
            {"alpha_coverage": 0.001},  # 2 empty_matte
            {"alpha_coverage": 0.99},  # 3 full_matte
            {"touches_border": True},  # 4 touches_border
            {"contains_key_color": True},  # 5 key_color
            {"gsg": 0.5, "alpha_coverage": 0.001, "contains_key_color": True},  # 6 first reason: low_gsg
            {"status": "failed", "gsg": None},  # 7 not a candidate
            {"status": "planned", "gsg": None},  # 8 not a candidate
            {"gsg": None},  # 9 no score: fails a GSG threshold
            {"alpha_coverage": None},  # 10 no coverage: counted as empty
        ]
    )
    params = FilterSettings(min_gsg=0.8, min_coverage=0.01, max_coverage=0.95, drop_border=True, drop_key_color=True)
    assert reasons_of(table, params) == [
        "kept", "low_gsg", "empty_matte", "full_matte", "touches_border", "key_color", "low_gsg",
        "not_candidate", "not_candidate", "low_gsg", "empty_matte",
    ]  # fmt: skip
    # switched-off tests keep those samples
    relaxed = FilterSettings(min_gsg=0.0, min_coverage=0.0, max_coverage=1.0, drop_border=False, drop_key_color=False, dedup_distance=-1)
    assert reasons_of(table, relaxed)[:7] == ["kept"] * 7
    result = select(table, params)
    assert result.counts_by_reason()["low_gsg"] == 3 and sum(result.counts_by_reason().values()) == 8
    assert result.status_counts == {"done": 9, "failed": 1, "planned": 1}


def test_near_duplicates_keep_best_gsg_and_resolve_chains() -> None:
    base = 0x123456789ABCDEF0
    table = index_table(
        [
            {"phash": base, "gsg": 0.85},  # 0: duplicate of 1 (1 has the better GSG)
            {"phash": base ^ 0b111, "gsg": 0.95},  # 1: best of the cluster, kept
            {"phash": base ^ 0b111 ^ (0b1111 << 20), "gsg": 0.9},  # 2: 4 bits from 1 -> duplicate
            {"phash": base ^ (0b11111 << 40), "gsg": 0.99},  # 3: 5 bits from 0, 8 from 1: kept (its own)
            {"phash": base, "gsg": 0.85},  # 4: identical hash to 0, same GSG, higher index -> duplicate
            {"phash": None},  # 5: no hash: never a duplicate
        ]
    )
    params = FilterSettings(dedup_distance=4)
    result = select(table, params)
    assert reasons_of(table, params) == ["near_duplicate", "kept", "near_duplicate", "kept", "near_duplicate", "kept"]
    assert result.duplicate_of[[0, 2, 4]].tolist() == [1, 1, 1]
    # a chain A~B~C with A, C far apart: greedy keeps A and C
    a = 0
    b = a ^ 0b1111  # 4 from a
    c = b ^ (0b1111 << 30)  # 4 from b, 8 from a
    chain = index_table([{"phash": a, "gsg": 0.99}, {"phash": b, "gsg": 0.95}, {"phash": c, "gsg": 0.9}])
    assert reasons_of(chain, params) == ["kept", "near_duplicate", "kept"]
    # distance 0: only identical hashes
    assert reasons_of(table, FilterSettings(dedup_distance=0)) == ["kept", "kept", "kept", "kept", "near_duplicate", "kept"]
    assert reasons_of(table, FilterSettings(dedup_distance=-1)) == ["kept"] * 6


def test_select_same_on_any_row_order_and_encoding() -> None:
    """The packed best-first sort (float32 GSG, rows in plan order) and the general two-key sort
    (rows shuffled, float64 GSG), plain or dictionary-encoded strings: the same reasons per sample."""
    rng = np.random.default_rng(3)
    n = 400
    base = rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64).view(np.uint64)
    hashes = base[rng.integers(0, 200, n)] ^ (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64))
    hashes[rng.random(n) < 0.1] = base[0]  # identical hashes
    rows = [
        {
            "class_name": f"c{rng.integers(0, 5)}",
            "gsg": float(rng.choice([0.8, 0.9, 0.95, -0.0, 0.0, np.nan])),  # many ties
            "phash": int(hashes[i].view(np.int64)),
            "status": "failed" if i % 17 == 0 else "done",
        }
        for i in range(n)
    ]
    table = index_table(rows)
    params = FilterSettings(min_gsg=0.0, dedup_distance=3, per_class_cap=25)
    want = select(table, params)
    assert (want.reason == CODE["near_duplicate"]).sum() > 50 and (want.reason == CODE["class_cap"]).sum() > 0
    perm = rng.permutation(n)
    shuffled = table.take(perm).set_column(5, "gsg", table["gsg"].cast(pa.float64()).take(perm))
    encoded = table
    for col in ("class_name", "status"):
        encoded = encoded.set_column(encoded.column_names.index(col), col, pa.compute.dictionary_encode(table[col]))
    for other, order in ((shuffled, perm), (encoded, np.arange(n))):
        got = select(other, params)
        assert (got.reason == want.reason[order]).all()
        assert got.per_class() == want.per_class() and got.status_counts == want.status_counts


def test_per_class_cap_keeps_best_gsg() -> None:
    rows = [{"class_name": "a", "gsg": g} for g in (0.81, 0.99, 0.9, 0.85)] + [{"class_name": "b", "gsg": 0.9}]
    table = index_table(rows)
    got = reasons_of(table, FilterSettings(per_class_cap=2))
    assert got == ["class_cap", "kept", "kept", "class_cap", "kept"]
    per_class = select(table, FilterSettings(per_class_cap=2)).per_class()
    assert per_class == {"a": {"done": 4, "kept": 2, "class_cap": 2}, "b": {"done": 1, "kept": 1}}


def test_params_validation() -> None:
    with pytest.raises(InputError, match="min_coverage 0.5 is above max_coverage 0.4"):
        filter_settings(FilterSettings(), min_coverage=0.5, max_coverage=0.4)
    with pytest.raises(InputError, match="--min-gsg 1.5: Input should be less than or equal to 1"):
        filter_settings(FilterSettings(), min_gsg=1.5)
    with pytest.raises(InputError, match="--dedup-distance"):
        filter_settings(FilterSettings(), dedup_distance=65)
    p = filter_settings(FilterSettings(per_class_cap=3), per_class_cap=0, min_gsg=None)
    assert p.per_class_cap is None and p.min_gsg == 0.8  # None keeps the manifest default


# ------------------------------------------------------------------------------------ the CLI


def _scores(row) -> dict:
    i = row.index
    if i in (0, 1):
        return {"gsg": 0.3}  # low_gsg (both class index 0 and 1)
    if i == 2:
        return {"alpha_coverage": 0.0}
    if i == 3:
        return {"alpha_coverage": 0.99}
    if i == 4:
        return {"touches_border": True}
    if i == 5:
        return {"contains_key_color": True}
    if i == 7:
        return {"phash": 0x5555, "gsg": 0.95}
    if i == 8:
        return {"phash": 0x5555 ^ 0b11, "gsg": 0.9}  # near-duplicate of 7
    return {}


@pytest.fixture
def run(tmp_path: Path):
    return make_run(tmp_path, 24, fields=_scores, status=lambda r: "failed" if r.index == 23 else "done")


def test_filter_cli_counts_reasons_and_writes_selection(cli, run, tmp_path: Path) -> None:
    res = cli(["filter", "--run", run.root, "--min-gsg", "0.8", "--drop-border"])
    assert res.code == 0, res.err
    out = res.out
    assert "24 samples, 23 done (1 failed not candidates)" in out
    for reason, n in [("low_gsg", 2), ("empty_matte", 1), ("full_matte", 1), ("touches_border", 1), ("key_color", 1), ("near_duplicate", 1)]:
        assert any(line.split()[:2] == [reason, str(n)] for line in out.splitlines()), (reason, out)
    assert "kept 16 of 23 done" in out
    sel = load_selection(run.root, "default")
    assert sel.table.num_rows == 16 and sel.table["index"].to_pylist() == sorted(sel.table["index"].to_pylist())
    assert 8 not in sel.table["index"].to_pylist() and 7 in sel.table["index"].to_pylist()
    assert sel.meta["params"]["min_gsg"] == 0.8 and sel.meta["params"]["drop_border"] is True
    assert sel.meta["dropped"]["near_duplicate"] == 1 and sel.meta["status"]["failed"] == 1
    # per-class lines add up to the totals
    per_class = sel.meta["per_class"]
    assert sum(c["kept"] for c in per_class.values()) == 16 and sum(c["done"] for c in per_class.values()) == 23
    for name, c in per_class.items():
        assert any(line.startswith(name) and f" {c['done']} " in line for line in out.splitlines())
    # re-runnable: a new threshold overwrites the same selection atomically
    res = cli(["filter", "--run", run.root, "--min-gsg", "0", "--keep-border", "--keep-key-color", "--dedup-distance", "-1"])
    assert res.code == 0 and "kept 21 of 23 done" in res.out
    assert load_selection(run.root, "default").table.num_rows == 21
    assert [p.name for p in (run.root / "selections").iterdir()] == ["default.parquet"]  # no temporaries left


def test_filter_defaults_from_manifest_and_latest_run(cli, run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    remember_latest_run(run.root, tmp_path)
    res = cli(["filter"])  # no --run, no thresholds: the manifest's defaults (min_gsg 0.8, key colour dropped)
    assert res.code == 0, res.err
    sel = load_selection(run.root, "default")
    assert sel.meta["params"] == {
        "min_gsg": 0.8, "min_coverage": 0.01, "max_coverage": 0.95, "drop_border": False,
        "drop_key_color": True, "dedup_distance": 4, "per_class_cap": None,
        "drop_no_board": True, "max_residual": 12.0, "min_confidence": 0.0,
    }  # fmt: skip
    assert sel.table.num_rows == 17  # 24 - failed - low_gsg 2 - empty - full - key colour - duplicate
    res = cli(["filter", "--name", "capped", "--per-class-cap", "2", "--dry-run"])
    assert res.code == 0 and "dry run" in res.out and [p.stem for p in list_selections(run.root)] == ["default"]
    res = cli(["filter", "--name", "capped", "--per-class-cap", "2"])
    assert res.code == 0 and "class_cap" in res.out
    counts = pq.read_table(run.root / "selections" / "capped.parquet").group_by("class_name").aggregate([("key", "count")])
    assert max(counts["key_count"].to_pylist()) == 2


def test_filter_cli_errors(cli, run, tmp_path: Path) -> None:
    res = cli(["filter", "--run", run.root, "--min-coverage", "0.6", "--max-coverage", "0.5"])
    assert res.code == 2 and "nothing could pass" in res.err and len(res.err.strip().splitlines()) == 1
    res = cli(["filter", "--run", run.root, "--name", "Bad Name"])
    assert res.code == 2 and "selection name" in res.err
    res = cli(["filter", "--run", tmp_path / "nope"])
    assert res.code == 2 and "not a run directory" in res.err


@pytest.mark.parametrize(
    ("text", "why"),
    [("[]", "an array where a JSON object is expected"), ('"run"', "a string where"), ("7", "a number where"),
     ('{"format": 1}', "no 'manifest'"), ("{not json", "not valid JSON")],
)
def test_filter_on_a_damaged_run_json_is_one_line(cli, run, text: str, why: str) -> None:
    (run.root / "run.json").write_text(text)
    res = cli(["filter", "--run", run.root])
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert f"{run.root / 'run.json'}: damaged run file" in res.err and why in res.err, res.err
    assert (run.root / "run.json").read_text() == text and not list_selections(run.root)


def test_a_selection_whose_metadata_is_not_an_object_is_damaged(run) -> None:
    from factory.selection import selection_path

    path = selection_path(run.root, "odd")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": ["a"]}).replace_schema_metadata({b"factory.selection": b"[1]"}), path)
    with pytest.raises(InputError, match="damaged selection"):
        load_selection(run.root, "odd")


def test_filter_verify_files_reports_corrupt_sample(cli, run) -> None:
    rec = [r for r in run.index().to_pylist() if r["index"] == 10][0]
    path = run.sample_path(rec["index"], rec["key"], ".png")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, broken CRC
    path.write_bytes(bytes(data))
    res = cli(["filter", "--run", run.root, "--verify-files"])
    assert res.code == 0, res.err
    assert f"warning: {rec['key']}: corrupt image ({rec['key']}.png: CRC mismatch" in res.err
    assert rec["key"] not in load_selection(run.root, "default").table["key"].to_pylist()
    assert any(line.split()[:2] == ["corrupt", "1"] for line in res.out.splitlines())


def test_selection_metadata_is_json(run) -> None:
    from factory.filter import run_filter

    summary = run_filter(run.root, name="x1", min_gsg=0.5)
    meta = json.loads(pq.read_schema(summary.path).metadata[b"factory.selection"])
    assert meta["name"] == "x1" and meta["kept"] == summary.kept and meta["fingerprint"] == run.info["fingerprint"]


def test_index_fast_path_equals_merging_reader(run, monkeypatch) -> None:
    """``RunStore.index(columns, dictionary)`` reads a folded index.parquet in one call; the rows
    are those of the merging reader, on a folded run and on a run with a newer journal chunk."""
    from factory.plan import table_rows
    from factory.store import RunStore
    from tests.fake_run import sample_result

    cols = ["index", "key", "class_name", "status", "gsg", "phash", "image_bytes"]
    want = pa.concat_tables(list(run._merged(cols)))
    with monkeypatch.context() as m:  # folded run: index.parquet is read directly
        m.setattr(RunStore, "_merged", lambda self, *a, **k: (_ for _ in ()).throw(AssertionError("slow path taken")))
        assert run.index(columns=cols).equals(want)
        fast = run.index(columns=cols, dictionary=("class_name", "status"))
    assert pa.types.is_dictionary(fast.schema.field("class_name").type)
    assert fast.cast(want.schema).equals(want)
    # a newer journal chunk (a run being written): the merging reader is used, and sees the change
    store = RunStore.open(run.root)
    row = table_rows(store.plan())[23]  # was failed
    store.save([sample_result(row, {"gsg": 0.99})])
    got = store.index(columns=cols)
    assert got.equals(pa.concat_tables(list(store._merged(cols)))) and got["status"][23].as_py() == "done"
    slow = store.index(columns=cols, dictionary=("class_name", "status"))  # encoded on this path too
    assert slow.schema == fast.schema and slow.cast(got.schema).equals(got)


def test_untrusted_mattes_and_no_board_are_dropped() -> None:
    """The matte-confidence columns: a residual above ``max_residual`` or a confidence below
    ``min_confidence`` is ``untrusted_matte``; ``no_board`` is dropped before it; an empty value
    (a run made before the columns existed) passes; ``max_residual`` 0 on the command line is off."""
    rows = [
        {"matte_residual": 3.0, "matte_confidence": 0.8, "no_board": False},  # 0 kept
        {"matte_residual": 20.0, "matte_confidence": 0.8, "no_board": False},  # 1 residual too high
        {"matte_residual": 3.0, "matte_confidence": 0.1, "no_board": False},  # 2 confidence too low
        {"matte_residual": 30.0, "matte_confidence": 0.0, "no_board": True},  # 3 no board comes first
        {"matte_residual": None, "matte_confidence": None, "no_board": None},  # 4 unknown: kept
    ]
    base = index_table([{} for _ in rows])
    extra = pa.table({
        "no_board": pa.array([r["no_board"] for r in rows], pa.bool_()),
        "matte_residual": pa.array([r["matte_residual"] for r in rows], pa.float32()),
        "matte_confidence": pa.array([r["matte_confidence"] for r in rows], pa.float32()),
    })  # fmt: skip
    table = base
    for name in extra.column_names:
        table = table.append_column(name, extra[name])
    params = FilterSettings(max_residual=12.0, min_confidence=0.5)
    assert reasons_of(table, params) == ["kept", "untrusted_matte", "untrusted_matte", "no_board", "kept"]
    assert reasons_of(table, FilterSettings(max_residual=None, min_confidence=0.0, drop_no_board=False)) == ["kept"] * 5
    assert reasons_of(base, params) == ["kept"] * 5  # an index without the columns: nothing to test
    assert filter_settings(FilterSettings(), max_residual=0).max_residual is None
    assert filter_settings(FilterSettings(), max_residual=5.5).max_residual == 5.5
    with pytest.raises(InputError, match="--max-residual"):
        filter_settings(FilterSettings(), max_residual=-1.0)


def test_the_help_names_every_drop_reason(cli) -> None:
    """The summary counts drops by these names; the help lists them all (``corrupt`` was missing)."""
    text = " ".join(cli(["filter", "--help"]).out.split())
    assert [reason for reason in REASONS if reason not in text] == []


def test_a_selection_cannot_be_named_all(cli, run) -> None:
    """Its export's default folder, RUN/export/all-FORMAT, is the one `export --all` writes: the one
    export silently replaced the other ("restarted: the folder held an export of another plan")."""
    res = cli(["filter", "--run", run.root, "--name", "all", "--min-gsg", "0"])
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "selection name 'all': reserved" in res.err, res.err
    assert not (run.root / "selections" / "all.parquet").exists()
    assert cli(["filter", "--run", run.root, "--name", "all-good", "--min-gsg", "0"]).code == 0


def test_a_selection_with_a_bit_flip_that_still_decodes_is_damaged(cli, run) -> None:
    """A flip in a selection's key column that Parquet decodes without error (into another key)
    is a damaged selection, not a selection of other samples."""
    assert cli(["filter", "--run", run.root, "--min-gsg", "0"]).code == 0
    path = list_selections(run.root)[0]
    data = path.read_bytes()
    keys = pq.read_table(path)["key"].to_pylist()
    meta = pq.ParquetFile(path).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "key")
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    for offset in range(start, start + col.total_compressed_size):
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        try:
            if pq.read_table(pa.BufferReader(bytes(flipped)))["key"].to_pylist() != keys:
                break
        except (OSError, pa.ArrowException):
            continue
    else:
        pytest.fail("no flip of the key column decodes")
    path.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="unreadable selection"):
        load_selection(run.root, path.stem)
