"""VolumeDriver operations on the storage core, one method per Docker call, named after it."""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from plugin.docker_api import DOCKER_ID, ContainerUse, Engine
from plugin.lease import mount_when_released
from storage import diskgroup, options, ownership, qos, snapshots, volumes
from storage.catalog.base import CatalogStore, VolumeRec
from storage.config import Config
from storage.diskgroup import DiskGroup
from storage.errors import AlreadyExists, InUse, NoSuchVolume, VeritasError
from storage.runner import Runner, run
from storage.units import check_name, format_size

log = logging.getLogger("veritas.plugin")

# Docker mounts a container's volumes before it starts its process, whether the container is new or
# was stopped: containers in these states may be the one a Mount is for
PRELIMIT_STATES = ("created", "exited")
ALL_STATES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")


@dataclass
class Driver:
    config: Config
    engine: Engine | None = None
    store: CatalogStore | None = None  # where the disk group's catalog lives; None: the configured one
    runner: Runner = run  # what runs the disk group's commands (fast tests: a fake kernel)

    def __post_init__(self) -> None:
        self._dg: DiskGroup | None = None
        self._pid = -1
        self._lock = threading.Lock()

    @property
    def dg(self) -> DiskGroup:
        """The disk group, opened once per process (gunicorn forks workers after import)."""
        with self._lock:
            if self._dg is None or self._pid != os.getpid():
                self._dg = diskgroup.default_dg(self.config, self.runner, store=self.store)
                self._pid = os.getpid()
            return self._dg

    def _name(self, name: str) -> str:
        return check_name(name, "volume name")

    def _get(self, name: str) -> VolumeRec:
        v = self.dg.catalog.volume(self._name(name))
        if v is None or v.state == "removing":
            raise NoSuchVolume(f"no such volume: {name}")
        return v

    # ------------------------------------------------------------ calls

    def create(self, name: str, opts: dict[str, str]) -> None:
        """Make a volume or snapshot; every option is parsed (the whole spec) before any step runs."""
        self._name(name)
        spec = options.parse_create(opts)
        existing = self.dg.catalog.volume(name)
        if existing is not None and existing.state == "ok":
            options.require_same(existing, spec, opts)
            return
        try:
            if isinstance(spec, options.SnapshotSpec):
                snapshots.make(self.dg, spec.source, name, spec.cachesize, autogrow=spec.autogrow,
                               maxiops=spec.maxiops)
            else:
                volumes.make(self.dg, name, spec=spec)
        except AlreadyExists:
            # a concurrent identical Create (swarm, several workers) won the race
            winner = self.dg.catalog.volume(name)
            if winner is None:
                raise
            if winner.state != "ok":
                # make finished a killed operation's leftovers itself: this one is live and raced in
                raise InUse(f"volume {name} is {winner.state} in another operation; try again when it"
                            " has finished") from None
            options.require_same(winner, spec, opts)

    def remove(self, name: str) -> None:
        v = self._get(name)
        volumes.remove(self.dg, v.name)
        self._users_file(v.name).unlink(missing_ok=True)

    def mount(self, name: str, mount_id: str) -> str:
        v = self._get(name)
        mp = mount_when_released(self.dg, v.name, lambda: volumes.mount(self.dg, v.name, mount_id),
                                 self.config.cluster.mount_wait)
        if v.maxiops:
            self._prelimit_containers(v)
        return str(mp)

    def unmount(self, name: str, mount_id: str) -> None:
        v = self._get(name)
        volumes.umount(self.dg, v.name, mount_id)

    def path(self, name: str) -> str:
        v = self._get(name)
        return str(self.dg.mountpoint(v.name)) if volumes.is_mounted(self.dg, v.name) else ""

    def get(self, name: str) -> dict[str, Any]:
        """A volume another Create is still making is not there yet, as List has it: Docker asks Get
        before Create and sends no Create (so no options to compare) for a volume Get finds; a node
        whose Create races another's must reach Create, where options are compared (moby#31492)."""
        v = self._get(name)
        if v.state == "creating":
            raise NoSuchVolume(f"no such volume: {name} (still being created)")
        try:
            info = volumes.info(self.dg, v.name)
        except NoSuchVolume:
            raise  # removed since
        except (VeritasError, OSError) as exc:
            # the volume exists: never deny it because its details cannot be read now
            log.warning("Get %s: details unavailable: %s", v.name, exc)
            info = {"health": f"unknown ({exc})", "mounts": [asdict(m) for m in self.dg.catalog.mounts(v.name)],
                    "used": None, "snapshots": [], "cache_used": None}
        status: dict[str, Any] = {
            "diskgroup": self.dg.name,
            "size": format_size(v.size),
            "layout": v.layout,
            "fstype": v.fstype,
            "maxiops": v.maxiops,
            "protect": v.protect,
            "provisioning": v.provisioning,
            "health": info["health"],
            "attached": sorted({m["node"] for m in info["mounts"]}),
            "mounts": len(info["mounts"]),
        }
        held = ownership.holder(self.dg, v.name)
        if held is not None:  # several nodes: where it is attached, and until when that node's lease runs
            att, expires = held
            status["attachment"] = {"node": att.node, "since": _iso(att.since), "lease_expires": _iso(expires),
                                    "lease_live": expires > time.time(), "wanted_by": att.wanted_by}
        if info.get("shared_domain"):
            status["failure_domain"] = info["shared_domain"]
        if info["used"] is not None:
            status["used"] = format_size(info["used"])
        if v.snapshot_of:
            status["sourcevol"] = v.snapshot_of
            status["cachesize"] = format_size(v.cachesize)
            status["cache_used"] = format_size(info.get("cache_used") or 0)
            status["autogrow"] = v.autogrow
            status["state"] = "invalid" if v.invalid else "valid"
            if v.invalid:
                status["invalid"] = v.invalid
        if info["snapshots"]:
            status["snapshots"] = info["snapshots"]
        created = datetime.fromtimestamp(v.created, tz=UTC).isoformat(timespec="seconds")
        return {"Name": v.name, "Mountpoint": str(self.dg.mountpoint(v.name)), "CreatedAt": created,
                "Status": status}

    def list(self) -> builtins.list[dict[str, str]]:
        return [{"Name": r["name"], "Mountpoint": r["mountpoint"]}
                for r in volumes.list_volumes(self.dg) if r["state"] == "ok"]

    # ------------------------------------------------------------ maxiops

    def _prelimit_containers(self, v: VolumeRec) -> None:
        """Write the limit into the cgroups of containers that may be about to start with this volume.

        Docker mounts volumes before it starts the container's process, so a cgroup made now binds
        from the first I/O; the event follower covers containers whose cgroup lives elsewhere. Mount
        does not say which container it is for, so every stopped one using the volume gets its cgroup;
        Docker's runtime removes it when a container stops, the follower when one is removed unstarted.
        """
        if self.engine is None:
            return
        try:
            listed = self.engine.listed(v.name, states=ALL_STATES)
        except Engine.ERRORS as exc:
            # dockerd serves no API while it restores containers at its start, and it restores them by
            # mounting their volumes: limit the containers that used the volume at the last listing
            ids = self._remembered_users(v.name)
            log.warning("cannot list containers of %s for maxiops (%s); pre-limiting the %d container(s)"
                        " that used it at the last listing", v.name, exc, len(ids))
            users = [ContainerUse(i, "exited", 0, (v.name,), "") for i in ids]
        else:
            self._remember_users(v.name, [u.id for u in listed])
            users = [u for u in listed if u.state in PRELIMIT_STATES]
        for u in users:
            try:
                volumes.apply_maxiops(self.dg, v.name, qos.container_cgroup(u.cgroup_parent, u.id), create=True)
            except (OSError, VeritasError) as exc:
                log.warning("cannot pre-limit container %s of %s: %s", u.id[:12], v.name, exc)

    def _users_dir(self) -> Path:
        """Node-local (the state root, never the disk group's root, which other nodes may share)."""
        return self.config.state_root / "plugin" / self.dg.name / "docker-users"

    def _users_file(self, volume: str) -> Path:
        return self._users_dir() / volume

    def _remember_users(self, volume: str, ids: builtins.list[str]) -> None:
        """Keep the IDs of the containers that reference ``volume`` (a cache, rewritten at each listing)."""
        path = self._users_file(volume)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text("".join(f"{i}\n" for i in sorted(ids)))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot keep the containers of %s: %s", volume, exc)

    def _remembered_users(self, volume: str) -> builtins.list[str]:
        try:
            text = self._users_file(volume).read_text()
        except OSError:
            return []
        return [i for i in text.split() if DOCKER_ID.fullmatch(i)]

    def forget_gone_users(self) -> int:
        """Drop remembered containers Docker no longer has, and the cgroups made ahead for them."""
        if self.engine is None:
            return 0
        dropped = 0
        for path in self._users_dir().glob("[!.]*"):  # not a writer's temporary file
            volume = path.name
            ids = self._remembered_users(volume)
            gone = [i for i in ids if self.engine.inspect(i) is None]
            if gone:
                for i in gone:
                    release_prelimit(i)
                self._remember_users(volume, [i for i in ids if i not in gone])
                dropped += len(gone)
        return dropped


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="seconds")


