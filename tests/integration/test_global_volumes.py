"""Global volumes on a shared disk group: two nodes, each its own Docker engine and its own veritas plugin
(different [node] names), one state root and one disk group made with `dg init -s` (the vendor's
`vxdg -s init`). Docker sends Create for the same name on both at the same moment (swarm does, moby#31492):
identical options make one volume and both succeed; conflicting ones make one volume, the loser gets an
error naming the option and the existing value, and nothing changes. Every engine lists it once, scope
global. Real engines, real plugins, real loop devices and filesystems.

"The same moment" is made exact with a pause point: node1's make stops with its volume recorded and its
lock held (VERITAS_PAUSE_AT=make.recorded) while node2's Create is sent. Docker asks the driver's Get
before Create and sends no Create for a volume Get finds (moby volume/service/store.go), so a conflicting
Create sent after the volume was made is answered by Docker itself and never reaches a plugin."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import diskgroup
from storage.config import Config, load_config
from tests.integration.conftest import finish
from tests.integration.dockerstack import DockerNode, PluginProcess, share_mount_root, unshare_mount_root

DG = "dockerdg"


@dataclass
class Node:
    name: str
    engine: DockerNode
    plugin: PluginProcess
    config_path: Path

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.engine.cli(*args, check=False, timeout=180)


@dataclass
class Cluster:
    root: Path
    nodes: list[Node]
    config: Config  # node1's

    def logs(self) -> str:
        """The plugins' logs, for a failure's message."""
        return "\n".join(f"--- {n.name}\n{n.plugin.log.read_text()[-3000:]}" for n in self.nodes)

    def catalog_state(self) -> tuple[object, ...]:
        """Everything the catalog says about volumes, to prove a refused Create changed nothing."""
        dg = diskgroup.DiskGroup(self.config, DG)
        try:
            return (dg.catalog.volumes(), dg.catalog.subdisks(), dg.catalog.intents(), dg.catalog.mounts())
        finally:
            dg.close()

    def volume(self, name: str):
        dg = diskgroup.DiskGroup(self.config, DG)
        try:
            return dg.catalog.volume(name)
        finally:
            dg.close()


def _config(root: Path, node: str, engine: DockerNode) -> Path:
    path = root / f"{node}.conf"
    path.write_text(
        "[storage]\n"
        f"diskgroup = {DG}\n"
        f"state_root = {root}/state\n"  # one state root, so one disk group root: the shared storage
        f"mount_root = {root}/mnt\n"
        "[node]\n"
        f"name = {node}\n"
        "[plugin]\n"
        f"socket = {engine.plugins}/veritas.sock\n"
        f"docker_host = {engine.url}\n"
        "workers = 2\n"
    )
    return path


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="vglobal-", dir="/tmp"))
    nodes = []
    for name in ("node1", "node2"):
        engine = DockerNode(root / name)
        path = _config(root, name, engine)
        nodes.append(Node(name, engine, PluginProcess(path, engine.plugins / "veritas.sock", root / f"{name}.log"),
                          path))
    config = load_config(nodes[0].config_path)
    try:
        share_mount_root(root / "mnt")  # before the engines' namespaces exist
        (root / "disks").mkdir()
        subprocess.run(["python3", "-m", "storage.cli", "--config", str(nodes[0].config_path), "dg", "init", "-s",
                        DG, f"{root}/disks/d1.img=3g", f"{root}/disks/d2.img=3g"],
                       check=True, capture_output=True, cwd=Path(__file__).resolve().parents[2])
        (root / "release").touch()  # node1's makes pause at make.recorded only while this is gone
        for n in nodes:
            n.engine.start()
            n.plugin.start(extra_env={"VERITAS_PAUSE_AT": "make.recorded",
                                      "VERITAS_PAUSE_FILE": str(root / "release")} if n.name == "node1" else None)
        yield Cluster(root, nodes, config)
    finally:
        for n in nodes:
            n.engine.stop()
        for n in nodes:
            n.plugin.stop()
        unshare_mount_root(root / "mnt")
        finish(config, root)


def _at_once(cluster: Cluster, name: str, opts: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """`docker volume create` of ``name`` on every node at the same moment, node i with options opts[i]."""
    barrier = threading.Barrier(len(cluster.nodes))
    out: list[subprocess.CompletedProcess[str] | None] = [None] * len(cluster.nodes)

    def one(i: int) -> None:
        args = [a for kv in opts[i] for a in ("-o", kv)]
        barrier.wait()
        out[i] = cluster.nodes[i].docker("volume", "create", "-d", "veritas", "--name", name, *args)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cluster.nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(o is not None for o in out), "a docker volume create did not return"
    return out  # type: ignore[return-value]


def _while_node1_makes(cluster: Cluster, name: str, opts: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """node1's Create of ``name`` (options opts[0]) paused with its volume recorded and its lock held,
    node2's Create of it (opts[1]) sent meanwhile; then node1's let go. Returns both results, and
    whether node2's was still waiting when node1's was let go (it reached the plugin's Create)."""
    release = cluster.root / "release"
    reached = Path(f"{release}.reached")
    release.unlink()
    reached.unlink(missing_ok=True)
    out: list[subprocess.CompletedProcess[str] | None] = [None, None]

    def one(i: int) -> None:
        args = [a for kv in opts[i] for a in ("-o", kv)]
        out[i] = cluster.nodes[i].docker("volume", "create", "-d", "veritas", "--name", name, *args)

    first = threading.Thread(target=one, args=(0,))
    second = threading.Thread(target=one, args=(1,))
    try:
        first.start()
        deadline = time.monotonic() + 60
        while not reached.exists():
            assert time.monotonic() < deadline and first.is_alive(), ("node1's Create never paused", out,
                                                                       cluster.logs())
            time.sleep(0.02)
        second.start()
        second.join(3)
        assert second.is_alive(), ("node2's Create did not wait for node1's: Docker answered it from Get,"
                                   " without sending Create", out[1], cluster.logs())
    finally:
        release.touch()
        first.join(300)
        second.join(300)
    assert all(o is not None for o in out), "a docker volume create did not return"
    return out  # type: ignore[return-value]


def _listed(node: Node) -> list[str]:
    proc = node.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}")
    assert proc.returncode == 0, proc.stderr
    return sorted(proc.stdout.split("\n")[:-1])


