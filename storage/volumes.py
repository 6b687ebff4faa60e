"""Volumes: make, list, info, grow, mount, unmount, remove, repair, IOPS limits.

Every multi-step operation records an intent in the catalog before it touches the kernel, passes
named crash points, and on failure undoes its own steps; storage.recovery finishes what a killed
process left. Each volume's operations are serialised by its lock stripe.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from storage import crash, durable, mountpoints, options, qos, recovery
from storage.catalog.base import IntentRec, MountRec, SubdiskRec, VolumeRec
from storage.diskgroup import DiskGroup
from storage.errors import (
    AlreadyExists,
    Degraded,
    InUse,
    InvalidArgument,
    NoSpace,
    NoSuchVolume,
    SnapshotInvalid,
    VeritasError,
)
from storage.kernel import btrfs, btrfs_super, fs, loop, mounts, reflink
from storage.layouts import ENGINES, engine
from storage.layouts.base import LayoutEngine, Shape
from storage.units import check_name, format_size, parse_size

MAKE_OPTIONS = options.VOLUME_OPTIONS
ADMIN_MOUNT_ID = "admin"


def _int_opt(opts: Mapping[str, Any], key: str) -> int | None:
    if key not in opts or opts[key] is None:
        return None
    raw = opts[key]
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = int(raw)
    except (TypeError, ValueError):
        raise InvalidArgument(f"option {key} must be an integer, got {raw!r}") from None
    if value < 0 or (key != "maxiops" and value == 0):
        raise InvalidArgument(f"option {key} must be a positive integer, got {raw!r}")
    return value


def shape_of(v: VolumeRec) -> Shape:
    return Shape(v.fstype, v.nmirror, v.ncol)


def _get(dg: DiskGroup, name: str) -> VolumeRec:
    v = dg.catalog.volume(name)
    if v is None:
        raise NoSuchVolume(f"no such volume: {name} in disk group {dg.name}")
    return v


def _ready(dg: DiskGroup, name: str) -> VolumeRec:
    v = _get(dg, name)
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
    """Loop devices currently attached to the volume's images (those present)."""
    return [d for img in images(dg, v) for d in loop.find(img)]


# ---------------------------------------------------------------- make


def make(dg: DiskGroup, name: str, size: str | int | None = None, *, spec: options.VolumeSpec | None = None,
         **opts: Any) -> VolumeRec:
    """Create volume ``name``; returns its record. Options: see MAKE_OPTIONS, or a spec parsed already.

    Every option is checked before the first step; the config file's [volume] section gives the defaults.
    """
    check_name(name, "volume name")
    if spec is None:
        spec = options.parse_volume(size, opts)
    elif size is not None or opts:
        raise InvalidArgument("make takes a parsed spec or options, not both")
    d = dg.config.volume  # fstype, nmirror and ncol are defaults per layout: see LayoutEngine.shape_for
    nbytes = d.size if spec.size is None else spec.size
    layout = d.layout if spec.layout is None else spec.layout
    maxiops = d.maxiops if spec.maxiops is None else spec.maxiops
    protect = d.protect if spec.protect is None else spec.protect
    fstype, nmirror, ncol = spec.fstype, spec.nmirror, spec.ncol

    with dg.locks.hold(name), mountpoints.claim(dg, name):
        check_free(dg, name)
        for attempt in range(5):
            # placement reads free space outside the catalog transaction; a concurrent make may take the
            # chosen disk's room first, so plan again rather than fail while other disks have space
            eng, shape, sizes, disks = _plan(dg, layout, nbytes, fstype, nmirror, ncol)
            vol = VolumeRec(name, nbytes, eng.name, shape.fstype, shape.nmirror, shape.ncol, maxiops,
                            None, 0, "creating", time.time(), protect)
            sds = [SubdiskRec(name, i, d, sz, sz) for i, (d, sz) in enumerate(zip(disks, sizes, strict=True))]
            try:
                dg.catalog.create_volume(vol, sds, IntentRec(name, "make", {}, time.time()), dg.capacity())
                break
            except NoSpace:
                if attempt == 4:
                    raise
        crash.point("make.recorded")
        try:
            paths = [dg.image(sd.disk, name, sd.idx) for sd in sds]
            for p, sd in zip(paths, sds, strict=True):
                with open(p, "xb") as fh:
                    fh.truncate(sd.size)
            crash.point("make.images")
            attached = [loop.attach_tracked(p, dg.runner) for p in paths]
            devs = [dev for dev, _new in attached]
            # images made just now are blank; a device found already attached is probed before mkfs
            fs.refuse_formatted([dev for dev, new in attached if not new], dg.runner)
            crash.point("make.attached")
            eng.mkfs(devs, shape, name, dg.runner)
            crash.point("make.mkfs")
            _detach(dg, vol, paths)
            crash.point("make.detached")
            durable.sync_files(paths)  # the images exist for good before the catalog says so
        except BaseException:
            teardown(dg, name)
            raise
        dg.catalog.finish_intent(name, {"state": "ok"})
        crash.point("make.done")
    return _get(dg, name)


