"""`factory check` and the rebuilding of a damaged index (issue 15.3, 15.4); the index's costs
follow what is done, not the plan's size (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.generate import GenerateOptions, run_generate
from factory.manifest import ModelSpec, load_manifest
from factory.plan import table_rows
from factory.store import RunStore
from tests.conftest import SMALL_MANIFEST, write_manifest
from tests.fake_run import sample_result


def tiny_identity() -> str:
    from factory.sampler import model_identity

    return model_identity(ModelSpec(source="tiny"))


class FakeExecutor:
    """Generate's executor seam: the fake run's samples (real PNGs and JSON), no model."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def run(self, rows):
        for start in range(0, len(rows), 2):
            batch = rows[start : start + 2]
            self.rows.extend(r.index for r in batch)
            yield [sample_result(r) for r in batch]

    def close(self) -> None:
        pass


def make_tiny_run(folder: Path, n: int, done: int, fold: bool = True) -> tuple[RunStore, Path]:
    """A run the `generate --model tiny` command accepts, its first ``done`` samples done."""
    manifest = write_manifest(folder, SMALL_MANIFEST, "small.yaml")
    store = RunStore.prepare(folder / "run", load_manifest(manifest), n, tiny_identity())
    try:
        rows = table_rows(store.plan())[:done]
        for start in range(0, len(rows), 2):
            store.save([sample_result(r) for r in rows[start : start + 2]])
        if fold:
            store.fold()
    finally:
        store.release_lock()
    return store, manifest


def generate(manifest: Path, n: int, run: Path) -> tuple[object, FakeExecutor]:
    executor = FakeExecutor()
    opts = GenerateOptions(manifest=manifest, n=n, out=run, model="tiny", use_ray=False, progress=False)
    return run_generate(opts, executor_factory=lambda spec, o: executor), executor


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def test_check_finds_same_size_bit_flips_and_repair_then_generate_redoes_them(cli, tmp_path: Path) -> None:
    store, manifest = make_tiny_run(tmp_path, 6, 6)
    rows = table_rows(store.plan())
    alpha = store.sample_path(2, rows[2].key, ".alpha.png")
    meta = store.sample_path(4, rows[4].key, ".json")
    good_alpha, good_meta = alpha.read_bytes(), meta.read_bytes()
    flip_bit(alpha, len(good_alpha) // 2)  # inside the IDAT data: same size, CRC mismatch
    text = good_meta.decode()
    at = text.index('"image": ') + len('"image": ')
    meta.write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :])  # same size, wrong number
    assert alpha.stat().st_size == len(good_alpha) and meta.stat().st_size == len(good_meta)
    assert store.resume().done == 6  # sizes match: a resume does not see it

    res = cli(["check", "--run", store.root])
    assert res.code == 1, res.err
    lines = res.out.splitlines()
    assert any(line.startswith(f"{rows[2].key}: corrupt alpha") and "CRC" in line for line in lines)
    assert any(line.startswith(f"{rows[4].key}: corrupt metadata") for line in lines)
    assert "checked: 6 done samples, 2 damaged" in res.out

    res = cli(["check", "--run", store.root, "--repair"])
    assert res.code == 0 and "repaired: 2 samples marked planned" in res.out
    status = store.index(columns=["status"])["status"].to_pylist()
    assert status == ["done", "done", "planned", "done", "planned", "done"]

    summary, executor = generate(manifest, 6, store.root)
    assert sorted(executor.rows) == [2, 4] and summary.done == 2
    assert alpha.read_bytes() == good_alpha and meta.read_bytes() == good_meta
    assert cli(["check", "--run", store.root]).code == 0


