"""Event-driven detection, the counterpart of the vendor's IMF: a watcher that follows each engine's
event stream (container ``die`` and ``health_status`` events) and each daemon's process (a pidfd), and
tells the cluster engine at once when a resource registered as expected online dies, instead of
waiting for the next monitor. The agents work without it, by polling monitor.

Which resources to follow comes from the registrations the agents write (agents.registry); a
notifier decides what "tell the cluster" means: Pacemaker's ``crm_resource --fail``, or a record for
tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agents import procs, registry
from agents.params import API_VERSION

log = logging.getLogger("veritas.agents.watch")


class Notifier(Protocol):
    def fail(self, resource: str, reason: str) -> None: ...


@dataclass
class Recording:
    """A notifier that records (resource, reason, time.monotonic()) and wakes waiters; for tests."""

    calls: list[tuple[str, str, float]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def fail(self, resource: str, reason: str) -> None:
        with self.cond:
            self.calls.append((resource, reason, time.monotonic()))
            self.cond.notify_all()

    def wait_for(self, resource: str, timeout: float) -> tuple[str, str, float] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = next((c for c in self.calls if c[0] == resource), None)
                left = deadline - time.monotonic()
                if hit or left <= 0:
                    return hit
                self.cond.wait(left)


class Pacemaker:
    """Fails the resource in Pacemaker (``crm_resource --fail --resource R --node N``) so it recovers
    now rather than at the next monitor interval."""

    def __init__(self, node: str | None = None, crm_resource: str = "crm_resource") -> None:
        self.node = node
        self.crm_resource = crm_resource

    def argv(self, resource: str) -> list[str]:
        node = self.node or self._local_node()
        return [self.crm_resource, "--fail", "--resource", resource, "--node", node]

    @staticmethod
    def _local_node() -> str:
        out = subprocess.run(["crm_node", "-n"], capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or os.uname().nodename

    def fail(self, resource: str, reason: str) -> None:
        argv = self.argv(resource)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if r.returncode != 0:
            log.error("%s failed (%s): %s", " ".join(argv), r.returncode, r.stderr.strip())
        else:
            log.info("failed %s in Pacemaker: %s", resource, reason)


class Watcher:
    """Follows the registered resources and notifies once per registration when one dies."""

    def __init__(self, notifier: Notifier, state: Path | None = None, rescan: float = 0.25) -> None:
        self.notifier = notifier
        self.state = state
        self.rescan = rescan
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._engines: dict[str, Any] = {}  # url -> the open event stream (closed to stop)
        self._engine_threads: dict[str, threading.Thread] = {}
        self._notified: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self.ready = threading.Event()  # set while some engine is registered and all their streams are open

    # -- notifying
    def _notify(self, resource: str, reason: str, check: dict[str, Any] | None = None) -> None:
        rec = registry.read(resource, self.state)  # fresh: an offline started since means "intended"
        if rec is None or rec.get("expect") != "online":
            return
        if check and any(rec.get(k) != v for k, v in check.items()):
            return
        key = (resource, int(rec.get("generation", 0)))
        with self._lock:
            if key in self._notified:
                return
            self._notified.add(key)
        log.warning("%s died: %s", resource, reason)
        try:
            self.notifier.fail(resource, reason)
        except Exception:
            log.exception("notifier failed for %s", resource)

    # -- engines
    def _follow_engine(self, url: str) -> None:
        import docker

        while not self._stop.is_set():
            try:
                # no read timeout: a quiet engine sends nothing for hours, and a reconnect could miss an event
                api = docker.APIClient(base_url=url, version=API_VERSION, timeout=None)  # type: ignore[arg-type]
                stream = api.events(decode=True, filters={"type": "container", "event": ["die", "health_status"]})
                self._engines[url] = stream
                self._update_ready()
                for ev in stream:
                    self._on_event(url, ev)
                    if self._stop.is_set():
                        break
            except Exception as exc:  # engine down or restarting: retry (its daemon resource reports it)
                log.debug("events from %s: %s", url, exc)
            self._engines.pop(url, None)
            self._stop.wait(0.5)

    def _on_event(self, url: str, ev: dict[str, Any]) -> None:
        action = str(ev.get("Action") or ev.get("status") or "")
        attrs = (ev.get("Actor") or {}).get("Attributes") or {}
        name = attrs.get("name")
        if action == "die":
            why = f"container {name} died (exit code {attrs.get('exitCode', '?')})"
        elif action.startswith("health_status") and action.endswith("unhealthy"):
            why = f"container {name} became unhealthy"
        else:
            return
        for rec in registry.read_all(self.state):
            if rec.get("kind") == "DockerContainer" and rec.get("name") == name and rec.get("docker_host") == url:
                self._notify(str(rec["resource"]), why, {"name": name, "docker_host": url})

    def _update_ready(self) -> None:
        urls = {r.get("docker_host") for r in registry.read_all(self.state)
                if r.get("kind") == "DockerContainer" and r.get("expect") == "online"}
        if urls and all(u in self._engines for u in urls):
            self.ready.set()
        else:
            self.ready.clear()

    # -- daemons
    def _follow_daemons(self) -> None:
        poller = select.poll()
        fds: dict[int, tuple[str, int, int]] = {}  # fd -> (resource, pid, generation)
        watching: dict[tuple[str, int], int] = {}
        while not self._stop.is_set():
            regs = [r for r in registry.read_all(self.state) if r.get("kind") == "DockerDaemon"
                    and r.get("expect") == "online" and isinstance(r.get("pid"), int)]
            want = {(str(r["resource"]), int(r["pid"])): int(r.get("generation", 0)) for r in regs}
            for key, gen in want.items():
                if key in watching:
                    continue
                res, pid = key
                try:
                    fd = os.pidfd_open(pid)
                except OSError:  # already gone
                    self._notify(res, f"dockerd pid {pid} is gone", {"pid": pid})
                    continue
                if not (procs.runs_binary(pid, str(next(r for r in regs if r["resource"] == res)["binary"]))):
                    os.close(fd)  # the PID was reused: the registered daemon is gone
                    self._notify(res, f"dockerd pid {pid} is gone", {"pid": pid})
                    continue
                fds[fd] = (res, pid, gen)
                watching[key] = fd
                poller.register(fd, select.POLLIN)
            for key, fd in list(watching.items()):
                if key not in want:
                    poller.unregister(fd)
                    os.close(fd)
                    del fds[fd], watching[key]
            for fd, _ in poller.poll(int(self.rescan * 1000)):
                res, pid, _gen = fds[fd]
                self._notify(res, f"dockerd pid {pid} exited", {"pid": pid})
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
                # keep it in ``watching`` so the same registration is not re-armed
        for fd in fds:
            os.close(fd)

    def _scan_engines(self) -> None:
        while not self._stop.is_set():
            for r in registry.read_all(self.state):
                url = r.get("docker_host")
                if r.get("kind") == "DockerContainer" and r.get("expect") == "online" and isinstance(url, str) \
                        and url not in self._engine_threads:
                    t = threading.Thread(target=self._follow_engine, args=(url,), daemon=True,
                                         name=f"events {url}")
                    self._engine_threads[url] = t
                    t.start()
            self._update_ready()
            self._stop.wait(self.rescan)

    def start(self) -> Watcher:
        for target, name in ((self._scan_engines, "engines"), (self._follow_daemons, "daemons")):
            t = threading.Thread(target=target, daemon=True, name=f"watch {name}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for stream in list(self._engines.values()):
            try:
                stream.close()
            except Exception:  # closing a dead stream
                pass
        for t in [*self._threads, *self._engine_threads.values()]:
            t.join(timeout=5)

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python3 -m agents.watch --notifier pacemaker [--node N]``: run until signalled."""
    p = argparse.ArgumentParser(prog="veritas-agent-watch", description=__doc__.split("\n\n")[0])
    p.add_argument("--notifier", choices=["pacemaker", "log"], default="pacemaker")
    p.add_argument("--node", help="Pacemaker node name (default: crm_node -n)")
    p.add_argument("--state-dir", help="registrations directory (default $VERITAS_AGENT_STATE or "
                                       f"{registry.DEFAULT_STATE_DIR})")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    class _Log:
        def fail(self, resource: str, reason: str) -> None:
            log.warning("would fail %s: %s", resource, reason)

    notifier: Notifier = Pacemaker(a.node) if a.notifier == "pacemaker" else _Log()
    w = Watcher(notifier, Path(a.state_dir) if a.state_dir else None).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        w.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
