"""An export's output folder: locked while written; ``export.json`` says what it holds and
whether it is complete, so a re-run resumes a matching export or restarts a stale one."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory import __version__
from factory.errors import InputError
from factory.export.prepare import Prepared
from factory.export.schema import public_model
from factory.fsutil import TMP_PREFIX, FileLock, atomic_write_text

EXPORT_FILE = "export.json"
EXPORT_KIND = "factory-export"
LOCK_FILE = ".lock"


@dataclass
class OutDir:
    """An export's output folder: locked while written; ``export.json`` says what it holds."""

    root: Path
    _lock: FileLock | None = None

    def open(self) -> dict[str, Any] | None:
        """Create or check the folder, take its lock, return the previous export.json (if any)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise InputError(f"{root}: exists and is not a directory; choose another --out")
        previous = None
        if (root / EXPORT_FILE).is_file():
            try:
                previous = json.loads((root / EXPORT_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                previous = {"kind": EXPORT_KIND, "plan": None}
            if previous.get("kind") != EXPORT_KIND:
                raise InputError(f"{root}: {EXPORT_FILE} is not a factory export's; choose another --out")
        elif root.is_dir() and not all(_debris(p) for p in root.iterdir()):
            # Only a lock and temporary files: an export killed before it wrote export.json
            # (they are removed once the lock is taken). Anything else is not ours.
            raise InputError(f"{root}: exists, is not empty and is not a factory export; choose another --out")
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(root / LOCK_FILE, f"{root}: another factory export is writing here")
        except OSError as exc:
            raise InputError(f"{root}: cannot create the output folder ({exc.strerror or exc})") from exc
        return previous

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove_temporaries(self) -> int:
        """Delete temporary files left by a killed export (we hold the lock, so none is live)."""
        removed = 0
        for path in self.root.rglob(f"{TMP_PREFIX}*"):  # rglob does not enter symlinked folders
            if path.is_symlink() or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        return removed

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.root / EXPORT_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _debris(path: Path) -> bool:
    """The lock or a temporary file an export leaves when killed (regular files only)."""
    return (path.name == LOCK_FILE or path.name.startswith(TMP_PREFIX)) and path.is_file() and not path.is_symlink()


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