def test_truncated_index_filter_export_say_so_and_generate_rebuilds(cli, tmp_path: Path) -> None:
    store, manifest = make_tiny_run(tmp_path, 8, 5)
    index_file = store.root / "index.parquet"
    data = index_file.read_bytes()
    index_file.write_bytes(data[: len(data) // 2])
    for args in (["filter", "--run", store.root], ["export", "--run", store.root, "--out", tmp_path / "ds"]):
        res = cli(args)
        assert res.code == 1 and res.err.count("\n") == 1, res.err
        assert "index.parquet: damaged index file" in res.err and "factory generate" in res.err and "internal error" not in res.err

    summary, executor = generate(manifest, 8, store.root)
    note = next(line for line in summary.lines() if line.startswith("index rebuilt"))
    assert "index.parquet (set aside as index.parquet.damaged)" in note and "5 done samples recovered" in note
    assert (store.root / "index.parquet.damaged").read_bytes() == data[: len(data) // 2]
    assert sorted(executor.rows) == [5, 6, 7]  # the 5 done before were not redone
    index = store.index()
    assert index["status"].to_pylist() == ["done"] * 8
    assert index["gsg"].to_pylist()[:5] == pytest.approx([0.9] * 5)
    assert cli(["check", "--run", store.root]).code == 0
    assert cli(["filter", "--run", store.root, "--min-gsg", "0"]).code == 0


def test_corrupt_journal_chunk_is_set_aside_and_the_run_finishes(cli, tmp_path: Path) -> None:
    store, manifest = make_tiny_run(tmp_path, 6, 4, fold=False)
    chunks = sorted((store.root / "index").glob("chunk-*.parquet"))
    assert len(chunks) == 2
    data = bytearray(chunks[0].read_bytes())
    data[8:400] = b"\xff" * 392  # the first columns' compressed pages
    chunks[0].write_bytes(bytes(data))
    with pytest.raises(Exception):
        pq.read_table(chunks[0])
    res = cli(["filter", "--run", store.root])
    assert res.code == 1 and "chunk-000000001.parquet: damaged index file" in res.err

    summary, executor = generate(manifest, 6, store.root)
    assert any("chunk-000000001.parquet (set aside as chunk-000000001.parquet.damaged)" in line for line in summary.lines())
    assert sorted(executor.rows) == [4, 5]
    assert store.index()["status"].to_pylist() == ["done"] * 6


def test_check_reports_a_damaged_index_and_repair_rebuilds_it(cli, tmp_path: Path) -> None:
    store, _ = make_tiny_run(tmp_path, 4, 4)
    index_file = store.root / "index.parquet"
    index_file.write_bytes(index_file.read_bytes()[:100])
    res = cli(["check", "--run", store.root])
    assert res.code == 1 and "index.parquet: damaged index file" in res.out
    res = cli(["check", "--run", store.root, "--repair"])
    assert res.code == 0 and "index rebuilt" in res.out and "checked: 4 done samples, 0 damaged" in res.out
    assert store.index()["status"].to_pylist() == ["done"] * 4


def test_an_unreadable_index_is_a_permission_problem_not_damage(cli, tmp_path: Path, monkeypatch) -> None:
    """Not readable by this user is not damaged: nothing is set aside or rebuilt, the line says why."""
    import factory.store.segments as segments

    store, _ = make_tiny_run(tmp_path, 4, 4)
    index_file = store.root / "index.parquet"
    before = index_file.read_bytes()
    real = segments.pq.read_schema

    def denied(path, *a, **kw):
        if Path(path) == index_file:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(segments.pq, "read_schema", denied)
    for command in (["filter", "--run", store.root], ["check", "--run", store.root, "--repair"]):
        res = cli(command)
        assert res.code == 2, (res.out, res.err)
        assert "cannot read this index file (permission denied)" in res.err + res.out and "damaged" not in res.err + res.out
    monkeypatch.undo()
    assert index_file.read_bytes() == before and not list(store.root.glob("*.damaged"))


@pytest.mark.parametrize(("errno_code", "reason"), [(13, "Permission denied"), (30, "Read-only file system")])
def test_repair_of_a_run_it_cannot_write_is_one_line(cli, tmp_path: Path, monkeypatch, errno_code: int, reason: str) -> None:
    """The lock is where a command first writes a run: a run this user cannot write (permissions,
    a read-only mount) is refused there, in one line, before anything is changed."""
    import builtins

    import factory.fsutil as fsutil

    store, _ = make_tiny_run(tmp_path, 4, 4)
    rows = table_rows(store.plan())
    alpha = store.sample_path(1, rows[1].key, ".alpha.png")
    flip_bit(alpha, len(alpha.read_bytes()) // 2)
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    lock = store.root / ".lock"

    def unwritable(path, *args, **kw):
        if Path(path) == lock:
            raise OSError(errno_code, reason, str(path))
        return builtins.open(path, *args, **kw)

    monkeypatch.setattr(fsutil, "open", unwritable, raising=False)
    res = cli(["check", "--run", store.root, "--repair"])
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert f"{store.root}: the run cannot be written, so it cannot be repaired" in res.err and reason in res.err, res.err
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before


def test_costs_follow_what_is_done_not_n(small_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """A run of N = 10 million: prepare, commits, folds and a resume never make or read a plan row
    beyond those used; the index holds the committed rows only."""
    import factory.plan as plan_mod

    store = RunStore.prepare(tmp_path / "run", load_manifest(small_manifest), 10_000_000, "fake:1", write_plan=False)
    made = []
    real_row = plan_mod.RowMaker.row
    monkeypatch.setattr(plan_mod.RowMaker, "row", lambda self, i: made.append(i) or real_row(self, i))
    store.fold_every = 2
    state = store.resume()
    assert state.done == 0 and len(state.pending) == 10_000_000 and made == []
    first = state.pending[:6]
    assert [r.index for r in first] == list(range(6)) and made == list(range(6))
    for start in (0, 2, 4):
        store.save([sample_result(r) for r in first[start : start + 2]])
    store.fold()
    assert pq.read_metadata(store.root / "index.parquet").num_rows == 6
    state = store.resume()
    assert state.done == 6 and state.pending.indices[:2].tolist() == [6, 7]
    assert made == list(range(6))
    assert not (store.root / "plan.parquet").exists()
    store.release_lock()


def test_segments_merge_like_a_binary_counter_and_survive_a_crash(small_manifest: Path, tmp_path: Path) -> None:
    from factory.store import segments

    store = RunStore.prepare(tmp_path / "run", load_manifest(small_manifest), 40, "fake:1")
    store.fold_every = 1
    rows = table_rows(store.plan())
    for r in rows[:8]:
        store.save([sample_result(r)])
    live = segments.live_files(segments.all_files(store.root))
    assert [f.rows() for f in live] == [8]  # 1+1 -> 2, 2+1+1 -> 4, ... -> 8
    store.save([sample_result(rows[8])])
    store.save([sample_result(rows[0], {"gsg": 0.5})])  # a newer row for sample 0 wins
    live = segments.live_files(segments.all_files(store.root))
    assert [f.rows() for f in live] == [8, 2]
    # a crash after writing a merged file, before deleting its inputs: the inputs are ignored
    stale = live[-1].path.read_bytes()
    store.save([sample_result(rows[9])])
    store.save([sample_result(rows[10])])
    (store.root / "index" / live[-1].path.name).write_bytes(stale)
    index = store.index()
    assert index["status"].to_pylist()[:11] == ["done"] * 11 and index["gsg"][0].as_py() == pytest.approx(0.5)
    store.fold()
    assert sorted(p.name for p in (store.root / "index").iterdir()) == []
    assert store.index().drop_columns(["updated_at"]).equals(index.drop_columns(["updated_at"]))
    store.release_lock()


def test_plan_command_streams_with_the_same_rows(cli, small_manifest: Path, tmp_path: Path) -> None:
    from factory.plan import build_plan, write_plan_file

    out = tmp_path / "p.parquet"
    summary = write_plan_file(load_manifest(small_manifest), 20000, out)
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # 8192-row groups: never whole in memory
    assert pq.read_table(out).equals(build_plan(load_manifest(small_manifest), 20000))
    assert summary.lines() == ["rows: 20000", "classes: 4 of 4", "per class: min 5000, max 5000"]
    res = cli(["plan", "--manifest", small_manifest, "--n", 10])
    assert res.code == 0 and "per class: min 2, max 3" in res.out
    assert json.loads(json.dumps(summary.lines()))  # plain strings


def test_check_bar_on_a_terminal_only_and_never_with_quiet(cli, tmp_path: Path, monkeypatch) -> None:
    """Off a terminal (a log file, a pipe) and with -q, check prints its findings and no bar; with
    -q the damaged samples are still printed (exit 1 alone would not say which)."""
    import io

    from rich.console import Console

    import factory.feedback as feedback

    store, _ = make_tiny_run(tmp_path, 4, 4)
    res = cli(["check", "--run", store.root])
    assert res.code == 0 and res.err == "" and "checked: 4 done samples, 0 damaged" in res.out
    for flags, bar in (([], True), (["-q"], False)):
        screen = io.StringIO()
        monkeypatch.setattr(feedback, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=120))
        res = cli([*flags, "check", "--run", store.root])
        assert res.code == 0 and res.err == ""
        assert ("4/4" in screen.getvalue()) is bar, screen.getvalue()
    rows = table_rows(store.plan())
    (store.sample_path(1, rows[1].key, ".png")).write_bytes(b"")
    res = cli(["-q", "check", "--run", store.root])
    assert res.code == 1 and res.err == ""
    assert res.out.splitlines() == [f"{rows[1].key}: corrupt image ({rows[1].key}.png: 0 bytes, the index says "
                                    f"{store.index()['image_bytes'][1]})"]


def test_a_row_rebuilt_from_json_has_every_score_of_the_committed_row(tmp_path: Path) -> None:
    """A damaged index is rebuilt from the samples' JSON: each rebuilt row must carry what `filter`
    reads, the matte's trust measures included (without them a sample with no board or an untrusted
    matte passed every filter once its index had been rebuilt). Only what the JSON never records
    (timings, the worker, the prompt's token count) may differ."""
    from factory.finish import CONFIDENCE_FIELDS, FinishSettings, metadata
    from factory.sample import SAMPLE_SUFFIXES, SIZE_COLUMNS
    from factory.store.recover import row_from_metadata
    from factory.store.tables import index_row

    store, _ = make_tiny_run(tmp_path, 1, 0)
    row = table_rows(store.plan())[0]
    trust = dict(zip(CONFIDENCE_FIELDS, (True, 0.25, 20.5, 0.125, 0.5, 0.0625)))
    res = sample_result(row, trust)
    files = dict(res.files)
    sizes = {suffix: len(files[suffix]) for suffix in (".png", ".alpha.png", ".fg.png")}
    meta = json.loads(json.dumps(metadata(row, res.fields, sizes, FinishSettings(model="fake:1", canvas_color=(0, 255, 0)))))
    files[".json"] = json.dumps(meta).encode()
    file_sizes = {suffix: len(files[suffix]) for suffix in SAMPLE_SUFFIXES}
    committed = index_row(res, {**res.fields, **{SIZE_COLUMNS[s]: n for s, n in file_sizes.items()}})
    rebuilt = row_from_metadata(meta, store.plan_reader().take([0]).to_pylist()[0], file_sizes)

    assert rebuilt is not None
    not_in_json = {"t_sample_s", "t_post_s", "worker", "updated_at", "prompt_tokens"}
    differ = {name: (committed[name], rebuilt.get(name)) for name in committed if name not in not_in_json and committed[name] != rebuilt.get(name)}
    assert differ == {}
    assert rebuilt["no_board"] is True and rebuilt["matte_residual"] == 20.5 and rebuilt["matte_confidence"] == 0.0625


def _column_chunk(path: Path, name: str) -> range:
    """The byte range of column ``name``'s pages in the (one row group) Parquet file at ``path``."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == name)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    return range(start, start + col.total_compressed_size)


def _silent_flips(path: Path, where: range, changed) -> list[int]:
    """Offsets in ``where`` whose bit flip Parquet reads without an error (its page checksums not
    verified, as a reader that does not ask) into a table for which ``changed(table)`` holds."""
    data = path.read_bytes()
    found = []
    for offset in where:
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        try:
            table = pq.read_table(pa.BufferReader(bytes(flipped)))
        except (OSError, pa.ArrowException):
            continue
        if changed(table):
            found.append(offset)
    return found


def test_a_bit_flip_that_still_decodes_is_damage_not_other_scores(cli, tmp_path: Path) -> None:
    """A flip in a data page that zstd and Parquet still decode (into other gsg values) or in the
    footer's schema (a renamed column, read as one this file lacks) is a damaged index for every
    reader, and --repair gives the samples their scores back from their JSON files."""
    store, _ = make_tiny_run(tmp_path, 4, 4)
    index_file = store.root / "index.parquet"
    original = index_file.read_bytes()
    gsg = store.index()["gsg"].to_pylist()
    in_data = _silent_flips(index_file, _column_chunk(index_file, "gsg"), lambda t: t["gsg"].to_pylist() != gsg)
    footer = range(len(original) - 8 - int.from_bytes(original[-8:-4], "little"), len(original) - 8)
    in_footer = _silent_flips(index_file, footer, lambda t: "gsg" not in t.column_names)
    assert in_data and in_footer  # such flips exist: the reader has to catch them
    for offset in (in_data[0], in_footer[0]):
        flipped = bytearray(original)
        flipped[offset] ^= 0x01
        index_file.write_bytes(bytes(flipped))
        res = cli(["check", "--run", store.root])
        assert res.code == 1 and "index.parquet: damaged index file" in res.out, (offset, res.out)
        res = cli(["filter", "--run", store.root, "--min-gsg", "0"])
        assert res.code == 1 and "index.parquet: damaged index file" in res.err and "Traceback" not in res.err
        res = cli(["check", "--run", store.root, "--repair"])
        assert res.code == 0 and "index rebuilt" in res.out, res.out
        assert store.index()["gsg"].to_pylist() == pytest.approx(gsg)
        for aside in store.root.glob("index.parquet.damaged*"):
            aside.unlink()


def test_a_plan_file_that_decodes_into_other_seeds_is_set_aside_and_written_again(tmp_path: Path) -> None:
    """plan.parquet is a cache of rows made from the manifest: a bit flip that Parquet still
    decodes (into another seed) must not have a sample redone from it. generate makes the damaged
    rows from the manifest, sets the file aside and writes the plan again, the same bytes."""
    store, manifest = make_tiny_run(tmp_path, 6, 4)
    plan_file = store.root / "plan.parquet"
    original = plan_file.read_bytes()
    seeds = pq.read_table(plan_file)["seed"].to_pylist()
    flips = _silent_flips(plan_file, _column_chunk(plan_file, "seed"), lambda t: t["seed"].to_pylist()[4:] != seeds[4:])
    assert flips
    flipped = bytearray(original)
    flipped[flips[0]] ^= 0x01
    plan_file.write_bytes(bytes(flipped))

    summary, executor = generate(manifest, 6, store.root)
    assert sorted(executor.rows) == [4, 5]
    assert store.index()["seed"].to_pylist() == seeds  # the redone samples were drawn from the manifest's seeds
    assert any(line.startswith("plan written again from the manifest: damaged plan.parquet (set aside as plan.parquet.damaged)") for line in summary.lines())
    assert (store.root / "plan.parquet.damaged").read_bytes() == bytes(flipped)
    assert plan_file.read_bytes() == original


def test_a_rebuild_stopped_half_way_is_finished_by_the_next_run_and_nothing_is_redone(cli, tmp_path: Path, monkeypatch) -> None:
    """A Ctrl-C (or kill) while the index is rebuilt from the samples' JSON files, after the
    damaged file was set aside: the next generate finishes the rebuild instead of taking the
    samples that only the damaged file held for uncommitted ones (deleted and drawn again)."""
    import factory.store.recover as recover

    store, manifest = make_tiny_run(tmp_path, 6, 6)
    before = {p.name: p.read_bytes() for p in (store.root / "samples").rglob("*") if p.is_file()}
    index_file = store.root / "index.parquet"
    index_file.write_bytes(index_file.read_bytes()[:100])

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(recover, "recover_rows", stopped)
        with pytest.raises(KeyboardInterrupt):
            generate(manifest, 6, store.root)
    assert (store.root / "index.parquet.damaged").exists()
    res = cli(["check", "--run", store.root])
    assert res.code == 1 and "a rebuild of the index was stopped half way" in res.out, res.out

    summary, executor = generate(manifest, 6, store.root)
    assert executor.rows == []
    assert any(line.startswith("index rebuilt:") and "6 done samples recovered" in line for line in summary.lines()), summary.lines()
    assert {p.name: p.read_bytes() for p in (store.root / "samples").rglob("*") if p.is_file()} == before
    assert store.index()["status"].to_pylist() == ["done"] * 6


def test_reading_a_plan_that_decodes_into_other_seeds_is_an_error_not_other_rows(tmp_path: Path) -> None:
    """`read_plan` (a plan written by `factory plan`) and `RunStore.plan()` verify the pages'
    checksums: the bit flip of the test above is refused in one line, never read as other seeds."""
    from factory.errors import InputError
    from factory.plan import read_plan

    store, _ = make_tiny_run(tmp_path, 6, 4)
    plan_file = store.root / "plan.parquet"
    seeds = pq.read_table(plan_file)["seed"].to_pylist()
    flips = _silent_flips(plan_file, _column_chunk(plan_file, "seed"), lambda t: t["seed"].to_pylist() != seeds)
    assert flips
    flipped = bytearray(plan_file.read_bytes())
    flipped[flips[0]] ^= 0x01
    plan_file.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="not a readable plan"):
        read_plan(plan_file)
    with pytest.raises(OSError):
        store.plan()
