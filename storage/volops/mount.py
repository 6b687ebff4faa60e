"""Mounting and unmounting: one kernel mount per volume and node, counted by mount ID."""

from __future__ import annotations

import time
from pathlib import Path

from storage import crash, mountpoints, ownership, qos, recovery, rvgrole, steps, trees
from storage.catalog.base import IntentRec, MountRec
from storage.errors import Degraded, InUse, SnapshotInvalid
from storage.group import DiskGroup
from storage.kernel import loop

ADMIN_MOUNT_ID = "admin"

def mount(dg: DiskGroup, name: str, mount_id: str = ADMIN_MOUNT_ID, degraded: bool = False) -> Path:
    """Mount the volume at its mount point (once), and count ``mount_id`` as a user of it."""
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)  # a killed worker's umount is finished, not overwritten
        rvgrole.refuse_secondary(dg, name)  # replication writes it here: not even its record is live
        v = steps.ready(dg, name)
        if v.invalid:
            raise SnapshotInvalid(f"snapshot {name} is invalid and cannot be mounted: {v.invalid}; its data was"
                                  f" released, remove it (veritas vol rm {name})")
        mp = dg.mountpoint(name)
        ownership.claim(dg, name)  # attached here, or refused naming the node that holds it
        if steps.is_mounted(dg, name):
            dg.catalog.add_mount(MountRec(name, dg.node, mount_id, time.time()))
            return mp
        mountpoints.refuse_foreign(dg, v)
        foreign = [m for m in dg.catalog.mounts(name) if m.node != dg.node]
        if foreign:
            raise InUse(f"volume {name} is mounted on node {foreign[0].node}; unmount it there first")
        state, lost = steps.health(dg, v)
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
            v = steps.ensure_identity(dg, v)
            paths = [p for p in steps.images(dg, v) if p.exists()]
            devs = []
            for p in paths:
                dev, new = loop.attach_tracked(p, dg.runner)
                devs.append(dev)
                if new:
                    attached.append(dev)
            crash.point("mount.attached")
            mp.mkdir(parents=True, exist_ok=True)
            if trees.is_tree(v):  # no loop device, no filesystem of its own: the tree, bind-mounted
                trees.bind(dg, v, mp)
            else:
                steps.engine_of(v).mount(devs, steps.shape_of(v), mp, degraded=state == "degraded", runner=dg.runner)
            crash.point("mount.mounted")
            if trees.is_tree(v):
                pass  # its devices are the whole host filesystem's: no writeback limit in the root cgroup
            elif v.maxiops:
                qos.apply_writeback(qos.Hierarchy.detect(), [loop.devnum(d) for d in devs], v.maxiops)
            else:
                steps.drop_writeback(devs)
            dg.catalog.add_mount(MountRec(name, dg.node, mount_id, time.time()))
        except BaseException:
            steps.unmount_kernel(dg, v, only=attached)
            dg.catalog.finish_intent(name)
            if not [m for m in dg.catalog.mounts(name) if m.node == dg.node]:
                ownership.release(dg, name)
            raise
        dg.catalog.finish_intent(name)
        crash.point("mount.done")
        return mp


def umount(dg: DiskGroup, name: str, mount_id: str = ADMIN_MOUNT_ID, force: bool = False) -> bool:
    """Forget ``mount_id``; unmount and detach when it was the last user (or ``force``).

    Returns True when the filesystem was unmounted.
    """
    with dg.locks.hold(name):
        recovery.recover_held(dg, name)
        v = steps.get(dg, name)
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
            steps.unmount_kernel(dg, v)
        except InUse:
            dg.catalog.finish_intent(name)
            raise
        crash.point("umount.unmounted")
        for m in mine:
            dg.catalog.remove_mount(name, m.node, m.mount_id)
        ownership.release(dg, name)  # before the intent ends: a crash in between is rolled forward
        dg.catalog.finish_intent(name)
        return True
