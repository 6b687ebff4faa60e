"""Recovery of abandoned operations with the catalog on etcd and two nodes sharing the disk group.

Every open of a disk group recovers the intents it finds, whichever node recorded them; what keeps
node B from rolling back node A's operation in flight is that A holds the operation's locks, which on
etcd are keys bound to A's session lease. So B opening the disk group while A's ``vol make`` is paused
at a crash point (tests/integration/test_crash.py's pause pattern) must leave it alone, and A then
finishes it. When A is killed instead, its locks go with its session lease, ``[cluster] lease_ttl``
after its last keepalive, and only then does B's open roll the operation back.

Both nodes are CLI processes on this host with their own node name and config; the disks are real
loop-backed images under one state root, the catalog and locks in a real etcd the test starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import diskgroup
from storage.catalog.etcd_store import EtcdStore
from storage.config import Config, load_config
from storage.diskgroup import DiskSpec
from storage.group import store_of
from tests.etcd_server import EtcdServer
from tests.integration.conftest import finish

REPO = Path(__file__).resolve().parents[2]
DG = "pausedg"
TTL = 3.0  # lease_ttl: the lock session's TTL too


@dataclass
class Nodes:
    root: Path
    etcd: EtcdServer
    conf_a: Path
    conf_b: Path

    def cli(self, conf: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["python3", "-m", "storage.cli", *args], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "VERITAS_CONFIG": str(conf), **(env or {})}, timeout=120,
                              check=False)

    def start(self, conf: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(["python3", "-m", "storage.cli", *args], cwd=REPO, text=True,
                                env={**os.environ, "VERITAS_CONFIG": str(conf), **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def volume_and_intents(self) -> tuple[str | None, list[str]]:
        """The state of volume ``mk`` and the keys of pending intents, read straight from etcd."""
        store = EtcdStore([self.etcd.endpoint])
        cat = store.open(DG)
        v = cat.volume("mk")
        return (None if v is None else v.state), [i.key for i in cat.intents()]


def _conf(root: Path, node: str, endpoint: str) -> Path:
    path = root / f"{node}.conf"
    path.write_text(f"[storage]\ndiskgroup = {DG}\nstate_root = {root}/state\nmount_root = {root}/mnt-{node}\n"
                    f"[node]\nname = {node}\n"
                    f"[cluster]\ncatalog = etcd\netcd_endpoints = {endpoint}\nlease_ttl = {TTL:g}\n"
                    "lease_interval = 0.5\n")
    return path


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    root = Path(tempfile.mkdtemp(prefix="vetcdrec-", dir="/tmp"))
    etcd = EtcdServer()
    etcd.start()
    config: Config | None = None
    try:
        conf_a, conf_b = _conf(root, "nodeA", etcd.endpoint), _conf(root, "nodeB", etcd.endpoint)
        config = load_config(conf_a)
        (root / "disks").mkdir()
        dg = diskgroup.init(config, DG, [DiskSpec.parse(f"{root}/disks/d{i}.img=2g") for i in (1, 2)])
        try:
            # B shares the disk group imported on A: it holds a live lease, as its plugin would renew it
            dg.catalog.renew_lease("nodeB", 600)
        finally:
            dg.close()
        yield Nodes(root, etcd, conf_a, conf_b)
    finally:
        try:
            if config is not None:
                finish(config, root)
        finally:
            if config is not None:
                store_of(config).close()
            etcd.remove()


def _wait_reached(proc: subprocess.Popen[str], marker: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the operation ended ({proc.returncode}) before its pause point: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the operation did not reach its pause point within {timeout} s")
        time.sleep(0.02)


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def test_b_opening_the_disk_group_leaves_a_paused_operation_of_a_alone(nodes: Nodes) -> None:
    release = nodes.root / "release"
    proc = nodes.start(nodes.conf_a, "vol", "make", "-g", DG, "mk", "300m",
                       env={"VERITAS_PAUSE_AT": "make.mkfs", "VERITAS_PAUSE_FILE": str(release)})
    try:
        _wait_reached(proc, Path(f"{release}.reached"))
        assert nodes.volume_and_intents() == ("creating", ["mk"])
        opened = nodes.cli(nodes.conf_b, "vol", "list", "-g", DG)  # opens the disk group: recovers what is abandoned
        assert opened.returncode == 0, opened.stderr
        assert nodes.volume_and_intents() == ("creating", ["mk"]), "B recovered A's live operation"
        assert proc.poll() is None, "A's paused operation ended while paused"
        time.sleep(TTL + 1)  # past the TTL: A's session keeps its locks alive, B's next open still waits
        again = nodes.cli(nodes.conf_b, "vol", "list", "-g", DG)
        assert again.returncode == 0, again.stderr
        assert nodes.volume_and_intents() == ("creating", ["mk"]), "B recovered A's live operation"
        release.touch()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"A's vol make failed after B opened the disk group: {err}"
        assert nodes.volume_and_intents() == ("ok", [])
    finally:
        release.touch()
        _end(proc)


def test_a_killed_mid_operation_is_rolled_back_by_b_once_its_lock_session_expires(nodes: Nodes) -> None:
    """A SIGKILLed at a crash point leaves its intent and its etcd locks; B's open leaves the intent
    while the locks live, and rolls it back within lease_ttl (plus etcd's expiry check) of the kill."""
    proc = nodes.start(nodes.conf_a, "vol", "make", "-g", DG, "mk", "300m", env={"VERITAS_CRASH_AT": "make.mkfs"})
    proc.communicate(timeout=120)
    killed = time.monotonic()
    assert proc.returncode == -signal.SIGKILL
    assert nodes.volume_and_intents() == ("creating", ["mk"])
    opened = nodes.cli(nodes.conf_b, "vol", "list", "-g", DG)
    assert opened.returncode == 0, opened.stderr
    if time.monotonic() - killed < TTL - 1:  # A's session lease surely still ran: its locks were held
        assert nodes.volume_and_intents() == ("creating", ["mk"]), "B rolled back before A's locks went"
    deadline = killed + TTL + 2.5
    while nodes.volume_and_intents() != (None, []):
        assert time.monotonic() < deadline, f"A's operation not rolled back within {TTL + 2.5:g} s of its death"
        time.sleep(0.3)
        got = nodes.cli(nodes.conf_b, "vol", "list", "-g", DG)
        assert got.returncode == 0, got.stderr
    made = nodes.cli(nodes.conf_b, "vol", "make", "-g", DG, "mk", "300m")  # the name is free again
    assert made.returncode == 0, made.stderr
