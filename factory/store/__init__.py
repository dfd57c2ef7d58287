"""The run store: a directory that records what exists, so nothing is lost, duplicated or redone.

Layout of a run directory::

    run.json               identity: manifest name and fingerprint, model identity, N, versions
    manifest.yaml          the manifest as run, with its prompt sources inlined
    plan.parquet           the plan (factory.plan), N rows
    samples/00000/KEY.png        image on green       (bucket = plan index // 1000)
                 KEY.alpha.png  alpha matte (8- or 16-bit, one channel)
                 KEY.fg.png     decontaminated foreground
                 KEY.json       metadata
    index.parquet          one row per sample (planned/done/failed), folded from the journal
    index/chunk-*.parquet  the journal: index rows committed since index.parquet was written
    selections/NAME.parquet   written by ``factory filter`` (factory.selection)
    .lock                  held by the one process writing the run

Rules (the "store's rules" other stages rely on):

- Every file is written to a temporary name in its final folder and renamed into place, so a file
  under a final name is always complete (:mod:`factory.fsutil`). Sample files are written before
  the index row that says they are done; the index row is the commit.
- The index is a journal of Parquet chunks, each written atomically; the latest row for a key wins.
  ``index.parquet`` is rewritten (atomically) from the journal every so often and at the end of a
  run, then the folded chunks are deleted. A reader ignores chunks already folded (their sequence
  number is in index.parquet's metadata), so a crash between the two steps is harmless. A killed
  process therefore never leaves the index unreadable.
- Resume: done samples whose files are all present are skipped; failed, planned and done-but-
  damaged samples are (re)done; temporary files and files of samples not done are deleted.
- One writer: a process holds ``.lock`` (an advisory ``flock``) while it writes.
- Memory does not grow with N: plan.parquet is written and read a row group at a time,
  index.parquet is kept sorted by plan index, and resume, fold and ``index()`` merge it with the
  journal and the plan a step of buckets (``STEP_ROWS``) at a time.

Modules: :mod:`~factory.store.layout` (names, schema), :mod:`~factory.store.tables` (Arrow helpers
of the index), :mod:`~factory.store.run` (:class:`RunStore`), :mod:`~factory.store.latest` (which
run a command defaults to).
"""

from factory.store.latest import LATEST_RUN_FILE, remember_latest_run, resolve_run
from factory.store.layout import (
    BUCKET_SIZE,
    INDEX_FILE,
    INDEX_SCHEMA,
    JOURNAL_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    RESULT_FIELDS,
    RESULT_NAMES,
    RUN_FILE,
    SAMPLES_DIR,
    SELECTIONS_DIR,
    STEP_ROWS,
    STORE_FORMAT,
)
from factory.store.run import ResumeState, RunStore

__all__ = [
    "BUCKET_SIZE",
    "INDEX_FILE",
    "INDEX_SCHEMA",
    "JOURNAL_DIR",
    "LATEST_RUN_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "PLAN_FILE",
    "RESULT_FIELDS",
    "RESULT_NAMES",
    "RUN_FILE",
    "SAMPLES_DIR",
    "SELECTIONS_DIR",
    "STEP_ROWS",
    "STORE_FORMAT",
    "ResumeState",
    "RunStore",
    "remember_latest_run",
    "resolve_run",
]
