"""The SQLite catalog store: each disk group's catalog a file in its directory under one parent.

``<parent>/<name>/catalog.db`` is a published disk group; ``catalog.db.new`` one being created (the
rename publishes it, so an init killed before it leaves only the ``.new`` to discard); ``locks/`` its
flock files. The store's own locks (creating a disk group, claiming a mount point) are flock files in
``shared_locks``. Nothing outside this module knows of these files.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage import durable
from storage.catalog.base import Catalog, CatalogStore, DiskGroupRec
from storage.catalog.sqlite import SqliteCatalog
from storage.errors import AlreadyExists, NoSuchDiskGroup
from storage.locks import FlockLocks, Locks

_DB = "catalog.db"
_NEW = "catalog.db.new"
_SIDE = ("", "-wal", "-shm")  # the database and WAL mode's companion files


class SqliteStore(CatalogStore):
    def __init__(self, parent: Path, shared_locks: Path) -> None:
        self.parent = parent
        self.shared_locks = shared_locks

    def _file(self, name: str, which: str = _DB) -> Path:
        return self.parent / name / which

    def exists(self, name: str) -> bool:
        return self._file(name).exists()

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.parent.iterdir() if (p / _DB).exists())
        except OSError:
            return []

    def create(self, rec: DiskGroupRec) -> Catalog:
        if self.exists(rec.name):
            raise AlreadyExists(f"disk group {rec.name} already exists")
        self.discard(rec.name)
        self._file(rec.name).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        cat = SqliteCatalog(self._file(rec.name, _NEW))
        try:
            cat.init(rec)
        except BaseException:
            cat.close()
            raise
        return cat

    def publish(self, name: str) -> None:
        if not self.is_partial(name):
            raise NoSuchDiskGroup(f"disk group {name} has no unpublished catalog to publish")
        os.replace(self._file(name, _NEW), self._file(name))
        durable.sync_dir(self.parent / name)  # the rename is the publication: make it survive a power failure
        for suffix in _SIDE[1:]:
            self._file(name, _NEW + suffix).unlink(missing_ok=True)

    def is_partial(self, name: str) -> bool:
        return self._file(name, _NEW).exists()

    def discard(self, name: str) -> None:
        for suffix in _SIDE:
            self._file(name, _NEW + suffix).unlink(missing_ok=True)

    def open(self, name: str, partial: bool = False) -> Catalog:
        path = self._file(name, _NEW if partial else _DB)
        if not path.exists():
            raise NoSuchDiskGroup(f"no such disk group: {name} (create it with veritas dg init {name} DISK...)")
        return SqliteCatalog(path)

    def destroy(self, name: str) -> None:
        self.locks(name).gone()
        for which in (_DB, _NEW):
            for suffix in _SIDE:
                self._file(name, which + suffix).unlink(missing_ok=True)

    def locks(self, name: str | None = None) -> Locks:
        return FlockLocks(self.shared_locks if name is None else self.parent / name / "locks")
