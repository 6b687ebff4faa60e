"""IOPS limits: the volume's recorded limit, written live into the cgroups that limit it."""

from __future__ import annotations

from storage import options, qos, steps, trees
from storage.catalog.base import VolumeRec
from storage.errors import InvalidArgument
from storage.group import DiskGroup
from storage.kernel import loop


def set_maxiops(dg: DiskGroup, name: str, iops: int | str) -> VolumeRec:
    """Change the volume's IOPS limit, live in every cgroup that already limits it."""
    value = options.int_option("maxiops", iops, allow_zero=True)
    with dg.locks.hold(name):
        v = steps.ready(dg, name)
        dg.catalog.update_volume(name, maxiops=value)
        # an fstype=none volume's devices carry other volumes' I/O too: the cgroups limiting them are not
        # all this volume's, so its new limit reaches its containers as they (re)start (plugin Mount)
        devs = [] if trees.is_tree(v) else steps.devices(dg, v)
        if devs:
            h = qos.Hierarchy.detect()
            nums = [loop.devnum(d) for d in devs]
            targets = set(qos.cgroups_limiting(h, nums))
            if steps.is_mounted(dg, name) and h.version == 1:
                targets.add(h.root)  # the writeback path
            for cg in targets:
                qos.set_limit(h, cg, nums, value)
        return steps.get(dg, name)


def apply_maxiops(dg: DiskGroup, name: str, cgroup: str, create: bool = False) -> list[tuple[int, int]]:
    """Write the volume's IOPS limit for its loop devices into ``cgroup`` (e.g. a container's).

    ``create`` makes the cgroup first: a limit in a cgroup made before its process starts binds from
    that process's first I/O.
    """
    v = steps.ready(dg, name)
    devs = steps.devices(dg, v)
    if not devs:
        raise InvalidArgument(f"volume {name} is not attached on this node; mount it first")
    h = qos.Hierarchy.detect()
    target = h.resolve(cgroup)
    if create:
        target.mkdir(parents=True, exist_ok=True)
    nums = [loop.devnum(d) for d in devs]
    qos.set_limit(h, target, nums, v.maxiops)
    return nums
