"""Repairing a degraded redundant volume: its layout engine rebuilds each lost subdisk on another disk."""

from __future__ import annotations

import time
from pathlib import Path

from storage import crash, durable, recovery, steps
from storage.catalog.base import IntentRec, SubdiskRec, VolumeRec
from storage.errors import Degraded, InvalidArgument, NoSpace, SharedFailureDomain
from storage.group import DiskGroup
from storage.kernel import alloc, loop
from storage.layouts.base import LayoutEngine


def repair(dg: DiskGroup, name: str) -> VolumeRec:
    """Restore a degraded redundant volume: rebuild each lost subdisk on another disk."""
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)
        v = steps.ready(dg, name)
        eng = steps.engine_of(v)
        if not eng.redundant:
            raise InvalidArgument(f"volume {name} has layout {v.layout}, which keeps no redundancy to repair")
        state, lost = steps.health(dg, v)
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
        targets = _place_apart(dg, name, broken, [sd for sd in sds if sd not in broken], free, v.layout)
        mp = dg.mountpoint(name)
        was_mounted = steps.is_mounted(dg, name)
        target = mp if was_mounted else dg.scratch(f"repair-{name}")
        dg.catalog.put_intent(IntentRec(name, "repair", {"scratch": None if was_mounted else str(target)},
                                        time.time()))
        crash.point("repair.recorded")
        pending: Path | None = None  # a replacement image not yet in the catalog: ours to remove on failure
        try:
            if not was_mounted:
                v = steps.ensure_identity(dg, v)
                paths = [p for p in steps.images(dg, v) if p.exists()]
                devs = [loop.attach(p, dg.runner) for p in paths]
                eng.mount(devs, steps.shape_of(v), target, degraded=True, runner=dg.runner)
            for sd, disk in zip(broken, targets, strict=True):
                img = dg.image(disk, name, sd.idx)
                img.unlink(missing_ok=True)
                pending = img
                with open(img, "xb") as fh:
                    fh.truncate(sd.size)
                    if v.provisioning == "thick" and v.snapshot_of is None:  # as make made it
                        alloc.allocate(fh.fileno(), img, 0, sd.size)
                dev = loop.attach(img, dg.runner)
                eng.replace(sd.idx, dev, target, dg.runner)
                pending = None  # a member of the filesystem now: detaching it would hurt a mounted volume
                durable.sync_files([img])
                crash.point("repair.replaced")
                dg.catalog.update_subdisk(name, sd.idx, capacity=dg.capacity(), disk=disk)
            eng.restore_redundancy(steps.shape_of(v), target, dg.runner)
            if v.provisioning == "thick" and v.snapshot_of is None:
                # replace discarded what it did not write: fill the holes again (the room was found
                # before the replace; the filesystem's blocks are kept)
                for sd, disk in zip(broken, targets, strict=True):
                    img = dg.image(disk, name, sd.idx)
                    with open(img, "r+b") as fh:
                        alloc.allocate(fh.fileno(), img, 0, sd.size)
        except BaseException:
            try:
                if not was_mounted:
                    steps.unmount_at(dg, v, target)
                if pending is not None:
                    _drop_replacement(dg, v, pending)
            finally:
                dg.catalog.finish_intent(name)
            raise
        if not was_mounted:
            steps.unmount_at(dg, v, target)
        dg.catalog.finish_intent(name)
        return steps.get(dg, name)


def _drop_replacement(dg: DiskGroup, v: VolumeRec, img: Path) -> None:
    """Detach and delete a replacement image a failed repair made (a failed replace leaves the device
    out of the filesystem, or the filesystem unmounted: either way nothing uses it)."""
    steps.engine_of(v).detach(loop.find(img), steps.shape_of(v), dg.runner)
    img.unlink(missing_ok=True)


def _place_apart(dg: DiskGroup, name: str, broken: list[SubdiskRec], kept: list[SubdiskRec],
                 free: dict[str, int], layout: str) -> list[str]:
    """Disks for the lost copies outside the failure domains of the surviving ones (directory disks
    of one filesystem are one), unless the volume was made with its copies in one domain (forced)."""
    domains = dg.failure_domains()
    held = {domains.get(sd.disk, sd.disk) for sd in kept}
    sizes = [sd.size for sd in broken]
    if any(domains.get(sd.disk, sd.disk) in held for sd in broken):
        return LayoutEngine.place(sizes, free, layout)  # its copies shared a domain from the start
    apart = {d: n for d, n in free.items() if domains.get(d, d) not in held}
    try:
        return LayoutEngine.place(sizes, apart, layout, dg.name, domains)
    except (NoSpace, SharedFailureDomain):
        LayoutEngine.place(sizes, free, layout)  # no room on any disk: that NoSpace says so
    raise SharedFailureDomain(
        f"volume {name}: the disks with room for its lost copy share a failure domain with its surviving"
        " copy (directories of one filesystem); add a disk on another filesystem or device and repair again")
