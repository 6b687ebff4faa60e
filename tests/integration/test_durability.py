"""Committed state survives a power failure: the catalog commits with synchronous=FULL, a disk group is
published by a rename whose directory is fsynced, and a volume's images (and their directory entries)
are on disk before the commit that records the volume as made.

Power cannot be cut in a test; what is checked is the order of fsyncs and commits, seen by wrapping
os.fsync and the catalog's commit, on real files and real loop devices.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import diskgroup, snapshots, volumes
from storage.catalog.sqlite import SqliteCatalog
from storage.diskgroup import DiskSpec


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """("fsync", path) for every os.fsync, ("replace", dst) for every os.replace, ("finish", key) for every
    catalog finish_intent (the commit that publishes an operation), in order."""
    seen: list[tuple[str, str]] = []
    real_fsync, real_replace, real_finish = os.fsync, os.replace, SqliteCatalog.finish_intent

    def fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        real_replace(src, dst)
        seen.append(("replace", str(dst)))

    def finish(self: SqliteCatalog, key: str, update: object = None) -> None:
        real_finish(self, key, update)  # type: ignore[arg-type]
        seen.append(("finish", key))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(SqliteCatalog, "finish_intent", finish)
    return seen


def test_catalog_commits_with_synchronous_full(tmp_path: Path) -> None:
    cat = SqliteCatalog(tmp_path / "catalog.db")
    try:
        assert cat._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert cat._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        cat.close()


def test_init_fsyncs_the_directory_after_publishing(env, events: list[tuple[str, str]]) -> None:
    root = env.config.dg_parent / "testdg"
    specs = [DiskSpec.parse(f"{env.disk_image(f'd{i}')}=1g") for i in (1, 2)]
    dg = diskgroup.init(env.config, "testdg", specs)
    try:
        published = events.index(("replace", str(root / "catalog.db")))
        assert ("fsync", str(root)) in events[published:], "the rename of catalog.db.new was never made durable"
        for s in specs:  # the disk images veritas created, before the catalog recorded them
            assert ("fsync", str(s.source)) in events
            assert ("fsync", str(s.source.parent)) in events
    finally:
        dg.close()


def test_images_are_durable_before_the_volume_is_recorded(env, dg, events: list[tuple[str, str]]) -> None:
    for make in (lambda: volumes.make(dg, "v1", "300m"), lambda: snapshots.make(dg, "v1", "s1")):
        events.clear()
        v = make()
        done = events.index(("finish", v.name))
        before = events[:done]
        for sd in dg.catalog.subdisks(v.name):
            img = dg.image(sd.disk, v.name, sd.idx)
            assert ("fsync", str(img)) in before, f"{img} not fsynced before {v.name} was recorded"
            assert ("fsync", str(img.parent)) in before, f"{img.parent} not fsynced before {v.name} was recorded"