def check_free(dg: DiskGroup, name: str) -> None:
    """Refuse a name in use; call with its lock held.

    A row left 'creating' or 'removing' under a free lock is a killed process's: it is finished first
    (rolled back or forward), as the next open would, so that a long-lived opener such as the plugin
    neither refuses the name nor takes a half-made volume for a real one.
    """
    v = dg.catalog.volume(name)
    if v is not None and v.state != "ok":
        from storage import recovery

        recovery.recover_held(dg, name)
        v = dg.catalog.volume(name)
    if v is not None:
        raise AlreadyExists(f"volume {name} already exists in disk group {dg.name}")


def _plan(dg: DiskGroup, layout: str, size: int, fstype: str | None, nmirror: int | None,
          ncol: int | None) -> tuple[LayoutEngine, Shape, list[int], list[str]]:
    free = dg.free()
    if layout == "auto":
        mirror = ENGINES["mirror"]
        try:
            shape = mirror.shape_for(size, fstype, nmirror, ncol, dg.config.volume)
            sizes = mirror.subdisk_sizes(size, shape)
            return mirror, shape, sizes, LayoutEngine.place(sizes, free, "mirror", dg.name)
        except VeritasError:
            layout = "concat"
            nmirror = ncol = None
    eng = engine(layout)
    shape = eng.shape_for(size, fstype, nmirror, ncol, dg.config.volume)
    sizes = eng.subdisk_sizes(size, shape)
    return eng, shape, sizes, LayoutEngine.place(sizes, free, eng.name, dg.name)


def _detach(dg: DiskGroup, v: VolumeRec, paths: list[Path]) -> None:
    devs = [d for p in paths for d in loop.find(p)]
    if v.fstype == "btrfs" and devs:
        fs.forget_btrfs(devs, dg.runner)
    for d in devs:
        loop.detach(d, dg.runner)


def teardown(dg: DiskGroup, name: str) -> None:
    """Remove every trace of volume ``name``: mount, loop devices, images, catalog rows. Idempotent."""
    v = dg.catalog.volume(name)
    if v is None:
        return
    mp = dg.mountpoint(name)
    if mountpoints.mounted_here(dg, v):  # never another volume's mount that shares the path
        fs.umount(mp, dg.runner)
    try:
        mp.rmdir()
    except OSError:
        pass
    paths = images(dg, v)
    _detach(dg, v, paths)
    for p in paths:
        p.unlink(missing_ok=True)
    dg.catalog.delete_volume(name)


# ---------------------------------------------------------------- queries


def list_volumes(dg: DiskGroup) -> list[dict[str, Any]]:
    """One row per volume; cheap (one catalog query and one read of the mount table)."""
    mounted = {e.target for e in mounts.table()}
    root = str(dg.config.mount_root)
    rows = []
    for v in dg.catalog.volumes():
        mp = f"{root}/{v.name}_{dg.name}"
        rows.append({"name": v.name, "size": v.size, "layout": v.layout, "fstype": v.fstype,
                     "maxiops": v.maxiops, "snapshot_of": v.snapshot_of, "state": v.state,
                     "mountpoint": mp, "mounted": mp in mounted and mountpoints.mounted_here(dg, v),
                     "invalid": v.invalid})
    return rows


def health(dg: DiskGroup, v: VolumeRec) -> tuple[str, list[str]]:
    """("ok" | "degraded" | "failed", names of disks the volume lost)."""
    online = {d.name for d in dg.catalog.disks() if d.state == "online"}
    lost = [sd.disk for sd in dg.catalog.subdisks(v.name)
            if sd.disk not in online or not dg.image(sd.disk, v.name, sd.idx).exists()]
    if not lost:
        return "ok", []
    if len(lost) <= engine(v.layout).missing_allowed(shape_of(v)):
        return "degraded", lost
    return "failed", lost


