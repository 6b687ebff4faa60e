"""Growing a volume: reserve the room, then extend images and filesystem (storage.steps.grow_steps)."""

from __future__ import annotations

import time

from storage import crash, recovery, rvgrole, steps
from storage.catalog.base import IntentRec, VolumeRec
from storage.errors import Degraded, InvalidArgument, NoSpace, SnapshotInvalid
from storage.group import DiskGroup
from storage.kernel import alloc
from storage.units import format_size, parse_size


def grow(dg: DiskGroup, name: str, size: str | int) -> VolumeRec:
    """Grow the volume to ``size`` (online for XFS and btrfs)."""
    new = parse_size(size)
    with dg.locks.hold(name):
        rvgrole.refuse_reshape(dg, name, "grown")
        recovery.recover_held(dg, name)
        v = steps.ready(dg, name)
        if v.invalid:
            raise SnapshotInvalid(f"snapshot {name} is invalid and cannot grow: {v.invalid}")
        if new < v.size:
            raise InvalidArgument(f"volume {name} is {format_size(v.size, long=True)}; it cannot shrink to"
                                  f" {format_size(new, long=True)} (volumes only grow)")
        if new == v.size:
            return v
        eng = steps.engine_of(v)
        if steps.is_mounted(dg, name):
            eng.check_grow_online(steps.shape_of(v))
        if steps.health(dg, v)[0] != "ok":
            raise Degraded(f"volume {name} is degraded; run veritas vol repair {name} before growing it")
        sizes = eng.subdisk_sizes(new, steps.shape_of(v))
        if v.provisioning == "thick" and v.snapshot_of is None:
            _check_room(dg, v, sizes)
        dg.catalog.put_intent(IntentRec(name, "grow", {"size": new, "sizes": sizes}, time.time()))
        crash.point("grow.recorded")
        try:
            steps.reserve_growth(dg, name, sizes)
        except BaseException:
            dg.catalog.finish_intent(name)
            raise
        crash.point("grow.reserved")
        steps.grow_steps(dg, v, new)
        return steps.get(dg, name)


def _check_room(dg: DiskGroup, v: VolumeRec, sizes: list[int]) -> None:
    """A thick grow allocates the added range (storage.steps.grow_steps): refuse it before anything is
    recorded when a disk's filesystem lacks that room, whatever the accounting says, rather than fail
    halfway with a grow intent that recovery could not finish either."""
    for sd, sz in zip(dg.catalog.subdisks(v.name), sizes, strict=True):
        img = dg.image(sd.disk, v.name, sd.idx)
        need = sz - sd.size
        if need > 0 and alloc.free_bytes(img.parent) < need:
            raise NoSpace(f"disk {sd.disk}'s filesystem has {format_size(alloc.free_bytes(img.parent), long=True)}"
                          f" free, {format_size(need, long=True)} needed to grow thick volume {v.name};"
                          " free room on that disk or add a disk")
