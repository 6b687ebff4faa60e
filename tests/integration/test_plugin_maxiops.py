"""maxiops through Docker on cgroup v1: a container on a limited volume is held to the limit from its first
I/O, an unlimited volume is not slowed, ``veritas vol set`` changes the limit of running containers live,
and the plugin's event follower puts limits on containers it did not see start (other cgroup parents,
or started while the plugin was down).

I/O inside containers: busybox dd with oflag=direct for the first-I/O burst (it writes at once), and the
host's fio bind-mounted into the container for measured IOPS.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.integration.dockerstack import IMAGE

BLKIO = Path("/sys/fs/cgroup/blkio")
WRITE_FILE = "blkio.throttle.write_iops_device"
FIO_MOUNTS = ("-v", "/usr/bin/fio:/fio:ro", "-v", "/usr/lib:/usr/lib:ro", "-v", "/usr/lib:/lib:ro",
              "-v", "/usr/lib64:/lib64:ro")

pytestmark = pytest.mark.skipif(not (BLKIO / WRITE_FILE).exists(), reason="needs cgroup v1 blkio throttling")


def _devnums(stack, name: str) -> list[str]:
    info = json.loads(stack.env.cli("--json", "vol", "info", name).stdout)
    out = []
    for dev in info["devices"]:
        rdev = os.stat(dev).st_rdev
        out.append(f"{os.major(rdev)}:{os.minor(rdev)}")
    assert out, f"volume {name} has no loop device: not mounted?"
    return out


def _limit(cgroup: Path, dev: str) -> int | None:
    try:
        text = (cgroup / WRITE_FILE).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(" ")
        if key == dev:
            return int(val)
    return None


def _wait_limit(cgroup: Path, dev: str, want: int | None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _limit(cgroup, dev) != want:
        assert time.monotonic() < deadline, f"{cgroup}: limit of {dev} is {_limit(cgroup, dev)}, want {want}"
        time.sleep(0.1)


def _sleeper(stack, vol: str, *extra: str) -> str:
    return stack.node.cli("run", "-d", "--network", "none", "-v", f"{vol}:/vol", *FIO_MOUNTS, *extra,
                          IMAGE, "sleep", "600").stdout.strip()


def _fio_iops(stack, container: str, runtime: int = 3) -> float:
    """4k direct random writes by fio inside ``container`` (docker exec joins its cgroup)."""
    p = stack.node.cli("exec", container, "/fio", "--name=qos", "--filename=/vol/fio.dat", "--rw=randwrite",
                       "--bs=4k", "--direct=1", "--ioengine=psync", "--size=64m", f"--runtime={runtime}",
                       "--time_based", "--output-format=json", timeout=runtime + 60)
    data = json.loads(p.stdout[p.stdout.index("{"):])
    job = data["jobs"][0]
    assert job["error"] == 0
    return float(job["write"]["iops"])


def test_limit_binds_from_first_io_and_changes_live(stack):
    node = stack.node
    node.cli("volume", "create", "-d", "veritas", "--name", "demovol", "-o", "maxiops=100")

    # the container's first command reads its own cgroup's limit, then writes at once: the limit is there
    # before its process runs only because the plugin wrote it during Mount (the start-event follower is
    # later); 300 direct 4k writes at 100 IOPS then take ~3 s, timed inside the container so that nothing
    # before its first write (e.g. a slow Mount) counts
    out = node.cli("run", "--rm", "--network", "none", "-v", "demovol:/vol", IMAGE, "sh", "-c",
                   f"echo limit $(cat /sys/fs/cgroup/blkio/{WRITE_FILE}); cat /proc/uptime;"
                   " dd if=/dev/zero of=/vol/burst bs=4k count=300 oflag=direct 2>/dev/null;"
                   " cat /proc/uptime").stdout.splitlines()
    assert re.fullmatch(r"limit 7:\d+ 100", out[0]), f"no limit in the container's cgroup at its start: {out[0]}"
    took = float(out[2].split()[0]) - float(out[1].split()[0])
    assert took >= 2.5, f"300 direct writes took {took:.2f} s: the limit missed the container's first I/O"

    ctr = _sleeper(stack, "demovol")
    cg = BLKIO / "docker" / ctr
    (dev,) = _devnums(stack, "demovol")
    assert _limit(cg, dev) == 100
    iops = _fio_iops(stack, ctr)
    assert 0.5 * 100 <= iops <= 1.1 * 100, f"measured {iops:.0f} write IOPS under a 100 IOPS limit"

    # live change for the running container
    stack.env.cli("vol", "set", "demovol", "maxiops=300")
    assert _limit(cg, dev) == 300
    assert _limit(BLKIO, dev) == 300  # the writeback path follows
    assert json.loads(node.cli("volume", "inspect", "demovol").stdout)[0]["Status"]["maxiops"] == 300
    iops = _fio_iops(stack, ctr)
    assert 0.5 * 300 <= iops <= 1.1 * 300, f"measured {iops:.0f} write IOPS under a 300 IOPS limit"

    stack.env.cli("vol", "set", "demovol", "maxiops=0")
    assert _limit(cg, dev) is None
    node.cli("rm", "-f", ctr)
    assert _limit(BLKIO, dev) is None  # unmounted: no writeback limit left on the loop device


def test_limit_binds_when_a_stopped_container_starts_again(stack):
    """``docker start`` of a stopped container mounts its volume again before its process runs: the limit
    is in its cgroup from the first I/O, as for a new container. A container that never starts gets a
    cgroup at each Mount too (Mount does not say which container it is for): removing it removes that."""
    node = stack.node
    node.cli("volume", "create", "-d", "veritas", "--name", "again", "-o", "maxiops=100")
    burst = (f"echo limit $(cat /sys/fs/cgroup/blkio/{WRITE_FILE}); cat /proc/uptime;"
             " dd if=/dev/zero of=/vol/burst bs=4k count=300 oflag=direct 2>/dev/null; cat /proc/uptime")
    ctr = node.cli("create", "--network", "none", "-v", "again:/vol", IMAGE, "sh", "-c", burst).stdout.strip()
    idle = node.cli("create", "--network", "none", "-v", "again:/vol", IMAGE, "true").stdout.strip()
    for run in ("first start (created)", "second start (exited)", "third start (exited)"):
        out = node.cli("start", "-a", ctr).stdout.splitlines()
        assert re.fullmatch(r"limit 7:\d+ 100", out[0]), f"{run}: no limit at the container's start: {out[0]}"
        took = float(out[2].split()[0]) - float(out[1].split()[0])
        assert took >= 2.5, f"{run}: 300 direct writes took {took:.2f} s: the limit missed the first I/O"
        assert json.loads(node.cli("inspect", ctr).stdout)[0]["State"]["Status"] == "exited"
    assert not (BLKIO / "docker" / ctr).exists(), "the runtime removes a stopped container's cgroup"
    assert (BLKIO / "docker" / idle).is_dir()
    node.cli("rm", idle)
    deadline = time.monotonic() + 15
    while (BLKIO / "docker" / idle).exists():
        assert time.monotonic() < deadline, "the cgroup made ahead for a removed container was left behind"
        time.sleep(0.1)
    node.cli("rm", ctr)


def test_unlimited_volume_is_not_slowed(stack):
    stack.node.cli("volume", "create", "-d", "veritas", "--name", "fast")
    ctr = _sleeper(stack, "fast")
    (dev,) = _devnums(stack, "fast")
    assert _limit(BLKIO / "docker" / ctr, dev) is None
    iops = _fio_iops(stack, ctr, runtime=2)
    assert iops > 5 * 100, f"unlimited volume measured only {iops:.0f} write IOPS"
    stack.node.cli("rm", "-f", ctr)


def test_event_follower_limits_container_under_other_cgroup_parent(stack):
    """The plugin pre-creates cgroups under docker/ (Mount cannot learn a container's cgroup parent);
    a container elsewhere gets its limit from the start event, and no stray cgroup is left behind."""
    parent = f"veritas-test-{os.getpid()}"
    stack.node.cli("volume", "create", "-d", "veritas", "--name", "lim", "-o", "maxiops=150")
    ctr = _sleeper(stack, "lim", "--cgroup-parent", f"/{parent}")
    try:
        (dev,) = _devnums(stack, "lim")
        _wait_limit(BLKIO / parent / ctr, dev, 150)
        assert not (BLKIO / "docker" / ctr).exists(), "a pre-created cgroup under docker/ was left behind"
        iops = _fio_iops(stack, ctr, runtime=2)
        assert iops <= 1.1 * 150
    finally:
        stack.node.cli("rm", "-f", ctr)
        stale = BLKIO / "docker" / ctr
        if stale.is_dir():
            stale.rmdir()
        for ctl in Path("/sys/fs/cgroup").iterdir():
            if (ctl / parent).is_dir():
                (ctl / parent).rmdir()


def test_catch_up_after_plugin_restart(stack):
    """A container whose start the plugin missed (it was down) gets its limit when the plugin reconnects."""
    stack.node.cli("volume", "create", "-d", "veritas", "--name", "demovol", "-o", "maxiops=100")
    ctr = _sleeper(stack, "demovol")
    cg = BLKIO / "docker" / ctr
    (dev,) = _devnums(stack, "demovol")
    assert _limit(cg, dev) == 100

    stack.plugin.kill9()
    (cg / WRITE_FILE).write_text(f"{dev} 0\n")  # as if the container had started unseen
    assert _limit(cg, dev) is None
    stack.plugin.start()
    _wait_limit(cg, dev, 100, timeout=10)
    # the restart kept the volume mounted for the running container, and it is still limited
    assert stack.node.cli("exec", ctr, "sh", "-c", "echo alive > /vol/f && cat /vol/f").stdout == "alive\n"
    iops = _fio_iops(stack, ctr, runtime=2)
    assert iops <= 1.1 * 100
    stack.node.cli("rm", "-f", ctr)
    assert json.loads(stack.node.cli("volume", "inspect", "demovol").stdout)[0]["Status"]["mounts"] == 0
