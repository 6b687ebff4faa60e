"""The machine's own Docker engine comes out of the suite as it went in.

Test engines (tests/integration/dockerstack.py, also used by bench/plugin.py) must never touch the
host's engine, its bridge ``docker0``, its networks or its volumes. The suite makes sure a host engine
runs before any Docker test (``test_host_engine_before_docker_tests``, ordered first by
tests/integration/conftest.py): if none answers on /var/run/docker.sock, it starts the standard one
(``dockerd`` with default settings, which creates docker0) and leaves it running, as scripts/run
would. Its state is what it was before the first Docker test: scripts/test records it before either
of its passes (tests/integration/hostengine.py, ``recorded_state``). ``test_host_engine_after_docker_tests``
(ordered last, in the pass that runs last) then checks that it is the same engine, with the same
docker0 (same interface index: not deleted and re-made), the same networks and volumes, and that it
still runs a container on its default bridge.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from tests.integration import netns
from tests.integration.dockerstack import DockerNode, alive, rmtree
from tests.integration.hostengine import (
    HostState,
    docker0_ifindex,
    engines_in_host_netns,
    host_state,
    run_on_default_bridge,
)


def test_host_engine_before_docker_tests(host_engine: HostState) -> None:
    """Ordered first (in a one-process run): the host's engine runs, has its docker0, and runs a
    container on its default bridge."""
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

