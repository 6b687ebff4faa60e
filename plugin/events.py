"""Following Docker's event stream: IOPS limits for starting containers, orphan mount IDs for removed ones."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from plugin.docker_api import DOCKER_ID, Engine
from plugin.driver import Driver, apply_container_limits, release_prelimit
from plugin.reconcile import release_orphans
from storage.errors import VeritasError

log = logging.getLogger("veritas.plugin")


class EventFollower(threading.Thread):
    """Writes maxiops into each starting container's cgroup, releases mount IDs nobody will unmount and
    removes the cgroups made ahead for containers removed without starting.

    On every (re)connection it first catches up: limits for all running containers, orphans for all.
    """

    def __init__(self, driver: Driver, engine: Engine, on_lost: Callable[[], None] | None = None) -> None:
        super().__init__(name="iops-enforcer", daemon=True)
        self.driver = driver
        self.engine = engine
        self.on_lost = on_lost  # told when a connected stream ends: the engine may be gone (the lease keeper)
        self.stopping = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                # replayed from before the catch-up below: nothing falls between it and the stream
                events = self.engine.start_events(since=int(time.time()) - 1)
                self.connected.set()
                # catch up on containers that started (or went) while we were not listening
                apply_container_limits(self.driver)
                release_orphans(self.driver.dg, self.engine)
                for ev in events:
                    if self.stopping.is_set():
                        return
                    cid = ev.get("id") or ev.get("Actor", {}).get("ID")
                    if (ev.get("Action") or ev.get("status")) == "destroy":
                        release_orphans(self.driver.dg, self.engine)
                        if cid and DOCKER_ID.fullmatch(cid):
                            release_prelimit(cid)
                        continue
                    if cid:
                        try:
                            apply_container_limits(self.driver, cid)
                        except (VeritasError, OSError) as exc:
                            log.warning("maxiops for container %s: %s", cid[:12], exc)
            except (*Engine.ERRORS, VeritasError) as exc:
                log.debug("event stream unavailable: %s", exc)
            if self.connected.is_set() and not self.stopping.is_set():
                self.connected.clear()
                if self.on_lost is not None:
                    self.on_lost()
            self.stopping.wait(1.0)

    def stop(self) -> None:
        self.stopping.set()