def test_identical_concurrent_creates_make_one_volume_listed_once_everywhere(cluster: Cluster):
    opts = ["size=300m", "layout=concat", "fstype=xfs", "maxiops=0"]
    for name in ("g1", "g2", "g3"):  # a few rounds: the race goes either way
        results = _at_once(cluster, name, [opts, opts])
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        v = cluster.volume(name)
        assert v is not None and v.state == "ok" and v.size == 300 * 1024**2 and v.layout == "concat", v
    for n in cluster.nodes:
        assert _listed(n) == ["veritas g1", "veritas g2", "veritas g3"], n.name
        # Docker retries a Create: the same options again on one node succeed and change nothing
        before = cluster.catalog_state()
        again = n.docker("volume", "create", "-d", "veritas", "--name", "g1", *[a for kv in opts for a in ("-o", kv)])
        assert again.returncode == 0, again.stderr
        assert cluster.catalog_state() == before
        inspect = json.loads(n.docker("volume", "inspect", "g1").stdout)
        assert len(inspect) == 1 and inspect[0]["Scope"] == "global" and inspect[0]["Driver"] == "veritas", inspect
    dg = diskgroup.DiskGroup(cluster.config, DG)
    try:
        assert [v.name for v in dg.catalog.volumes()] == ["g1", "g2", "g3"]
        assert len(dg.catalog.subdisks("g1")) == 1 and dg.catalog.intents() == []
    finally:
        dg.close()


def test_a_create_racing_one_in_progress_on_another_node_waits_for_it_and_succeeds(cluster: Cluster):
    """node2's Create arrives while node1's is half way (volume recorded, lock held): it reaches the
    plugin's Create (Get does not count a volume still being made), waits, and succeeds on the one volume."""
    opts = ["size=300m", "layout=concat"]
    results = _while_node1_makes(cluster, "w1", [opts, opts])
    assert [r.returncode for r in results] == [0, 0], ([r.stderr for r in results], cluster.logs())
    v = cluster.volume("w1")
    assert v is not None and v.state == "ok" and v.size == 300 * 1024**2
    for n in cluster.nodes:
        assert _listed(n) == ["veritas w1"], n.name


@pytest.mark.parametrize(("key", "values", "shown"), [
    ("size", ("300m", "400m"), {"300m": "300 MiB", "400m": "400 MiB"}),
    ("layout", ("concat", "mirror"), {"concat": "concat", "mirror": "mirror"}),
    ("fstype", ("xfs", "ext4"), {"xfs": "xfs", "ext4": "ext4"}),
    ("maxiops", ("100", "200"), {"100": "100", "200": "200"}),
])
def test_conflicting_concurrent_creates_one_wins_the_other_is_told_and_nothing_changes(
        cluster: Cluster, key: str, values: tuple[str, str], shown: dict[str, str]):
    base = {"size": "300m", "maxiops": "0"} if key == "layout" else {"size": "300m", "layout": "concat",
                                                                     "fstype": "xfs", "maxiops": "0"}
    opts = [[f"{k}={v}" for k, v in {**base, key: val}.items()] for val in values]
    results = _while_node1_makes(cluster, "c1", opts)
    assert [r.returncode == 0 for r in results] == [True, False], ([r.stderr for r in results], cluster.logs())
    win, lose = 0, 1
    err = results[lose].stderr
    # the differing option, the existing (winner's) value, and what the loser asked
    assert "already exists with different options" in err, err
    assert f"{key}={shown[values[win]]} (asked {values[lose]})" in err, err
    v = cluster.volume("c1")
    assert v is not None and v.state == "ok"
    want = {"size": 300 * 1024**2 if values[win] == "300m" else 400 * 1024**2} if key == "size" else \
        {key: int(values[win]) if key == "maxiops" else values[win]}
    assert {k: getattr(v, k) for k in want} == want, v
    # the loser's Create reaching its plugin again (a retry) is refused again, and changes nothing;
    # through `docker volume create` Docker now answers from Get itself, also changing nothing
    before = cluster.catalog_state()
    asked = dict(kv.split("=", 1) for kv in opts[lose])
    again = cluster.nodes[lose].plugin.call("VolumeDriver.Create", {"Name": "c1", "Opts": asked})["Err"]
    assert f"{key}={shown[values[win]]} (asked {values[lose]})" in again, again
    cluster.nodes[lose].docker("volume", "create", "-d", "veritas", "--name", "c1",
                               *[a for kv in opts[lose] for a in ("-o", kv)])
    assert cluster.catalog_state() == before
    for n in cluster.nodes:
        assert _listed(n) == ["veritas c1"], n.name
