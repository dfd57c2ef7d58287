"""A disk that fills in the middle of a shard, for the one-line 'disk full' tests of export and
composite (both write WebDataset shards through ``TarShard.add``)."""

from __future__ import annotations

import errno

import pytest


def fill_disk_at_shard_add(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Make ``TarShard.add`` raise ENOSPC on its ``nth`` call (``monkeypatch.undo()`` frees the disk)."""
    from factory.export import webdataset

    real_add = webdataset.TarShard.add
    calls: list[int] = []

    def full_disk(self, members, scratch=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, members, scratch)

    monkeypatch.setattr(webdataset.TarShard, "add", full_disk)
