"""IOPS limits on real cgroup v1 blkio: a process in a limited cgroup is held to the volume's maxiops,
a live change reaches the cgroup, and the root cgroup's writeback limit lives exactly as long as the mount.

fio runs inside a blkio cgroup of the test's own (sh writes its pid into cgroup.procs, then execs fio).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import qos, volumes
from storage.diskgroup import DiskGroup
from storage.kernel import loop

BLKIO = Path("/sys/fs/cgroup/blkio")
WRITE_FILE = "blkio.throttle.write_iops_device"
READ_FILE = "blkio.throttle.read_iops_device"

pytestmark = pytest.mark.skipif(not (BLKIO / WRITE_FILE).exists(), reason="needs cgroup v1 blkio throttling")


def _line(cgroup: Path, dev: tuple[int, int], name: str = WRITE_FILE) -> int | None:
    """The limit ``cgroup`` holds for ``dev`` in ``name``, or None when it has no line for it."""
    key = f"{dev[0]}:{dev[1]}"
    for line in (cgroup / name).read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return None


def _devnums(dg: DiskGroup, name: str) -> list[tuple[int, int]]:
    v = dg.catalog.volume(name)
    assert v is not None
    return [loop.devnum(d) for d in volumes.devices(dg, v)]


@pytest.fixture
def root_guard() -> Iterator[list[tuple[int, int]]]:
    """Device numbers the test may have limited in the root cgroup; any limit left on them is removed."""
    devs: list[tuple[int, int]] = []
    yield devs
    for dev in devs:
        for name in (READ_FILE, WRITE_FILE):
            if _line(BLKIO, dev, name) is not None:
                (BLKIO / name).write_text(f"{dev[0]}:{dev[1]} 0\n")


@pytest.fixture
def cgroups() -> Iterator[list[Path]]:
    """Factory list: call ``_new_cgroup(cgroups, tag)``; every cgroup made is emptied and removed."""
    made: list[Path] = []
    yield made
    for cg in reversed(made):
        if not cg.exists():
            continue
        for pid in (cg / "cgroup.procs").read_text().split():
            try:
                (BLKIO / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # it exited meanwhile
        cg.rmdir()


def _new_cgroup(made: list[Path], tag: str) -> Path:
    cg = BLKIO / f"veritas-test-{os.getpid()}-{tag}"
    cg.mkdir()
    made.append(cg)
    return cg


def _fio_write_iops(cgroup: Path, target: Path, runtime: int = 3) -> float:
    """Run a 4k random direct write fio job inside ``cgroup`` on file ``target``; its write IOPS."""
    assert shutil.which("fio"), "fio is missing (apt package fio)"
    fio = (f"exec fio --name=qos --thread --filename={target} --rw=randwrite --bs=4k --direct=1 --ioengine=psync"
           f" --runtime={runtime} --time_based --size=64m --output-format=json")
    proc = subprocess.run(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && {fio}"], capture_output=True,
                          text=True, timeout=runtime + 60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    data = json.loads(out[out.index("{"):])  # fio may print notes before the JSON
    job = data["jobs"][0]
    assert job["error"] == 0
    return float(job["write"]["iops"])


def test_maxiops_binds_in_cgroup_and_changes_live(env, dg, cgroups, root_guard):
    volumes.make(dg, "lim", "1g", maxiops=100)
    mp = volumes.mount(dg, "lim")
    devs = _devnums(dg, "lim")
    root_guard.extend(devs)
    assert len(devs) == 1
    cg = _new_cgroup(cgroups, "lim")

    applied = volumes.apply_maxiops(dg, "lim", str(cg))
    assert applied == devs
    assert _line(cg, devs[0]) == 100
    assert _line(cg, devs[0], READ_FILE) == 100
    assert str(cg) in [str(p) for p in qos.cgroups_limiting(qos.Hierarchy.detect(), devs)]

    iops = _fio_write_iops(cg, mp / "fio.dat")
    assert 0.5 * 100 <= iops <= 1.1 * 100, f"measured {iops:.0f} write IOPS under a 100 IOPS limit"

    env.cli("vol", "set", "lim", "maxiops=300")
    assert dg.catalog.volume("lim").maxiops == 300
    assert _line(cg, devs[0]) == 300
    assert _line(cg, devs[0], READ_FILE) == 300
    assert _line(BLKIO, devs[0]) == 300  # the writeback path follows too

    iops = _fio_write_iops(cg, mp / "fio.dat")
    assert 0.5 * 300 <= iops <= 1.1 * 300, f"measured {iops:.0f} write IOPS under a 300 IOPS limit"

    volumes.umount(dg, "lim")
    assert _line(BLKIO, devs[0]) is None


def test_cli_iops_applies_limit_to_cgroup(env, dg, cgroups, root_guard):
    volumes.make(dg, "clivol", "1g", maxiops=250)
    volumes.mount(dg, "clivol")
    devs = _devnums(dg, "clivol")
    root_guard.extend(devs)
    cg = _new_cgroup(cgroups, "cli")
    out = json.loads(env.cli("--json", "vol", "iops", "clivol", "--cgroup", cg.name).stdout)
    assert out["devices"] == [f"{a}:{b}" for a, b in devs]
    assert _line(cg, devs[0]) == 250
    bad = env.cli("vol", "iops", "clivol", "--cgroup", "/etc", check=False)
    assert bad.returncode == 2 and "not inside" in bad.stderr
    volumes.umount(dg, "clivol")


def test_unlimited_volume_runs_much_faster(env, dg, cgroups, root_guard):
    volumes.make(dg, "free", "1g")
    mp = volumes.mount(dg, "free")
    devs = _devnums(dg, "free")
    root_guard.extend(devs)
    assert _line(BLKIO, devs[0]) is None  # no writeback limit for an unlimited volume
    cg = _new_cgroup(cgroups, "free")
    volumes.apply_maxiops(dg, "free", str(cg))
    assert _line(cg, devs[0]) is None  # 0 is "no limit"
    iops = _fio_write_iops(cg, mp / "fio.dat")
    assert iops > 5 * 100, f"unlimited volume measured only {iops:.0f} write IOPS"
    volumes.umount(dg, "free")


def test_writeback_limit_lives_with_the_mount(env, dg, root_guard):
    volumes.make(dg, "wb", "1g", maxiops=150)
    volumes.mount(dg, "wb")
    devs = _devnums(dg, "wb")
    root_guard.extend(devs)
    assert _line(BLKIO, devs[0]) == 150
    assert _line(BLKIO, devs[0], READ_FILE) == 150

    volumes.set_maxiops(dg, "wb", 0)
    assert _line(BLKIO, devs[0]) is None
    volumes.set_maxiops(dg, "wb", 400)
    assert _line(BLKIO, devs[0]) == 400

    volumes.umount(dg, "wb")
    assert volumes.devices(dg, dg.catalog.volume("wb")) == []
    assert _line(BLKIO, devs[0]) is None, "umount left a stale writeback limit in the root cgroup"
    assert _line(BLKIO, devs[0], READ_FILE) is None

    # mounted again: back, with the current value
    volumes.mount(dg, "wb")
    devs2 = _devnums(dg, "wb")
    root_guard.extend(devs2)
    assert _line(BLKIO, devs2[0]) == 400
    volumes.umount(dg, "wb")
    assert _line(BLKIO, devs2[0]) is None


def test_forced_remove_of_mounted_volume_leaves_no_writeback_limit(env, dg, root_guard):
    """A loop device keeps its cgroup rules after detach; the next volume to get that device would
    inherit the limit, so removing a mounted limited volume must drop it as well."""
    volumes.make(dg, "gone", "1g", maxiops=120)
    volumes.mount(dg, "gone")
    devs = _devnums(dg, "gone")
    root_guard.extend(devs)
    assert _line(BLKIO, devs[0]) == 120
    volumes.remove(dg, "gone", force=True)
    assert _line(BLKIO, devs[0]) is None, "forced remove left a stale writeback limit in the root cgroup"
    assert _line(BLKIO, devs[0], READ_FILE) is None


def test_umount_drops_writeback_limit_even_if_catalog_says_unlimited(env, dg, root_guard):
    """The kernel files are the state: a limit left in the root cgroup (e.g. set_maxiops killed between its
    catalog update to 0 and its cgroup writes) must still go with the umount."""
    volumes.make(dg, "drift", "1g", maxiops=200)
    volumes.mount(dg, "drift")
    devs = _devnums(dg, "drift")
    root_guard.extend(devs)
    assert _line(BLKIO, devs[0]) == 200
    dg.catalog.update_volume("drift", maxiops=0)
    volumes.umount(dg, "drift")
    assert _line(BLKIO, devs[0]) is None, "umount left a stale writeback limit in the root cgroup"


def test_mount_drops_a_stale_limit_the_loop_device_kept(env, dg, root_guard):
    """A loop device keeps its cgroup rules after detach: a limit leaked by an earlier user of the device
    must not throttle the unlimited volume that gets it next."""
    volumes.make(dg, "plain", "1g")
    v = dg.catalog.volume("plain")
    dev = loop.attach(volumes.images(dg, v)[0])  # mount reuses the device already backed by the image
    num = loop.devnum(dev)
    root_guard.append(num)
    for name in (READ_FILE, WRITE_FILE):
        (BLKIO / name).write_text(f"{num[0]}:{num[1]} 100\n")
    assert _line(BLKIO, num) == 100
    volumes.mount(dg, "plain")
    assert _devnums(dg, "plain") == [num]
    assert _line(BLKIO, num) is None and _line(BLKIO, num, READ_FILE) is None
    volumes.umount(dg, "plain")
