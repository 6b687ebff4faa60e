"""The machine's own Docker engine, as the tests find it and must leave it (see test_host_engine.py):
started if none runs, described by what tests must not change, and checked by running a container
on its default bridge."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.integration import netns
from tests.integration.dockerstack import busybox_tar

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
    """docker0 in this process's (the host's) network namespace, by interface index (asked of the
    kernel through a socket, not sysfs, which shows the namespace of whoever mounted it)."""
    try:
        return socket.if_nametoindex("docker0")
    except OSError:
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


STATE_ENV = "VERITAS_TEST_HOST_STATE"  # scripts/test: the file that carries the state across its passes


def recorded_state() -> HostState:
    """The host engine's state before any Docker test. scripts/test runs the suite in two passes (in
    parallel, then the timing-bound tests alone) and records it once before both, in the file that
    ``$VERITAS_TEST_HOST_STATE`` names; without it (one pytest run) it is taken now."""
    path = os.environ.get(STATE_ENV)
    if not path:
        return host_state()
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return record(Path(path))
    return HostState(pid=raw["pid"], docker0_ifindex=raw["docker0_ifindex"],
                     networks=frozenset((i, n) for i, n in raw["networks"]), volumes=frozenset(raw["volumes"]))


def record(path: Path) -> HostState:
    state = host_state()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"pid": state.pid, "docker0_ifindex": state.docker0_ifindex,
                               "networks": sorted(state.networks), "volumes": sorted(state.volumes)}))
    os.replace(tmp, path)  # workers of the first pass may ask at once: each sees a whole file
    return state


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


if __name__ == "__main__":  # scripts/test: record the host engine's state before the first pass
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m tests.integration.hostengine STATE_FILE")
    record(Path(sys.argv[1]))
