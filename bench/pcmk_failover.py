"""The Pacemaker failover scenarios of issue 11 on a ``scripts/lab up --pacemaker --app`` lab, shared by
tests/cluster/test_pacemaker_failover.py (each once, with its assertions) and bench/agents.py (timed, many
times, beside the stock ``ocf:heartbeat:docker`` agent).

Every scenario causes one event (standby of a node, ``kill -9`` of a container's process until the
migration threshold, a kill of the node's dockerd, a kill of the whole node) and waits until each given
resource runs on another node: Pacemaker shows it Started there and, for a resource with data, the
container reads there the token written into its volume before the event. The time is from the event.

Probes run the cluster's tools inside a node (``nsenter`` into its first process's namespaces, as
``scripts/lab exec`` does, without starting the lab command each time) and the Docker CLI on the node's
socket, so a poll costs a fraction of the seconds measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from lab import pacemaker as pcmk

NODES = ["node1", "node2", "node3"]
WEB, DAEMON, DAEMON_CLONE, VOL = pcmk.APP_CONTAINER, pcmk.APP_DAEMON, pcmk.APP_DAEMON_CLONE, pcmk.APP_VOLUME
GROUP = pcmk.APP_GROUP
THRESHOLD = pcmk.APP_MIGRATION_THRESHOLD
STOCK = "stockweb"  # the baseline: ocf:heartbeat:docker, the same image, no volume


@dataclass(frozen=True)
class Rsc:
    """A Pacemaker resource running one container; ``data``: it has the veritas volume at /data."""

    id: str
    container: str
    data: bool


WEB_RSC = Rsc(WEB, WEB, True)
STOCK_RSC = Rsc(STOCK, STOCK, False)


def stock_xml(score: int = 200) -> tuple[str, list[str]]:
    """The baseline resource and its constraints: ocf:heartbeat:docker running web's image with no volume.

    The stock agent splits ``run_cmd`` into words without quotes, so web's ``sh -c '...'`` cannot be
    given to it; ``--init`` with ``sleep`` ends on SIGTERM at once, as web's trap does, so neither stop
    waits for a kill timeout. Like web it runs where the node's DockerDaemon runs, after it, with the
    same stickiness, migration threshold, failure timeout and operation timings. It goes with web's
    group by a finite score above the stickiness: one event moves both, and it can still move alone
    when its own fail count bars it from web's node (an INFINITY colocation would stop it instead)."""
    ia, meta = f"{STOCK}-ia", f"{STOCK}-meta"
    nv = pcmk._nv
    prim = (f'<primitive id="{STOCK}" class="ocf" provider="heartbeat" type="docker">'
            f'<instance_attributes id="{ia}">' + nv(ia, "name", STOCK) + nv(ia, "image", pcmk.APP_IMAGE)
            + nv(ia, "run_opts", "--init") + nv(ia, "run_cmd", "sleep 1000000") + '</instance_attributes>'
            f'<meta_attributes id="{meta}">' + nv(meta, "resource-stickiness", "100")
            + nv(meta, "migration-threshold", str(THRESHOLD)) + nv(meta, "failure-timeout", pcmk.APP_FAILURE_TIMEOUT)
            + '</meta_attributes>'
            f'<operations><op id="{STOCK}-start" name="start" interval="0s" timeout="60s"/>'
            f'<op id="{STOCK}-stop" name="stop" interval="0s" timeout="60s"/>'
            f'<op id="{STOCK}-monitor" name="monitor" interval="10s" timeout="30s"/></operations></primitive>')
    cons = [f'<rsc_colocation id="{STOCK}-with-{DAEMON}" rsc="{STOCK}" with-rsc="{DAEMON_CLONE}" score="INFINITY"/>',
            f'<rsc_order id="{DAEMON}-then-{STOCK}" first="{DAEMON_CLONE}" then="{STOCK}" kind="Mandatory"/>',
            f'<rsc_colocation id="{STOCK}-with-{GROUP}" rsc="{STOCK}" with-rsc="{GROUP}" '
            f'score={quoteattr(str(score))}/>']
    return prim, cons


def started_in(xml: str, rsc: str) -> list[str]:
    """Every node where ``rsc`` (a primitive, or each instance of a clone) is started and not failed,
    from ``crm_mon --output-as=xml``."""
    root = ET.fromstring(xml)
    return sorted(n.get("name", "") for r in root.iter("resource") if r.get("id") == rsc
                  and r.get("role") == "Started" and r.get("active") == "true" and r.get("failed") != "true"
                  for n in r.findall("node"))


