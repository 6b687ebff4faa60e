"""The in-memory catalog store: MemoryCatalogs and in-process locks, for fast tests of the upper layers."""

from __future__ import annotations

import threading

from storage.catalog.base import Catalog, CatalogStore, DiskGroupRec
from storage.catalog.memory import MemoryCatalog
from storage.errors import AlreadyExists, NoSuchDiskGroup
from storage.locks import Locks, LockTable, MemoryLocks


class MemoryStore(CatalogStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._published: dict[str, MemoryCatalog] = {}
        self._partial: dict[str, MemoryCatalog] = {}
        self._tables: dict[str | None, LockTable] = {}

    def exists(self, name: str) -> bool:
        return name in self._published

    def names(self) -> list[str]:
        return sorted(self._published)

    def create(self, rec: DiskGroupRec) -> Catalog:
        with self._lock:
            if rec.name in self._published:
                raise AlreadyExists(f"disk group {rec.name} already exists")
            cat = MemoryCatalog()
            cat.init(rec)
            self._partial[rec.name] = cat
            return cat

    def publish(self, name: str) -> None:
        with self._lock:
            cat = self._partial.pop(name, None)
            if cat is None:
                raise NoSuchDiskGroup(f"disk group {name} has no unpublished catalog to publish")
            self._published[name] = cat

    def is_partial(self, name: str) -> bool:
        return name in self._partial

    def discard(self, name: str) -> None:
        with self._lock:
            self._partial.pop(name, None)

    def open(self, name: str, partial: bool = False) -> Catalog:
        cat = (self._partial if partial else self._published).get(name)
        if cat is None:
            raise NoSuchDiskGroup(f"no such disk group: {name} (create it with veritas dg init {name} DISK...)")
        return cat

    def destroy(self, name: str) -> None:
        with self._lock:
            self._published.pop(name, None)
            self._partial.pop(name, None)
            table = self._tables.pop(name, None)
        if table is not None:
            MemoryLocks(name, table).gone()

    def locks(self, name: str | None = None) -> Locks:
        with self._lock:
            table = self._tables.setdefault(name, LockTable())
        return MemoryLocks(name or "", table)

    def abandon(self, thread: int) -> None:
        """Free every lock ``thread`` holds in this store, as the kernel frees the flocks of a killed
        process (tests stand a thread stopped for good for a killed process)."""
        with self._lock:
            tables = list(self._tables.values())
        for table in tables:
            table.abandon(thread)
