"""The shared, idempotent steps of volume operations, and the lookups they start from.

Each step may be run again after a crash, by the operation itself or by storage.recovery, and ends in
the same state: attach, detach, unmount, tear down, grow, give a clone its identity. What differs by
layout or filesystem (btrfs forgetting its devices, ext4 growing offline) is the layout engine's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from storage import crash, durable, mountpoints, qos, trees
from storage.catalog.base import IntentRec, SubdiskRec, VolumeRec
from storage.errors import InUse, NoSpace, NoSuchVolume, VeritasError
from storage.group import DiskGroup
from storage.kernel import alloc, fs, loop
from storage.layouts import engine
from storage.layouts.base import LayoutEngine, Shape


def shape_of(v: VolumeRec) -> Shape:
    return Shape(v.fstype, v.nmirror, v.ncol)


def engine_of(v: VolumeRec) -> LayoutEngine:
    return engine(v.layout)


def get(dg: DiskGroup, name: str) -> VolumeRec:
    """The volume's record. :raises NoSuchVolume:"""
    v = dg.catalog.volume(name)
    if v is None:
        raise NoSuchVolume(f"no such volume: {name} in disk group {dg.name}")
    return v


def ready(dg: DiskGroup, name: str) -> VolumeRec:
    """The record of a volume neither being made nor removed. :raises InUse: otherwise."""
    v = get(dg, name)
    if v.state != "ok":
        raise InUse(f"volume {name} is being {'created' if v.state == 'creating' else 'removed'}; retry shortly")
    return v


def images(dg: DiskGroup, v: VolumeRec) -> list[Path]:
    return [dg.image(sd.disk, v.name, sd.idx) for sd in dg.catalog.subdisks(v.name)]


def is_mounted(dg: DiskGroup, name: str) -> bool:
    """Mounted at its mount point by its own device: another filesystem mounted there does not count."""
    v = dg.catalog.volume(name)
    return v is not None and mountpoints.mounted_here(dg, v)


def devices(dg: DiskGroup, v: VolumeRec) -> list[str]:
    """Loop devices currently attached to the volume's images (those present); for an fstype=none
    volume mounted here, the block devices of the filesystem that holds its tree."""
    if trees.is_tree(v):
        return trees.devices(dg, v)
    return [d for img in images(dg, v) for d in loop.find(img)]


def health(dg: DiskGroup, v: VolumeRec) -> tuple[str, list[str]]:
    """("ok" | "degraded" | "failed", names of disks the volume lost)."""
    online = {d.name for d in dg.catalog.disks() if d.state == "online"}
    lost = [sd.disk for sd in dg.catalog.subdisks(v.name)
            if sd.disk not in online or not (trees.exists(dg, v) if trees.is_tree(v)
                                             else dg.image(sd.disk, v.name, sd.idx).exists())]
    if not lost:
        return "ok", []
    if len(lost) <= engine_of(v).missing_allowed(shape_of(v)):
        return "degraded", lost
    return "failed", lost


def detach(dg: DiskGroup, v: VolumeRec, paths: list[Path]) -> None:
    """Detach every loop device on ``paths`` (the volume is not mounted)."""
    engine_of(v).detach([d for p in paths for d in loop.find(p)], shape_of(v), dg.runner)


def rmdir_quietly(path: Path) -> None:
    """Remove an empty mount point; one still in use or not empty stays."""
    try:
        path.rmdir()
    except OSError:
        pass


def teardown(dg: DiskGroup, name: str) -> None:
    """Remove every trace of volume ``name``: mount, loop devices, images, catalog rows. Idempotent."""
    v = dg.catalog.volume(name)
    if v is None:
        return
    mp = dg.mountpoint(name)
    if mountpoints.mounted_here(dg, v):  # never another volume's mount that shares the path
        fs.umount(mp, dg.runner)
    rmdir_quietly(mp)
    paths = images(dg, v)
    detach(dg, v, paths)
    for p in paths:
        p.unlink(missing_ok=True)
    trees.remove(dg, v)
    dg.catalog.delete_volume(name)


def drop_writeback(devs: list[str]) -> None:
    """Remove any root-cgroup limit on ``devs``: a loop device keeps its cgroup rules across detach and
    reattach, so one leaked by an earlier user of the device would throttle an unlimited volume.

    No IO controller, or no rule for a device, is nothing to drop. :raises VeritasError: when a rule
    could not be removed (the volume would run throttled by another volume's limit).
    """
    try:
        h = qos.Hierarchy.detect()
    except VeritasError:
        return  # no cgroup IO controller: no rule can exist
    if h.version != 1:
        return  # only v1 keeps writeback rules in the root cgroup
    nums = [loop.devnum(d) for d in devs]
    ruled = qos.limits(h, h.root)
    nums = [n for n in nums if f"{n[0]}:{n[1]}" in ruled]
    if not nums:
        return
    try:
        qos.apply_writeback(h, nums, 0)
    except OSError as exc:
        raise VeritasError(f"cannot remove the IOPS limit of {', '.join(devs)} from {h.root}: {exc}") from None