def parse_failcount(out: str) -> int:
    """``crm_failcount --query --quiet``: a number, INFINITY, or nothing (0)."""
    v = out.strip()
    return int(v) if v.isdigit() else (10**6 if v == "INFINITY" else 0)


class Cluster:
    """Probes and events on one lab (tests.cluster.test_lab.Lab: the scripts/lab command line)."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab

    @property
    def dir(self) -> Path:
        return Path(self.lab.dir)

    def init_pid(self, node: str) -> int | None:
        import json

        try:
            rec = json.loads((self.dir / "nodes" / node / "pids.json").read_text())
            return int(rec["init"][0]) if rec.get("init") else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive(self, node: str) -> bool:
        pid = self.init_pid(node)
        return pid is not None and Path(f"/proc/{pid}").exists()

    def in_node(self, node: str, *argv: str, timeout: float = 30,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        pid = self.init_pid(node)
        if pid is None:
            raise AssertionError(f"{node} is killed")
        cmd = ["nsenter", "-t", str(pid), "-m", "-u", "-n", "--wd=/", *argv]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            r = subprocess.CompletedProcess(cmd, 124, "", "timed out")
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} on {node} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
        return r

    def docker(self, node: str, *args: str, check: bool = True,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "-H", f"unix://{self.dir / 'nodes' / node / 'docker.sock'}", *args]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            r = subprocess.CompletedProcess(argv, 124, "", "timed out")
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} on {node}: {r.stderr}")
        return r

    # --- Pacemaker's view -----------------------------------------------------------------------------
    def started(self, via: str, rsc: str) -> list[str]:
        r = self.in_node(via, "crm_mon", "-1", "--output-as=xml", check=False) if self.alive(via) else None
        if r is None or r.returncode != 0:
            return []
        try:
            return started_in(r.stdout, rsc)
        except ET.ParseError:
            return []

    def where(self, rsc: str, via: str = "node1", timeout: float = 60) -> str:
        try:
            wait_for(lambda: len(self.started(via, rsc)) == 1, timeout, f"{rsc} running on one node")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.report()}") from None
        return self.started(via, rsc)[0]

    def report(self, lines: int = 6) -> str:
        """What a timed-out scenario leaves to read: the cluster as a live node's Pacemaker shows it
        (with fail counts and failed actions), then per node the last of its controller's errors and
        warnings about operations, and of its plugin's and watcher's logs. Never raises: a report that
        cannot be made must not hide the failure it was to explain."""
        try:
            return self._report(lines)
        except Exception as exc:
            return f"(no cluster report: {exc!r})"

    def _report(self, lines: int) -> str:
        out = []
        via = next((n for n in NODES if self.alive(n)), None)
        if via is not None:
            mon = self.in_node(via, "crm_mon", "-1", "-r", "-f", check=False)
            out.append(f"crm_mon on {via}:\n{mon.stdout.strip() or mon.stderr.strip()}")
        keys = ("error", "warning: rsc_op", "did not send", "Timed Out", "Result of", "Initiating")
        for n in NODES:
            base = self.dir / "nodes" / n
            for name, path, want in (("pacemaker", base / "pcmk" / "log-pacemaker" / "pacemaker.log", keys),
                                     ("plugin", base / "plugin.log", ("WARNING", "ERROR")),
                                     ("watch", base / "watch.log", ("",))):
                try:
                    text = path.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                picked = [ln[:220] for ln in text if any(k in ln for k in want)
                          and "meta-data" not in ln and "metadata" not in ln][-lines:]
                if picked:
                    out.append(f"{n} {name}.log:\n  " + "\n  ".join(picked))
        return "\n".join(out)

    def failcount(self, via: str, rsc: str, node: str) -> int:
        return parse_failcount(self.in_node(via, "crm_failcount", "--query", "--quiet", "-r", rsc, "-N", node,
                                            check=False).stdout)

    def cleanup(self, via: str, rsc: str) -> None:
        self.in_node(via, "crm_resource", "--cleanup", "-r", rsc, timeout=60)

    def settle(self, via: str, timeout: float = 120) -> None:
        """Until the cluster has no action pending (``crm_resource --wait``)."""
        self.in_node(via, "crm_resource", "--wait", f"--timeout={int(timeout)}s", timeout=timeout + 10)

    def target_role(self, via: str, rsc: str, role: str) -> None:
        self.in_node(via, "crm_resource", "-r", rsc, "--meta", "-p", "target-role", "-v", role)

    def daemons_everywhere(self, via: str, timeout: float = 90, what: str = "") -> None:
        wait_for(lambda: self.started(via, DAEMON) == NODES, timeout, f"the DockerDaemon clone on every node {what}")

    # --- the containers -------------------------------------------------------------------------------
    def write_token(self, node: str, rsc: Rsc = WEB_RSC) -> str:
        token = uuid.uuid4().hex
        self.docker(node, "exec", rsc.container, "sh", "-c", f"echo {token} >> /data/log && sync")
        if not self.reads(node, token, rsc):
            raise AssertionError(f"{rsc.container} on {node} does not read back the token it wrote")
        return token

    def reads(self, node: str, token: str, rsc: Rsc = WEB_RSC) -> bool:
        r = self.docker(node, "exec", rsc.container, "cat", "/data/log", check=False)
        return r.returncode == 0 and token in r.stdout.split()

    def state(self, node: str, rsc: Rsc) -> tuple[bool, int]:
        """Whether ``rsc``'s container runs on ``node``, and its PID (0 when none)."""
        r = self.docker(node, "inspect", "-f", "{{.State.Running}} {{.State.Pid}}", rsc.container, check=False)
        running, _, pid = r.stdout.strip().partition(" ")
        return running == "true", int(pid) if pid.isdigit() else 0

    def container_pid(self, node: str, rsc: Rsc = WEB_RSC) -> int:
        return self.state(node, rsc)[1]

    def runs_on(self, node: str, rsc: Rsc, token: str | None) -> bool:
        """``rsc``'s container runs on ``node`` (and reads ``token`` from its volume when it has one)."""
        if token is not None:
            return self.reads(node, token, rsc)
        return self.state(node, rsc)[0]


