"""The DockerContainer and DockerDaemon agents against real engines, through their OCF and VCS scripts.

DockerContainer runs on the ``stack`` fixture (a private dockerd with the veritas plugin): start,
monitor, stop and clean of a container on a veritas volume whose data survives; an unhealthy container
faults; a ``kill -9`` of the container's process reaches the watcher's notifier in under a second.
DockerDaemon runs a private dockerd (own data root, exec root and socket in a temp dir, own mount and
network namespaces); clean leaves none of its processes. Both OCF agents pass ``ocf-tester``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agents import procs, registry
from agents.watch import Recording, Watcher
from tests.integration import netns
from tests.integration.dockerstack import IMAGE, busybox_tar, rmtree

REPO = Path(__file__).resolve().parents[2]
OCF = REPO / "agents" / "ocf"
VCS = REPO / "agents" / "vcs"
NS_HELPER = Path(__file__).with_name("agent_ns.py")


@pytest.fixture
def agent_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The agents' registrations for this test only (the scripts inherit the variable)."""
    d = Path(tempfile.mkdtemp(prefix="vagst-", dir="/tmp"))
    monkeypatch.setenv("VERITAS_AGENT_STATE", str(d))
    try:
        yield d
    finally:
        rmtree(d)


def ocf(kind: str, action: str, params: dict[str, str], resource: str = "res1", prefix: list[str] | None = None,
        extra: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": resource,
           **{f"OCF_RESKEY_{k}": v for k, v in params.items()}, **(extra or {})}
    return subprocess.run([*(prefix or []), str(OCF / kind), action], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def vcs(kind: str, entry: str, args: list[str], timeout: float = 120,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), str(VCS / kind / entry), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def container_params(stack, name: str, **kw: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"name": name, "image": IMAGE, "command": "sleep 1000", "docker_host": stack.node.url,
            "stop_timeout": "2", **kw}


def vcs_args(kind: str, resource: str, params: dict[str, str]) -> list[str]:
    from agents.fronts import agent_type

    return [resource, *[params.get(p.key, "") for p in agent_type(kind).params]]


def test_container_start_monitor_stop_clean_keeps_data(stack, agent_state: Path) -> None:  # type: ignore[no-untyped-def]
    p = container_params(stack, "agweb", run_options="--init -e APP=1", volumes="agvol:/data",
                         remove_on_offline="true")
    client = stack.docker()
    assert ocf("DockerContainer", "validate-all", p).returncode == 0
    assert ocf("DockerContainer", "monitor", p).returncode == 7  # absent
    r = ocf("DockerContainer", "start", p)
    assert r.returncode == 0, r.stderr
    assert ocf("DockerContainer", "monitor", p).returncode == 0
    ctr = client.containers.get("agweb")
    mount = next(m for m in ctr.attrs["Mounts"] if m["Destination"] == "/data")
    assert (mount["Name"], mount["Driver"]) == ("agvol", "veritas")
    assert ctr.labels["com.veritas.agent.resource"] == "res1" and "APP=1" in ctr.attrs["Config"]["Env"]
    assert registry.read("res1", agent_state)["expect"] == "online"
    assert ctr.exec_run(["sh", "-c", "echo kept > /data/proof && sync"]).exit_code == 0

    r = ocf("DockerContainer", "stop", p)
    assert r.returncode == 0, r.stderr
    assert ocf("DockerContainer", "monitor", p).returncode == 7
    with pytest.raises(docker.errors.NotFound):
        client.containers.get("agweb")  # remove_on_offline
    assert registry.read("res1", agent_state)["expect"] == "offline"
    assert ocf("DockerContainer", "stop", p).returncode == 0  # stopping a stopped resource

    # the VCS entry points on the same core: online recreates it on the same volume, with its data
    a = vcs_args("DockerContainer", "res1", p)
    r = vcs("DockerContainer", "online", a)
    assert r.returncode == 0, r.stderr
    assert vcs("DockerContainer", "monitor", a).returncode == 110
    ctr = client.containers.get("agweb")
    out = ctr.exec_run(["cat", "/data/proof"])
    assert (out.exit_code, out.output) == (0, b"kept\n")
    assert vcs("DockerContainer", "info", a).stdout.startswith("Container agweb")
    client.api.pause("agweb")
    assert vcs("DockerContainer", "monitor", a).returncode == 102  # paused: online, 20 %
    client.api.unpause("agweb")
    r = vcs("DockerContainer", "clean", [a[0], "4", *a[1:]])
    assert r.returncode == 0 and "unexpected offline" in r.stdout, r.stderr
    with pytest.raises(docker.errors.NotFound):
        client.containers.get("agweb")
    assert vcs("DockerContainer", "monitor", a).returncode == 100
    assert client.volumes.get("agvol").attrs["Driver"] == "veritas"  # the data stays


def test_unhealthy_faults_and_kill_is_reported_within_a_second(stack, agent_state: Path) -> None:  # type: ignore[no-untyped-def]
    client = stack.docker()
    rec = Recording()
    hc = container_params(stack, "aghc", command="sh -c 'touch /tmp/ok; exec sleep 1000'",
                          run_options="--init --health-cmd 'test -f /tmp/ok' --health-interval 200ms "
                                      "--health-retries 1 --health-timeout 2s")
    kl = container_params(stack, "agkill", stop_timeout="1")
    with Watcher(rec, agent_state, rescan=0.1) as w:
        r = ocf("DockerContainer", "start", hc, resource="hc")
        assert r.returncode == 0, r.stderr
        health = client.containers.get("aghc").attrs["State"]["Health"]
        assert health["Status"] == "healthy", health
        r = ocf("DockerContainer", "start", kl, resource="kill")
        assert r.returncode == 0, r.stderr
        assert w.ready.wait(10), "the watcher did not open the engine's event stream"
        time.sleep(0.3)  # the stream is open; let the engine register the subscription

        # kill -9 of the container's process: the notifier hears of it at once
        pid = client.containers.get("agkill").attrs["State"]["Pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        hit = rec.wait_for("kill", 5)
        assert hit is not None, "the watcher did not report the killed container"
        latency = hit[2] - t0
        print(f"\nkill -9 -> notifier: {latency * 1000:.0f} ms ({hit[1]})")
        assert latency < 1.0, rec.calls
        assert "exit code 137" in hit[1]
        r = ocf("DockerContainer", "monitor", kl, resource="kill")
        assert r.returncode == 7, r.stderr

        # an intended stop is no failure
        r = ocf("DockerContainer", "start", kl, resource="kill")
        assert r.returncode == 0, r.stderr
        r = ocf("DockerContainer", "stop", kl, resource="kill")
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        assert [c for c in rec.calls if c[0] == "kill"] == [hit], rec.calls

        # unhealthy: faulted (OCF 1, VCS offline so the engine faults it), and reported
        assert client.containers.get("aghc").exec_run(["rm", "/tmp/ok"]).exit_code == 0
        deadline = time.monotonic() + 15
        while (code := ocf("DockerContainer", "monitor", hc, resource="hc").returncode) == 0 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert code == 1, client.containers.get("aghc").attrs["State"]
        r = vcs("DockerContainer", "monitor", vcs_args("DockerContainer", "hc", hc))
        assert r.returncode == 100, r.stdout + r.stderr
        hit = rec.wait_for("hc", 5)
        assert hit is not None and "unhealthy" in hit[1], rec.calls
        # a faulted container is not started over: clean first
        r = ocf("DockerContainer", "start", hc, resource="hc")
        assert r.returncode == 1 and "unhealthy" in r.stderr, r.stderr
        r = ocf("DockerContainer", "stop", hc, resource="hc")
        assert r.returncode == 0, r.stderr


def test_ocf_tester_passes_container(stack, agent_state: Path) -> None:  # type: ignore[no-untyped-def]
    p = container_params(stack, "agocft", run_options="--init", volumes="agtvol:/data", stop_timeout="1")
    argv = ["ocf-tester", "-n", "ocft"] + [x for k, v in p.items() for x in ("-o", f"{k}={v}")]
    r = subprocess.run([*argv, str(OCF / "DockerContainer")], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OCF_ROOT": "/usr/lib/ocf"}, check=False)
    print(r.stdout)
    assert r.returncode == 0 and "passed all tests" in r.stdout, r.stdout + r.stderr
    assert stack.docker().containers.get("agocft").status == "exited"  # left stopped


# -- DockerDaemon on a private dockerd

class PrivateDaemon:
    """Parameters of a private dockerd, and every network namespace an agent started it in."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vagd-", dir="/tmp"))
        self.params = {"binary": "/usr/sbin/dockerd", "socket": f"{self.root}/d.sock",
                       "pidfile": f"{self.root}/d.pid", "logfile": f"{self.root}/d.log", "stop_timeout": "20",
                       "args": f"--data-root {self.root}/data --exec-root {self.root}/exec --iptables=false "
                               "--ip-masq=false --bridge=none --log-level=warn"}
        self.nsfiles: list[Path] = []
        # an open fd on each namespace keeps its inode from naming another (later) namespace while we
        # look for processes in it by that inode
        self.ns_fds: list[int] = []

    def prefix(self) -> list[str]:
        """Run the agent in fresh mount and network namespaces: the dockerd it starts stays in them."""
        f = self.root / f"ns{len(self.nsfiles)}"
        self.nsfiles.append(f)
        return ["unshare", "-m", "-n", "--propagation", "slave", sys.executable, str(NS_HELPER), str(self.root),
                str(f)]

    def members_after(self, timeout: float = 5) -> list[int]:
        """What is still in the namespaces once ``timeout`` passed with some left (shims exit just after
        their containers)."""
        deadline = time.monotonic() + timeout
        while (left := self.members()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def hold(self, pid: int, timeout: float = 10) -> None:
        """Hold the network namespace the last prefix() made, through ``pid`` (a process in it): its
        inode must be the one the helper recorded there."""
        f = self.nsfiles[-1]
        deadline = time.monotonic() + timeout
        while not f.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_ino != int(f.read_text()):
            os.close(fd)
            raise AssertionError(f"pid {pid} is not in the namespace the helper made")
        self.ns_fds.append(fd)

    def hold_daemon(self) -> None:
        self.hold(int(Path(self.params["pidfile"]).read_text()))

    def members(self) -> list[int]:
        out: list[int] = []
        for fd in self.ns_fds:
            out += [p for p in netns.members(os.fstat(fd).st_ino) if procs.alive(p)]
        return out

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"unix://{self.params['socket']}", version="1.41", timeout=60)

    def run_container(self) -> tuple[str, int]:
        c = self.client()
        if not c.images.list(name=IMAGE.split(":")[0]):
            c.api.import_image_from_data(busybox_tar(), repository=IMAGE.split(":")[0], tag="latest")
        ctr = c.containers.run(IMAGE, ["sleep", "1000"], detach=True, init=True, network_mode="none")
        ctr.reload()
        return ctr.id, int(ctr.attrs["State"]["Pid"])

    def close(self) -> None:
        left = self.members()
        procs.kill_all(left)
        for fd in self.ns_fds:
            os.close(fd)
        rmtree(self.root)
        assert not left, f"processes left in the daemon's namespaces: {left}"


@pytest.fixture
def private_daemon(agent_state: Path) -> Iterator[PrivateDaemon]:
    d = PrivateDaemon()
    try:
        yield d
    finally:
        d.close()


def test_daemon_start_monitor_stop_clean(private_daemon: PrivateDaemon) -> None:
    d = private_daemon
    p = d.params
    assert ocf("DockerDaemon", "validate-all", p).returncode == 0
    assert ocf("DockerDaemon", "monitor", p).returncode == 7
    r = ocf("DockerDaemon", "start", p, prefix=d.prefix())
    assert r.returncode == 0, r.stderr
    d.hold_daemon()
    assert ocf("DockerDaemon", "monitor", p).returncode == 0
    a = vcs_args("DockerDaemon", "res1", p)
    assert vcs("DockerDaemon", "monitor", a).returncode == 110
    assert ocf("DockerDaemon", "start", p).returncode == 0  # already running: no second daemon
    dpid = int(Path(p["pidfile"]).read_text())
    assert registry.read("res1")["pid"] == dpid

    # offline: SIGTERM, dockerd stops its container and exits, nothing of it is left
    _, cpid = d.run_container()
    r = ocf("DockerDaemon", "stop", p)
    assert r.returncode == 0, r.stderr
    assert not procs.alive(dpid) and not procs.alive(cpid)
    assert d.members_after() == []
    assert ocf("DockerDaemon", "monitor", p).returncode == 7

    # clean: SIGKILL of dockerd, containerd, the shim and the container; their cgroups go too
    r = vcs("DockerDaemon", "online", a, prefix=d.prefix())
    assert r.returncode == 0, r.stderr
    d.hold_daemon()
    cid, cpid = d.run_container()
    dpid = int(Path(p["pidfile"]).read_text())
    everything = set(procs.tree(dpid)) | {cpid, procs.ppid(cpid)}
    assert len(everything) >= 4, everything  # dockerd, containerd, shim, container (its init)
    lo = vcs("DockerDaemon", "action", [a[0], "leftovers", *a[1:]])
    assert str(cpid) in lo.stdout and str(procs.ppid(cpid)) in lo.stdout, lo.stdout
    cgroups = procs.cgroup_dirs(cid)
    assert cgroups, "the container has no cgroup"
    r = vcs("DockerDaemon", "clean", [a[0], "2", *a[1:]])
    assert r.returncode == 0, r.stdout + r.stderr
    assert [x for x in everything if procs.alive(x)] == []
    assert d.members_after() == []
    assert [c for c in cgroups if c.exists()] == []
    assert vcs("DockerDaemon", "monitor", a).returncode == 100


def test_ocf_tester_passes_daemon(private_daemon: PrivateDaemon) -> None:
    d = private_daemon
    argv = ["ocf-tester", "-n", "ocftd"] + [x for k, v in d.params.items() for x in ("-o", f"{k}={v}")]
    proc = subprocess.Popen([*d.prefix(), *argv, str(OCF / "DockerDaemon")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OCF_ROOT": "/usr/lib/ocf"})
    try:
        d.hold(proc.pid)  # ocf-tester is the namespace's first process (unshare and the helper exec it)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(out)
    assert proc.returncode == 0 and "passed all tests" in out, out + err
    assert d.members_after() == []  # it ended stopped, with nothing left