def drop_writeback_logged(devs: list[str]) -> None:
    """As drop_writeback, on the way out (unmount): the devices are detached anyway, and their next
    mount drops the rule again (and fails if it cannot), so a failure here is reported, not raised."""
    try:
        drop_writeback(devs)
    except (OSError, VeritasError) as exc:
        print(f"veritas: warning: {exc}", file=sys.stderr)


def ensure_identity(dg: DiskGroup, v: VolumeRec) -> VolumeRec:
    """Give a snapshot its own filesystem identity before its first attach, so it mounts beside its source.

    Redone after a crash until it completes: the catalog flag is cleared only afterwards.
    """
    if not v.identity_pending:
        return v
    engine_of(v).new_identity(images(dg, v), shape_of(v), lambda: dg.scratch(f"identity-{v.name}"), dg.runner)
    crash.point("identity.done")
    dg.catalog.update_volume(v.name, identity_pending=False)
    return get(dg, v.name)


def unmount_kernel(dg: DiskGroup, v: VolumeRec, only: list[str] | None = None) -> None:
    """Unmount the volume (its own mount only) and detach its devices, or only the devices in ``only``."""
    mp = dg.mountpoint(v.name)
    if mountpoints.mounted_here(dg, v):  # never another volume's mount that shares the path
        fs.umount(mp, dg.runner)
    paths = images(dg, v)
    devs = [d for p in paths for d in loop.find(p) if only is None or d in only]
    if devs:  # whatever the catalog says now: a loop device keeps its rules after detach
        drop_writeback_logged(devs)
    if only is None:
        detach(dg, v, paths)
    else:
        engine_of(v).detach(devs, shape_of(v), dg.runner)
    rmdir_quietly(mp)


def unmount_at(dg: DiskGroup, v: VolumeRec, target: Path) -> None:
    """Unmount a volume mounted at a scratch point for offline work, and detach it."""
    fs.umount(target, dg.runner)
    detach(dg, v, images(dg, v))
    rmdir_quietly(target)


def reserve_growth(dg: DiskGroup, name: str, sizes: list[int]) -> None:
    """Record the grown subdisk sizes, all or none; already grown subdisks are skipped, so a grow's
    recovery can run it again. :raises NoSpace: (nothing changed) if a disk lacks the room."""
    done: list[SubdiskRec] = []
    try:
        for sd, sz in zip(dg.catalog.subdisks(name), sizes, strict=True):
            if sz > sd.size:
                dg.catalog.update_subdisk(name, sd.idx, capacity=dg.capacity(), size=sz,
                                          reserved=sd.reserved + sz - sd.size)
                done.append(sd)
    except BaseException:
        for sd in done:
            dg.catalog.update_subdisk(name, sd.idx, size=sd.size, reserved=sd.reserved)
        raise


def grow_steps(dg: DiskGroup, v: VolumeRec, new: int) -> None:
    """Extend images and filesystem to the recorded subdisk sizes; idempotent (recovery reruns it)."""
    sds = dg.catalog.subdisks(v.name)
    if trees.is_tree(v):  # no image, no filesystem: the quota is the size
        trees.set_limit(dg, v, sds[0].size)
        crash.point("grow.fs")
        dg.catalog.finish_intent(v.name, {"size": new})
        return
    for sd in sds:
        p = dg.image(sd.disk, v.name, sd.idx)
        if p.stat().st_size < sd.size:
            with open(p, "r+b") as fh:
                fh.truncate(sd.size)
        if v.provisioning == "thick" and v.snapshot_of is None:
            # the whole image again, not only the added range: recovery may rerun this after the
            # truncate above was done; allocating what is allocated already costs nothing
            with open(p, "r+b") as fh:
                alloc.allocate(fh.fileno(), p, 0, sd.size)
    crash.point("grow.images")
    mp = dg.mountpoint(v.name)
    if is_mounted(dg, v.name):
        devs = devices(dg, v)
        for d in devs:
            loop.refresh_size(d, dg.runner)
        engine_of(v).grow(devs, shape_of(v), mp, lambda: dg.scratch(f"grow-{v.name}"), dg.runner)
    else:
        v = ensure_identity(dg, v)
        paths = images(dg, v)
        devs = [loop.attach(p, dg.runner) for p in paths]
        try:
            for d in devs:
                loop.refresh_size(d, dg.runner)
            engine_of(v).grow(devs, shape_of(v), None, lambda: dg.scratch(f"grow-{v.name}"), dg.runner)
        finally:
            detach(dg, v, paths)
    durable.sync_files([dg.image(sd.disk, v.name, sd.idx) for sd in sds])
    crash.point("grow.fs")
    dg.catalog.finish_intent(v.name, {"size": new})


def record_new(dg: DiskGroup, plan: Callable[[], tuple[VolumeRec, list[SubdiskRec]]], tries: int = 5
               ) -> tuple[VolumeRec, list[SubdiskRec]]:
    """Record a new volume with its subdisks and its make intent in one catalog step. Placement reads
    free space outside the catalog transaction, so a concurrent make may take the chosen disk's room
    first: ``plan`` again rather than fail while other disks have space."""
    for attempt in range(tries):
        vol, sds = plan()
        try:
            dg.catalog.create_volume(vol, sds, IntentRec(vol.name, "make", {}, time.time()), dg.capacity())
            return vol, sds
        except NoSpace:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