def wait_for(cond: Callable[[], bool], timeout: float, what: str, period: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)
    return time.monotonic() - t0


@dataclass
class Move:
    """One event and what followed: from which node, when (time.monotonic()), and per resource the node
    it runs on afterwards and the seconds from the event until it ran there (with its data)."""

    src: str
    t0: float
    moved: dict[str, tuple[str, float]] = field(default_factory=dict)
    kills: int = 0  # container_kill: the kills it took (the last one crossed the threshold)
    restarts: list[float] = field(default_factory=list)  # container_kill: each restart in place, from its kill
    tokens: dict[str, str | None] = field(default_factory=dict)  # what each resource wrote before the event

    def secs(self, rsc: Rsc) -> float:
        return self.moved[rsc.id][1]

    def dst(self, rsc: Rsc) -> str:
        return self.moved[rsc.id][0]


def wait_moved(c: Cluster, via: str, src: str, t0: float, tokens: dict[Rsc, str | None], timeout: float,
               what: str) -> dict[str, tuple[str, float]]:
    """Until every resource of ``tokens`` runs on one node other than ``src`` (reading its token there):
    per resource, that node and the seconds since ``t0``, each taken when it was first seen so."""
    out: dict[str, tuple[str, float]] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(tokens):
        xml = c.in_node(via, "crm_mon", "-1", "--output-as=xml", check=False)
        for rsc, token in tokens.items():
            if rsc.id in out or xml.returncode != 0:
                continue
            try:
                on = started_in(xml.stdout, rsc.id)
            except ET.ParseError:
                continue
            if len(on) == 1 and on[0] != src and c.runs_on(on[0], rsc, token):
                out[rsc.id] = (on[0], time.monotonic() - t0)
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: after {timeout:g} s only {sorted(out)} of "
                                 f"{sorted(r.id for r in tokens)} run on another node than {src} (with their data)"
                                 f"\n{c.report()}")
        if len(out) < len(tokens):
            time.sleep(0.05)
    return out


def _tokens(c: Cluster, src: str, rscs: list[Rsc]) -> dict[Rsc, str | None]:
    return {r: c.write_token(src, r) if r.data else None for r in rscs}


def _ids(tokens: dict[Rsc, str | None]) -> dict[str, str | None]:
    return {r.id: t for r, t in tokens.items()}


