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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import pcmk_failover as pf
from bench.pcmk_failover import DAEMON, NODES, THRESHOLD, VOL, WEB, WEB_RSC, Cluster
from tests.cluster.test_failover import INTERVAL, TTL, MountSampler
from tests.cluster.test_lab import Lab, pid_alive

pytestmark = pytest.mark.integration

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
        info: dict[str, Any] = {"lab": lab, "c": Cluster(lab), "sampler": sampler, "times": {}}
        info["c"].settle("node1")  # every scenario starts from an idle cluster
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


@pytest.fixture
def healthy(env: dict[str, Any]) -> Iterator[None]:
    """A scenario's cluster: as the previous test should have left it. When it did not (it failed), the
    cluster is put back first, so that one failure is reported once, not again by every test after it."""
    done = pf.restore(env["c"], [WEB_RSC])
    if done:
        print(f"\nrestored before this test: {', '.join(done)}")
    yield


# --- helpers (the scenarios themselves are bench/pcmk_failover.py's, which bench/agents.py times) ----------
def mounted_only_on(env: dict[str, Any], node: str) -> None:
    snap = env["sampler"].once()
    where = sorted(n for n, vols in snap.items() if VOL in vols)
    assert where == [node], (where, node)


# --- tests ------------------------------------------------------------------------------------------------
def test_the_app_runs_on_one_node_over_every_nodes_adopted_dockerd(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    c: Cluster = env["c"]
    node = c.where(WEB)
    c.daemons_everywhere("node1", 60)
    st = lab.status()
    for n in st["nodes"]:
        # adopted, not restarted: the clone's instance is the dockerd the lab started (its pid file's)
        pid = int((lab.dir / "nodes" / n["name"] / "docker.pid").read_text())
        assert n["pids"]["dockerd"] == pid, n
        assert n["pids"]["watch"] and pid_alive(n["pids"]["watch"]), n
    token = c.write_token(node)
    mounted_only_on(env, node)
    assert c.reads(node, token)
    env["watchers"] = [n["pids"]["watch"] for n in st["nodes"]]


def test_every_node_answers_meta_data_to_pacemakers_own_user(env: dict[str, Any]) -> None:
    """The controller asks an agent for meta-data as hacluster before its first operation on the node; a
    failed answer can lose that operation in Pacemaker 2.1.5 and stall every transition behind it (90 s),
    which a standby right after ``up`` ran into."""
    lab: Lab = env["lab"]
    for n in NODES:
        for agent in ("DockerContainer", "DockerDaemon"):
            r = lab.exec(n, "runuser", "-u", "hacluster", "--", f"/usr/lib/ocf/resource.d/veritas/{agent}",
                         "meta-data", check=False)
            assert r.returncode == 0, (n, agent, r.stderr)
            assert f'<resource-agent name="{agent}"' in r.stdout, (n, agent, r.stdout[:200])
        log = (lab.dir / "nodes" / n / "pcmk" / "log-pacemaker" / "pacemaker.log").read_text(errors="replace")
        assert "Failed to retrieve meta-data" not in log, n


@pytest.mark.usefixtures("healthy")
def test_standby_of_the_active_node_moves_the_container_with_its_data(env: dict[str, Any]) -> None:
    c: Cluster = env["c"]
    m = pf.standby(c, [WEB_RSC])
    src, dst, took = m.src, m.dst(WEB_RSC), m.secs(WEB_RSC)
    env["times"]["standby"] = round(took, 2)
    print(f"\nstandby {src} -> web with its data on {dst}: {took:.1f} s")
    mounted_only_on(env, dst)
    # standby stops everything of the node: the container, then its dockerd (through the agent)
    assert src not in c.started("node1", DAEMON)
    assert c.docker(src, "ps", "-q", "--filter", f"name=^{WEB}$", check=False).stdout.strip() == ""
    pf.unstandby(c, src)
    assert c.started("node1", WEB) == [dst]  # sticky: it does not move back


@pytest.mark.usefixtures("healthy")
def test_crm_resource_move_migrates_the_container_offline_with_its_data(env: dict[str, Any]) -> None:
    """The seed's offline migration of a container through the cluster: stopped on the source, its volume
    released, recreated and started on the target with its data; never attached on both (the sampler)."""
    c: Cluster = env["c"]
    m = pf.move(c)
    src, dst, took = m.src, m.dst(WEB_RSC), m.secs(WEB_RSC)
    env["times"]["crm_resource_move"] = round(took, 2)
    print(f"\ncrm_resource --move {src} -> web with its data on {dst}: {took:.1f} s")
    mounted_only_on(env, dst)
    assert c.docker(src, "ps", "-q", "--filter", f"name=^{WEB}$", check=False).stdout.strip() == ""
    assert c.started("node1", WEB) == [dst]  # the move's constraint is gone; stickiness keeps it there
    c.settle("node1")
    assert c.started("node1", WEB) == [dst]


@pytest.mark.usefixtures("healthy")
def test_killing_the_containers_process_restarts_it_in_place_then_moves_it(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    c: Cluster = env["c"]
    src = c.where(WEB)

    def first_restart(kill: int, took: float) -> None:
        if kill != 1:
            return
        env["times"]["container_kill_restart_in_place"] = round(took, 2)
        print(f"\nkill -9 of web's process on {src} -> restarted in place: {took:.1f} s")
        assert c.started("node1", WEB) == [src]
        assert 1 <= c.failcount("node1", WEB, src) < THRESHOLD
        # the watcher failed it at once (crm_resource --fail), not the next monitor
        assert f"failed {WEB} in Pacemaker" in (lab.dir / "nodes" / src / "watch.log").read_text()
        assert took < MONITOR_INTERVAL, took

    m = pf.container_kill(c, WEB_RSC, THRESHOLD, after_restart=first_restart)
    assert "container_kill_restart_in_place" in env["times"], m  # the first kill restarted it in place
    dst, took = m.dst(WEB_RSC), m.secs(WEB_RSC)
    env["times"]["container_kill"] = round(took, 2)
    print(f"kill -9 number {m.kills} on {src} -> web with its data on {dst}: {took:.1f} s")
    mounted_only_on(env, dst)
    pf.clear_failures(c, WEB_RSC, src)
    assert c.where(WEB) == dst


@pytest.mark.usefixtures("healthy")
def test_killing_the_nodes_dockerd_fails_the_group_over(env: dict[str, Any]) -> None:
    c: Cluster = env["c"]
    m = pf.dockerd_kill(c, [WEB_RSC])
    src, dst, took = m.src, m.dst(WEB_RSC), m.secs(WEB_RSC)
    env["times"]["dockerd_kill"] = round(took, 2)
    print(f"\nkill of dockerd on {src} -> web with its data on {dst}: {took:.1f} s")
    mounted_only_on(env, dst)
    assert src not in c.started("node1", DAEMON)  # migration-threshold 1: not restarted there
    assert c.alive(src)  # no stop failed: nobody fenced it
    # cleared, the clone starts the node's dockerd again (through the agent, with the lab's arguments)
    pf.restore_dockerd(c, src, [])
    assert c.docker(src, "info", "--format", "{{.Name}}").stdout.strip() == src
    assert c.started("node1", WEB) == [dst]


@pytest.mark.usefixtures("healthy")
def test_killing_the_whole_node_fences_it_and_fails_the_group_over(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    c: Cluster = env["c"]
    m = pf.node_kill(c, [WEB_RSC])
    src, dst, took = m.src, m.dst(WEB_RSC), m.secs(WEB_RSC)
    via = next(n for n in NODES if n != src)
    env["times"]["node_kill"] = round(took, 2)
    print(f"\nkill of {src} -> web with its data on {dst}: {took:.1f} s")
    history = c.in_node(via, "stonith_admin", "--history", src).stdout
    assert f"off of {src} successful" in history or f"turn off node {src}" in history, history
    assert f"off {src}: ok" in (lab.dir / "fencer.log").read_text()
    mounted_only_on(env, dst)
    took = pf.restore_node(c, src)
    print(f"start {src} -> rejoined, its dockerd adopted: {took:.1f} s")
    assert c.started(via, WEB) == [dst]
    mounted_only_on(env, dst)
    token = m.tokens[WEB]
    assert token is not None and c.reads(dst, token)


def test_down_ends_the_watchers_and_leaves_nothing(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    watchers = [n["pids"]["watch"] for n in lab.status()["nodes"]]
    assert all(watchers), watchers
    env["sampler"].stop()  # before the nodes go (the fixture checks what it saw)
    lab.run("down", timeout=180)
    assert not lab.dir.exists()
    for pid in watchers + env.get("watchers", []):
        assert not pid_alive(pid), pid
