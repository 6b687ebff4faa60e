"""Failover in a real lab (issue 10, "What must work"): exclusive attachment across nodes, a node killed
whole, only its dockerd killed, its catalog cut off, and the seed's swarm scenario.

The whole module runs once per catalog backend (a three-node swarm lab per run, short leases). A
sampler reads every node's mount table (its init's /proc/PID/mountinfo) ten times a second throughout
and identifies each volume mount by the kernel's word (the loop device's backing file): any volume
mounted on two nodes in one sample fails the module, whatever the times.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.config import ClusterSettings
from storage.kernel import loop
from tests.cluster.test_lab import REPO, Lab, pid_alive, wait_for

pytestmark = pytest.mark.integration

TTL = 5.0  # lease_ttl: fencing ends ttl/2 + ttl/4 + 0.5 s after the last renewal, 1 s before expiry
INTERVAL = 0.5
GRACE = ClusterSettings().engine_grace  # the lab leaves engine_grace at its default (5 s)
NODES = ("node1", "node2", "node3")
IMAGE = "localbusybox:latest"
DG = "dockerdg"


class MountSampler:
    """Every node's volume mounts, sampled from the kernel until stopped."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.samples: list[tuple[float, dict[str, dict[str, Any]]]] = []  # (time.time(), node -> vol -> id)
        self.overlaps: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _init_pid(self, node: str) -> int | None:
        try:
            rec = json.loads((self.lab.dir / "nodes" / node / "pids.json").read_text())
            return int(rec["init"][0]) if rec.get("init") else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def once(self) -> dict[str, dict[str, Any]]:
        """node -> {volume: backing file identity} of what is mounted at the node's mount points now."""
        out: dict[str, dict[str, Any]] = {}
        for node in NODES:
            pid = self._init_pid(node)
            if pid is None:
                continue
            root = str(self.lab.dir / "nodes" / node / "mnt")
            seen: dict[str, Any] = {}
            try:
                lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                f = line.split()
                target = f[4]
                if os.path.dirname(target) == root and target.endswith(f"_{DG}"):
                    major, minor = (int(x) for x in f[2].split(":"))
                    seen[os.path.basename(target)[: -len(DG) - 1]] = loop.backing_id_of(major, minor) or (major, minor)
            out[node] = seen
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            # stamped when the read ended: whatever a sample shows was so by then (a stamp taken before
            # the read could precede a mount the read then saw)
            snap = self.once()
            now = time.time()
            self.samples.append((now, snap))
            where: dict[Any, list[str]] = {}
            for node, vols in snap.items():
                for vol, ident in vols.items():
                    where.setdefault(ident, []).append(f"{node}:{vol}")
            for places in where.values():
                if len(places) > 1:
                    self.overlaps.append(f"{time.strftime('%H:%M:%S')} mounted on two nodes at once: {places}")

    def start(self) -> MountSampler:
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def first(self, node: str, vol: str, after: float) -> float | None:
        """When ``vol`` was first seen mounted on ``node`` after ``after`` (wall clock)."""
        return next((t for t, s in self.samples if t >= after and vol in s.get(node, {})), None)

    def last(self, node: str, vol: str) -> float | None:
        return next((t for t, s in reversed(self.samples) if vol in s.get(node, {})), None)