def _one_node(c: Cluster, via: str, rscs: list[Rsc]) -> str:
    where = {c.where(r.id, via) for r in rscs}
    if len(where) != 1:
        raise AssertionError(f"{[r.id for r in rscs]} do not run on one node: {sorted(where)}")
    return where.pop()


# --- the scenarios --------------------------------------------------------------------------------------
def standby(c: Cluster, rscs: list[Rsc], via: str = "node1", timeout: float = 60) -> Move:
    """Standby of the node ``rscs`` run on; they run elsewhere (the node stays in standby: unstandby)."""
    src = _one_node(c, via, rscs)
    tokens = _tokens(c, src, rscs)
    t0 = time.monotonic()
    c.in_node(via, "crm_attribute", "--node", src, "--name", "standby", "--update", "on")
    return Move(src, t0, wait_moved(c, via, src, t0, tokens, timeout, "standby"), tokens=_ids(tokens))


def move(c: Cluster, target: str | None = None, via: str = "node1", timeout: float = 60) -> Move:
    """``crm_resource --move`` of web's group to ``target`` (default: another node with a dockerd): the
    agent's stop on the source (the container stopped, its volume released), its start on the target (the
    container recreated there from the resource's attributes, on the same volume). The move's constraint
    is cleared again once it runs there."""
    src = _one_node(c, via, [WEB_RSC])
    dst = target or next(n for n in sorted(c.started(via, pcmk.APP_DAEMON)) if n != src)
    tokens = _tokens(c, src, [WEB_RSC])
    t0 = time.monotonic()
    c.in_node(via, "crm_resource", "--move", "--resource", GROUP, "--node", dst)
    try:
        moved = wait_moved(c, via, src, t0, tokens, timeout, f"crm_resource --move to {dst}")
    finally:
        c.in_node(via, "crm_resource", "--clear", "--resource", GROUP, check=False)
    if moved[WEB_RSC.id][0] != dst:
        raise AssertionError(f"crm_resource --move to {dst}: web runs on {moved[WEB_RSC.id][0]}")
    return Move(src, t0, moved, tokens=_ids(tokens))


def restore(c: Cluster, rscs: list[Rsc], via: str = "node1") -> list[str]:
    """Back to where every scenario starts, whatever an earlier one left (a failed run of it, say):
    every node up and out of standby, no fail counts, the DockerDaemon clone on every node, each of
    ``rscs`` running on one node, nothing pending. What had to be done, for the caller to report."""
    done = []
    for n in NODES:
        if not c.alive(n):
            c.lab.run("start", n, timeout=180)
            done.append(f"started {n}")
    for n in NODES:
        q = c.in_node(via, "crm_attribute", "--node", n, "--name", "standby", "--query", "--quiet", check=False)
        if q.stdout.strip() == "on":
            c.in_node(via, "crm_attribute", "--node", n, "--name", "standby", "--update", "off")
            done.append(f"{n} out of standby")
    for rid in [DAEMON, *(r.id for r in rscs)]:
        if any(c.failcount(via, rid, n) for n in NODES):
            c.cleanup(via, DAEMON_CLONE if rid == DAEMON else rid)
            done.append(f"{rid}'s fail counts cleared")
    if done:
        c.settle(via)
    c.daemons_everywhere(via, 90, "(restore)")
    for r in rscs:
        c.where(r.id, via)
    return done


def unstandby(c: Cluster, node: str, via: str = "node1") -> None:
    c.in_node(via, "crm_attribute", "--node", node, "--name", "standby", "--update", "off")
    c.daemons_everywhere(via, 60, f"({node} out of standby)")


