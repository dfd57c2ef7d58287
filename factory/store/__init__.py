"""The run store: a directory that records what exists, so nothing is lost, duplicated or redone.

Layout of a run directory (store format 1; runs written before the index held committed rows
only read the same)::

    run.json               identity: manifest name and fingerprint, model identity, N, versions
    manifest.yaml          the manifest as run, with its prompt sources inlined
    plan.parquet           the plan (factory.plan), N rows: a cache, written beside the run
    plan-from-LO.parquet   the plan's rows from LO when N grew (only the new rows are written;
                           readers take the files in order: :mod:`~factory.store.planfiles`)
    samples/00000/KEY.png        image on green       (bucket = plan index // 1000)
                 KEY.alpha.png  alpha matte (8- or 16-bit, one channel)
                 KEY.fg.png     decontaminated foreground
                 KEY.json       metadata (the plan row, scores, file sizes: enough to rebuild its row)
    index.parquet          committed index rows (done, failed), sorted by plan index
    index/seg-LO-HI.parquet   committed rows of journal chunks LO..HI, sorted by plan index
    index/chunk-SEQ.parquet   the journal: one chunk per commit since the last fold
    index/rebuild-pending     only while a damaged index is rebuilt (finished by the next run)
    selections/NAME.parquet   written by ``factory filter`` (factory.selection)
    .lock                  held by the one process writing the run

Rules (the "store's rules" other stages rely on):

- Every file is written to a temporary name in its final folder, fsynced and renamed into place,
  so a file under a final name is always complete (:mod:`factory.fsutil`). A sample's files are
  written (by the driver, or by the worker that finished it: ``generate --writes``) and their
  folder fsynced before the index row that says it is done; the committed row is the commit.
- The index holds committed rows only; the plan is the source of planned rows. A plan row is a
  pure function of the manifest and its index (:class:`factory.plan.RowMaker`), so plan.parquet is
  a cache: ``generate`` writes it in the background while it works, and readers make rows from
  the manifest when it is missing or of another N. Nothing at the start of a run costs N.
- The journal is a sequence of Parquet chunks, each written atomically. Every ``fold_every``
  commits the unfolded chunks become a segment, and segments of similar size merge (a binary
  counter), so folding costs what was committed, not N; at the end of a run everything is merged
  into index.parquet. A file whose chunk range lies inside another's was merged and is ignored
  (:mod:`~factory.store.segments`); for a plan index the newest row wins (a ``planned`` row, from
  ``factory check --repair``, undoes an older one). A killed process leaves the old files or a
  complete new one.
- Resume trusts the committed index for presence. It reads the committed rows (cost: what is
  done), lists the sample folders that can hold uncommitted files (those not all done) and those
  of the rows still in the journal (the last commits), checks their done samples' files for
  presence and size, and deletes temporary files and files of samples not done, inside the run.
  Failed, planned and damaged samples are (re)done. ``factory check`` checks everything in full.
- A damaged index file (Parquet refuses it: every page has a CRC, verified on reading, and a
  column of another name or type than ``INDEX_SCHEMA``'s is damage in the footer) is set aside
  as ``NAME.damaged`` and the rows it held rebuilt from the samples' JSON files
  (:mod:`~factory.store.recover`): by ``generate`` on its own, by ``factory check --repair``; ``filter`` and ``export`` name the file and say so.
- One writer: a process holds ``.lock`` (an advisory ``flock``) while it writes.
- Memory does not grow with N: plan.parquet is written and read a row group at a time; the index
  files are sorted by plan index and merged a step of buckets (``STEP_ROWS``) at a time.
- File access is local paths (``pathlib``/``os``) in :mod:`~factory.store.run`, ``segments`` and
  ``recover`` only: an object-store run (``s3://``, ``gs://`` through fsspec or pyarrow file
  systems) would replace those calls; the rename-as-commit rule becomes "the index row is the
  commit" (already true) with sample files put whole. Not supported today.

Modules: :mod:`~factory.store.layout` (names, schema), :mod:`~factory.store.tables` (Arrow helpers
of the index), :mod:`~factory.store.segments` (the index's files), :mod:`~factory.store.recover`
(rebuilding a damaged index), :mod:`~factory.store.planfiles` (the plan's files),
:mod:`~factory.store.run` (:class:`RunStore`),
:mod:`~factory.store.latest` (which run a command defaults to).
"""

from factory.store.latest import LATEST_RUN_FILE, latest_run_pointer, remember_latest_run, resolve_run, restore_latest_run
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
    "latest_run_pointer",
    "restore_latest_run",
    "resolve_run",
]
