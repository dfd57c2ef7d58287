"""Everything an export decides before writing: the run, the rows (a selection's, or every done
sample), the settings, and the order (:mod:`factory.export.ordering`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from factory.errors import InputError
from factory.export.options import ExportOptions, resolve_settings
from factory.export.ordering import plan_fingerprint, plan_order
from factory.export.schema import attribute_keys
from factory.manifest import ExportSettings, Manifest
from factory.sample import STATUS_DONE
from factory.selection import ALL_DONE, Selection, list_selections, load_selection
from factory.store import RunStore, resolve_run


@dataclass
class ExportSource:
    """The rows to export and where they came from."""

    store: RunStore
    rows: pa.Table  # index rows (done), plan-index order
    description: str  # for the summary and the card
    selection: Selection | None
    missing: int = 0  # selected keys that are not done in the run any more


def load_source(store: RunStore, selection: str | None, all_done: bool) -> ExportSource:
    """The selection's rows joined with the run's index (only done samples)."""
    index = store.index()
    done = index.filter(pc.equal(index["status"], STATUS_DONE))
    if all_done and selection:
        raise InputError("give either --selection or --all, not both")
    if all_done:
        return ExportSource(store, done, f"all {done.num_rows} done samples (--all)", None)
    if selection is None:
        found = list_selections(store.root)
        if not found:
            return ExportSource(store, done, f"all {done.num_rows} done samples (the run has no selection; see `factory filter`)", None)
        selection = found[-1].stem
        how = "the most recent"
    else:
        how = "given"
    sel = load_selection(store.root, selection)
    info = store.info
    if sel.meta.get("fingerprint") not in (None, info.get("fingerprint")) or sel.meta.get("model") not in (None, info.get("model")):
        raise InputError(
            f"{sel.path}: made on a different run (manifest or model changed since); re-run `factory filter --name {selection}`"
        )
    keys = sel.table["key"]
    rows = done.filter(pc.is_in(done["key"], value_set=keys))
    missing = len(keys) - rows.num_rows
    desc = f"selection '{selection}' ({how}; {len(keys)} sample{'' if len(keys) == 1 else 's'}"
    desc += f", {missing} no longer done in the run)" if missing else ")"
    return ExportSource(store, rows, desc, sel, missing)


@dataclass
class Prepared:
    store: RunStore
    manifest: Manifest
    settings: ExportSettings
    source: ExportSource
    ordered: pa.Table
    out: Path
    fingerprint: str
    options: ExportOptions
    attribute_keys: list[str]  # every attribute key of the rows: the exported struct's fields


def prepare(options: ExportOptions) -> Prepared:
    """Resolve the run, defaults, selection, split and order: everything but the writing."""
    store = RunStore.open(resolve_run(options.run))
    manifest = store.manifest()
    settings = resolve_settings(options, manifest.export)
    source = load_source(store, options.selection, options.all_done)
    if source.rows.num_rows == 0:
        hint = ""
        if source.selection is not None:
            dropped = {k: v for k, v in (source.selection.meta.get("dropped") or {}).items() if v}
            top = sorted(dropped.items(), key=lambda kv: -kv[1])[:3]
            relax = "; ".join(f"{n} {reason} ({_RELAX.get(reason, 'see factory filter --help')})" for reason, n in top)
            hint = f"; the filter dropped {relax}" if relax else ""
            hint += "; re-run `factory filter` with looser options, or export every done sample with --all"
        raise InputError(f"{store.root}: nothing to export: {source.description}{hint}")
    ordered = plan_order(source.rows, settings.split, settings.shuffle_seed)
    name = source.selection.name if source.selection is not None else ALL_DONE
    out = Path(options.out) if options.out is not None else store.root / "export" / f"{name}-{settings.format}"
    fingerprint = plan_fingerprint(ordered, settings, store)
    return Prepared(store, manifest, settings, source, ordered, out, fingerprint, options, attribute_keys(ordered))


#: The option that relaxes each filter reason (for the "nothing to export" hint).
_RELAX = {
    "low_gsg": "--min-gsg",
    "empty_matte": "--min-coverage",
    "full_matte": "--max-coverage 1",
    "touches_border": "--keep-border",
    "key_color": "--keep-key-color",
    "no_board": "--keep-no-board",
    "untrusted_matte": "--max-residual 0 --min-confidence 0",
    "near_duplicate": "--dedup-distance -1",
    "class_cap": "--per-class-cap 0",
    "corrupt": "damaged files",
}
