"""Start-up reconciliation: rebuild the plugin's view before it serves Mount or Unmount.

Catalog, kernel and Docker can disagree after a crash, a reboot, a dockerd restart or a managed plugin's
forced disable or upgrade: volumes that containers still use but that are no longer mounted here are
mounted again, keeping their mount IDs; mount IDs whose filesystem is gone are dropped; Docker's mount
IDs of volumes no container of the engine uses are released, and a volume is unmounted when no mount ID
is left; stray loop devices and orphan images go (storage doctor). Mount IDs that are not Docker's
(``veritas vol mount``'s "admin") belong to an administrator and stay.

Docker is asked only through its container list, never inspect: inspect waits on the lock of a
container that is starting, and a starting container waits on its volume's Mount, which this plugin
answers only after reconciling. A busy volume is logged and left; it never stops the plugin.
"""

from __future__ import annotations

import logging

from plugin.docker_api import ACTIVE_STATES, DOCKER_ID, Engine
from storage import doctor, volumes
from storage.diskgroup import DiskGroup
from storage.errors import VeritasError

log = logging.getLogger("veritas.plugin")


def reconcile(dg: DiskGroup, engine: Engine | None) -> list[str]:
    in_use: set[str] | None = None
    if engine is not None and engine.reachable():
        try:
            in_use = engine.volumes_in_use(ACTIVE_STATES)
        except Engine.ERRORS as exc:
            log.warning("cannot list containers; keeping every mounted volume: %s", exc)
    actions = readopt(dg, in_use or set())
    actions += [str(f) for f in doctor.check(dg, repair=True) if f.fixed]
    for v in dg.catalog.volumes():
        if in_use is None or v.name in in_use or v.state != "ok" or not volumes.is_mounted(dg, v.name):
            continue
        try:
            actions += _release_unused(dg, v.name)
        except VeritasError as exc:
            log.warning("reconcile: left %s as it is: %s", v.name, exc)
    for a in actions:
        log.info("reconcile: %s", a)
    return actions


def _release_unused(dg: DiskGroup, name: str) -> list[str]:
    """Drop Docker's mount IDs of a volume no container of the engine uses: Docker will never send the
    Unmounts they wait for. Each goes on its own, so the volume is unmounted only when no mount ID is
    left, and an administrator's mount keeps it mounted."""
    counted = [m.mount_id for m in dg.catalog.mounts(name) if m.node == dg.node]
    docker_ids = [i for i in counted if DOCKER_ID.fullmatch(i)]
    if not counted:
        volumes.umount(dg, name, force=True)  # mounted, but nobody counted: nothing can ever unmount it
        return [f"unmounted {name}: mounted with no mount ID counted"]
    for mount_id in docker_ids:
        volumes.umount(dg, name, mount_id)
    if not docker_ids:
        return []
    kept = len(counted) - len(docker_ids)
    if kept:
        return [f"released {len(docker_ids)} Docker mount ID(s) of {name}: no container uses it;"
                f" it stays mounted for {kept} other mount ID(s)"]
    return [f"unmounted {name}: mounted for {len(docker_ids)} Docker mount ID(s) but no container uses it"]


def readopt(dg: DiskGroup, in_use: set[str]) -> list[str]:
    """Mount again the volumes that containers still use but that are not mounted here.

    A managed plugin mounts under its propagated mount, which Docker unmounts when it force-disables or
    upgrades the plugin. Running containers keep the filesystem through their own mount namespaces (its
    loop devices stay attached, so mounting again shares that filesystem), and Docker will send their
    Unmounts later. Without this the counted mount IDs would be dropped as stale: the volume would look
    unused while a container writes to it, and a snapshot would not freeze it.
    """
    actions: list[str] = []
    for v in dg.catalog.volumes():
        ids = [m.mount_id for m in dg.catalog.mounts(v.name) if m.node == dg.node]
        if v.state != "ok" or v.name not in in_use or not ids or volumes.is_mounted(dg, v.name):
            continue
        try:
            volumes.mount(dg, v.name, ids[0])
        except VeritasError as exc:
            log.warning("cannot mount %s again for the containers using it: %s", v.name, exc)
            continue
        actions.append(f"mounted {v.name} again: {len(ids)} mount ID(s) of running containers")
    return actions


def release_orphans(dg: DiskGroup, engine: Engine) -> list[str]:
    """Release Docker's mount IDs of volumes that no container of the engine references any more.

    Docker sends no Unmount for mounts it forgot (its own crash, containers it killed while restoring),
    and once no container references a volume, no Unmount can come for it. Each ID is released on its
    own, never forced: a Mount that raced in between stays counted and keeps the volume mounted.
    """
    actions: list[str] = []
    for v in dg.catalog.volumes():
        ids = [m.mount_id for m in dg.catalog.mounts(v.name)
               if m.node == dg.node and DOCKER_ID.fullmatch(m.mount_id)]
        if not ids or engine.users(v.name):
            continue
        try:
            for mount_id in ids:
                volumes.umount(dg, v.name, mount_id)
        except VeritasError as exc:
            log.warning("cannot release mount IDs of %s: %s", v.name, exc)
            continue
        actions.append(f"released {len(ids)} mount ID(s) of {v.name}: no container references it")
    for a in actions:
        log.info("reconcile: %s", a)
    return actions
