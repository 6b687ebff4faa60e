"""Who a mount point belongs to: one volume on the host, told by device numbers, never by its name.

``<mount_root>/<volume>_<diskgroup>`` is not unique across disk groups (volume ``a_b`` of disk group
``c`` and volume ``a`` of ``b_c`` share ``a_b_c``), and something mounted at a volume's mount point is
not necessarily that volume. So a volume counts as mounted only when the mount at its mount point stands
on a loop device backed by one of its images (by backing device and inode), and ``make`` refuses a name
whose mount point another disk group's volume, or a mounted filesystem, already has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from storage import trees
from storage.catalog.base import VolumeRec
from storage.errors import InUse, VeritasError
from storage.group import DiskGroup
from storage.kernel import loop, mounts
from storage.units import check_name


def image_ids(dg: DiskGroup, v: VolumeRec) -> set[loop.FileId]:
    """Identities of the volume's image files that exist."""
    ids = (loop.identity(dg.image(sd.disk, v.name, sd.idx)) for sd in dg.catalog.subdisks(v.name))
    return {i for i in ids if i is not None}


def entry_ids(entry: mounts.MountEntry) -> set[loop.FileId]:
    """Identities of the files behind the loop devices a mount stands on."""
    ids = (loop.backing_id_of(major, minor) for major, minor in mounts.devices_of(entry))
    return {i for i in ids if i is not None}


def is_own(dg: DiskGroup, v: VolumeRec, entry: mounts.MountEntry) -> bool:
    """True when ``entry`` is a mount of volume ``v``'s own filesystem (any member of a btrfs one), or
    for an fstype=none volume a mount of its tree (storage.trees)."""
    if trees.is_tree(v):
        return trees.is_mount_of(dg, v, entry)
    return bool(entry_ids(entry) & image_ids(dg, v))


def mounted_here(dg: DiskGroup, v: VolumeRec) -> bool:
    """The volume is mounted at its mount point in this mount namespace: by its own device."""
    entry = mounts.mounted_at(dg.mountpoint(v.name))
    return entry is not None and is_own(dg, v, entry)


def claimant(dg: DiskGroup, name: str) -> str | None:
    """The volume of another disk group (of the same state root) whose mount point is the one volume
    ``name`` of ``dg`` would have, as "volume V of disk group G"; None when there is none."""
    point = dg.mountpoint(name).name
    for other in _diskgroups(dg):
        suffix = f"_{other}"
        if other == dg.name or not point.endswith(suffix):
            continue
        candidate = point[: -len(suffix)]
        try:
            check_name(candidate)
        except VeritasError:
            continue
        try:
            cat = dg.store.open(other)
        except VeritasError:
            continue  # being destroyed meanwhile
        try:
            if cat.volume(candidate) is not None:
                return f"volume {candidate} of disk group {other}"
        finally:
            cat.close()
    return None


def _diskgroups(dg: DiskGroup) -> list[str]:
    return dg.store.names()


def refuse_taken(dg: DiskGroup, name: str) -> None:
    """Raise InUse when volume ``name``'s mount point belongs to another volume or holds a mount."""
    mp = dg.mountpoint(name)
    other = claimant(dg, name)
    if other is not None:
        raise InUse(f"volume {name} of disk group {dg.name} would be mounted at {mp}, which is the mount"
                    f" point of {other}; choose another name")
    entry = mounts.mounted_at(mp)
    if entry is not None:
        raise InUse(f"{mp}, the mount point volume {name} would have, already has {entry.source}"
                    f" ({entry.fstype}) mounted; unmount it or choose another name")


@contextmanager
def claim(dg: DiskGroup, name: str) -> Iterator[None]:
    """Hold the host-wide lock of volume ``name``'s mount point while checking it is free and creating
    the volume, so that two disk groups cannot take one mount point at the same time."""
    with dg.store.locks().hold(f"mountpoint:{dg.mountpoint(name).name}", shared_dg=False):
        if dg.catalog.volume(name) is None:  # an existing name is the caller's to refuse (AlreadyExists)
            refuse_taken(dg, name)
        yield


def refuse_foreign(dg: DiskGroup, v: VolumeRec) -> None:
    """Raise InUse when something that is not volume ``v`` sits at its mount point: mounting over it
    would hide it, and counting it as ``v`` would hand its data to ``v``'s users."""
    mp = dg.mountpoint(v.name)
    entry = mounts.mounted_at(mp)
    if entry is None or is_own(dg, v, entry):
        return
    other = claimant(dg, v.name)
    owner = f"; it is the mount point of {other}" if other else ""
    raise InUse(f"cannot mount volume {v.name}: {mp} already has {entry.source} ({entry.fstype}) mounted,"
                f" which is not this volume{owner}")
