"""`factory export`: a run's selected samples as WebDataset shards or a folder tree, with a card.

Modules, in the order an export runs: :mod:`~factory.export.options` (options -> settings),
:mod:`~factory.export.ordering` (split by class, shuffle, plan fingerprint),
:mod:`~factory.export.prepare` (the run, the rows, the order: everything before writing),
:mod:`~factory.export.outdir` (the locked output folder and ``export.json``),
:mod:`~factory.export.members` (one sample's checked files and JSON),
:mod:`~factory.export.records` (bookkeeping), the formats :mod:`~factory.export.webdataset` and
:mod:`~factory.export.folder`, :mod:`~factory.export.card` (the dataset card) and
:mod:`~factory.export.run` (the command).
"""

from factory.export.options import ExportOptions, parse_size, parse_splits
from factory.export.run import FORMATS, ExportSummary, run_export

__all__ = ["FORMATS", "ExportOptions", "ExportSummary", "parse_size", "parse_splits", "run_export"]