def info(dg: DiskGroup, name: str) -> dict[str, Any]:
    v = _get(dg, name)
    out: dict[str, Any] = asdict(v)
    mp = dg.mountpoint(name)
    sds = dg.catalog.subdisks(name)
    out["mountpoint"] = str(mp)
    out["mounted"] = mountpoints.mounted_here(dg, v)  # by device: not whatever sits at the path
    out["mounts"] = [asdict(m) for m in dg.catalog.mounts(name)]
    out["diskgroup"] = dg.name
    out["subdisks"] = [{"idx": s.idx, "disk": s.disk, "size": s.size, "reserved": s.reserved,
                        "image": str(dg.image(s.disk, name, s.idx))} for s in sds]
    out["devices"] = devices(dg, v)
    out["health"], out["lost_disks"] = health(dg, v)
    out["snapshots"] = [s.name for s in dg.catalog.volumes() if s.snapshot_of == name]
    if out["mounted"]:
        total, free = fs.statvfs_size(mp)
        out["used"] = total - free
    else:
        out["used"] = None
    if v.snapshot_of is not None:
        out["cache_used"] = sum(reflink.unshared_bytes(p) for p in images(dg, v) if p.exists())
    return out


# ---------------------------------------------------------------- mount / unmount


def mount(dg: DiskGroup, name: str, mount_id: str = ADMIN_MOUNT_ID, degraded: bool = False) -> Path:
    """Mount the volume at its mount point (once), and count ``mount_id`` as a user of it."""
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)  # a killed worker's umount is finished, not overwritten
        v = _ready(dg, name)
        if v.invalid:
            raise SnapshotInvalid(f"snapshot {name} is invalid and cannot be mounted: {v.invalid}; its data was"
                                  f" released, remove it (veritas vol rm {name})")
        mp = dg.mountpoint(name)
        if is_mounted(dg, name):
            dg.catalog.add_mount(MountRec(name, dg.node, mount_id, time.time()))
            return mp
        mountpoints.refuse_foreign(dg, v)
        foreign = [m for m in dg.catalog.mounts(name) if m.node != dg.node]
        if foreign:
            raise InUse(f"volume {name} is mounted on node {foreign[0].node}; unmount it there first")
        state, lost = health(dg, v)
        if state == "failed":
            raise Degraded(f"volume {name} lost disk(s) {', '.join(lost)} and its layout {v.layout} cannot"
                           " survive that; its data is unavailable")
        if state == "degraded" and not degraded:
            raise Degraded(f"volume {name} is degraded (lost disk(s) {', '.join(lost)}); mount it with"
                           f" --degraded, then run veritas vol repair {name}")
        dg.catalog.put_intent(IntentRec(name, "mount", {"mount_id": mount_id}, time.time()))
        crash.point("mount.recorded")
        attached: list[str] = []  # a failed mount detaches only these: a device found attached may serve
        try:                       # this volume's mount in another namespace (a managed plugin's, say)
            v = ensure_identity(dg, v)
            paths = [p for p in images(dg, v) if p.exists()]
            devs = []
            for p in paths:
                dev, new = loop.attach_tracked(p, dg.runner)
                devs.append(dev)
                if new:
                    attached.append(dev)
            crash.point("mount.attached")
            mp.mkdir(parents=True, exist_ok=True)
            engine(v.layout).mount(devs, shape_of(v), mp, degraded=state == "degraded", runner=dg.runner)
            crash.point("mount.mounted")
            if v.maxiops:
                qos.apply_writeback(qos.Hierarchy.detect(), [loop.devnum(d) for d in devs], v.maxiops)
            else:
                _drop_writeback(devs)
            dg.catalog.add_mount(MountRec(name, dg.node, mount_id, time.time()))
        except BaseException:
            _unmount_kernel(dg, v, only=attached)
            dg.catalog.finish_intent(name)
            raise
        dg.catalog.finish_intent(name)
        crash.point("mount.done")
        return mp


def _drop_writeback(devs: list[str]) -> None:
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


def _drop_writeback_logged(devs: list[str]) -> None:
    """As _drop_writeback, on the way out (unmount): the devices are detached anyway, and their next
    mount drops the rule again (and fails if it cannot), so a failure here is reported, not raised."""
    try:
        _drop_writeback(devs)
    except (OSError, VeritasError) as exc:
        print(f"veritas: warning: {exc}", file=sys.stderr)


