"""The machine's own Docker engine comes out of the suite as it went in.

Test engines (tests/integration/dockerstack.py, also used by bench/plugin.py) must never touch the
host's engine, its bridge ``docker0``, its networks or its volumes. The suite makes sure a host engine
runs before any Docker test (``test_host_engine_before_docker_tests``, ordered first by
tests/integration/conftest.py): if none answers on /var/run/docker.sock, it starts the standard one
(``dockerd`` with default settings, which creates docker0) and leaves it running, as scripts/run
would. ``test_host_engine_after_docker_tests`` (ordered last) then checks that it is the same engine,
with the same docker0 (same interface index: not deleted and re-made), the same networks and volumes,
and that it still runs a container on its default bridge.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.integration import netns
from tests.integration.dockerstack import DockerNode, alive, busybox_tar, rmtree

HOST_URL = "unix:///var/run/docker.sock"
HOST_SOCK = "/var/run/docker.sock"
HOST_LOG = Path("/var/log/dockerd.log")  # where scripts/run and scripts/test log the engine they start


@dataclass(frozen=True)
class HostState:
    """What the tests must leave as it is."""

    pid: int
    docker0_ifindex: int | None
    networks: frozenset[tuple[str, str]]
    volumes: frozenset[str]


def host_client(timeout: int = 60) -> docker.DockerClient:
    return docker.DockerClient(base_url=HOST_URL, timeout=timeout, version="auto")


def host_engine_answers() -> bool:
    try:
        return bool(host_client(timeout=5).ping())
    except Exception:  # no socket, or nothing behind it
        return False


def start_host_engine(timeout: float = 60.0) -> None:
    """Start the machine's standard engine (default settings and socket) and leave it running: it is
    the host's, not the test's, exactly what scripts/run starts when no engine runs."""
    with open(HOST_LOG, "ab") as log:
        proc = subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd="/")
    deadline = time.monotonic() + timeout
    while not host_engine_answers():
        if proc.poll() is not None:
            pytest.fail(f"the host's dockerd exited ({proc.returncode}): {HOST_LOG.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the host's dockerd did not come up in {timeout} s: {HOST_LOG.read_text()[-2000:]}")
        time.sleep(0.2)


def docker0_ifindex() -> int | None:
    """docker0 in the host's (this process's) network namespace, by interface index."""
    try:
        return int(Path("/sys/class/net/docker0/ifindex").read_text())
    except FileNotFoundError:
        return None


def engine_pid() -> int:
    """The process serving the host's socket, as the kernel says (SO_PEERCRED), not a pid file."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(HOST_SOCK)
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", cred)[0])


def engines_in_host_netns(host_pid: int) -> str:
    """Other dockerd processes in the host's network namespace (the usual culprits), for messages."""
    out = []
    for pid in netns.members(netns.inode()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != host_pid and argv and Path(argv[0].decode(errors="replace")).name == "dockerd":
            out.append(f"{pid}: {b' '.join(argv).decode(errors='replace')[:300]}")
    return "; other engines in the host's network namespace: " + ("; ".join(out) or "none")


def host_state() -> HostState:
    c = host_client()
    return HostState(pid=engine_pid(),
                     docker0_ifindex=docker0_ifindex(),
                     networks=frozenset((n.id, n.name) for n in c.networks.list()),
                     volumes=frozenset(v.name for v in c.volumes.list()))


def run_on_default_bridge() -> None:
    """``docker run --rm --network bridge IMG true`` on the host's engine, with a busybox image
    imported under a tag of this test's own and removed afterwards."""
    c = host_client()
    repo, tag = "veritas-hostcheck", uuid.uuid4().hex[:12]
    c.api.import_image_from_data(busybox_tar(), repository=repo, tag=tag)
    try:
        ctr = c.containers.create(f"{repo}:{tag}", ["true"], network="bridge")
        try:
            ctr.start()
            status = ctr.wait(timeout=60)["StatusCode"]
        finally:
            ctr.remove(force=True)
        assert status == 0, f"`true` on the host's default bridge exited {status}"
    finally:
        c.images.remove(f"{repo}:{tag}")
    assert not c.images.list(name=repo), "the test image is still on the host's engine"


@pytest.fixture(scope="session")
def host_engine() -> HostState:
    """The host's engine, started if none runs; its state before any Docker test."""
    if not host_engine_answers():
        start_host_engine()
    return host_state()


def test_host_engine_before_docker_tests(host_engine: HostState) -> None:
    """Ordered first: the host's engine runs, and runs a container on its default bridge, before any
    test engine starts."""
    assert alive(host_engine.pid)
    assert host_engine.docker0_ifindex is not None, \
        "the host's engine has no docker0" + engines_in_host_netns(host_engine.pid)
    run_on_default_bridge()


def test_node_engine_has_its_own_network_namespace(host_engine: HostState) -> None:
    """A test engine runs in a network namespace of its own (loopback up), starting and stopping it
    leaves the host's docker0 alone, and stop() leaves no process in that namespace."""
    root = Path(f"/tmp/vhostns-{uuid.uuid4().hex[:8]}")
    node = DockerNode(root / "node")
    try:
        node.start()
        assert node.proc is not None
        ns = netns.inode(node.proc.pid)
        assert ns != netns.inode(), "the test engine shares the host's network namespace"
        assert docker0_ifindex() == host_engine.docker0_ifindex, \
            "starting a test engine changed docker0" + engines_in_host_netns(host_engine.pid)
        # loopback is up inside: a socket there reaches itself (a registry for the engine listens so)
        assert netns.call_in(node.netns, _echo_on_loopback)
        members = netns.members(ns)
        assert node.proc.pid in members
    finally:
        node.stop()
        rmtree(root)
    assert [p for p in members if alive(p)] == []
    assert docker0_ifindex() == host_engine.docker0_ifindex, \
        "a test engine changed the host's docker0" + engines_in_host_netns(host_engine.pid)


def _echo_on_loopback() -> bool:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname(), timeout=5) as cli:
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"x")
                return conn.recv(1) == b"x"


def test_host_engine_after_docker_tests(host_engine: HostState) -> None:
    """Ordered last: the same engine, the same docker0, networks and volumes, and a container still
    runs on the default bridge (after an engine with --bridge=none in the host's network namespace it
    fails with "could not find bridge docker0")."""
    now = host_state()
    assert now.pid == host_engine.pid, "the host's engine was restarted or replaced during the tests"
    others = engines_in_host_netns(now.pid)
    assert now.docker0_ifindex is not None, "docker0 of the host's engine is gone" + others
    assert now.docker0_ifindex == host_engine.docker0_ifindex, "docker0 of the host's engine was re-made" + others
    assert now.networks == host_engine.networks
    assert now.volumes == host_engine.volumes
    run_on_default_bridge()