@pytest.fixture(scope="module", params=["sqlite", "etcd"])
def env(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    dir = Path(tempfile.mkdtemp(prefix="labfo-", dir="/tmp")) / "lab"
    lab = Lab(dir)
    sampler = None
    try:
        lab.run("up", "--nodes", "3", "--swarm", "--catalog", request.param, "--lease-ttl", f"{TTL:g}",
                "--lease-interval", f"{INTERVAL:g}", timeout=240)
        sampler = MountSampler(lab).start()
        info = {"lab": lab, "catalog": request.param, "sampler": sampler, "times": {}}
        yield info
        print(f"\nfailover times ({request.param}): {json.dumps(info['times'])}")
        assert sampler.overlaps == [], sampler.overlaps
    finally:
        if sampler is not None:
            sampler.stop()
        if dir.exists():
            lab.run("down", check=False, timeout=240)
        os.rmdir(dir.parent) if dir.parent.exists() and not any(dir.parent.iterdir()) else None


def run_with(lab: Lab, node: str, vol: str, script: str, check: bool = True) -> Any:
    return lab.exec(node, "docker", "run", "-d", "--stop-timeout", "1", "-v", f"{vol}:/data", "--volume-driver",
                    "veritas", IMAGE, "sh", "-c", script, check=check, timeout=60)


def host_pid(lab: Lab, node: str, cid: str) -> int:
    return int(lab.exec(node, "docker", "inspect", "-f", "{{.State.Pid}}", cid).stdout)


def read_on(lab: Lab, node: str, vol: str) -> Any:
    """``cat /data/f`` in a throwaway container on ``node`` (Docker mounts and unmounts the volume)."""
    return lab.exec(node, "docker", "run", "--rm", "-v", f"{vol}:/data", "--volume-driver", "veritas", IMAGE,
                    "cat", "/data/f", check=False, timeout=60)


def attachment(lab: Lab, node: str, vol: str) -> Any:
    out = lab.exec(node, "docker", "volume", "inspect", "-f", "{{json .Status.attachment}}", vol).stdout.strip()
    return json.loads(out) if out and out != "<no value>" else None


def take_over(lab: Lab, node: str, vol: str, script: str, timeout: float) -> tuple[str, list[str]]:
    """Retry `docker run -d` with ``vol`` on ``node`` (as swarm retries a task) until it starts; its ID
    and the errors of the refused tries."""
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        r = run_with(lab, node, vol, script, check=False)
        if r.returncode == 0:
            return r.stdout.strip(), errors
        errors.append(r.stderr.strip())
        # a refused `docker run -d` leaves a created container behind
        for cid in lab.exec(node, "docker", "ps", "-aq", "--filter", "status=created").stdout.split():
            lab.exec(node, "docker", "rm", "-f", cid, check=False)
        if time.monotonic() > deadline:
            raise AssertionError(f"{node} never got {vol}: {errors[-3:]}")
        time.sleep(0.3)


def plugin_log(lab: Lab, node: str) -> str:
    return (lab.dir / "nodes" / node / "plugin.log").read_text(errors="replace")


def test_a_volume_mounted_on_node2_is_refused_on_node3_naming_node2_until_node2_lets_go(env: dict[str, Any]) -> None:
    """node3's Mount waits (lease_ttl + lease_interval) for node2 to let go, then is refused naming it."""
    lab: Lab = env["lab"]
    for node in NODES:  # `up --lease-ttl/--lease-interval` reach every node's config
        text = (lab.dir / "nodes" / node / "veritas.conf").read_text()
        assert f"lease_ttl = {TTL:g}\nlease_interval = {INTERVAL:g}\n" in text, text
    lab.exec("node2", "docker", "volume", "create", "-d", "veritas", "-o", "size=100m", "excl")
    cid = run_with(lab, "node2", "excl", "echo from-node2 > /data/f; sleep 100000").stdout.strip()
    wait_for(lambda: "excl" in env["sampler"].once().get("node2", {}), 20, "excl mounted on node2")
    t0 = time.monotonic()
    r = read_on(lab, "node3", "excl")
    waited = time.monotonic() - t0
    assert r.returncode != 0 and "node2" in r.stderr, r.stderr
    assert waited >= TTL + INTERVAL - 0.5, f"refused after {waited:.1f} s: the Mount did not wait for node2"
    assert attachment(lab, "node3", "excl")["node"] == "node2"
    lab.exec("node2", "docker", "rm", "-f", cid)
    r = read_on(lab, "node3", "excl")
    assert (r.returncode, r.stdout.strip()) == (0, "from-node2"), r.stderr
    lab.exec("node3", "docker", "volume", "rm", "excl")


def test_node2_killed_whole_node3_takes_its_volume_after_the_lease_and_node2_back_leaves_it(
        env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    s: MountSampler = env["sampler"]
    lab.exec("node2", "docker", "volume", "create", "-d", "veritas", "-o", "size=100m", "whole")
    run_with(lab, "node2", "whole", "echo from-node2 > /data/f; sleep 100000")
    wait_for(lambda: "whole" in s.once().get("node2", {}), 20, "whole mounted on node2")
    time.sleep(2 * INTERVAL)  # a renewal after the mount: the lease now runs from about here
    t_kill = time.time()
    lab.run("kill", "node2")
    cid, refused = take_over(lab, "node3", "whole", "cat /data/f > /data/seen; echo by-node3 >> /data/f; sleep 100000",
                             timeout=TTL + 30)
    t_mount = s.first("node3", "whole", t_kill)
    assert t_mount is not None
    env["times"]["node_kill_to_mounted_s"] = round(t_mount - t_kill, 2)
    # the lease was renewed at most one interval before the kill: it cannot have expired sooner
    assert t_mount - t_kill >= TTL - INTERVAL - 0.2, (t_mount - t_kill, refused)
    # the Mount waited for node2's lease to run out: one docker run, no refusal for swarm to retry after
    # its restart delay
    assert refused == [], refused
    assert t_mount - t_kill < TTL + 3 + 5, t_mount - t_kill  # target ttl + 3 s (bench); slack for a busy box
    assert lab.exec("node3", "docker", "exec", cid, "cat", "/data/seen").stdout.strip() == "from-node2"

    lab.run("start", "node2")
    time.sleep(3 * INTERVAL)  # a few renewals and watchdog ticks of the node come back
    assert "whole" not in s.once().get("node2", {}), "node2 mounted the volume node3 holds"
    assert attachment(lab, "node2", "whole")["node"] == "node3"
    assert lab.exec("node3", "docker", "exec", cid, "cat", "/data/f").stdout.split() == ["from-node2", "by-node3"]
    r = read_on(lab, "node2", "whole")
    assert r.returncode != 0 and "node3" in r.stderr, r.stderr
    lab.exec("node3", "docker", "rm", "-f", cid)
    for node in ("node2", "node3"):
        for c in lab.exec(node, "docker", "ps", "-aq").stdout.split():
            lab.exec(node, "docker", "rm", "-f", c, check=False)
    lab.exec("node3", "docker", "volume", "rm", "whole")


def wait_dead(pid: int, timeout: float) -> float:
    """When ``pid`` ended (time.time()), woken by its pidfd at once: a poll would note the death up to
    its period late, and then a mount that followed the death closely would seem to precede it."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.time()
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise AssertionError(f"timed out after {timeout} s waiting for process {pid} to end")
        return time.time()
    finally:
        os.close(fd)


def test_only_dockerd_of_node2_killed_its_plugin_kills_the_writer_then_node3_mounts(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    s: MountSampler = env["sampler"]
    lab.exec("node2", "docker", "volume", "create", "-d", "veritas", "-o", "size=100m", "dkill")
    cid = run_with(lab, "node2", "dkill", "echo from-node2 > /data/f; while :; do date >> /data/ticks; sleep 0.1; done"
                   ).stdout.strip()
    pid = host_pid(lab, "node2", cid)
    wait_for(lambda: "dkill" in s.once().get("node2", {}), 20, "dkill mounted on node2")
    t_kill = time.time()
    lab.run("kill", "node2", "--only", "dockerd")
    assert pid_alive(pid), "the container died with its engine"
    died: list[float] = []

    def watch() -> None:
        died.append(wait_dead(pid, 60))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cid3, refused = take_over(lab, "node3", "dkill", "cat /data/f > /data/seen; sleep 100000", timeout=TTL * 3 + 30)
    watcher.join(5)
    t_mount = s.first("node3", "dkill", t_kill)
    assert died and t_mount is not None
    assert t_mount > died[0], "node3 mounted while node2's container could still write"
    last2 = s.last("node2", "dkill")
    assert last2 is not None and last2 < t_mount
    assert refused == [], refused  # the Mount waited for node2's plugin to kill the writer and let go
    env["times"]["dockerd_kill_to_mounted_s"] = round(t_mount - t_kill, 2)
    assert "killing what uses them" in plugin_log(lab, "node2")
    assert lab.exec("node3", "docker", "exec", cid3, "cat", "/data/seen").stdout.strip() == "from-node2"
    lab.run("start", "node2")
    lab.exec("node3", "docker", "rm", "-f", cid3)
    for c in lab.exec("node2", "docker", "ps", "-aq").stdout.split():
        lab.exec("node2", "docker", "rm", "-f", c, check=False)
    lab.exec("node3", "docker", "volume", "rm", "dkill")


def test_dockerd_of_node2_back_quickly_the_plugin_kills_nothing_and_lets_the_volume_go(env: dict[str, Any]) -> None:
    """Back within the grace, nothing is killed by the plugin. The engine itself ends the container it
    finds at start (swarm mode forbids live-restore) without an Unmount: the plugin then releases the
    idle volume a peer wants, so that node3 is not refused for ever."""
    lab: Lab = env["lab"]
    s: MountSampler = env["sampler"]
    lab.exec("node2", "docker", "volume", "create", "-d", "veritas", "-o", "size=100m", "dquick")
    cid = run_with(lab, "node2", "dquick", "echo from-node2 > /data/f; sleep 100000").stdout.strip()
    pid = host_pid(lab, "node2", cid)
    wait_for(lambda: "dquick" in s.once().get("node2", {}), 20, "dquick mounted on node2")
    before = [plugin_log(lab, "node2").count(w) for w in ("lease: killed", "killing what uses them")]
    t_kill = time.monotonic()
    lab.run("kill", "node2", "--only", "dockerd")
    # a peer wants it meanwhile: its Mount waits (in a thread of its own here) while dockerd comes back
    read: list[Any] = []
    reader = threading.Thread(target=lambda: read.append(read_on(lab, "node3", "dquick")), daemon=True)
    reader.start()
    lab.run("start", "node2")
    back = time.monotonic() - t_kill
    assert back < GRACE, f"dockerd back only after {back:.1f} s, past the grace: the test proves nothing"
    wait_for(lambda: not pid_alive(pid), 30, "the engine ending its container at start")
    state = json.loads(lab.exec("node2", "docker", "inspect", "-f", "{{json .State}}", cid).stdout)
    assert state["Status"] == "exited", state
    reader.join(TTL + 30)
    # node2's engine ended the container (no Unmount): the plugin let the idle volume go to the waiting
    # Mount, or it was refused naming node2 before that
    assert read and ((read[0].returncode, read[0].stdout.strip()) == (0, "from-node2") or
                     (read[0].returncode != 0 and "node2" in read[0].stderr)), read
    cid3, _ = take_over(lab, "node3", "dquick", "cat /data/f > /data/seen; sleep 100000", timeout=TTL * 2 + 20)
    assert lab.exec("node3", "docker", "exec", cid3, "cat", "/data/seen").stdout.strip() == "from-node2"
    log = plugin_log(lab, "node2")
    assert [log.count(w) for w in ("lease: killed", "killing what uses them")] == before
    assert "released dquick (wanted elsewhere and no container of this engine uses it)" in log
    lab.exec("node3", "docker", "rm", "-f", cid3)
    lab.exec("node2", "docker", "rm", "-f", cid)
    lab.exec("node3", "docker", "volume", "rm", "dquick")


def test_node2_cut_from_the_catalog_fences_itself_before_its_lease_ends(env: dict[str, Any]) -> None:
    """With etcd, a cut node's renewals fail: it stops its containers and unmounts before its lease
    ends, node3 takes the volume after expiry, and node2 healed holds nothing. With SQLite the catalog
    is a file every node of the one host reaches: a cut node keeps renewing and keeps its volume."""
    lab: Lab = env["lab"]
    s: MountSampler = env["sampler"]
    lab.exec("node2", "docker", "volume", "create", "-d", "veritas", "-o", "size=100m", "cutvol")
    cid = run_with(lab, "node2", "cutvol", "echo from-node2 > /data/f; sleep 100000").stdout.strip()
    pid = host_pid(lab, "node2", cid)
    wait_for(lambda: "cutvol" in s.once().get("node2", {}), 20, "cutvol mounted on node2")
    leases = {r["node"]: r for r in json.loads(lab.exec("node3", "veritas", "--json", "dg", "leases").stdout)}
    assert leases["node2"]["live"]
    t_cut = time.time()
    lab.run("cut", "node2")
    try:
        if env["catalog"] == "sqlite":
            time.sleep(TTL + 1)
            assert pid_alive(pid) and "cutvol" in s.once().get("node2", {})
            lease = next(r for r in json.loads(lab.exec("node3", "veritas", "--json", "dg", "leases").stdout)
                         if r["node"] == "node2")
            assert lease["live"] and lease["expires"] > t_cut + TTL
            return
        # the lease's end as the catalog reports it, read from node3 just before it ends
        wait_for(lambda: not pid_alive(pid), TTL, "node2's container stopped")
        t_dead = time.time()
        lease = next(r for r in json.loads(lab.exec("node3", "veritas", "--json", "dg", "leases").stdout)
                     if r["node"] == "node2")
        cid3, refused = take_over(lab, "node3", "cutvol", "cat /data/f > /data/seen; sleep 100000", timeout=TTL + 30)
        t_mount = s.first("node3", "cutvol", t_cut)
        last2 = s.last("node2", "cutvol")
        assert t_mount is not None and last2 is not None
        assert t_dead < lease["expires"] and last2 < lease["expires"], (t_dead, last2, lease)
        assert t_mount >= lease["expires"] - 0.2, (t_mount, lease)
        env["times"]["cut_to_unmounted_s"] = round(last2 - t_cut, 2)
        env["times"]["cut_to_mounted_s"] = round(t_mount - t_cut, 2)
        assert lab.exec("node3", "docker", "exec", cid3, "cat", "/data/seen").stdout.strip() == "from-node2"
    finally:
        lab.run("heal", "node2")
    time.sleep(4 * INTERVAL)
    assert "cutvol" not in s.once().get("node2", {})
    assert attachment(lab, "node2", "cutvol")["node"] == "node3"
    leases = {r["node"]: r for r in json.loads(lab.exec("node2", "veritas", "--json", "dg", "leases").stdout)}
    assert leases["node2"]["live"] and leases["node2"]["attached"] == 0, leases
    lab.exec("node3", "docker", "rm", "-f", cid3)
    for c in lab.exec("node2", "docker", "ps", "-aq").stdout.split():
        lab.exec("node2", "docker", "rm", "-f", c, check=False)
    lab.exec("node3", "docker", "volume", "rm", "cutvol")


def task_node(lab: Lab, service: str) -> str | None:
    ps = lab.exec("node1", "docker", "service", "ps", service, "-f", "desired-state=running",
                  "--format", "{{.Node}} {{.CurrentState}}").stdout.split("\n")
    return next((line.split()[0] for line in ps if " Running" in line), None)


def task_reads(lab: Lab, node: str, service: str) -> list[str]:
    cid = lab.exec(node, "docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}",
                   check=False).stdout.split()
    if len(cid) != 1:
        return []
    r = lab.exec(node, "docker", "exec", cid[0], "cat", "/data/log", check=False)
    return r.stdout.split() if r.returncode == 0 else []


def test_seed_scenario_drain_then_dockerd_killed_the_task_moves_with_its_data(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    lab.exec("node1", "docker", "service", "create", "-d", "--name", "seed", "--no-resolve-image", "--init",
             "--stop-grace-period", "1s", "--restart-delay", "1s", "--hostname", "{{.Node.Hostname}}",
             "--mount", "type=volume,source=volumel,target=/data,volume-driver=veritas",
             IMAGE, "sh", "-c", "hostname >> /data/log; sleep 100000")
    try:
        wait_for(lambda: task_node(lab, "seed") is not None, 90, "the seed task running")
        first = task_node(lab, "seed")
        assert first in ("node2", "node3")
        other = "node3" if first == "node2" else "node2"
        wait_for(lambda: task_reads(lab, first, "seed") == [first], 20, "the first task's write")
        t0 = time.monotonic()
        lab.exec("node1", "docker", "node", "update", "--availability", "drain", first)
        wait_for(lambda: task_reads(lab, other, "seed") == [first, other], 90,
                 "the task on the other node with the data")
        env["times"]["drain_to_running_with_data_s"] = round(time.monotonic() - t0, 2)
        lab.exec("node1", "docker", "node", "update", "--availability", "active", first)
        t0 = time.monotonic()
        lab.run("kill", other, "--only", "dockerd")
        wait_for(lambda: task_reads(lab, first, "seed") == [first, other, first], TTL * 3 + 60,
                 "the task back on the first node with the data")
        env["times"]["dockerd_kill_to_running_with_data_s"] = round(time.monotonic() - t0, 2)
        lab.run("start", other)
    finally:
        lab.exec("node1", "docker", "service", "rm", "seed", check=False)
        def gone() -> bool:
            return not any(lab.exec(node, "docker", "ps", "-q", "--filter", "label=com.docker.swarm.service.name=seed",
                                    check=False).stdout.strip() for node in ("node2", "node3"))

        wait_for(gone, 30, "the seed tasks gone")


def test_readme_ha_demo_runs_as_written() -> None:
    """The README's five-line demo, line by line as a person pastes it (in a lab directory of its own)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("A failover demo:"):]
    block = block[: block.index("\n\n", block.index("\n\n") + 2)]
    lines = [line[4:] for line in block.splitlines() if line.startswith("    scripts/lab") or
             line.startswith("    sleep")]
    assert len(lines) == 5 and lines[0].startswith("scripts/lab up") and lines[-1] == "scripts/lab down", lines
    dir = Path(tempfile.mkdtemp(prefix="labdemo-", dir="/tmp")) / "lab"
    env = {**os.environ, "VERITAS_LAB_DIR": str(dir)}
    try:
        out = []
        for line in lines:
            r = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
                               check=False)
            assert r.returncode == 0, (line, r.stderr[-2000:])
            out.append(r.stdout)
        drained = out[2].strip()
        assert drained in ("node2", "node3"), out[2]
        other = "node3" if drained == "node2" else "node2"
        # the new node's task printed what the drained node's task wrote
        assert any(line.split("@", 1)[-1].split() == [other, "|", drained] for line in out[3].splitlines()), out[3]
        assert not dir.exists()
    finally:
        if dir.exists():
            Lab(dir).run("down", check=False, timeout=240)
        os.rmdir(dir.parent) if dir.parent.exists() and not any(dir.parent.iterdir()) else None