def ensure_identity(dg: DiskGroup, v: VolumeRec) -> VolumeRec:
    """Give a snapshot its own filesystem identity before its first attach, so it mounts beside its source.

    Redone after a crash until it completes: the catalog flag is cleared only afterwards.
    """
    if not v.identity_pending:
        return v
    paths = images(dg, v)
    if v.fstype == "btrfs":
        btrfs_super.new_fsid(paths)  # on the image files: no device with the source's fsid appears
    else:
        devs = [loop.attach(p, dg.runner) for p in paths]
        scratch = dg.scratch(f"identity-{v.name}")
        try:
            fs.new_uuid(v.fstype, devs, scratch, dg.runner)
        finally:
            fs.umount(scratch, dg.runner)
            try:
                scratch.rmdir()
            except OSError:
                pass
            _detach(dg, v, paths)
    crash.point("identity.done")
    dg.catalog.update_volume(v.name, identity_pending=False)
    return _get(dg, v.name)


def _unmount_kernel(dg: DiskGroup, v: VolumeRec, only: list[str] | None = None) -> None:
    """Unmount the volume (its own mount only) and detach its devices, or only the devices in ``only``."""
    mp = dg.mountpoint(v.name)
    if mountpoints.mounted_here(dg, v):  # never another volume's mount that shares the path
        fs.umount(mp, dg.runner)
    paths = images(dg, v)
    devs = [d for p in paths for d in loop.find(p) if only is None or d in only]
    if devs:  # whatever the catalog says now: a loop device keeps its rules after detach
        _drop_writeback_logged(devs)
    if only is None:
        _detach(dg, v, paths)
    else:
        if v.fstype == "btrfs" and devs:
            fs.forget_btrfs(devs, dg.runner)
        for d in devs:
            loop.detach(d, dg.runner)
    try:
        mp.rmdir()
    except OSError:
        pass


def umount(dg: DiskGroup, name: str, mount_id: str = ADMIN_MOUNT_ID, force: bool = False) -> bool:
    """Forget ``mount_id``; unmount and detach when it was the last user (or ``force``).

    Returns True when the filesystem was unmounted.
    """
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)
        v = _get(dg, name)
        mine = [m for m in dg.catalog.mounts(name) if m.node == dg.node]
        others = [m for m in mine if m.mount_id != mount_id]
        if others and not force:
            dg.catalog.remove_mount(name, dg.node, mount_id)  # one atomic step: others still use it
            return False
        # the ID is released only once the unmount is done (or by recovery rolling it forward), so a
        # crash in between never leaves a mounted volume that no ID counts
        dg.catalog.put_intent(IntentRec(name, "umount", {"mount_id": mount_id, "force": force}, time.time()))
        crash.point("umount.recorded")
        try:
            _unmount_kernel(dg, v)
        except InUse:
            dg.catalog.finish_intent(name)
            raise
        crash.point("umount.unmounted")
        for m in mine:
            dg.catalog.remove_mount(name, m.node, m.mount_id)
        dg.catalog.finish_intent(name)
        return True


# ---------------------------------------------------------------- remove


def remove(dg: DiskGroup, name: str, force: bool = False, _cascade: bool = False) -> None:
    """Remove the volume and free its space. Refused while mounted or snapshotted, unless ``force``."""
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)
        v = _get(dg, name)
        snaps = [s.name for s in dg.catalog.volumes() if s.snapshot_of == name]
        if snaps:
            raise InUse(f"volume {name} has snapshots ({', '.join(snaps)}); remove them first")
        if v.protect and not force:
            raise InUse(f"volume {name} is protected: its data is kept; `veritas vol rm --force {name}`"
                        " removes it and its data")
        in_use = dg.catalog.mounts(name)
        if (in_use or is_mounted(dg, name)) and not force:
            where = sorted({m.node for m in in_use}) or [dg.node]
            raise InUse(f"volume {name} is mounted on {', '.join(where)}; unmount it first")
        mp = dg.mountpoint(name)
        if force:
            # unmount before recording anything, so a busy mount fails cleanly and changes nothing
            _unmount_kernel(dg, v)
            for m in in_use:
                dg.catalog.remove_mount(name, m.node, m.mount_id)
        dg.catalog.put_intent(IntentRec(name, "rm", {}, time.time()))
        dg.catalog.update_volume(name, state="removing")
        crash.point("rm.recorded")
        paths = images(dg, v)
        _detach(dg, v, paths)
        crash.point("rm.detached")
        for p in paths:
            p.unlink(missing_ok=True)
        crash.point("rm.images")
        dg.catalog.delete_volume(name)
        try:
            mp.rmdir()
        except OSError:
            pass
        crash.point("rm.done")


