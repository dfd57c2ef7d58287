"""Counts in the commands' output read right for one of a thing ("1 sample", not "1 samples"):
the filter and export commands on a one-sample run, and the summary lines of the other commands
built with counts of one (no model, no torch)."""

from __future__ import annotations

import re
from pathlib import Path

from factory.feedback import plural
from tests.fake_run import make_run

#: "1 samples", "1 files", ...: a count of one before a plural noun (the nouns the commands count).
ONE_PLURAL = re.compile(
    r"(?<![\d.])1 (samples|files|steps|images|objects|parts|pairings|composites|scenes|processes|CPUs|GPUs|unreadable (?:\w+ )?files|"
    r"workers|batches|shards|prompts|restarts)\b"
)


def _no_one_plural(text: str) -> None:
    assert not ONE_PLURAL.search(text), ONE_PLURAL.search(text).group(0) + " in:\n" + text


def test_plural_of_int_float_and_irregular_counts() -> None:
    assert [plural(n, "sample") for n in (0, 1, 2)] == ["0 samples", "1 sample", "2 samples"]
    assert plural(1.0, "GPU") == "1 GPU" and plural(0.5, "GPU") == "0.5 GPUs" and plural(2.0, "CPU") == "2 CPUs"
    assert plural(1, "process", "processes") == "1 process" and plural(3, "process", "processes") == "3 processes"


def test_filter_and_export_of_a_one_sample_run(cli, tmp_path: Path) -> None:
    run = make_run(tmp_path, 1)
    res = cli(["filter", "--run", run.root])
    assert res.code == 0, res.err
    assert f"run {run.root}: 1 sample, 1 done" in res.out and "(1 sample) written to" in res.out
    _no_one_plural(res.out + res.err)

    res = cli(["export", "--run", run.root, "--out", tmp_path / "e", "--split", "none"])
    assert res.code == 0, res.err
    assert re.search(r"train +1 sample +1 shard ", res.out) and "exported 1 sample (" in res.out, res.out
    _no_one_plural(res.out + res.err)


def test_summary_lines_with_counts_of_one(tmp_path: Path) -> None:
    from factory.caption import CaptionSummary
    from factory.composite.run import CompositeSummary
    from factory.export.run import ExportSummary
    from factory.filter import describe
    from factory.manifest import FilterSettings
    from factory.toy.dataset import ToySetSummary

    caption = CaptionSummary(tmp_path / "c.jsonl", 1, 0, 1, 1, 1.0, "m", "in process").lines()
    assert "captioned 1 of 1 sample (0 done before)" in caption[0] and "1 caption is empty" in caption[2]
    toy = ToySetSummary(tmp_path, 1, 0).lines()
    assert toy[0].startswith("toy world: 1 sample written")
    comp = CompositeSummary(tmp_path, "baked", 1, 1, {"matte": 1}, "o", "b", skipped_backgrounds=1, resumed_parts=1).lines()
    assert "skipped 1 unreadable background file" in comp and "resumed: 1 part already written was kept" in comp
    assert any(line.startswith("wrote 1 composite (baked;") for line in comp)
    export = ExportSummary(tmp_path, "folder", "s", {}, {"train": {"samples": 1, "bytes": 10}}, resumed_samples=1).lines()
    assert "resumed: 1 sample already written was kept" in export
    assert "near-duplicate distance 1 bit;" in describe(FilterSettings(dedup_distance=1))
    from factory.check import CheckSummary

    check = CheckSummary(tmp_path, checked=1, damaged=[("k", "corrupt alpha")], repaired=1, repair=True).lines()
    assert "checked: 1 done sample, 1 damaged" in check and any(line.startswith("repaired: 1 sample marked planned;") for line in check)
    for text in (caption, toy, comp, export, check):
        _no_one_plural("\n".join(text))


def test_ray_notes_with_counts_of_one_and_small_byte_counts() -> None:
    from factory.distribute.executor import ExecutorStats, RayExecutor
    from factory.distribute.sizing import plan_workers

    plan = plan_workers({"CPU": 1.0}, None, None)
    assert "(1 CPU, 0 GPUs)" in plan.describe()
    executor = object.__new__(RayExecutor)  # its summary only: no Ray started
    executor.notes, executor.plan = [], plan
    executor.stats = ExecutorStats(
        restarts=1, resubmitted=1, sampler_busy_s=5.0, first_ready_at=0.0, ended_at=10.0, bytes_received=30_000, samples_received=10
    )
    notes = executor.summary_notes()
    assert "faults: 1 sampler worker restart, 1 batch re-submitted, 0 batches given up" in notes
    assert "driver received 30.0 kB of encoded samples (3.0 kB/s, 3.0 kB per sample)" in notes, notes
    _no_one_plural("\n".join(notes))
