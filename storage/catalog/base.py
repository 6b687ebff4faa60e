"""Catalog records and the interface every catalog backend implements.

Callers never see SQL. Every method is atomic on its own; the multi-record ones (create_volume,
finish_intent, delete_volume) are what makes multi-step operations crash-safe together with intents.
A second backend (etcd, for disk groups spanning hosts) implements the same interface and must pass
the same contract tests (tests/unit/test_catalog_contract.py).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.errors import NoSpace
from storage.locks import Locks
from storage.units import format_size


@dataclass(frozen=True)
class DiskGroupRec:
    name: str
    uuid: str
    imported_on: str | None
    created: float
    # redundant copies may share a failure domain (directory disks of one filesystem): accepted once for
    # the group at `dg init --force` (and by the embedded default, a single host by definition), so a
    # request that cannot say --force (Docker's Create) gets its mirror, with a warning, not a refusal
    accept_shared_domain: bool = False
    # shared (`dg init -s`, the vendor's `vxdg -s init`): in use on every node that sees its root at once;
    # ``imported_on`` then says only that it is not deported (the node that made or imported it), and
    # which node may use a volume is the volume's business (leases and attachments, below)
    shared: bool = False


@dataclass(frozen=True)
class DiskRec:
    """A disk of the group: an XFS filesystem on ``source`` (an image file or a block device)."""

    name: str
    source: str
    kind: str  # "file" | "block" | "dir" (a directory on a reflink filesystem: no XFS of its own)
    size: int
    state: str = "online"  # "online" | "missing"


@dataclass(frozen=True)
class VolumeRec:
    name: str
    size: int
    layout: str
    fstype: str
    nmirror: int = 1
    ncol: int = 1
    maxiops: int = 0
    snapshot_of: str | None = None
    cachesize: int = 0
    state: str = "ok"  # "creating" | "ok" | "removing"
    created: float = 0.0
    protect: bool = False
    identity_pending: bool = False  # a snapshot whose filesystem still carries its source's UUID
    autogrow: bool = False  # a snapshot whose cache grows from the disk group's free space (storage.snapcache)
    invalid: str = ""  # why a snapshot was invalidated (its cache ran out); empty while it is valid
    provisioning: str = "thin"  # "thin": sparse images; "thick": allocated in full at make and grow


@dataclass(frozen=True)
class SubdiskRec:
    """One image file of a volume on one disk; ``reserved`` is what it counts against the disk."""

    volume: str
    idx: int
    disk: str
    size: int
    reserved: int


@dataclass(frozen=True)
class MountRec:
    volume: str
    node: str
    mount_id: str
    created: float


@dataclass(frozen=True)
class LeaseRec:
    """A node's claim to be alive in this disk group, renewed every lease_interval; ``expires`` is
    wall-clock seconds (time.time()) as the backend judges it (etcd: the server's lease TTL)."""

    node: str
    expires: float
    ttl: float


@dataclass(frozen=True)
class AttachRec:
    """The one node a volume is attached on. Valid while that node's lease is live; a node whose lease
    expired has lost every attachment it held, whether or not the record is still there."""

    volume: str
    node: str
    since: float
    wanted_by: str | None = None  # a node that asked for it since (Catalog.want)


@dataclass(frozen=True)
class IntentRec:
    """A multi-step operation in progress on ``key`` (a volume name, or ``@dg``)."""

    key: str
    op: str
    data: Mapping[str, Any] = field(default_factory=dict)
    created: float = 0.0


def check_space(used: Mapping[str, int], subdisks: list[SubdiskRec], capacity: Mapping[str, int]) -> None:
    """Raise NoSpace unless ``subdisks`` fit on their disks beside what is ``used`` already.

    Shared by every backend so they refuse the same requests with the same words.
    """
    want: dict[str, int] = {}
    for s in subdisks:
        want[s.disk] = want.get(s.disk, 0) + s.reserved
    for disk, n in want.items():
        have = capacity.get(disk, 0) - used.get(disk, 0)
        if n > have:
            raise NoSpace(
                f"disk {disk} has {format_size(max(have, 0), long=True)} free, {format_size(n, long=True)} needed;"
                " add a disk (veritas dg adddisk) or choose a smaller size"
            )


def lease_live(leases: Mapping[str, LeaseRec], node: str, now: float) -> bool:
    """Whether ``node`` holds a lease that has not run out at ``now``."""
    lease = leases.get(node)
    return lease is not None and lease.expires > now


def refuse_attach(volume: str, node: str, cur: AttachRec | None, leases: Mapping[str, LeaseRec],
                  now: float) -> AttachRec:
    """The compare of attach's compare-and-set, shared so every backend decides and refuses alike:
    the attachment to record, or InUse naming the live holder. Re-attaching on the holder keeps its
    ``since`` and a pending ``wanted_by``: the node that asked still waits."""
    from storage.errors import AttachedElsewhere, InUse

    if not lease_live(leases, node, now):
        raise InUse(f"node {node} holds no live lease in this disk group, so it cannot attach volume {volume};"
                    " its plugin renews the lease (is it running?)")
    if cur is not None and cur.node == node:
        return cur
    if cur is not None and lease_live(leases, cur.node, now):
        until = time.strftime("%H:%M:%S", time.localtime(leases[cur.node].expires))
        raise AttachedElsewhere(f"volume {volume} is attached on node {cur.node} (its lease runs until {until},"
                                f" renewed while that node lives); unmount it there first, or wait for that"
                                f" node's lease to expire")
    return AttachRec(volume, node, now)


def check_owner(dg: str, current: str | None, expect: Collection[str | None] | None) -> None:
    """The compare of set_imported's compare-and-set, shared so every backend refuses alike."""
    from storage.errors import InUse

    if expect is not None and current not in expect:
        where = f"imported on node {current}" if current is not None else "deported"
        raise InUse(f"disk group {dg} is {where} now, which this change did not expect; look again"
                    f" (veritas dg list) and retry")


class Catalog(abc.ABC):
    """One disk group's catalog. Raises storage.errors types, never backend exceptions."""

    @abc.abstractmethod
    def init(self, dg: DiskGroupRec) -> None:
        """Create the catalog for ``dg``. :raises AlreadyExists: if it already holds a disk group."""

    @abc.abstractmethod
    def diskgroup(self) -> DiskGroupRec:
        """:raises NoSuchDiskGroup: if the catalog was never initialised."""

    @abc.abstractmethod
    def set_imported(self, node: str | None, expect: Collection[str | None] | None = None) -> None:
        """Record the node the disk group is imported on (None: deported), atomically.

        Compare-and-set: with ``expect``, only while the current owner is one of ``expect``.
        :raises InUse: naming the current owner otherwise, with nothing changed.
        """

    @abc.abstractmethod
    def add_disk(self, disk: DiskRec) -> None:
        """:raises AlreadyExists: if a disk of that name or source is in the group."""

    @abc.abstractmethod
    def disks(self) -> list[DiskRec]: ...

    @abc.abstractmethod
    def set_disk_state(self, name: str, state: str) -> None: ...

    @abc.abstractmethod
    def remove_disk(self, name: str) -> None:
        """:raises InUse: if a subdisk still lives on it."""

    @abc.abstractmethod
    def create_volume(self, vol: VolumeRec, subdisks: list[SubdiskRec], intent: IntentRec,
                      capacity: Mapping[str, int]) -> None:
        """Record a new volume, its subdisks and its intent at once.

        :raises AlreadyExists: if the name is taken.
        :raises IntentPending: if ``intent.key`` already has an intent.
        :raises NoSpace: if a disk's reservations would exceed ``capacity[disk]``.
        """

    @abc.abstractmethod
    def volume(self, name: str) -> VolumeRec | None: ...

    @abc.abstractmethod
    def volumes(self) -> list[VolumeRec]: ...

    @abc.abstractmethod
    def subdisks(self, volume: str | None = None) -> list[SubdiskRec]:
        """Subdisks of ``volume`` ordered by idx, or of every volume."""

    @abc.abstractmethod
    def update_volume(self, name: str, **fields: Any) -> None:
        """:raises NoSuchVolume: if absent."""

    @abc.abstractmethod
    def update_subdisk(self, volume: str, idx: int, capacity: Mapping[str, int] | None = None,
                       **fields: Any) -> None:
        """Change a subdisk (move it to another disk, grow it); checks ``capacity`` when given.

        :raises NoSpace: if the new reservation does not fit.
        """

    @abc.abstractmethod
    def delete_volume(self, name: str) -> None:
        """Remove the volume with its subdisks, mounts and intent; absent is not an error."""

    @abc.abstractmethod
    def add_mount(self, mount: MountRec) -> bool:
        """Record a mount ID; False if that ID was already recorded."""

    @abc.abstractmethod
    def remove_mount(self, volume: str, node: str, mount_id: str) -> bool:
        """Forget a mount ID; False if it was not recorded."""

    @abc.abstractmethod
    def mounts(self, volume: str | None = None) -> list[MountRec]: ...

    @abc.abstractmethod
    def put_intent(self, intent: IntentRec) -> None:
        """Record the pending operation on ``intent.key``.

        :raises IntentPending: (nothing changed) if the key already has one: a caller holding the key's
            locks recovers that intent first (storage.recovery.recover_held); nothing ever overwrites one.
        """

    @abc.abstractmethod
    def finish_intent(self, key: str, update: Mapping[str, Any] | None = None) -> None:
        """Clear the intent on ``key`` and apply ``update`` to volume ``key`` in one step."""

    @abc.abstractmethod
    def intents(self) -> list[IntentRec]: ...

    # --- several nodes: leases and exclusive attachment (issue 10). Every backend implements these;
    # the defaults only keep a backend that predates them importable.

    def renew_lease(self, node: str, ttl: float, sent: float | None = None) -> LeaseRec:
        """Create or extend ``node``'s lease to expire ``ttl`` seconds from now, atomically; from ``sent``
        (the caller's time.time() when it began the renewal) if that is earlier. A node's fencing counts
        its lease from when it sent the renewal, since it cannot know when a renewal that waited (on a
        locked SQLite file) took effect; the catalog counts it alike, so that a Mount the catalog allows
        is never one the node's own fencing stops at once. etcd counts a lease on its own clock from
        when a keepalive arrives, and ignores ``sent``.

        :raises CatalogError: when the catalog cannot be reached (the caller self-fences)."""
        raise NotImplementedError

    def drop_lease(self, node: str) -> None:
        """End ``node``'s lease now (a clean shutdown); its attachments go with it. Absent is no error."""
        raise NotImplementedError

    def leases(self) -> list[LeaseRec]:
        """Every recorded lease, live or expired, sorted by node; callers compare ``expires`` with now."""
        raise NotImplementedError

    def attach(self, volume: str, node: str) -> AttachRec:
        """Make ``node`` the volume's one attachment, compare-and-set in one step: it succeeds when the
        volume is attached nowhere, already on ``node``, or on a node whose lease has expired (that
        attachment is replaced). ``node`` must hold a live lease.

        :raises InUse: naming the node that holds it (and until when its lease runs), nothing changed.
        :raises NoSuchVolume: if the volume is not in the catalog."""
        raise NotImplementedError

    def want(self, volume: str, node: str) -> None:
        """Record that ``node`` asked for the volume and was refused (swarm moved its task there), so the
        holder learns it is wanted elsewhere (AttachRec.wanted_by). A successful attach clears it."""
        raise NotImplementedError

    def detach(self, volume: str, node: str) -> bool:
        """Drop the attachment if ``node`` holds it; False (nothing changed) if it does not."""
        raise NotImplementedError

    def attachments(self) -> list[AttachRec]:
        """Every attachment record, sorted by volume. The record of a node whose lease expired is worth
        nothing (AttachRec), and backends differ only in when it goes: it may stay until another node
        takes the volume or that node renews (SQLite, memory), or vanish with the lease, bound to it
        (etcd). Callers judge a record by its node's lease, never by its presence."""
        raise NotImplementedError

    def reserved(self) -> dict[str, int]:
        """Bytes reserved on each disk by all subdisks."""
        out: dict[str, int] = {}
        for sd in self.subdisks():
            out[sd.disk] = out.get(sd.disk, 0) + sd.reserved
        return out

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources."""


class CatalogStore(abc.ABC):
    """Where disk groups' catalogs live, and their locks: which disk groups exist, creating one
    unpublished and publishing it in one step, discarding one an interrupted creation left, destroying one.

    Callers never see files: the SQLite store keeps each catalog in a file under its parent directory,
    the memory store in memory, and a store spanning hosts (etcd) under its keys.
    """

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Disk group ``name`` is published (an unpublished, partial one does not count)."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """The published disk groups, sorted."""

    @abc.abstractmethod
    def create(self, rec: DiskGroupRec) -> Catalog:
        """A new, unpublished catalog holding ``rec``: ``exists`` stays False until ``publish``.

        A partial one of that name is replaced. :raises AlreadyExists: if ``rec.name`` is published.
        """

    @abc.abstractmethod
    def publish(self, name: str) -> None:
        """Make the unpublished catalog of ``name`` the disk group's, atomically and durably.

        Close every Catalog object of the unpublished one first. :raises NoSuchDiskGroup: if there is none.
        """

    @abc.abstractmethod
    def is_partial(self, name: str) -> bool:
        """An unpublished catalog of ``name`` is there: a creation was interrupted before publishing."""

    @abc.abstractmethod
    def discard(self, name: str) -> None:
        """Remove the unpublished catalog of ``name``, if any; a published one is left alone."""

    @abc.abstractmethod
    def open(self, name: str, partial: bool = False) -> Catalog:
        """The catalog of published disk group ``name`` (with ``partial``: of the unpublished one).

        :raises NoSuchDiskGroup: if there is none.
        """

    @abc.abstractmethod
    def destroy(self, name: str) -> None:
        """Remove the catalog of ``name``, published or not, and its locks: waiters for them fail with
        NoSuchDiskGroup. Absent is not an error. Close its Catalog objects first."""

    @abc.abstractmethod
    def locks(self, name: str | None = None) -> Locks:
        """The locks of disk group ``name``; with None, the store's own, for what spans its disk groups
        (creating one; claiming a mount point that names volumes of several)."""