# ---------------------------------------------------------------- grow


def grow(dg: DiskGroup, name: str, size: str | int) -> VolumeRec:
    """Grow the volume to ``size`` (online for XFS and btrfs)."""
    new = parse_size(size)
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)
        v = _ready(dg, name)
        if v.invalid:
            raise SnapshotInvalid(f"snapshot {name} is invalid and cannot grow: {v.invalid}")
        if new < v.size:
            raise InvalidArgument(f"volume {name} is {format_size(v.size, long=True)}; it cannot shrink to"
                                  f" {format_size(new, long=True)} (volumes only grow)")
        if new == v.size:
            return v
        eng = engine(v.layout)
        if v.fstype == "ext4" and is_mounted(dg, name):
            raise InUse("ext4 cannot grow while mounted on this host (online resize needs CAP_SYS_RESOURCE);"
                        " unmount the volume and grow it again, or use fstype=xfs")
        if health(dg, v)[0] != "ok":
            raise Degraded(f"volume {name} is degraded; run veritas vol repair {name} before growing it")
        sizes = eng.subdisk_sizes(new, shape_of(v))
        dg.catalog.put_intent(IntentRec(name, "grow", {"size": new, "sizes": sizes}, time.time()))
        crash.point("grow.recorded")
        try:
            reserve_growth(dg, name, sizes)
        except BaseException:
            dg.catalog.finish_intent(name)
            raise
        crash.point("grow.reserved")
        _grow_steps(dg, v, new)
        return _get(dg, name)


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


def _grow_steps(dg: DiskGroup, v: VolumeRec, new: int) -> None:
    """Extend images and filesystem to the recorded subdisk sizes; idempotent (recovery reruns it)."""
    sds = dg.catalog.subdisks(v.name)
    for sd in sds:
        p = dg.image(sd.disk, v.name, sd.idx)
        if p.stat().st_size < sd.size:
            with open(p, "r+b") as fh:
                fh.truncate(sd.size)
    crash.point("grow.images")
    mp = dg.mountpoint(v.name)
    if is_mounted(dg, v.name):
        devs = devices(dg, v)
        for d in devs:
            loop.refresh_size(d, dg.runner)
        fs.grow(v.fstype, devs, mp, dg.runner)
    else:
        v = ensure_identity(dg, v)
        paths = images(dg, v)
        devs = [loop.attach(p, dg.runner) for p in paths]
        try:
            for d in devs:
                loop.refresh_size(d, dg.runner)
            if v.fstype == "ext4":
                fs.grow("ext4", devs, None, dg.runner)
            else:
                scratch = dg.scratch(f"grow-{v.name}")
                engine(v.layout).mount(devs, shape_of(v), scratch, runner=dg.runner)
                try:
                    fs.grow(v.fstype, devs, scratch, dg.runner)
                finally:
                    fs.umount(scratch, dg.runner)
                    scratch.rmdir()
        finally:
            _detach(dg, v, paths)
    durable.sync_files([dg.image(sd.disk, v.name, sd.idx) for sd in sds])
    crash.point("grow.fs")
    dg.catalog.finish_intent(v.name, {"size": new})


# ---------------------------------------------------------------- IOPS


def set_maxiops(dg: DiskGroup, name: str, iops: int | str) -> VolumeRec:
    """Change the volume's IOPS limit, live in every cgroup that already limits it."""
    value = _int_opt({"maxiops": iops}, "maxiops")
    if value is None:
        raise InvalidArgument(f"maxiops must be an integer, got {iops!r}")
    with dg.locks.hold(name):
        v = _ready(dg, name)
        dg.catalog.update_volume(name, maxiops=value)
        devs = devices(dg, v)
        if devs:
            h = qos.Hierarchy.detect()
            nums = [loop.devnum(d) for d in devs]
            targets = set(qos.cgroups_limiting(h, nums))
            if is_mounted(dg, name) and h.version == 1:
                targets.add(h.root)  # the writeback path
            for cg in targets:
                qos.set_limit(h, cg, nums, value)
        return _get(dg, name)


