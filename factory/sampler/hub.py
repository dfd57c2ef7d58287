"""The local Hugging Face hub cache, read directly (no network, no torch, no huggingface_hub import).

The factory never downloads: a hub id (``owner/name``) is used only when it is already in the local
cache, laid out by ``huggingface_hub`` as::

    $HF_HUB_CACHE/models--owner--name/
      refs/main                    # the commit hash of the cached "main"
      snapshots/<commit>/...       # the files (symlinks into blobs/ in a real cache)

The cache folder is found as ``huggingface_hub`` finds it, read at call time (so a changed
environment counts): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. ``HF_HUB_OFFLINE`` needs no
special handling: nothing here goes to the network whatever it says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from factory.errors import InputError

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> Path:
    """The hub cache folder ``huggingface_hub`` would use with the current environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def repo_folder(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str) -> tuple[str, Path] | None:
    """``(commit, snapshot folder)`` of the cached ``main`` of ``repo_id``, or None when not cached.

    Without ``refs/main`` (a cache filled by ``revision=<commit>`` downloads) a single snapshot is
    used; several snapshots and no ref are ambiguous and count as not cached.
    """
    repo = repo_folder(repo_id)
    ref = repo / "refs" / "main"
    commit = None
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif (repo / "snapshots").is_dir():
        snaps = [p.name for p in (repo / "snapshots").iterdir() if p.is_dir()]
        commit = snaps[0] if len(snaps) == 1 else None
    if not commit or not _COMMIT_RE.match(commit):
        return None
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir() or not any(snapshot.iterdir()):
        return None
    return commit, snapshot


def not_cached(repo_id: str, what: str = "model", include: str = "", instead: str = "pass a local folder with --model") -> InputError:
    """The one-line error for a hub id that is not in the local cache."""
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
    return InputError(
        f"{what} '{repo_id}' is not in the local Hugging Face cache ({hub_cache_dir()}, set by HF_HUB_CACHE or HF_HOME){offline}; "
        f"on a machine with network run `hf download {repo_id}{include}` (`huggingface-cli download` with older "
        f"huggingface_hub) and bring that cache here, or {instead}"
    )


def require_snapshot(repo_id: str, what: str = "model", include: str = "", instead: str = "pass a local folder with --model") -> tuple[str, Path]:
    """Like :func:`cached_snapshot`, but a one-line ``InputError`` when it is not cached."""
    found = cached_snapshot(repo_id)
    if found is None:
        raise not_cached(repo_id, what, include, instead)
    return found
