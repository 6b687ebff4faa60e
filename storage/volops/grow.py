"""Growing a volume: reserve the room, then extend images and filesystem (storage.steps.grow_steps)."""

from __future__ import annotations

import time

from storage import crash, recovery, steps
from storage.catalog.base import IntentRec, VolumeRec
from storage.errors import Degraded, InvalidArgument, SnapshotInvalid
from storage.group import DiskGroup
from storage.units import format_size, parse_size


def grow(dg: DiskGroup, name: str, size: str | int) -> VolumeRec:
    """Grow the volume to ``size`` (online for XFS and btrfs)."""
    new = parse_size(size)
    with dg.locks.hold(name):
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