def apply_container_limits(driver: Driver, container: str | None = None) -> int:
    """Apply maxiops of our volumes to running containers (one, or all); returns cgroups written."""
    if driver.engine is None:
        return 0
    if container is None:  # a catch-up after (re)connecting to the engine
        driver.forget_gone_users()
    uses = [driver.engine.inspect(container)] if container else driver.engine.users(states=("running",))
    written = 0
    h = qos.Hierarchy.detect()
    for use in uses:
        if use is None or use.pid <= 0:
            continue
        cg = qos.cgroup_of_pid(h, use.pid)
        if cg is None:
            continue
        stale = h.root / qos.container_cgroup(None, use.id)
        if cg != stale and stale.is_dir():
            try:  # pre-created by Mount under the default parent, but the container lives elsewhere
                stale.rmdir()
            except OSError:
                pass
        for name in use.volumes:
            v = driver.dg.catalog.volume(name)
            if v is None or not v.maxiops or not volumes.devices(driver.dg, v):
                continue  # unlimited, or attached on another node
            volumes.apply_maxiops(driver.dg, name, str(cg))
            written += 1
    return written


def release_prelimit(container_id: str) -> bool:
    """Remove the cgroup Mount made ahead for a container that is gone without running in it.

    Only an empty cgroup can be removed, so one still in use stays; returns whether one was removed.
    """
    try:
        h = qos.Hierarchy.detect()
        (h.root / qos.container_cgroup(None, container_id)).rmdir()
    except (OSError, VeritasError):
        return False
    log.info("removed the cgroup made ahead for container %s", container_id[:12])
    return True
