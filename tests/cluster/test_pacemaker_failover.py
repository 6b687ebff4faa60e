"""Failover on a real Pacemaker cluster (issue 11): ``scripts/lab up --pacemaker --app`` runs the group of
ocf:veritas:DockerContainer ``web`` (veritas volume webdata:/data) on a clone of ocf:veritas:DockerDaemon
that adopted every node's dockerd, with the agents' watcher on every node.

One three-node lab with short leases serves the module; the tests run in file order against it. Each
scenario writes a token into the volume from the container where it runs, causes the event, and waits
until the container runs on the new node and reads the token there; the time from the event to that is
printed. A sampler (tests/cluster/test_failover.py's) reads every node's mount table ten times a second
throughout: the volume mounted on two nodes in one sample fails the module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_failover import INTERVAL, TTL, MountSampler
from tests.cluster.test_lab import Lab, pid_alive, wait_for

pytestmark = pytest.mark.integration

NODES = ["node1", "node2", "node3"]
WEB, DAEMON, DAEMON_CLONE, VOL = "web", "dockerd", "dockerd-clone", "webdata"
THRESHOLD = 3  # web's migration-threshold (lab.pacemaker)
MONITOR_INTERVAL = 10.0  # web's monitor interval (lab.pacemaker): a restart well before it is the watcher's


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    top = Path(tempfile.mkdtemp(prefix="labpfo-", dir="/tmp"))
    lab = Lab(top / "lab")
    sampler = None
    try:
        t0 = time.monotonic()
        lab.run("up", "--nodes", "3", "--pacemaker", "--app", "--lease-ttl", f"{TTL:g}",
                "--lease-interval", f"{INTERVAL:g}", timeout=300)
        print(f"\nlab up --nodes 3 --pacemaker --app: {time.monotonic() - t0:.1f} s")
        sampler = MountSampler(lab).start()
        info: dict[str, Any] = {"lab": lab, "sampler": sampler, "times": {}}
        yield info
        print(f"\npacemaker failover times (event -> running with its data on the new node): "
              f"{json.dumps(info['times'])}")
        assert sampler.overlaps == [], sampler.overlaps
    finally:
        if sampler is not None:
            sampler.stop()
        if lab.dir.exists():
            lab.run("down", check=False, timeout=180)
        shutil.rmtree(top, ignore_errors=True)


# --- helpers --------------------------------------------------------------------------------------------
def crm(lab: Lab, via: str) -> ET.Element:
    return ET.fromstring(lab.exec(via, "crm_mon", "-1", "--output-as=xml", timeout=30).stdout)


def started(lab: Lab, via: str, rsc: str) -> list[str]:
    """Every node where resource ``rsc`` (a primitive, or each instance of a clone) is started."""
    try:
        root = crm(lab, via)
    except (AssertionError, ET.ParseError, subprocess.TimeoutExpired):
        return []
    return sorted(n.get("name", "") for r in root.iter("resource") if r.get("id") == rsc
                  and r.get("role") == "Started" and r.get("active") == "true" and r.get("failed") != "true"
                  for n in r.findall("node"))


def docker(lab: Lab, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["docker", "-H", f"unix://{lab.dir / 'nodes' / node / 'docker.sock'}", *args]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        r = subprocess.CompletedProcess(argv, 124, "", "timed out")
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} on {node}: {r.stderr}")
    return r


def web_node(lab: Lab, via: str = "node1") -> str:
    wait_for(lambda: len(started(lab, via, WEB)) == 1, 60, "web running on one node")
    return started(lab, via, WEB)[0]


def write_token(lab: Lab, node: str) -> str:
    token = uuid.uuid4().hex
    docker(lab, node, "exec", WEB, "sh", "-c", f"echo {token} >> /data/log && sync")
    assert reads(lab, node, token)
    return token


def reads(lab: Lab, node: str, token: str) -> bool:
    r = docker(lab, node, "exec", WEB, "cat", "/data/log", check=False)
    return r.returncode == 0 and token in r.stdout.split()


def container_pid(lab: Lab, node: str) -> int:
    return int(docker(lab, node, "inspect", "-f", "{{.State.Pid}}", WEB).stdout.strip() or 0)


def moved_with_data(lab: Lab, via: str, src: str, token: str, timeout: float, what: str) -> tuple[str, float]:
    """Wait until web runs on a node other than ``src`` and reads ``token`` there; (node, seconds waited)."""
    t0 = time.monotonic()
    got: list[str] = []

    def ok() -> bool:
        on = started(lab, via, WEB)
        if len(on) == 1 and on[0] != src and reads(lab, on[0], token):
            got[:] = on
            return True
        return False

    wait_for(ok, timeout, f"{what}: web running on another node than {src} with its data")
    return got[0], time.monotonic() - t0


def failcount(lab: Lab, via: str, rsc: str, node: str) -> int:
    v = lab.exec(via, "crm_failcount", "--query", "--quiet", "-r", rsc, "-N", node, check=False).stdout.strip()
    return int(v) if v.isdigit() else (10**6 if v == "INFINITY" else 0)


def cleanup(lab: Lab, via: str, rsc: str) -> None:
    lab.exec(via, "crm_resource", "--cleanup", "-r", rsc, timeout=60)


def mounted_only_on(env: dict[str, Any], node: str) -> None:
    snap = env["sampler"].once()
    where = sorted(n for n, vols in snap.items() if VOL in vols)
    assert where == [node], (where, node)


# --- tests ------------------------------------------------------------------------------------------------
def test_the_app_runs_on_one_node_over_every_nodes_adopted_dockerd(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    node = web_node(lab)
    wait_for(lambda: started(lab, "node1", DAEMON) == NODES, 60, "the DockerDaemon clone on every node")
    st = lab.status()
    for n in st["nodes"]:
        # adopted, not restarted: the clone's instance is the dockerd the lab started (its pid file's)
        pid = int((lab.dir / "nodes" / n["name"] / "docker.pid").read_text())
        assert n["pids"]["dockerd"] == pid, n
        assert n["pids"]["watch"] and pid_alive(n["pids"]["watch"]), n
    token = write_token(lab, node)
    mounted_only_on(env, node)
    assert reads(lab, node, token)
    env["watchers"] = [n["pids"]["watch"] for n in st["nodes"]]


def test_standby_of_the_active_node_moves_the_container_with_its_data(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    src = web_node(lab)
    token = write_token(lab, src)
    t0 = time.monotonic()
    lab.exec("node1", "crm_attribute", "--node", src, "--name", "standby", "--update", "on")
    dst, _ = moved_with_data(lab, "node1", src, token, 60, "standby")
    took = time.monotonic() - t0
    env["times"]["standby"] = round(took, 2)
    print(f"\nstandby {src} -> web with its data on {dst}: {took:.1f} s")
    mounted_only_on(env, dst)
    # standby stops everything of the node: the container, then its dockerd (through the agent)
    assert src not in started(lab, "node1", DAEMON)
    assert docker(lab, src, "ps", "-q", "--filter", f"name=^{WEB}$", check=False).stdout.strip() == ""
    lab.exec("node1", "crm_attribute", "--node", src, "--name", "standby", "--update", "off")
    wait_for(lambda: started(lab, "node1", DAEMON) == NODES, 60, f"{src} out of standby")
    assert started(lab, "node1", WEB) == [dst]  # sticky: it does not move back


def test_killing_the_containers_process_restarts_it_in_place_then_moves_it(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    src = web_node(lab)
    token = write_token(lab, src)
    old = container_pid(lab, src)
    t0 = time.monotonic()
    subprocess.run(["kill", "-9", str(old)], check=True)

    def restarted() -> bool:
        r = docker(lab, src, "inspect", "-f", "{{.State.Running}} {{.State.Pid}}", WEB, check=False)
        running, _, pid = r.stdout.strip().partition(" ")
        return running == "true" and pid.isdigit() and int(pid) not in (0, old) and reads(lab, src, token)

    try:
        wait_for(restarted, 60, f"web restarted on {src}")
    except AssertionError as exc:
        mon = lab.exec("node1", "crm_mon", "-1", "--show-detail", "--failcounts", check=False).stdout
        raise AssertionError(f"{exc}: web on {started(lab, 'node1', WEB)}, fail count "
                             f"{failcount(lab, 'node1', WEB, src)}; {mon}"
                             f"{(lab.dir / 'nodes' / src / 'watch.log').read_text()[-1500:]}") from None
    took = time.monotonic() - t0
    env["times"]["container_kill_restart_in_place"] = round(took, 2)
    print(f"\nkill -9 of web's process on {src} -> restarted in place: {took:.1f} s")
    assert started(lab, "node1", WEB) == [src]
    assert 1 <= failcount(lab, "node1", WEB, src) < THRESHOLD
    # the watcher failed it at once (crm_resource --fail), not the next monitor
    assert f"failed {WEB} in Pacemaker" in (lab.dir / "nodes" / src / "watch.log").read_text()
    assert took < MONITOR_INTERVAL, took

    # killed again until the fail count reaches the threshold: then it moves, with its data
    for kills in range(2, THRESHOLD + 1):
        before = failcount(lab, "node1", WEB, src)
        old = container_pid(lab, src)
        t0 = time.monotonic()
        subprocess.run(["kill", "-9", str(old)], check=True)
        wait_for(lambda b=before: failcount(lab, "node1", WEB, src) > b, 30, f"kill {kills} counted")  # type: ignore[misc]
        if failcount(lab, "node1", WEB, src) >= THRESHOLD:
            break
        wait_for(restarted, 60, f"web restarted on {src} after kill {kills}")
    dst, _ = moved_with_data(lab, "node1", src, token, 60, f"kill {kills} (migration-threshold {THRESHOLD})")
    took = time.monotonic() - t0
    env["times"]["container_kill"] = round(took, 2)
    print(f"kill -9 number {kills} on {src} -> web with its data on {dst}: {took:.1f} s")
    mounted_only_on(env, dst)
    cleanup(lab, "node1", WEB)
    wait_for(lambda: failcount(lab, "node1", WEB, src) == 0, 30, "web's fail count cleared")
    assert web_node(lab) == dst


def test_killing_the_nodes_dockerd_fails_the_group_over(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    src = web_node(lab)
    token = write_token(lab, src)
    t0 = time.monotonic()
    lab.run("kill", src, "--only", "dockerd")
    dst, _ = moved_with_data(lab, "node1", src, token, 90, "dockerd killed")
    took = time.monotonic() - t0
    env["times"]["dockerd_kill"] = round(took, 2)
    print(f"\nkill of dockerd on {src} -> web with its data on {dst}: {took:.1f} s")
    mounted_only_on(env, dst)
    assert src not in started(lab, "node1", DAEMON)  # migration-threshold 1: not restarted there
    # cleared, the clone starts the node's dockerd again (through the agent, with the lab's arguments)
    cleanup(lab, "node1", DAEMON_CLONE)
    wait_for(lambda: started(lab, "node1", DAEMON) == NODES, 90, f"dockerd back on {src}")
    assert docker(lab, src, "info", "--format", "{{.Name}}").stdout.strip() == src
    assert started(lab, "node1", WEB) == [dst]


def test_killing_the_whole_node_fences_it_and_fails_the_group_over(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    src = web_node(lab)
    via = next(n for n in NODES if n != src)
    token = write_token(lab, src)
    t0 = time.monotonic()
    lab.run("kill", src)
    dst, _ = moved_with_data(lab, via, src, token, 90, "node killed")
    took = time.monotonic() - t0
    env["times"]["node_kill"] = round(took, 2)
    print(f"\nkill of {src} -> web with its data on {dst}: {took:.1f} s")
    history = lab.exec(via, "stonith_admin", "--history", src).stdout
    assert f"off of {src} successful" in history or f"turn off node {src}" in history, history
    assert f"off {src}: ok" in (lab.dir / "fencer.log").read_text()
    mounted_only_on(env, dst)
    t1 = time.monotonic()
    lab.run("start", src, timeout=180)
    wait_for(lambda: started(lab, via, DAEMON) == NODES, 90, f"{src}'s dockerd adopted again")
    print(f"start {src} -> rejoined, its dockerd adopted: {time.monotonic() - t1:.1f} s")
    assert started(lab, via, WEB) == [dst]
    mounted_only_on(env, dst)
    assert reads(lab, dst, token)


def test_down_ends_the_watchers_and_leaves_nothing(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    watchers = [n["pids"]["watch"] for n in lab.status()["nodes"]]
    assert all(watchers), watchers
    env["sampler"].stop()  # before the nodes go (the fixture checks what it saw)
    lab.run("down", timeout=180)
    assert not lab.dir.exists()
    for pid in watchers + env.get("watchers", []):
        assert not pid_alive(pid), pid
