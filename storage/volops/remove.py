"""Removing a volume: refused while in use, then rolled forward to the end once recorded."""

from __future__ import annotations

import time

from storage import crash, recovery, rvgrole, steps, trees
from storage.catalog.base import IntentRec
from storage.errors import InUse
from storage.group import DiskGroup


def remove(dg: DiskGroup, name: str, force: bool = False, _cascade: bool = False) -> None:
    """Remove the volume and free its space. Refused while mounted or snapshotted, unless ``force``."""
    with dg.locks.hold(name):
        if not _cascade:  # a disk group destroyed with --force goes with its RVG records
            rvgrole.refuse_reshape(dg, name, "removed")
        recovery.recover_held(dg, name)
        v = steps.get(dg, name)
        snaps = [s.name for s in dg.catalog.volumes() if s.snapshot_of == name]
        if snaps:
            raise InUse(f"volume {name} has snapshots ({', '.join(snaps)}); remove them first")
        if v.protect and not force:
            raise InUse(f"volume {name} is protected: its data is kept; `veritas vol rm --force {name}`"
                        " removes it and its data")
        in_use = dg.catalog.mounts(name)
        if (in_use or steps.is_mounted(dg, name)) and not force:
            where = sorted({m.node for m in in_use}) or [dg.node]
            raise InUse(f"volume {name} is mounted on {', '.join(where)}; unmount it first")
        mp = dg.mountpoint(name)
        if force:
            # unmount before recording anything, so a busy mount fails cleanly and changes nothing
            steps.unmount_kernel(dg, v)
            for m in in_use:
                dg.catalog.remove_mount(name, m.node, m.mount_id)
        dg.catalog.put_intent(IntentRec(name, "rm", {}, time.time()))
        dg.catalog.update_volume(name, state="removing")
        crash.point("rm.recorded")
        paths = steps.images(dg, v)
        steps.detach(dg, v, paths)
        crash.point("rm.detached")
        for p in paths:
            p.unlink(missing_ok=True)
        trees.remove(dg, v)  # an fstype=none volume's tree and quota
        crash.point("rm.images")
        dg.catalog.delete_volume(name)
        try:
            mp.rmdir()
        except OSError:
            pass
        crash.point("rm.done")