def apply_maxiops(dg: DiskGroup, name: str, cgroup: str, create: bool = False) -> list[tuple[int, int]]:
    """Write the volume's IOPS limit for its loop devices into ``cgroup`` (e.g. a container's).

    ``create`` makes the cgroup first: a limit in a cgroup made before its process starts binds from
    that process's first I/O.
    """
    v = _ready(dg, name)
    devs = devices(dg, v)
    if not devs:
        raise InvalidArgument(f"volume {name} is not attached on this node; mount it first")
    h = qos.Hierarchy.detect()
    target = h.resolve(cgroup)
    if create:
        target.mkdir(parents=True, exist_ok=True)
    nums = [loop.devnum(d) for d in devs]
    qos.set_limit(h, target, nums, v.maxiops)
    return nums


# ---------------------------------------------------------------- repair


def repair(dg: DiskGroup, name: str) -> VolumeRec:
    """Restore a degraded redundant volume: rebuild each lost subdisk on another disk."""
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)
        v = _ready(dg, name)
        eng = engine(v.layout)
        if not eng.redundant:
            raise InvalidArgument(f"volume {name} has layout {v.layout}, which keeps no redundancy to repair")
        state, lost = health(dg, v)
        if state == "ok":
            return v
        if state == "failed":
            raise Degraded(f"volume {name} lost more disks ({', '.join(lost)}) than layout {v.layout}"
                           " survives; its data cannot be rebuilt")
        sds = dg.catalog.subdisks(name)
        used_disks = {sd.disk for sd in sds}
        free = {d: n for d, n in dg.free().items() if d not in used_disks}
        online = {d.name for d in dg.catalog.disks() if d.state == "online"}
        broken = [sd for sd in sds if sd.disk not in online or not dg.image(sd.disk, name, sd.idx).exists()]
        targets = LayoutEngine.place([sd.size for sd in broken], free, v.layout)
        mp = dg.mountpoint(name)
        was_mounted = is_mounted(dg, name)
        target = mp if was_mounted else dg.scratch(f"repair-{name}")
        dg.catalog.put_intent(IntentRec(name, "repair", {"scratch": None if was_mounted else str(target)},
                                        time.time()))
        crash.point("repair.recorded")
        pending: Path | None = None  # a replacement image not yet in the catalog: ours to remove on failure
        try:
            if not was_mounted:
                v = ensure_identity(dg, v)
                paths = [p for p in images(dg, v) if p.exists()]
                devs = [loop.attach(p, dg.runner) for p in paths]
                eng.mount(devs, shape_of(v), target, degraded=True, runner=dg.runner)
            for sd, disk in zip(broken, targets, strict=True):
                img = dg.image(disk, name, sd.idx)
                img.unlink(missing_ok=True)
                pending = img
                with open(img, "xb") as fh:
                    fh.truncate(sd.size)
                dev = loop.attach(img, dg.runner)
                btrfs.replace(sd.idx + 1, dev, target, dg.runner)
                pending = None  # a member of the filesystem now: detaching it would hurt a mounted volume
                durable.sync_files([img])
                crash.point("repair.replaced")
                dg.catalog.update_subdisk(name, sd.idx, capacity=dg.capacity(), disk=disk)
            btrfs.convert(eng.profile(shape_of(v)) or "raid1", target, dg.runner)
        except BaseException:
            try:
                if not was_mounted:
                    _unmount_at(dg, v, target)
                if pending is not None:
                    _drop_replacement(dg, v, pending)
            finally:
                dg.catalog.finish_intent(name)
            raise
        if not was_mounted:
            _unmount_at(dg, v, target)
        dg.catalog.finish_intent(name)
        return _get(dg, name)


def _drop_replacement(dg: DiskGroup, v: VolumeRec, img: Path) -> None:
    """Detach and delete a replacement image a failed repair made (a failed replace leaves the device
    out of the filesystem, or the filesystem unmounted: either way nothing uses it)."""
    devs = loop.find(img)
    if devs and v.fstype == "btrfs":
        fs.forget_btrfs(devs, dg.runner)
    for d in devs:
        loop.detach(d, dg.runner)
    img.unlink(missing_ok=True)


def _unmount_at(dg: DiskGroup, v: VolumeRec, target: Path) -> None:
    fs.umount(target, dg.runner)
    _detach(dg, v, images(dg, v))
    try:
        target.rmdir()
    except OSError:
        pass
