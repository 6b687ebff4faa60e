"""In-memory catalog: the fake that passes the same contract suite, for fast tests of upper layers."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from storage.catalog.base import (
    AttachRec,
    Catalog,
    DiskGroupRec,
    DiskRec,
    IntentRec,
    LeaseRec,
    MountRec,
    SubdiskRec,
    VolumeRec,
    check_owner,
    check_space,
    refuse_attach,
)
from storage.errors import AlreadyExists, IntentPending, InUse, NoSuchDiskGroup, NoSuchVolume


class MemoryCatalog(Catalog):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall clock of lease expiry; tests pass a fake one
        self._lock = threading.RLock()
        self._leases: dict[str, LeaseRec] = {}
        self._attach: dict[str, AttachRec] = {}
        self._dg: DiskGroupRec | None = None
        self._disks: dict[str, DiskRec] = {}
        self._vols: dict[str, VolumeRec] = {}
        self._sds: dict[tuple[str, int], SubdiskRec] = {}
        self._mounts: dict[tuple[str, str, str], MountRec] = {}
        self._intents: dict[str, IntentRec] = {}

    def init(self, dg: DiskGroupRec) -> None:
        with self._lock:
            if self._dg is not None:
                raise AlreadyExists(f"disk group {self._dg.name} already exists")
            self._dg = dg

    def diskgroup(self) -> DiskGroupRec:
        if self._dg is None:
            raise NoSuchDiskGroup("catalog holds no disk group")
        return self._dg

    def set_imported(self, node: str | None, expect: Collection[str | None] | None = None) -> None:
        with self._lock:
            dg = self.diskgroup()
            check_owner(dg.name, dg.imported_on, expect)
            self._dg = dataclasses.replace(dg, imported_on=node)

    def add_disk(self, disk: DiskRec) -> None:
        with self._lock:
            if disk.name in self._disks or any(d.source == disk.source for d in self._disks.values()):
                raise AlreadyExists(f"disk {disk.name} ({disk.source}) is already in the disk group")
            self._disks[disk.name] = disk

    def disks(self) -> list[DiskRec]:
        return sorted(self._disks.values(), key=lambda d: d.name)

    def set_disk_state(self, name: str, state: str) -> None:
        with self._lock:
            if name in self._disks:
                self._disks[name] = dataclasses.replace(self._disks[name], state=state)

    def remove_disk(self, name: str) -> None:
        with self._lock:
            for sd in self._sds.values():
                if sd.disk == name:
                    raise InUse(f"disk {name} still holds volume {sd.volume}; remove or repair it first")
            self._disks.pop(name, None)

    def _check(self, subdisks: list[SubdiskRec], capacity: Mapping[str, int],
               minus: SubdiskRec | None = None) -> None:
        used = self.reserved()
        if minus is not None:
            used[minus.disk] = used.get(minus.disk, 0) - minus.reserved
        check_space(used, subdisks, capacity)

    def create_volume(self, vol: VolumeRec, subdisks: list[SubdiskRec], intent: IntentRec,
                      capacity: Mapping[str, int]) -> None:
        with self._lock:
            if vol.name in self._vols:
                raise AlreadyExists(f"volume {vol.name} already exists")
            self._check(subdisks, capacity)
            self._refuse_pending(intent.key)
            self._vols[vol.name] = vol
            for s in subdisks:
                self._sds[(s.volume, s.idx)] = s
            self._intents[intent.key] = _copy_intent(intent)

    def volume(self, name: str) -> VolumeRec | None:
        return self._vols.get(name)

    def volumes(self) -> list[VolumeRec]:
        return sorted(self._vols.values(), key=lambda v: v.name)

    def subdisks(self, volume: str | None = None) -> list[SubdiskRec]:
        with self._lock:
            sds = [s for s in self._sds.values() if volume is None or s.volume == volume]
        return sorted(sds, key=lambda s: (s.volume, s.idx))

    def update_volume(self, name: str, **fields: Any) -> None:
        with self._lock:
            bad = set(fields) - _VOL_FIELDS
            if bad:
                raise ValueError(f"unknown volume fields {sorted(bad)}")
            if name not in self._vols:
                raise NoSuchVolume(f"no such volume: {name}")
            self._vols[name] = dataclasses.replace(self._vols[name], **fields)

    def update_subdisk(self, volume: str, idx: int, capacity: Mapping[str, int] | None = None,
                       **fields: Any) -> None:
        with self._lock:
            old = self._sds.get((volume, idx))
            if old is None:
                raise NoSuchVolume(f"volume {volume} has no subdisk {idx}")
            new = dataclasses.replace(old, **fields)
            if capacity is not None:
                self._check([new], capacity, minus=old)
            self._sds[(volume, idx)] = new

    def delete_volume(self, name: str) -> None:
        with self._lock:
            self._vols.pop(name, None)
            self._intents.pop(name, None)
            self._attach.pop(name, None)
            for k in [k for k in self._sds if k[0] == name]:
                del self._sds[k]
            for mk in [k for k in self._mounts if k[0] == name]:
                del self._mounts[mk]

    def add_mount(self, mount: MountRec) -> bool:
        with self._lock:
            key = (mount.volume, mount.node, mount.mount_id)
            if key in self._mounts:
                return False
            self._mounts[key] = mount
            return True

    def remove_mount(self, volume: str, node: str, mount_id: str) -> bool:
        with self._lock:
            return self._mounts.pop((volume, node, mount_id), None) is not None

    def mounts(self, volume: str | None = None) -> list[MountRec]:
        with self._lock:
            ms = [m for m in self._mounts.values() if volume is None or m.volume == volume]
        return sorted(ms, key=lambda m: (m.volume, m.created))

    def _refuse_pending(self, key: str) -> None:
        if key in self._intents:
            raise IntentPending(f"an unfinished {self._intents[key].op} on {key} is recorded;"
                                " it must be recovered first")

    def put_intent(self, intent: IntentRec) -> None:
        with self._lock:
            self._refuse_pending(intent.key)
            self._intents[intent.key] = _copy_intent(intent)

    def finish_intent(self, key: str, update: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            if update:
                self.update_volume(key, **update)
            self._intents.pop(key, None)

    def intents(self) -> list[IntentRec]:
        with self._lock:
            return sorted((_copy_intent(i) for i in self._intents.values()), key=lambda i: i.created)

    def renew_lease(self, node: str, ttl: float, sent: float | None = None) -> LeaseRec:
        with self._lock:
            now = self._clock()
            old = self._leases.get(node)
            if old is not None and old.expires <= now:  # ran out: its attachments were lost with it
                self._drop_attachments(node)
            self._leases[node] = LeaseRec(node, min(now, now if sent is None else sent) + ttl, ttl)
            return self._leases[node]

    def _drop_attachments(self, node: str) -> None:
        for vol in [v for v, a in self._attach.items() if a.node == node]:
            del self._attach[vol]

    def drop_lease(self, node: str) -> None:
        with self._lock:
            self._drop_attachments(node)
            self._leases.pop(node, None)

    def leases(self) -> list[LeaseRec]:
        with self._lock:
            return sorted(self._leases.values(), key=lambda rec: rec.node)

    def attach(self, volume: str, node: str) -> AttachRec:
        with self._lock:
            if volume not in self._vols:
                raise NoSuchVolume(f"no such volume: {volume}")
            new = refuse_attach(volume, node, self._attach.get(volume), self._leases, self._clock())
            self._attach[volume] = new
            return new

    def want(self, volume: str, node: str) -> None:
        with self._lock:
            cur = self._attach.get(volume)
            if cur is not None and cur.node != node:
                self._attach[volume] = dataclasses.replace(cur, wanted_by=node)

    def detach(self, volume: str, node: str) -> bool:
        with self._lock:
            cur = self._attach.get(volume)
            if cur is None or cur.node != node:
                return False
            del self._attach[volume]
            return True

    def attachments(self) -> list[AttachRec]:
        with self._lock:
            return sorted(self._attach.values(), key=lambda a: a.volume)


_VOL_FIELDS = {f for f in VolumeRec.__dataclass_fields__ if f != "name"}


def _copy_intent(intent: IntentRec) -> IntentRec:
    """Store and hand out copies of ``data``, as a real backend does, so no caller shares it."""
    return dataclasses.replace(intent, data=copy.deepcopy(dict(intent.data)))
