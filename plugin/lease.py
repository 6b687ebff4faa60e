"""The node's lease in the disk group, and self-fencing (issue 10).

The serving process renews this node's lease every ``lease_interval`` seconds (LeaseKeeper, two
threads). While it lives, the volumes attached here are this node's alone (storage.ownership).

Self-fencing: renewals may fail (the catalog unreachable or erroring) while the lease still runs in the
catalog; another node takes the volumes when it has run out. So once ``fence_after`` seconds
(``lease_ttl / 2``) have passed since the start of the last renewal that succeeded, this node stops
writing, with no help from the catalog: it stops the containers that use its volumes (Docker API, a
quarter of lease_ttl before Docker kills them), kills what still runs in those containers' cgroups,
and unmounts the volumes. That leaves ``fence_margin`` (the other half of the TTL) for all of it,
measured on this node's monotonic clock from before the renewal was sent, so clock offsets and a slow
catalog only make it earlier. When the catalog answers again the fenced volumes are released there.

Engine gone: when this node's dockerd does not answer for ``engine_grace`` seconds (the grace, 5 s
by default: a dockerd restarting faster than that is left alone; renewals come every quarter second
meanwhile) and a volume attached
here is wanted by another node, the processes of the containers that used it (found through their
cgroups: the engine is dead, its containers run on) are killed, the volume is unmounted and released.
An engine that comes back within the grace costs nothing.

At start (``adopt``) volumes this node's catalog records say it mounted are checked: one another node
holds now is never touched again (no mkfs, no repair, no writes); what still runs on it here is
stopped, its mount point is unmounted and the node's stale mount records dropped.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from plugin.docker_api import ACTIVE_STATES, Engine
from storage import diskgroup, ownership, volumes
from storage.catalog.base import AttachRec, Catalog
from storage.config import Config
from storage.diskgroup import DiskGroup
from storage.errors import AttachedElsewhere, InUse, LeaseStale, VeritasError
from storage.group import store_of
from storage.kernel import mounts

log = logging.getLogger("veritas.plugin")
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


def container_pids(ids: set[str]) -> list[int]:
    """PIDs whose cgroup path names one of the container IDs (Docker's cgroupfs and systemd drivers
    both put the full ID in the container's cgroup), read from /proc: no engine needed."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            text = Path(f"/proc/{entry}/cgroup").read_text()
        except OSError:
            continue
        if set(_CONTAINER_ID.findall(text)) & ids:
            out.append(int(entry))
    return out


def device_users(sources: set[tuple[str, str]]) -> list[int]:
    """PIDs of container processes in other mount namespaces than ours that have one of ``sources``
    (a filesystem's "major:minor" and a root within it, or below) mounted, from /proc/PID/mountinfo: the
    kernel's word on who can still write to a volume, whether or not the engine told us of them."""
    if not sources:
        return []
    try:
        own = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return []

    def holds(e: mounts.MountEntry) -> bool:
        return any(e.major_minor == dev and (root == "/" or e.root == root or e.root.startswith(root + "/"))
                   for dev, root in sources)

    seen: dict[int, bool] = {}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/mnt").st_ino
            if ns == own:
                continue
            if ns not in seen:
                seen[ns] = any(holds(e) for e in mounts.table(int(entry)))
        except OSError:
            continue
        if seen[ns] and _in_a_container(int(entry)):
            out.append(int(entry))
    return out


def _in_a_container(pid: int) -> bool:
    """The process's cgroup names a container (by its 64-hex ID): an engine's, a node's init or a
    plugin is never one, though on one kernel their mount namespaces may show the volume by propagation."""
    try:
        return _CONTAINER_ID.search(Path(f"/proc/{pid}/cgroup").read_text()) is not None
    except OSError:
        return False


def kill_containers(ids: set[str], timeout: float = 5.0, devices: set[tuple[str, str]] | None = None) -> list[int]:
    """SIGKILL every process of the containers ``ids``, and every process of another mount namespace
    that has one of ``devices`` mounted (again until none is left, as they may fork)."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in container_pids(ids) + device_users(devices or set()) if _running(p)]
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
                killed.append(p)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return killed


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def unmount_point(mp: Path) -> bool:
    """Unmount what is mounted at ``mp`` (the kernel only: no catalog, no loop device detached, so
    nothing another node may share is touched). False if it is still mounted."""
    import subprocess

    for _ in range(20):
        if mounts.mounted_at(mp) is None:
            return True
        subprocess.run(["umount", str(mp)], capture_output=True, check=False)
        if mounts.mounted_at(mp) is None:
            return True
        time.sleep(0.1)
    return mounts.mounted_at(mp) is None


T = TypeVar("T")


def mount_when_released(dg: DiskGroup, name: str, mount: Callable[[], T], wait: float,
                        clock: Callable[[], float] = time.monotonic, poll: float = 0.2) -> T:
    """``mount()``, and while it is refused because another node holds the volume (or this node's own
    lease awaits its next renewal), again every ``poll`` seconds for up to ``wait`` seconds (mount_wait:
    by then the holder has released it, or its lease has run out), then the refusal.

    Why wait here rather than refuse at once: a refused Mount fails the swarm task, and swarm starts a
    new one only after the service's restart delay (5 s by default). The refusal recorded that this node
    wants the volume, so a holder whose engine is gone lets it go within seconds, and a dead holder's
    lease runs out within ``lease_ttl``: the Mount that waits gets the volume as soon as it is free.
    Docker gives a Mount two minutes. Each try takes the volume's lock anew, so the holder's release is
    never blocked by the waiting node."""
    deadline = clock() + wait
    while True:
        try:
            return mount()
        except InUse as exc:
            if clock() >= deadline:
                raise
            # waiting on our own renewal, or on a holder refused just now, is always worth it: that
            # holder's attachment may already be gone when looked at again (its lease ran out or it
            # released), and then the next try gets the volume
            if not isinstance(exc, (LeaseStale, AttachedElsewhere)):
                held = ownership.holder(dg, name)
                if held is None or held[0].node == dg.node:
                    raise
            time.sleep(poll)


class LeaseKeeper:
    """Renews this node's lease in the configured disk group and fences the node when it cannot."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 open_catalog: Callable[[], Catalog] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self._open_catalog = open_catalog or (lambda: store_of(config).open(config.diskgroup))
        self.node = config.node
        self.settings = config.cluster
        self.clock = clock
        self.wall = wall  # time.time(), for the catalog: the lease runs from when the renewal was sent
        self.stop_timeout = max(1, int(self.settings.lease_ttl / 4))
        self.engine = Engine(config.plugin.docker_host, config.plugin.driver, timeout=self.stop_timeout + 3.0)
        self.last_ok: float | None = None  # clock() before the last renewal that succeeded
        self.held: dict[str, AttachRec] = {}  # volumes attached here, as last read
        self.containers: dict[str, set[str]] = {}  # volume -> IDs of this engine's containers using it
        self.fenced: set[str] = set()  # volumes unmounted by fencing, to release once the catalog answers
        self.engine_down_since: float | None = None
        self.idle_wanted: set[str] = set()  # volumes held here, wanted elsewhere, with no container at the last look
        self.peers: set[str] = set()  # other nodes with a lease in the disk group: fencing is for them
        self._stop = threading.Event()
        self._renewed = threading.Event()  # set by each renewal that succeeded, for _follower
        self._engine_poked = threading.Event()  # set by engine_lost, for _follower
        self._lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- renewals

    def _cat(self) -> Catalog:
        if self._catalog is None:
            self._catalog = self._open_catalog()
        return self._catalog

    def renew(self) -> bool:
        """One renewal; True when it succeeded. Refreshes what is attached here."""
        t0, sent = self.clock(), self.wall()
        try:
            cat = self._cat()
            cat.renew_lease(self.node, self.settings.lease_ttl, sent=sent)
            atts = cat.attachments()
            held = {a.volume: a for a in atts if a.node == self.node}
            # a lease that ran out (a stalled renewal) took its attachments with it; volumes still
            # mounted here that no node holds are attached again (a compare-and-set: never another's)
            orphans = (self.mounted_here() & {m.volume for m in cat.mounts() if m.node == self.node}) \
                - {a.volume for a in atts}
            for name in sorted(orphans):
                try:
                    held[name] = cat.attach(name, self.node)
                    log.warning("lease: %s is mounted here but was attached nowhere: attached again", name)
                except VeritasError as exc:
                    log.error("lease: %s is mounted here but cannot be attached again: %s", name, exc)
            peers = {rec.node for rec in cat.leases() if rec.node != self.node}
        except (VeritasError, OSError) as exc:
            log.warning("lease: renewal in disk group %s failed: %s", self.config.diskgroup, exc)
            if self._catalog is not None:
                try:
                    self._catalog.close()
                except Exception:  # a broken connection may fail to close too
                    pass
                self._catalog = None
            return False
        with self._lock:
            self.last_ok = t0
            self.held = held
            self.peers = peers
        return True

    def next_wait(self) -> float:
        """Seconds to the next renewal: ``lease_interval``, but a quarter second while this node's engine
        does not answer, so that a peer's want (read at each renewal) is seen, and the volume released,
        within a fraction of a second rather than of a lease_interval."""
        return min(0.25, self.settings.lease_interval) if self.engine_down_since is not None \
            else self.settings.lease_interval

    def _renewer(self) -> None:
        """Renew, and only renew: what follows a renewal (asking the engine, releasing volumes) runs in
        ``_follower``. A Docker engine that is starting accepts connections and answers seconds later,
        and a release waits for the volume's lock: on this thread either would hold renewals back past
        ``fence_after`` and fence a node whose catalog answers."""
        while not self._stop.wait(self.next_wait()):
            if self.renew():
                self._renewed.set()

    def _follower(self) -> None:
        while not self._stop.is_set():
            if self._engine_poked.is_set():
                self._engine_poked.clear()
                self.note_engine()
            if not self._renewed.wait(timeout=0.25):
                continue
            self._renewed.clear()
            try:
                self._after_renewal()
            except (VeritasError, OSError) as exc:
                log.warning("lease: %s", exc)

    def engine_lost(self) -> None:
        """The engine's event stream ended (dockerd died or restarts): look at the engine within a
        quarter second rather than at the next renewal, so that the grace starts when the engine went,
        not up to a lease_interval later. Called from another thread; the look runs on _follower's."""
        self._engine_poked.set()

    def note_engine(self) -> None:
        """Start the grace now if the engine does not answer; nothing else (decisions follow renewals)."""
        if self.engine_down_since is None and not self.engine.reachable():
            self._engine_went(self.clock())

    def _engine_went(self, now: float) -> None:
        self.engine_down_since = now
        log.warning("lease: the Docker engine does not answer; its containers run on")

    def _after_renewal(self) -> None:
        with self._lock:
            fenced, self.fenced = self.fenced, set()
        if fenced:
            self._release(fenced, "fenced while the catalog did not answer")
        self._watch_engine()

    # ---------------------------------------------------------------- fencing

    def _watchdog(self) -> None:
        tick = min(0.25, self.settings.lease_interval / 2)
        while not self._stop.wait(tick):
            self.check()

    def check(self) -> set[str]:
        """Fence now if the last renewal that succeeded started ``fence_after`` ago or more; the volumes
        fenced (none while a peer could not take them anyway: fencing is for nodes that share)."""
        with self._lock:
            last, held, peers = self.last_ok, set(self.held), set(self.peers)
        if last is None or not peers or self.clock() - last < self.settings.fence_after:
            return set()
        with self._lock:
            todo = (held | self.mounted_here()) - self.fenced
        if not todo:
            return set()
        log.error("lease: no renewal for %.1f s (lease_ttl %.1f s): fencing this node, stopping what uses %s",
                  self.clock() - last, self.settings.lease_ttl, ", ".join(sorted(todo)))
        stuck = self.fence(todo)  # those stay held: the next tick tries again
        todo -= stuck
        with self._lock:
            self.fenced |= todo
            self.held = {k: v for k, v in self.held.items() if k not in todo}
        return todo

    def mounted_here(self) -> set[str]:
        """Volumes of the disk group mounted at this node's mount points now (the kernel's word): one
        mounted since the last renewal read the attachments is fenced too."""
        suffix = f"_{self.config.diskgroup}"
        out = set()
        for e in mounts.table():
            t = Path(e.target)
            if t.parent == self.config.mount_root and t.name.endswith(suffix):
                out.add(t.name[: -len(suffix)])
        return out

    def fence(self, names: set[str], engine_alive: bool = True, by_device: bool = True) -> set[str]:
        """Stop everything that writes to ``names`` on this node and unmount them, without the catalog;
        returns those still mounted (something here may still write: they must not be released).
        ``by_device``: also kill what has the volume's filesystem mounted in other mount namespaces; only
        while this node holds the attachment (no other node may then have it mounted: on one kernel, as
        in the lab, another node's mount of the same volume shows the same device).

        Docker is asked to stop the containers (their own stop signal first), but never waited on: a
        stop waits for the volume's Unmount, which may be waiting on the very catalog that failed. After
        ``stop_timeout`` what still runs in the containers' cgroups is killed, then the volumes unmounted.
        """
        ids: set[str] = set()
        for name in names:
            ids |= self.containers.get(name, set())
        if engine_alive:
            for name in names:
                try:
                    ids |= {u.id for u in self.engine.listed(name, ACTIVE_STATES)}
                except Engine.ERRORS as exc:
                    log.warning("lease: cannot list the containers using %s: %s", name, exc)
            for cid in ids:
                threading.Thread(target=self._stop_container, args=(cid,), daemon=True).start()
            deadline = self.clock() + self.stop_timeout + 0.5
            while self.clock() < deadline and [p for p in container_pids(ids) if _running(p)]:
                time.sleep(0.05)
        devices = set()
        for name in names if by_device else ():
            entry = mounts.mounted_at(self.config.mount_root / f"{name}_{self.config.diskgroup}")
            if entry is not None:  # the root tells one subtree (an fstype=none volume) from the rest
                devices.add((entry.major_minor, entry.root))
        killed = kill_containers(ids, devices=devices)
        if killed:
            log.warning("lease: killed %d process(es) of containers using %s", len(killed), ", ".join(sorted(names)))
        stuck = set()
        for name in sorted(names):
            mp = self.config.mount_root / f"{name}_{self.config.diskgroup}"
            if unmount_point(mp):
                log.warning("lease: %s unmounted from %s", name, mp)
            else:
                log.error("lease: %s is still mounted at %s after fencing", name, mp)
                stuck.add(name)
        return stuck

    def _stop_container(self, cid: str) -> None:
        try:
            self.engine.client.api.stop(cid, timeout=self.stop_timeout)
            log.warning("lease: stopped container %s", cid[:12])
        except Engine.ERRORS as exc:
            log.warning("lease: stopping container %s: %s", cid[:12], exc)

    def _release(self, names: set[str], why: str) -> None:
        """Forget volumes this node no longer uses, in the catalog: unmount what is left when the volume is
        still ours, only drop this node's mount records when another node holds it now."""
        dg = diskgroup.DiskGroup(self.config, self.config.diskgroup)
        try:
            for name in sorted(names):
                with dg.locks.hold(name):
                    att = next((a for a in dg.catalog.attachments() if a.volume == name), None)
                    if att is None or att.node == self.node:
                        if dg.catalog.volume(name) is not None:
                            volumes.umount(dg, name, force=True)
                        dg.catalog.detach(name, self.node)
                    else:
                        for m in dg.catalog.mounts(name):
                            if m.node == self.node:
                                dg.catalog.remove_mount(name, m.node, m.mount_id)
                log.warning("lease: released %s (%s)", name, why)
        finally:
            dg.close()

    # ---------------------------------------------------------------- engine gone

    def _watch_engine(self) -> None:
        alive = self.engine.reachable()
        if alive:
            self.engine_down_since = None
            idle = set()
            for name, att in self.held.items():
                try:
                    self.containers[name] = {u.id for u in self.engine.listed(name, ACTIVE_STATES)}
                except Engine.ERRORS:
                    continue
                if not self.containers[name] and att.wanted_by is not None:
                    idle.add(name)
            # idle at two renewals in a row (not a Mount whose container is being made): a dockerd that
            # restarted ends its containers (swarm mode forbids live-restore) but never sends Unmount
            stale, self.idle_wanted = idle & self.idle_wanted, idle
            if stale:
                self._release(stale, "wanted elsewhere and no container of this engine uses it")
                with self._lock:
                    for name in stale:
                        self.held.pop(name, None)
                        self.containers.pop(name, None)
            return
        now = self.clock()
        if self.engine_down_since is None:
            self._engine_went(now)
            return
        if now - self.engine_down_since < self.settings.engine_grace:
            return  # within the grace: a restarting engine is left alone
        wanted = {name for name, a in self.held.items() if a.wanted_by is not None}
        if not wanted:
            return
        log.error("lease: the Docker engine is gone for %.1f s and node(s) %s want %s: killing what uses them",
                  now - self.engine_down_since, ", ".join(sorted({str(self.held[n].wanted_by) for n in wanted})),
                  ", ".join(sorted(wanted)))
        stuck = self.fence(wanted, engine_alive=False)
        if stuck:
            log.error("lease: not releasing %s: still mounted here; retrying", ", ".join(sorted(stuck)))
        wanted -= stuck
        if not wanted:
            return
        self._release(wanted, "wanted elsewhere while this node's engine is gone")
        with self._lock:
            for name in wanted:
                self.held.pop(name, None)
                self.containers.pop(name, None)

    # ---------------------------------------------------------------- start and stop

    def adopt(self, dg: DiskGroup) -> list[str]:
        """At start: volumes this node has mount records of are attached here again, or, when another
        node holds them now, left alone: their use here is stopped and the records dropped."""
        actions: list[str] = []
        if not dg.catalog.leases():
            return actions
        attached = {a.volume: a.node for a in dg.catalog.attachments()}
        lease_of = {rec.node: rec for rec in dg.catalog.leases()}
        now = time.time()
        # by its mount records, and by the kernel: the taker dropped the records of a node that expired
        mine = {m.volume for m in dg.catalog.mounts() if m.node == self.node}
        mine |= {n for n in self.mounted_here() if dg.catalog.volume(n) is not None}
        for name in sorted(mine):
            holder = attached.get(name)
            other_live = holder not in (None, self.node) and lease_of.get(str(holder)) is not None \
                and lease_of[str(holder)].expires > now
            if not other_live:
                try:
                    with dg.locks.hold(name):
                        dg.catalog.attach(name, self.node)
                    continue
                except VeritasError as exc:
                    log.warning("lease: cannot attach %s again: %s", name, exc)
            self.fence({name}, by_device=False)  # the holder's containers may show the same device
            with dg.locks.hold(name):
                for m in dg.catalog.mounts(name):
                    if m.node == self.node:
                        dg.catalog.remove_mount(name, m.node, m.mount_id)
            actions.append(f"{name} is attached on node {holder} now: left alone, this node's mount records dropped")
        for a in actions:
            log.warning("lease: %s", a)
        return actions

    def start(self) -> None:
        if not self.renew():
            log.warning("lease: first renewal failed; retrying every %.1f s", self.settings.lease_interval)
        for target in (self._renewer, self._follower, self._watchdog):
            t = threading.Thread(target=target, name=f"lease-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """End the threads. The lease is dropped only when nothing is attached here: a plugin restarting
        under running containers keeps its volumes for the TTL."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        try:
            cat = self._cat()
            if not [a for a in cat.attachments() if a.node == self.node]:
                cat.drop_lease(self.node)
        except (VeritasError, OSError) as exc:
            log.warning("lease: not dropped: %s", exc)
        if self._catalog is not None:
            self._catalog.close()
