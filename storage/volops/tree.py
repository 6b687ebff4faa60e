"""Making an fstype=none volume: a directory tree on one disk's filesystem, held to its size by that
filesystem's quota (storage.trees). The intent protocol is make's: the catalog records the volume and
its intent in one step, so a killed make is rolled back (storage.recovery tears the tree down)."""

from __future__ import annotations

import time

from storage import crash, mountpoints, recovery, steps, trees
from storage.catalog.base import SubdiskRec, VolumeRec
from storage.errors import InvalidArgument
from storage.group import DiskGroup
from storage.layouts.base import LayoutEngine, mib
from storage.layouts.concat import MIN_SIZE
from storage.units import MiB


def make(dg: DiskGroup, name: str, size: int, maxiops: int, protect: bool) -> VolumeRec:
    """Create fstype=none volume ``name`` of ``size`` bytes (rounded up to MiB) on a disk that can hold
    a directory to a size. :raises InvalidArgument: when no disk can, saying why for each."""
    if size < MIN_SIZE:
        raise InvalidArgument(f"size must be at least {MIN_SIZE // MiB} MiB")
    limit = mib(size)
    with dg.locks.hold(name), mountpoints.claim(dg, name):
        recovery.check_free(dg, name)
        reasons = {d.name: trees.refusal(dg, d) for d in dg.catalog.disks()}
        able = {d for d, why in reasons.items() if why is None}
        if not able:
            raise InvalidArgument(trees.refusal_text([why for why in reasons.values() if why]
                                                     or [f"disk group {dg.name} has no disks"]))
        def plan() -> tuple[VolumeRec, list[SubdiskRec]]:
            free = {d: n for d, n in dg.free().items() if d in able}
            disk = LayoutEngine.place([limit], free, "concat", dg.name)[0]
            vol = VolumeRec(name, size, "concat", trees.FSTYPE, 1, 1, maxiops, None, 0, "creating",
                            time.time(), protect, provisioning="thin")
            return vol, [SubdiskRec(name, 0, disk, limit, limit)]

        _vol, sds = steps.record_new(dg, plan)
        disk = sds[0].disk
        crash.point("make.recorded")
        try:
            trees.create(dg, trees.path(dg, disk, name), limit)
            crash.point("make.tree")
        except BaseException:
            steps.teardown(dg, name)
            raise
        dg.catalog.finish_intent(name, {"state": "ok"})
        crash.point("make.done")
    return steps.get(dg, name)
