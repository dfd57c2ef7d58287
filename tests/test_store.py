"""The run store: atomic writes, journal and fold, resume rules, refusal of another manifest/model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.errors import InputError
from factory.manifest import load_manifest
from factory.plan import table_rows
from factory.sample import SampleResult
from factory.store import INDEX_FILE, RunStore, remember_latest_run, resolve_run
from tests.conftest import SMALL_MANIFEST, write_manifest

REPO = Path(__file__).resolve().parent.parent


def fake_result(row, status: str = "done", payload: bytes = b"x") -> SampleResult:
    """A test double for the sampler + finish stages: tiny fake files, made-up scores."""
    plan = {**row.__dict__, "attributes": json.dumps(row.attributes, sort_keys=True)}
    if status != "done":
        return SampleResult(plan=plan, status=status, error="boom: NaN output", fields={"model": "fake"})
    files = {
        ".png": b"PNG" + payload + row.key.encode(),
        ".alpha.png": b"ALPHA" + payload,
        ".fg.png": b"FG" + payload,
        ".json": json.dumps({"key": row.key}).encode(),
    }
    return SampleResult(plan=plan, status="done", files=files, fields={"model": "fake", "gsg": 0.9, "width": 8, "height": 8})


@pytest.fixture
def store(small_manifest: Path, tmp_path: Path):
    s = RunStore.prepare(tmp_path / "run", load_manifest(small_manifest), 10, "fake:1")
    yield s
    s.release_lock()


def test_prepare_layout(store: RunStore) -> None:
    root = store.root
    assert (root / "run.json").is_file() and (root / "manifest.yaml").is_file()
    assert store.plan().num_rows == 10
    info = json.loads((root / "run.json").read_text())
    assert info["manifest"] == "small" and info["model"] == "fake:1" and info["n"] == 10
    # the manifest as run is self-contained and loads back
    assert store.manifest().fingerprint() == info["fingerprint"]
    index = store.index()
    assert index.num_rows == 10 and set(index["status"].to_pylist()) == {"planned"}


def test_save_index_and_resume(store: RunStore) -> None:
    rows = table_rows(store.plan())
    store.save([fake_result(r) for r in rows[:4]])
    store.save([fake_result(rows[4], "failed")])
    index = store.index()
    statuses = dict(zip(index["key"].to_pylist(), index["status"].to_pylist()))
    assert [statuses[r.key] for r in rows[:6]] == ["done"] * 4 + ["failed", "planned"]
    row4 = [r for r in index.to_pylist() if r["key"] == rows[4].key][0]
    assert row4["error"] == "boom: NaN output"
    done_row = [r for r in index.to_pylist() if r["key"] == rows[0].key][0]
    assert done_row["image_bytes"] == len(fake_result(rows[0]).files[".png"]) and done_row["gsg"] == pytest.approx(0.9)
    state = store.resume()
    assert state.done == 4 and state.failed_before == 1
    assert [r.key for r in state.pending] == [r.key for r in rows[4:]]
    # files are where the store says, complete
    assert store.sample_path(rows[0].index, rows[0].key, ".png").read_bytes().startswith(b"PNG")


def test_retry_of_failed_sample_wins(store: RunStore) -> None:
    row = table_rows(store.plan())[0]
    store.save([fake_result(row, "failed")])
    store.save([fake_result(row)])
    assert store.index()["status"][0].as_py() == "done"
    store.fold()
    assert store.index()["status"][0].as_py() == "done"


def test_fold_rewrites_index_and_drops_chunks(store: RunStore) -> None:
    rows = table_rows(store.plan())
    for r in rows[:5]:
        store.save([fake_result(r)])
    before = store.index()
    assert len(list((store.root / "index").glob("chunk-*.parquet"))) == 5
    store.fold()
    assert list((store.root / "index").glob("chunk-*.parquet")) == []
    folded = pq.read_table(store.root / INDEX_FILE)
    assert folded.num_rows == 5 and folded.schema.metadata[b"covers"] == b"5"  # committed rows only
    assert store.index().drop_columns(["updated_at"]).equals(before.drop_columns(["updated_at"]))
    store.save([fake_result(rows[5])])  # journal numbering continues after the fold
    assert sorted(p.name for p in (store.root / "index").glob("chunk-*"))[0] == "chunk-000000006.parquet"
    assert store.resume().done == 6


def test_stale_chunks_after_crash_between_fold_steps_are_ignored(store: RunStore) -> None:
    rows = table_rows(store.plan())
    store.save([fake_result(rows[0], "failed")])
    chunk = next((store.root / "index").glob("chunk-*.parquet"))
    saved = chunk.read_bytes()
    store.save([fake_result(rows[0])])
    store.fold()
    chunk.write_bytes(saved)  # as if the process died before deleting the folded chunk
    assert store.index()["status"][0].as_py() == "done"


def test_damaged_and_orphan_files(store: RunStore) -> None:
    rows = table_rows(store.plan())
    store.save([fake_result(r) for r in rows[:3]])
    store.sample_path(rows[1].index, rows[1].key, ".alpha.png").unlink()  # damaged: file gone
    store.sample_path(rows[2].index, rows[2].key, ".fg.png").write_bytes(b"truncated")  # wrong size
    folder = store.sample_dir(rows[5].index)
    (folder / f"{rows[5].key}.png").write_bytes(b"orphan")  # written, never committed
    (folder / f".tmp-{rows[6].key}.png.123.abc").write_bytes(b"partial")
    state = store.resume()
    assert state.damaged == 2 and state.done == 1
    assert [r.key for r in state.pending][:2] == [rows[1].key, rows[2].key]
    names = set(os.listdir(folder))
    assert not any(n.startswith(".tmp-") for n in names)
    assert not any(n.startswith((rows[1].key, rows[2].key, rows[5].key)) for n in names)
    assert {f"{rows[0].key}{s}" for s in (".png", ".alpha.png", ".fg.png", ".json")} <= names


def test_refuses_other_manifest_and_model(store: RunStore, tmp_path: Path) -> None:
    store.save([fake_result(table_rows(store.plan())[0])])  # a run with a sample (one without takes a new model)
    store.release_lock()
    other = load_manifest(write_manifest(tmp_path, SMALL_MANIFEST.replace("seed: 7", "seed: 9"), "o.yaml"))
    same = store.manifest()
    before = sorted(p.name for p in store.root.iterdir())
    with pytest.raises(InputError, match="made by a different manifest.*--restart"):
        RunStore.prepare(store.root, other, 10, "fake:1")
    with pytest.raises(InputError, match="made with a different model"):
        RunStore.prepare(store.root, same, 10, "fake:2")
    assert sorted(p.name for p in store.root.iterdir()) == before
    s2 = RunStore.prepare(store.root, other, 10, "fake:2", restart=True)
    s2.release_lock()
    assert json.loads((store.root / "run.json").read_text())["model"] == "fake:2"


def test_refuses_non_run_directory(small_manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a run directory"):
        RunStore.prepare(tmp_path / "stuff", load_manifest(small_manifest), 4, "fake:1")
    assert (tmp_path / "stuff" / "precious.txt").read_text() == "keep me"


def test_extend_and_shrink_n(store: RunStore) -> None:
    rows = table_rows(store.plan())
    store.save([fake_result(r) for r in rows])
    store.release_lock()
    manifest = store.manifest()
    bigger = RunStore.prepare(store.root, manifest, 15, "fake:1")
    state = bigger.resume()
    assert state.done == 10 and len(state.pending) == 5
    assert [r.key for r in state.pending] == bigger.plan()["key"].to_pylist()[10:]
    bigger.release_lock()
    smaller = RunStore.prepare(store.root, manifest, 4, "fake:1")
    assert smaller.index().num_rows == 4 and len(smaller.resume().pending) == 0
    # samples beyond N are kept, not deleted: growing again finds them done
    smaller.release_lock()
    again = RunStore.prepare(store.root, manifest, 10, "fake:1")
    assert again.resume().done == 10
    again.release_lock()


def test_streaming_passes_match_a_whole_table_reference(small_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """resume/fold/index go a step of buckets at a time: with 2-sample buckets and 4-index steps,
    a history of commits, retries, folds and N changes gives what the whole journal says."""
    import factory.store.layout as store_mod

    monkeypatch.setattr(store_mod, "BUCKET_SIZE", 2)
    monkeypatch.setattr(store_mod, "STEP_ROWS", 4)
    manifest = load_manifest(small_manifest)
    s = RunStore.prepare(tmp_path / "run", manifest, 15, "fake:1")
    s.fold_every = 3
    rows = table_rows(s.plan())
    rng = random.Random(5)
    latest: dict[int, str] = {}
    for _ in range(12):  # commits in random order: retries of failed samples, some done twice
        batch = rng.sample(rows, 3)
        results = [fake_result(r, rng.choice(["done", "done", "failed"])) for r in batch]
        s.save(results)
        latest.update({r.index: r.status for r in results})
    index = s.index()
    assert index["index"].to_pylist() == list(range(15))
    assert index["status"].to_pylist() == [latest.get(i, "planned") for i in range(15)]
    assert s.index(columns=["key", "gsg"]).equals(index.select(["key", "gsg"]))
    assert s.records()["index"].to_pylist() == sorted(latest)
    s.fold()
    assert pq.ParquetFile(s.root / INDEX_FILE).metadata.num_row_groups == len({i // 4 for i in latest})  # a step at a time
    assert s.index().drop_columns(["updated_at"]).equals(index.drop_columns(["updated_at"]))
    done = sorted(i for i, st in latest.items() if st == "done")
    state = s.resume()
    assert state.done == len(done) and [r.index for r in state.pending] == [i for i in range(15) if i not in done]
    # a damaged done sample, and an orphan file in a bucket that has no index row at all
    victim = rows[done[-1]]
    s.sample_path(victim.index, victim.key, ".json").write_bytes(b"{}")
    orphan = s.root / "samples" / "00050" / "small-00000100-x.png"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"orphan")
    state = s.resume(verify="all")
    assert state.damaged == 1 and victim.index in [r.index for r in state.pending] and not orphan.exists()
    assert not s.sample_path(victim.index, victim.key, ".png").exists()
    s.release_lock()
    # lower N: rows beyond it leave the index (but stay on disk), committed ones stay as records
    small = RunStore.prepare(s.root, manifest, 7, "fake:1")
    assert small.index()["index"].to_pylist() == list(range(7))
    beyond = [i for i in done[:-1] if i >= 7]
    kept = [r["index"] for r in small.index(only_plan=False).to_pylist() if r["index"] >= 7]
    assert kept == sorted(i for i in latest if i >= 7)  # the damaged one too: its row says done
    small.resume()
    assert all(small.sample_path(i, rows[i].key, ".png").exists() for i in beyond)
    small.fold()
    assert small.index(only_plan=False).num_rows == 7 + len(kept)
    assert small.index(only_plan=False)["index"].to_pylist() == list(range(7)) + kept
    small.release_lock()


def test_plan_is_written_in_row_groups_and_kept_on_reopen(small_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    import factory.store.run as store_mod
    from factory.plan import build_plan

    monkeypatch.setattr(store_mod, "PLAN_ROW_GROUP", 4)
    manifest = load_manifest(small_manifest)
    s = RunStore.prepare(tmp_path / "run", manifest, 10, "fake:1")
    s.release_lock()
    plan_file = s.root / "plan.parquet"
    assert pq.ParquetFile(plan_file).metadata.num_row_groups == 3
    assert s.plan().equals(build_plan(manifest, 10))
    before = plan_file.stat().st_ino
    RunStore.prepare(s.root, manifest, 10, "fake:1").release_lock()  # same N: the plan is not rebuilt
    assert plan_file.stat().st_ino == before
    RunStore.prepare(s.root, manifest, 12, "fake:1").release_lock()  # N grows: an extension, the plan kept
    assert plan_file.stat().st_ino == before
    assert RunStore.open(s.root).plan().equals(build_plan(manifest, 12))


def test_extending_n_writes_only_the_new_rows(small_manifest: Path, tmp_path: Path) -> None:
    """The same run extended from N to 2N (generate's path: the plan written in the background)
    writes one file of the N new rows, leaves plan.parquet as it was, and reads like a fresh run
    of 2N: plan, index, resume and filter; N lowered back drops the extension, not the plan."""
    from factory.filter import run_filter
    from factory.plan import build_plan
    from factory.selection import load_selection

    manifest, n = load_manifest(small_manifest), 6
    ext = RunStore.prepare(tmp_path / "ext", manifest, n, "fake:1")
    fresh = RunStore.prepare(tmp_path / "fresh", manifest, 2 * n, "fake:1")
    rows = table_rows(fresh.plan())
    def result(row, status="done"):
        res = fake_result(row, status)
        res.fields.update(alpha_coverage=0.3, touches_border=False, contains_key_color=False, phash=(row.index + 1) * 0x0F0F0F0F0F0F0F)
        return res

    first = [result(r, "failed" if r.index == 1 else "done") for r in rows[:n]]
    ext.save(first)
    ext.release_lock()
    plan_file = ext.root / "plan.parquet"
    stat, data = plan_file.stat(), plan_file.read_bytes()
    names = {p.name for p in ext.root.iterdir()}
    (ext.root / f".tmp-plan-from-{n:012d}.parquet.1.x").write_bytes(b"PAR1 half an extension")  # a killed one

    ext = RunStore.prepare(ext.root, manifest, 2 * n, "fake:1", write_plan=False)
    state = ext.resume()
    ext.start_plan_writer()
    ext.finish_plan_writer(wait=True)
    new = sorted({p.name for p in ext.root.iterdir()} - names)
    assert new == [f"plan-from-{n:012d}.parquet"]
    assert pq.read_metadata(ext.root / new[0]).num_rows == n  # the new rows only
    after = plan_file.stat()
    assert (after.st_ino, after.st_mtime_ns, plan_file.read_bytes()) == (stat.st_ino, stat.st_mtime_ns, data)
    assert ext.plan().equals(build_plan(manifest, 2 * n)) and ext.plan_reader().take(range(2 * n)).equals(ext.plan())
    assert [r.index for r in state.pending] == [1, *range(n, 2 * n)] and ext.resume().pending.table().equals(state.pending.table())
    later = [result(r) for r in rows[n : n + 3]]
    ext.save(later)
    fresh.save(first)
    fresh.save(later)
    for s in (ext, fresh):
        s.fold()
        s.release_lock()
    drop = ["updated_at"]
    assert ext.index().drop_columns(drop).equals(fresh.index().drop_columns(drop))
    kept = [run_filter(s.root, name="x", min_gsg=0.5) for s in (ext, fresh)]
    assert kept[0].kept == kept[1].kept > 0
    tables = [load_selection(s.root, "x").table for s in (ext, fresh)]
    assert tables[0].num_rows == kept[0].kept and tables[0].equals(tables[1])

    RunStore.prepare(ext.root, manifest, n, "fake:1").release_lock()  # lowered back to N
    assert not (ext.root / new[0]).exists() and plan_file.stat().st_ino == stat.st_ino
    assert RunStore.open(ext.root).plan().equals(build_plan(manifest, n))


def test_one_writer(store: RunStore) -> None:
    other = RunStore(store.root)
    with pytest.raises(InputError, match="another factory process"):
        other.acquire_lock()


def test_latest_run_pointer(store: RunStore, tmp_path: Path) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    with pytest.raises(InputError, match="no run found"):
        resolve_run(None, cwd=cwd)
    remember_latest_run(store.root, cwd=cwd)
    assert resolve_run(None, cwd=cwd) == store.root.resolve()
    with pytest.raises(InputError, match="not a run directory"):
        resolve_run(tmp_path, cwd=cwd)


WRITER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from factory.manifest import load_manifest
from factory.plan import table_rows
from factory.store import RunStore
from tests.test_store import fake_result
store = RunStore.prepare(sys.argv[1], load_manifest(sys.argv[2]), 60, "fake:1")
store.fold_every = 3
state = store.resume()
rows = list(state.pending)
print("started", flush=True)
for i in range(0, len(rows), 2):
    store.save([fake_result(r, payload=b"y" * 2000) for r in rows[i:i+2]])
store.fold()
print("finished", flush=True)
"""


def test_sigkill_at_random_moments_then_resume(small_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    rng = random.Random(1234)
    finished = False
    for attempt in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(run), str(small_manifest), str(REPO)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() == "started" and attempt < 11:
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        finished = finished or "finished" in out
        # whatever the moment of death, the index is readable
        RunStore.open(run).index()
    assert finished
    store = RunStore.open(run)
    index = store.index()
    assert index.num_rows == 60 and set(index["status"].to_pylist()) == {"done"}
    assert len(set(index["key"].to_pylist())) == 60
    files = [p for p in (run / "samples").rglob("*") if p.is_file()]
    assert len(files) == 60 * 4  # no orphans, no temporaries
    for rec in index.to_pylist():
        assert store.sample_path(rec["index"], rec["key"], ".png").stat().st_size == rec["image_bytes"]


# ------------------------------------------------------------------------------ via the CLI


def test_generate_refuses_a_run_of_another_manifest_and_changes_nothing(cli, small_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    s = RunStore.prepare(run, load_manifest(small_manifest), 4, "tiny:v1:seed=0")
    s.release_lock()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = write_manifest(tmp_path, SMALL_MANIFEST.replace("seed: 7", "seed: 99"), "other.yaml")
    res = cli(["generate", "--manifest", other, "--n", 4, "--model", "tiny", "--out", run, "--no-ray"])
    assert res.code == 2 and res.err.count("\n") == 1 and "Traceback" not in res.err
    assert "made by a different manifest" in res.err and "--restart" in res.err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_generate_unwritable_output(cli, small_manifest: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli(["generate", "--manifest", small_manifest, "--n", 2, "--model", "tiny", "--out", blocker / "run", "--no-ray"])
    assert res.code == 2 and res.err.count("\n") == 1 and "Traceback" not in res.err
    assert blocker.read_text() == "x"