def container_kill(c: Cluster, rsc: Rsc, threshold: int = THRESHOLD, via: str = "node1", timeout: float = 60,
                   after_restart: Callable[[int, float], None] | None = None, phase: float | None = None) -> Move:
    """``kill -9`` of ``rsc``'s container process (from the host) until its fail count reaches
    ``threshold``; each kill below it is waited for to restart in place (Pacemaker shows it Started on
    the node again and its new container runs: ``after_restart(kill, secs)``), then for the cluster to
    settle. The move is timed from the kill that crossed the threshold.

    ``phase``: seconds to wait, after the cluster settled, before a kill with the fail count at
    ``threshold - 1``: where failures are seen by a recurring monitor, whose schedule stands at about
    the same point whenever the cluster has just settled, this shifts the crossing kill to that phase
    of the monitor's interval."""
    src = c.where(rsc.id, via)
    token = c.write_token(src, rsc) if rsc.data else None
    move = Move(src, 0.0, tokens={rsc.id: token})

    def restarted(old: int) -> bool:
        running, pid = c.state(src, rsc)
        return running and pid not in (0, old) and c.started(via, rsc.id) == [src] and (
            token is None or c.reads(src, token, rsc))

    for kill in range(1, threshold + 1):
        c.settle(via)
        before = c.failcount(via, rsc.id, src)
        if phase is not None and before == threshold - 1:
            time.sleep(phase)
        old = c.container_pid(src, rsc)
        if not old:
            raise AssertionError(f"{rsc.container} does not run on {src} before kill {kill}")
        move.t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        move.kills = kill
        wait_for(lambda b=before: c.failcount(via, rsc.id, src) > b, 40, f"kill {kill} of {rsc.id} counted")  # type: ignore[misc]
        if c.failcount(via, rsc.id, src) >= threshold:
            break
        try:
            wait_for(lambda o=old: restarted(o), timeout, f"{rsc.id} restarted on {src} after kill {kill}")  # type: ignore[misc]
        except AssertionError as exc:
            mon = c.in_node(via, "crm_mon", "-1", "--show-detail", "--failcounts", check=False).stdout
            raise AssertionError(f"{exc}: {rsc.id} on {c.started(via, rsc.id)}, fail count "
                                 f"{c.failcount(via, rsc.id, src)}; {mon}") from None
        took = time.monotonic() - move.t0
        move.restarts.append(took)
        if after_restart is not None:
            after_restart(kill, took)
    else:
        raise AssertionError(f"{threshold} kills of {rsc.id} never took its fail count to {threshold}")
    move.moved = wait_moved(c, via, src, move.t0, {rsc: token}, timeout,
                            f"kill {move.kills} of {rsc.id} (migration-threshold {threshold})")
    return move


def clear_failures(c: Cluster, rsc: Rsc, node: str, via: str = "node1") -> None:
    c.cleanup(via, rsc.id)
    wait_for(lambda: c.failcount(via, rsc.id, node) == 0, 30, f"{rsc.id}'s fail count on {node} cleared")


def dockerd_kill(c: Cluster, rscs: list[Rsc], via: str = "node1", timeout: float = 90) -> Move:
    """``scripts/lab kill NODE --only dockerd`` of the node ``rscs`` run on."""
    src = _one_node(c, via, rscs)
    tokens = _tokens(c, src, rscs)
    t0 = time.monotonic()
    c.lab.run("kill", src, "--only", "dockerd")
    return Move(src, t0, wait_moved(c, via if via != src else _other(src), src, t0, tokens, timeout, "dockerd killed"),
                tokens=_ids(tokens))


def restore_dockerd(c: Cluster, node: str, rscs: list[Rsc], via: str = "node1") -> None:
    """After dockerd_kill: the node back if it was fenced meanwhile, fail counts cleared (the clone then
    starts the node's dockerd again, through the agent, with the lab's arguments)."""
    if not c.alive(node):
        c.lab.run("start", node, timeout=180)
    c.cleanup(via, DAEMON_CLONE)
    for r in rscs:
        c.cleanup(via, r.id)
    c.daemons_everywhere(via, 90, f"(dockerd back on {node})")


def node_kill(c: Cluster, rscs: list[Rsc], timeout: float = 90) -> Move:
    """``scripts/lab kill NODE`` of the node ``rscs`` run on (Pacemaker fences it, then recovers)."""
    src = _one_node(c, "node1", rscs)
    via = _other(src)
    tokens = _tokens(c, src, rscs)
    t0 = time.monotonic()
    c.lab.run("kill", src)
    return Move(src, t0, wait_moved(c, via, src, t0, tokens, timeout, "node killed"), tokens=_ids(tokens))


def restore_node(c: Cluster, node: str) -> float:
    """``scripts/lab start NODE``: until it rejoined and its dockerd is adopted again; the seconds taken."""
    t0 = time.monotonic()
    c.lab.run("start", node, timeout=180)
    c.daemons_everywhere(_other(node), 90, f"({node}'s dockerd adopted again)")
    return time.monotonic() - t0


def _other(node: str) -> str:
    return next(n for n in NODES if n != node)
