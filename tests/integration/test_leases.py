"""Leases, exclusive attachment and self-fencing with two real nodes on one shared disk group root,
once with each catalog backend: SQLite in the shared root, and a real etcd the test starts.

Each node is a real dockerd (its own mount and network namespace) with its own veritas plugin, node
name and mount root; both plugins use one state root (the "shared storage" of a site), and one
catalog: the SQLite file under it, or etcd. Short leases (lease_ttl 6 s, lease_interval 1 s) keep the
waits short.

The catalog is made to fail for real in the fencing test. On SQLite the test holds SQLite's write lock
on the catalog file (BEGIN EXCLUSIVE), so node A's renewals fail with "database is locked" exactly as
they do when another writer or a stalled shared filesystem holds it; node B cannot write meanwhile
either, so it takes over after the lock goes, once A's lease has expired. On etcd node A reaches etcd
through a TCP relay the test owns (tests/tcp_relay.py) and node B directly: the test kills the relay,
so etcd is out of A's reach only, as in a partition, and B renews throughout.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.catalog.base import AttachRec, Catalog, LeaseRec
from storage.catalog.etcd import EtcdCatalog
from storage.catalog.etcd_store import EtcdStore
from storage.catalog.sqlite import SqliteCatalog
from storage.config import load_config
from storage.group import store_of
from storage.kernel import mounts
from tests.etcd_server import EtcdServer, free_port
from tests.integration import conftest
from tests.integration.dockerstack import (
    REPO,
    DockerNode,
    PluginProcess,
    alive,
    share_mount_root,
    unshare_mount_root,
)
from tests.tcp_relay import Relay

IMAGE = "localbusybox"
TTL = 6.0
INTERVAL = 1.0
GRACE = 8.0  # engine_grace: longer than this machine takes to restart a test dockerd under load (4-5 s)
WRITER = "echo hello > /data/f; i=0; while true; do echo $i >> /data/log; i=$((i+1)); sleep 0.05; done"


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Node:
    name: str
    docker: DockerNode
    plugin: PluginProcess
    mnt: Path

    def mountpoint(self, vol: str) -> Path:
        return self.mnt / f"{vol}_dockerdg"

    def run(self, *args: str, check: bool = True) -> str:
        return self.docker.cli(*args, check=check).stdout.strip()

    def veritas(self, *args: str) -> str:
        """The veritas CLI with this node's config, as an administrator on the node runs it."""
        env = {**os.environ, "VERITAS_CONFIG": str(self.plugin.config_path)}
        proc = subprocess.run([sys.executable, "-m", "storage.cli", *args], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


@dataclass
class Pair:
    root: Path
    a: Node
    b: Node
    etcd: EtcdServer | None = None  # None: the catalog is SQLite in the shared root
    relay: Relay | None = None  # node A's way to etcd

    @property
    def db(self) -> Path:
        return self.root / "state" / "dg" / "dockerdg" / "catalog.db"

    def open_catalog(self) -> Catalog:
        """The disk group's catalog, read as a third party (etcd: directly, not through A's relay)."""
        if self.etcd is None:
            return SqliteCatalog(self.db)
        return EtcdStore([self.etcd.endpoint]).open("dockerdg")

    def catalog(self) -> tuple[list[LeaseRec], list[AttachRec]]:
        cat = self.open_catalog()
        try:
            return cat.leases(), cat.attachments()
        finally:
            cat.close()

    def attached(self, vol: str) -> AttachRec | None:
        return next((a for a in self.catalog()[1] if a.volume == vol), None)

    def lease(self, node: str) -> LeaseRec | None:
        return next((rec for rec in self.catalog()[0] if rec.node == node), None)

    def lease_gone(self, node: str) -> bool:
        """Whether ``node``'s lease has run out as the catalog judges it: SQLite's recorded expiry has
        passed; etcd's server reports the lease expired (its alive key and attachments are gone)."""
        if self.etcd is None:
            rec = self.lease(node)
            return rec is None or rec.expires + 0.2 < time.time()
        return self.etcd_lease_left(node) < 0

    def etcd_lease_left(self, node: str) -> int:
        """Seconds etcd says ``node``'s lease has left; -1 once the server let it expire."""
        cat = self.open_catalog()
        assert isinstance(cat, EtcdCatalog)
        kv = cat.etcd.get("test: read a lease", cat._k(f"lease/{node}"))
        if kv is None:
            return -1
        return cat.etcd.time_to_live("test: read a lease", int(json.loads(kv["value"])["id"]))


def _config(root: Path, name: str, node: DockerNode, mnt: Path, etcd_endpoint: str | None) -> Path:
    path = root / f"{name}.conf"
    catalog = f"catalog = etcd\netcd_endpoints = {etcd_endpoint}\n" if etcd_endpoint else ""
    path.write_text(
        "[storage]\ndiskgroup = dockerdg\n"
        f"state_root = {root}/state\nmount_root = {mnt}\n"
        "default_disk_size = 4g\ndefault_disk_count = 2\n"
        f"[node]\nname = {name}\n"
        f"[plugin]\nsocket = {node.plugins}/veritas.sock\ndocker_host = {node.url}\nworkers = 2\n"
        f"[cluster]\n{catalog}lease_ttl = {TTL:g}\nlease_interval = {INTERVAL:g}\nengine_grace = {GRACE:g}\n"
    )
    return path


@pytest.fixture(params=["sqlite", "etcd"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    root = Path(tempfile.mkdtemp(prefix="vlease-", dir="/tmp"))
    nodes: list[Node] = []
    etcd: EtcdServer | None = None
    relay: Relay | None = None
    try:
        if request.param == "etcd":
            etcd = EtcdServer()  # its own: the plugins keep the disk group under etcd's /veritas prefix
            etcd.start()
            relay = Relay(free_port(), etcd.client_port)
            relay.heal()
        for name in ("nodeA", "nodeB"):
            mnt = root / f"mnt-{name}"
            share_mount_root(mnt)  # before the node's namespace is made, or it never sees volume mounts
            docker = DockerNode(root / name, keep_root=root)
            endpoint = None if etcd is None else (relay.endpoint if relay and name == "nodeA" else etcd.endpoint)
            conf = _config(root, name, docker, mnt, endpoint)
            plugin = PluginProcess(conf, docker.plugins / "veritas.sock", root / f"plugin-{name}.log")
            nodes.append(Node(name, docker, plugin, mnt))
            docker.start()
            plugin.start()  # nodeA first: it makes the default disk group; nodeB shares it
        pair = Pair(root, nodes[0], nodes[1], etcd, relay)
        # nodeA's first renewal came before its disk group existed; it renews within lease_interval
        wait_for("both nodes' leases", lambda: all((pair.lease(n) or LeaseRec("", 0, 0)).expires > time.time()
                                                   for n in ("nodeA", "nodeB")), timeout=TTL)
        yield pair
    finally:
        try:
            for n in nodes:
                n.docker.stop()
            for n in nodes:
                n.plugin.stop()
            for n in nodes:
                unshare_mount_root(n.mnt)
            if relay is not None:
                relay.cut()
            # B's config reaches the catalog directly (A's may go through the relay)
            config = load_config(root / ("nodeB.conf" if (root / "nodeB.conf").exists() else "nodeA.conf"))
            try:
                conftest.finish(config, root)
            finally:
                if etcd is not None:
                    store_of(config).close()  # this process's lock session on that etcd
        finally:
            if etcd is not None:
                etcd.remove()


def start_writer(node: Node, ctr: str, vol: str) -> None:
    node.run("run", "-d", "--name", ctr, "--network", "none", "--stop-timeout", "1", "--volume-driver", "veritas",
             "-v", f"{vol}:/data", IMAGE, "sh", "-c", WRITER)
    wait_for("the writer to write", lambda: (node.mountpoint(vol) / "log").exists())


def read_on(node: Node, vol: str, check: bool = True) -> tuple[int, str]:
    proc = node.docker.cli("run", "--rm", "--network", "none", "--volume-driver", "veritas", "-v", f"{vol}:/data",
                           IMAGE, "cat", "/data/f", check=check)
    return proc.returncode, proc.stdout + proc.stderr


def status(node: Node, ctr: str) -> str:
    return node.run("inspect", "-f", "{{.State.Status}}", ctr)


def test_b_is_refused_naming_a_while_a_uses_the_volume_and_gets_it_when_a_stops(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.run("volume", "create", "-d", "veritas", "--name", "vol", "-o", "size=400m")
    start_writer(a, "wa", "vol")
    assert pair.attached("vol") is not None and pair.attached("vol").node == "nodeA"  # type: ignore[union-attr]
    rc, out = read_on(b, "vol", check=False)
    assert rc != 0 and "attached on node nodeA" in out, out
    assert not b.mountpoint("vol").exists() or mounts.mounted_at(b.mountpoint("vol")) is None
    att = pair.attached("vol")
    assert att is not None and att.node == "nodeA" and att.wanted_by == "nodeB"
    # docker volume inspect on either node shows where it is attached and until when the lease runs
    shown = b.run("volume", "inspect", "-f", "{{json .Status.attachment}}", "vol")
    assert '"node":"nodeA"' in shown and '"lease_live":true' in shown and '"wanted_by":"nodeB"' in shown, shown
    listed = b.veritas("vol", "list")
    assert "nodeA (lease to " in listed, listed
    leases = b.veritas("dg", "leases")
    assert [line.split()[0] for line in leases.splitlines()[1:]] == ["nodeA", "nodeB"], leases
    assert leases.count(" live ") == 2, leases
    a.run("rm", "-f", "wa")  # Docker unmounts its last use on A: A lets the volume go
    wait_for("A to release vol", lambda: pair.attached("vol") is None)
    rc, out = read_on(b, "vol")
    assert rc == 0 and out.strip() == "hello"
    assert pair.attached("vol") is None  # B's container ended: released there too


def test_a_killed_plugin_loses_the_volume_at_lease_expiry_and_leaves_it_alone_when_back(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.run("volume", "create", "-d", "veritas", "--name", "vol", "-o", "size=400m")
    start_writer(a, "wa", "vol")
    a.plugin.kill9()  # the plugin dies; A's container runs on, as on a node that died whole it would not
    expires = pair.lease("nodeA").expires  # type: ignore[union-attr]
    # B's Mount waits while A's lease runs (lease_ttl + lease_interval at most), and gets the volume
    # as soon as it has run out: one docker run, no refusal for swarm to retry after its restart delay
    rc, out = read_on(b, "vol", check=False)
    mounted = time.time()
    assert rc == 0 and out.strip() == "hello", out
    assert mounted > expires, "B mounted while A's lease still ran"
    assert mounted < expires + 2 + 2 * INTERVAL, f"B mounted {mounted - expires:.1f} s after A's lease ran out"
    ctr_b = b.run("run", "-d", "--network", "none", "--volume-driver", "veritas", "-v", "vol:/data", IMAGE,
                  "sh", "-c", "cat /data/f > /data/.seen; mv /data/.seen /data/seen-by-b; sleep 600")
    wait_for("B's container to read", lambda: (b.mountpoint("vol") / "seen-by-b").exists())
    assert (b.mountpoint("vol") / "seen-by-b").read_text().strip() == "hello"
    assert pair.attached("vol").node == "nodeB"  # type: ignore[union-attr]
    # A comes back: it finds the volume is B's, stops its own user of it and drops its mount records,
    # and does nothing to the volume: B's container goes on with the same data
    a.plugin.start()
    wait_for("A to stop its container", lambda: status(a, "wa") != "running")
    wait_for("A's mount point to go", lambda: mounts.mounted_at(a.mountpoint("vol")) is None)
    assert "attached on node nodeB now: left alone" in a.plugin.log.read_text()
    assert "mkfs" not in a.plugin.log.read_text() and "repair" not in a.plugin.log.read_text()
    cat = pair.open_catalog()
    try:
        assert [m.node for m in cat.mounts("vol")] == ["nodeB"]
    finally:
        cat.close()
    assert pair.attached("vol").node == "nodeB"  # type: ignore[union-attr]
    assert b.run("exec", ctr_b, "cat", "/data/f") == "hello" and status(b, ctr_b) == "running"
    b.run("rm", "-f", ctr_b)
    wait_for("B to release vol", lambda: pair.attached("vol") is None)


def test_a_that_cannot_renew_stops_its_container_and_unmounts_before_its_lease_ends(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.run("volume", "create", "-d", "veritas", "--name", "vol", "-o", "size=400m")
    start_writer(a, "wa", "vol")
    time.sleep(2 * INTERVAL)  # a renewal reads the attachment
    pid = int(a.run("inspect", "-f", "{{.State.Pid}}", "wa"))
    if pair.etcd is None:
        lock = sqlite3.connect(str(pair.db), timeout=30, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # from here, A's renewals fail: "database is locked"
        expires = lock.execute("SELECT expires FROM lease WHERE node='nodeA'").fetchone()[0]

        def heal() -> None:
            lock.execute("ROLLBACK")
            lock.close()
    else:
        assert pair.relay is not None
        pair.relay.cut()  # from here etcd is out of A's reach, and only A's
        expires = pair.lease("nodeA").expires  # type: ignore[union-attr]
        heal = pair.relay.heal
    try:
        # watched through the kernel: Docker's API waits on the container while its Unmount waits on
        # the catalog, as it would for a real outage
        wait_for("A to stop its container", lambda: not alive(pid), timeout=TTL)
        wait_for("A to unmount vol", lambda: mounts.mounted_at(a.mountpoint("vol")) is None, timeout=TTL)
        fenced_at = time.time()
        if pair.etcd is not None:  # the lease as the server judges it, not only as it was last read
            left = pair.etcd_lease_left("nodeA")
            assert left >= 0, "etcd let A's lease expire before A stopped writing: " + a.plugin.log.read_text()[-3000:]
        assert fenced_at < expires, (f"A stopped writing {fenced_at - expires:.1f} s after its lease ran out: "
                                     + a.plugin.log.read_text()[-3000:])
        log = a.plugin.log.read_text()
        assert "fencing this node" in log, log[-3000:]
        assert alive(a.plugin.proc.pid)  # type: ignore[union-attr]
        wait_for("A's lease to run out", lambda: time.time() > expires + 0.5 and pair.lease_gone("nodeA"),
                 timeout=TTL + 2)
        if pair.etcd is not None:  # B reaches etcd throughout: it takes the volume while A is still cut off
            assert pair.attached("vol") is None  # A's attachment went with its lease
            rc, out = read_on(b, "vol")
            assert rc == 0 and out.strip() == "hello", out
    finally:
        heal()
    if pair.etcd is None:
        # B could not renew either while the lock was held: its plugin renews again first (swarm retries;
        # until then a Mount on B is refused, as B's own plugin would fence it at once)
        wait_for("B's lease to be renewed",
                 lambda: (pair.lease("nodeB") or LeaseRec("", 0, 0)).expires > time.time() + TTL / 2)
        rc, out = read_on(b, "vol", check=False)
        assert rc == 0 and out.strip() == "hello", (out + "\nA: " + a.plugin.log.read_text()[-2000:]
                                                    + "\nB: " + b.plugin.log.read_text()[-2000:])
    wait_for("vol to be released", lambda: pair.attached("vol") is None)
    if pair.etcd is not None:  # A reaches etcd again: it renews, and finds nothing of its own to release
        wait_for("A's new lease", lambda: not pair.lease_gone("nodeA"))
        wait_for("A to log the release", lambda: "fenced while the catalog did not answer" in a.plugin.log.read_text())


def _writer_pid(node: Node, ctr: str) -> int:
    time.sleep(2 * INTERVAL)  # the plugin's lease thread notes which containers use the volume
    return int(node.run("inspect", "-f", "{{.State.Pid}}", ctr))


def test_a_whose_engine_is_gone_kills_what_uses_a_volume_wanted_elsewhere_after_the_grace(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.run("volume", "create", "-d", "veritas", "--name", "vol", "-o", "size=400m")
    start_writer(a, "wa", "vol")
    pid = _writer_pid(a, "wa")
    a.docker.kill()  # dockerd SIGKILLed: its container runs on, and no Unmount will ever come
    killed_engine = time.monotonic()
    # B's Mount is refused at first (recording that B wants it) and tries again while it waits; A's
    # plugin kills the container's processes after the grace (engine_grace), unmounts and releases,
    # and B's waiting Mount gets the volume, within the one docker run
    rc, out = read_on(b, "vol", check=False)
    took = time.monotonic() - killed_engine
    assert rc == 0 and out.strip() == "hello", out
    assert not alive(pid)
    assert took >= GRACE - 0.5, f"B had the volume {took:.1f} s after A's engine died: before the grace"
    # the grace runs from the end of A's event stream (not from A's next renewal); then quarter-second
    # looks, the kill, unmount and release, B's 0.2 s retries and B's container run
    assert took < GRACE + 3 * INTERVAL, (f"B had the volume only {took:.1f} s after A's engine died;"
                                         f" A's plugin:\n{a.plugin.log.read_text()[-3000:]}")
    assert mounts.mounted_at(a.mountpoint("vol")) is None
    assert "killing what uses them" in a.plugin.log.read_text()


def test_an_engine_back_within_the_grace_has_nothing_killed(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.run("volume", "create", "-d", "veritas", "--name", "vol", "-o", "size=400m")
    start_writer(a, "wa", "vol")
    _writer_pid(a, "wa")  # the plugin notes which containers use the volume
    a.docker.kill()
    killed_engine = time.monotonic()
    # B's Mount (it waits, in a thread of its own here) records that B wants the volume, while A's
    # dockerd comes back (dockerd itself may then stop the container it finds: its choice)
    reader = threading.Thread(target=read_on, args=(b, "vol"), kwargs={"check": False}, daemon=True)
    reader.start()
    a.docker.start()
    back = time.monotonic() - killed_engine
    assert back < GRACE, f"the engine came back only after the grace ({back:.1f} s): the test needs a faster dockerd"

    def wanted() -> bool:
        att = pair.attached("vol")
        return att is not None and (att.wanted_by == "nodeB" or att.node == "nodeB")

    wait_for("B to want vol", wanted, timeout=TTL)
    wait_for("the grace to pass", lambda: time.monotonic() - killed_engine > GRACE + 3 * INTERVAL, timeout=GRACE + 10)
    assert "killing what uses them" not in a.plugin.log.read_text()
    reader.join(timeout=TTL + 10)
    att = pair.attached("vol")
    assert att is None or att.node in ("nodeA", "nodeB")  # B may have it once A's dockerd stopped its container
