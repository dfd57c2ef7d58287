"""An export's output folder: locked while written; ``export.json`` says what it holds and
whether it is complete, so a re-run resumes a matching export or restarts a stale one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory import __version__
from factory.export.prepare import Prepared
from factory.export.schema import public_model
from factory.errors import InputError
from factory.fsutil import FileLock, atomic_write_text, open_owned_folder, remove_temporaries

EXPORT_FILE = "export.json"
EXPORT_KIND = "factory-export"


@dataclass
class OutDir:
    """An export's output folder: locked while written; ``export.json`` says what it holds."""

    root: Path
    _lock: FileLock | None = None

    def open(self) -> dict[str, Any] | None:
        """Create or check the folder, take its lock, return the previous export.json (if any)."""
        self._lock, previous = open_owned_folder(self.root, EXPORT_FILE, EXPORT_KIND, "factory export")
        return previous

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove_temporaries(self) -> int:
        """Delete temporary files left by a killed export (we hold the lock, so none is live)."""
        return remove_temporaries(self.root)

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.root / EXPORT_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def export_state(p: Prepared, state: str, **extra: Any) -> dict[str, Any]:
    info = p.store.info
    return {
        "kind": EXPORT_KIND,
        "version": 1,
        "state": state,
        "format": p.settings.format,
        "plan": p.fingerprint,
        "settings": p.settings.model_dump(mode="json"),
        "run": p.store.root.name,  # the run folder's name: no path of this machine in an export
        "manifest": info.get("manifest"),
        "fingerprint": info.get("fingerprint"),
        "model": public_model(info.get("model")),
        "selection": p.source.selection.name if p.source.selection is not None else None,
        "samples": p.ordered.num_rows,
        "factory_version": __version__,
        **extra,
    }


def check_export_finished(folder: Path, what: str) -> None:
    """Refuse ``folder`` when ``factory export`` started it and has not finished (interrupted, or
    being written): its finished shards or files are a part that would pass for the whole. ``what``
    names it in the error (``--data X``). A folder without ``export.json`` is not an export: no test."""
    marker = Path(folder) / EXPORT_FILE
    if not marker.is_file():
        return
    try:
        state = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(state, dict) and state.get("kind") == EXPORT_KIND and state.get("state") != "complete":
        raise InputError(
            f"{what}: an unfinished export ({EXPORT_FILE} says {state.get('state')!r}); "
            "re-run its `factory export` command to finish it"
        )
