"""Disk groups on real block devices (zram: no loop device between the disk's XFS and the device).

The same operations the image-disk tests run, on disks of kind ``block``: init through the CLI, concat and
mirror volumes written and read back, kill -9 at every discovered crash point of make and mount, loss of
one mirror device (its signatures and first MiBs wiped) then repair onto a device added with adddisk, and
a deport / import round trip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from storage import diskgroup, volumes
from storage.diskgroup import DiskGroup, DiskSpec
from storage.errors import AlreadyExists
from storage.kernel import loop, mounts
from storage.units import MiB
from tests.integration.conftest import Env
from tests.integration.test_crash import (
    DG,
    KEEP,
    KEEP_DATA,
    MAKE,
    MOUNT,
    Ctx,
    Op,
    check_bystander,
    check_invariants,
    ok,
    write_file,
)
from tests.integration.test_mirror_repair import profiles

Zram = Callable[[int, str], list[Path]]
SIZE = "1G"


def devnum(dev: Path) -> str:
    st = dev.stat()
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounts_of(dev: Path) -> list[str]:
    """Where the kernel has ``dev`` mounted, by its device number (any name it is mounted by)."""
    num = devnum(dev)
    return [e.target for e in mounts.table() if e.major_minor == num]


def disk_info(env: Env) -> list[dict[str, object]]:
    return list(json.loads(env.cli("--json", "dg", "info", DG).stdout)["disks"])


def check_block_disks(env: Env, devs: list[Path]) -> None:
    """Each device is a disk of kind block, its XFS mounted from the device itself, no loop device on it."""
    disks = disk_info(env)
    assert [(d["source"], d["kind"], d["state"]) for d in disks] == [(str(p), "block", "online") for p in devs]
    dg = diskgroup.DiskGroup(env.config, DG)
    try:
        for d in dg.catalog.disks():
            assert mounts_of(Path(d.source)) == [str(dg.disk_dir(d.name))]
            assert mounts.mounted_at(dg.disk_dir(d.name)).fstype == "xfs"  # type: ignore[union-attr]
    finally:
        dg.close()
    assert not set(map(str, devs)) & set(loop.attached().values()), "a loop device on a block disk"


def write_and_check(env: Env, name: str, data: bytes) -> None:
    """Mount through the CLI, write and fsync ``data``, unmount; mount again and read it back from disk."""
    ok(env.cli("vol", "mount", name))
    mp = env.config.mount_root / f"{name}_{DG}"
    write_file(mp / "data", data)
    ok(env.cli("vol", "umount", name))
    assert mounts.mounted_at(mp) is None
    read_back(env, name, data)


def read_back(env: Env, name: str, data: bytes) -> None:
    ok(env.cli("vol", "mount", name))
    mp = env.config.mount_root / f"{name}_{DG}"
    try:
        assert (mp / "data").read_bytes() == data
    finally:
        ok(env.cli("vol", "umount", name))


def test_cli_init_concat_and_mirror(block_env: Env, zram_devices: Zram) -> None:
    devs = zram_devices(2, SIZE)
    ok(block_env.cli("dg", "init", DG, *map(str, devs)))
    check_block_disks(block_env, devs)
    for d in disk_info(block_env):
        assert 800 * MiB < int(str(d["size"])) <= 1024 * MiB, d  # the device's size, less the XFS reserve
    ok(block_env.cli("vol", "make", "c1", "400m", "layout=concat"))
    ok(block_env.cli("vol", "make", "m1", "300m", "layout=mirror"))
    info = json.loads(block_env.cli("--json", "vol", "info", "m1").stdout)
    assert sorted(sd["disk"] for sd in info["subdisks"]) == [f"{DG}01", f"{DG}02"], info
    data_c, data_m = os.urandom(40 * MiB + 3), os.urandom(20 * MiB + 7)
    write_and_check(block_env, "c1", data_c)
    write_and_check(block_env, "m1", data_m)
    # an adddisk refuses a device that already is a disk of the group, whatever name it is given
    third = zram_devices(1, SIZE)[0]
    alias = block_env.root / "alias"
    alias.symlink_to(devs[0])
    for name in (devs[0], alias):
        proc = block_env.cli("dg", "adddisk", DG, str(name), "--force", check=False)
        assert proc.returncode == AlreadyExists.exit_code and f"already disk {DG}01" in proc.stderr, proc.stderr
    ok(block_env.cli("dg", "adddisk", DG, str(third)))
    check_block_disks(block_env, [*devs, third])


# ------------------------------------------------------------------ kill -9 at the crash points


def new_block_dg(env: Env, devs: list[Path]) -> DiskGroup:
    """A disk group on ``devs`` (overwriting what an earlier round left) with the mounted bystander."""
    dg = diskgroup.init(env.config, DG, [DiskSpec(p) for p in devs], force=True)
    mp = volumes.mount(dg, volumes.make(dg, KEEP, "200m", fstype="ext4").name)
    write_file(mp / "data.bin", KEEP_DATA)
    return dg


def drop_dg(dg: DiskGroup) -> None:
    for m in dg.catalog.mounts():
        dg.catalog.remove_mount(m.volume, m.node, m.mount_id)
    diskgroup.destroy(dg, force=True)


@contextmanager
def block_round(env: Env, devs: list[Path]) -> Iterator[Ctx]:
    dg = new_block_dg(env, devs)
    c = Ctx(env.root, env.config_path, dg)
    try:
        yield c
    finally:
        for fn in reversed(c.cleanups):
            fn()
        drop_dg(dg)


def discover_block(env: Env, devs: list[Path], op: Op) -> list[str]:
    """The crash points ``op`` passes on block disks, traced through the real CLI."""
    trace = env.root / f"trace-{op.name}"
    with block_round(env, devs) as c:
        op.setup(c)
        ok(c.cli(*op.argv(c), env={"VERITAS_CRASH_TRACE": str(trace)}))
    points = trace.read_text().split()
    assert set(op.required) <= set(points) and all(p.startswith(op.prefix) for p in points), points
    return points


def adddisk_op(dev: Path) -> Op:
    """adddisk of block device ``dev``: rolled back unless done, and then the device is added again
    (with --force: the half-made XFS stays on it) and comes online; no loop device on it either way."""
    def verify(c: Ctx, completed: bool) -> None:
        names = [d.name for d in c.dg.catalog.disks()]
        if not completed:
            assert names == [f"{DG}01", f"{DG}02"], f"adddisk not rolled back: {names}"
            assert mounts_of(dev) == [] and not c.dg.disk_dir(f"{DG}03").exists()
            ok(c.cli("dg", "adddisk", DG, str(dev), "--force"))
        disks = c.dg.catalog.disks()
        assert [(d.source, d.kind, d.state) for d in disks][-1] == (str(dev), "block", "online")
        assert mounts_of(dev) == [str(c.dg.disk_dir(disks[-1].name))]
        assert str(dev) not in loop.attached().values()
        assert c.dg.free()[disks[-1].name] > 800 * MiB
    return Op("adddisk", ("adddisk.",), ("adddisk.recorded", "adddisk.mkfs"), lambda c: None,
              lambda c: ["dg", "adddisk", DG, str(dev), "--force"], verify)


@pytest.mark.parametrize("name", ["make", "mount", "adddisk"])
def test_kill_at_crash_points(block_env: Env, zram_devices: Zram, name: str) -> None:
    devs = zram_devices(2, SIZE)
    op = {"make": MAKE, "mount": MOUNT}.get(name) or adddisk_op(zram_devices(1, SIZE)[0])
    points = discover_block(block_env, devs, op)
    print(f"{op.name}: killed at {points}")
    for point in points:
        with block_round(block_env, devs) as c:
            try:
                op.setup(c)
                proc = c.cli(*op.argv(c), env={"VERITAS_CRASH_AT": point})
                assert proc.returncode == -signal.SIGKILL, f"got {proc.returncode}: {proc.stderr}"
                rec = ok(c.cli("vol", "list", "-g", DG))  # the next start recovers
                assert "recovery" not in rec.stderr, rec.stderr
                check_invariants(block_env.root, c.dg)
                op.verify(c, point == f"{op.prefix[0]}done")
                check_invariants(block_env.root, c.dg)
                check_bystander(c.dg)
                assert {d.kind for d in c.dg.catalog.disks()} == {"block"}
            except AssertionError as exc:
                raise AssertionError(f"{op.name} killed at {point}: {exc}") from exc


# ------------------------------------------------------------------ losing a mirror device


def wipe(dev: Path) -> None:
    """What a replaced or dead disk looks like to the next mount: no signatures, the first MiBs zero."""
    subprocess.run(["wipefs", "-a", str(dev)], capture_output=True, check=True)
    with open(dev, "r+b") as fh:
        fh.write(bytes(16 * MiB))
        fh.flush()
        os.fsync(fh.fileno())


@pytest.mark.parametrize("mounted", [False, True], ids=["unmounted", "mounted-degraded"])
def test_lose_mirror_device_then_repair_onto_added_device(block_env: Env, zram_devices: Zram,
                                                          mounted: bool) -> None:
    """A mirror loses one device (wiped); repair onto a device added with adddisk, the volume unmounted
    or mounted degraded meanwhile. The wiped device itself, still the lost disk's source, is refused by
    adddisk under any name before anything is written (it used to be formatted and mounted, then
    refused by the catalog, and left so until the next open rolled the adddisk back)."""
    devs = zram_devices(2, SIZE)
    ok(block_env.cli("dg", "init", DG, *map(str, devs)))
    ok(block_env.cli("vol", "make", "m1", "400m", "layout=mirror"))
    data = os.urandom(30 * MiB + 11)
    write_and_check(block_env, "m1", data)

    dg = block_env.open()
    lost_rec = next(d for d in dg.catalog.disks() if d.source == str(devs[0]))
    subprocess.run(["umount", str(dg.disk_dir(lost_rec.name))], check=True)
    dg.close()
    wipe(devs[0])

    info = json.loads(block_env.cli("--json", "vol", "info", "m1").stdout)  # a fresh open finds it gone
    assert info["health"] == "degraded" and info["lost_disks"] == [lost_rec.name], info
    states = {str(d["source"]): d["state"] for d in disk_info(block_env)}
    assert states == {str(devs[0]): "missing", str(devs[1]): "online"}
    assert mounts_of(devs[0]) == [], "the wiped device was mounted again"

    mp = block_env.config.mount_root / f"m1_{DG}"
    more = os.urandom(3 * MiB)
    if mounted:
        ok(block_env.cli("vol", "mount", "m1", "--degraded"))
        assert (mp / "data").read_bytes() == data
        write_file(mp / "written-while-degraded", more)
    alias = block_env.root / "lost-alias"
    alias.symlink_to(devs[0])
    for name in (devs[0], alias):
        proc = block_env.cli("dg", "adddisk", DG, str(name), "--force", check=False)
        assert proc.returncode == AlreadyExists.exit_code, proc.stderr
        assert f"already disk {lost_rec.name}" in proc.stderr, proc.stderr
        assert mounts_of(devs[0]) == [], "a refused adddisk left the device mounted"
        assert subprocess.run(["blkid", "-p", str(devs[0])], capture_output=True).returncode != 0, \
            "a refused adddisk wrote a filesystem on the device"
        assert [d["name"] for d in disk_info(block_env)] == [f"{DG}01", f"{DG}02"]
    new = zram_devices(1, SIZE)[0]
    added = json.loads(ok(block_env.cli("--json", "dg", "adddisk", DG, str(new))).stdout)
    ok(block_env.cli("vol", "repair", "m1"))
    if mounted:
        assert mounts.mounted_at(mp) is not None, "repair of a mounted volume must keep it mounted"
        ok(block_env.cli("vol", "umount", "m1"))

    for _ in range(2):  # each open finds the same disks: the lost one stays lost
        info = json.loads(block_env.cli("--json", "vol", "info", "m1").stdout)
        assert info["health"] == "ok" and info["lost_disks"] == [], info
        by_name = {str(d["name"]): d for d in disk_info(block_env)}
        assert by_name[lost_rec.name]["state"] == "missing" and by_name[added[0]]["state"] == "online"
        assert mounts_of(new) == [str(block_env.config.dg_parent / DG / "disks" / added[0])]
    kept = next(str(d["name"]) for d in disk_info(block_env) if d["source"] == str(devs[1]))
    assert sorted(sd["disk"] for sd in info["subdisks"]) == sorted([kept, *added]), info
    ok(block_env.cli("vol", "mount", "m1"))
    try:
        assert "degraded" not in mounts.mounted_at(mp).options  # type: ignore[union-attr]
        assert (mp / "data").read_bytes() == data
        if mounted:
            assert (mp / "written-while-degraded").read_bytes() == more
        found = profiles(mp)
        assert all(p == {"RAID1"} for p in found.values()), found
    finally:
        ok(block_env.cli("vol", "umount", "m1"))


# ------------------------------------------------------------------ deport / import


def test_deport_import_round_trip(block_env: Env, zram_devices: Zram) -> None:
    devs = zram_devices(2, SIZE)
    ok(block_env.cli("dg", "init", DG, *map(str, devs)))
    ok(block_env.cli("vol", "make", "c1", "300m", "layout=concat"))
    ok(block_env.cli("vol", "make", "m1", "300m", "layout=mirror"))
    data_c, data_m = os.urandom(10 * MiB + 1), os.urandom(12 * MiB + 2)
    write_and_check(block_env, "c1", data_c)
    write_and_check(block_env, "m1", data_m)

    ok(block_env.cli("vol", "mount", "c1"))
    refused = block_env.cli("dg", "deport", DG, check=False)
    assert refused.returncode != 0 and "mounted" in refused.stderr, refused.stderr
    ok(block_env.cli("vol", "umount", "c1"))

    ok(block_env.cli("dg", "deport", DG))
    assert [mounts_of(d) for d in devs] == [[], []], "deport left a disk mounted"
    prefix = str(block_env.root) + "/"
    assert not [b for b in loop.attached().values() if b.startswith(prefix)]
    dg = diskgroup.DiskGroup(block_env.config, DG)
    try:
        assert dg.catalog.diskgroup().imported_on is None
    finally:
        dg.close()
    proc = block_env.cli("vol", "mount", "c1", check=False)
    assert proc.returncode != 0 and "deported" in proc.stderr, proc.stderr

    ok(block_env.cli("dg", "import", DG))
    check_block_disks(block_env, devs)
    read_back(block_env, "c1", data_c)
    read_back(block_env, "m1", data_m)


# ------------------------------------------------------------------ a foreign disk at a disk's path


def test_foreign_disk_at_a_disks_path_is_left_alone(block_env: Env, zram_devices: Zram) -> None:
    """Block device names are not stable (sdX, zramN are handed out again): when the device at a disk's
    recorded path carries another disk group's disk, import marks the disk missing and leaves that
    device unmounted. It used to stay mounted in the disk's directory, so the next open found a mount
    there and called the foreign disk online: its volume images were then this group's to remove."""
    devs = zram_devices(2, SIZE)
    ok(block_env.cli("dg", "init", DG, *map(str, devs)))
    ok(block_env.cli("vol", "make", "m1", "300m", "layout=mirror"))
    data = os.urandom(5 * MiB)
    write_and_check(block_env, "m1", data)
    ok(block_env.cli("dg", "deport", DG))
    # the first device now holds a disk of another group, with a volume of its own
    ok(block_env.cli("dg", "init", "otherdg", str(devs[0]), "--force"))
    ok(block_env.cli("vol", "make", "-g", "otherdg", "o1", "100m"))
    ok(block_env.cli("dg", "deport", "otherdg"))

    ok(block_env.cli("dg", "import", DG))
    assert mounts_of(devs[0]) == [], "another group's disk was left mounted in this group's disk directory"
    for _ in range(2):  # and a later open does not take the foreign disk for this one
        info = json.loads(block_env.cli("--json", "vol", "info", "m1").stdout)
        assert info["health"] == "degraded" and info["lost_disks"] == [f"{DG}01"], info
        assert mounts_of(devs[0]) == []
    assert [d["state"] for d in disk_info(block_env)] == ["missing", "online"]
    ok(block_env.cli("vol", "mount", "m1", "--degraded"))
    try:
        assert (block_env.config.mount_root / f"m1_{DG}" / "data").read_bytes() == data
    finally:
        ok(block_env.cli("vol", "umount", "m1"))
    ok(block_env.cli("dg", "deport", DG))
    # the other group's disk is intact and its own again
    ok(block_env.cli("dg", "import", "otherdg"))
    other = json.loads(block_env.cli("--json", "vol", "info", "-g", "otherdg", "o1").stdout)
    assert other["health"] == "ok", other


# ------------------------------------------------------------------ the fixture's own leak check


def test_zram_pool_reports_a_device_it_cannot_remove(tmp_path: Path) -> None:
    """The zram teardown can fail: a device still mounted is reported (not silently kept), and removed
    once released."""
    from tests.integration.zram import ZramPool, sysfs

    pool = ZramPool()
    dev = pool.add("512M")
    num = pool.numbers[0]
    target = tmp_path / "m"
    target.mkdir()
    try:
        subprocess.run(["mkfs.xfs", "-q", str(dev)], check=True, capture_output=True)
        subprocess.run(["mount", str(dev), str(target)], check=True)
        problems = pool.remove_all()
        assert len(problems) == 1 and f"zram{num}" in problems[0] and "busy" in problems[0], problems
        assert pool.left() == [f"zram{num}"]
    finally:
        subprocess.run(["umount", str(target)], check=False, capture_output=True)
        assert pool.remove_all() == []
    assert pool.left() == [] and not sysfs(num).exists()


def test_init_refuses_one_device_named_twice(block_env: Env, zram_devices: Zram) -> None:
    """One device under two names (its node and a symlink, as /dev/disk/by-id gives) is refused before
    anything is written: it used to be formatted under the first name and refused as mounted under the
    second, leaving a fresh XFS on it."""
    from storage.errors import InvalidArgument

    dev = zram_devices(1, SIZE)[0]
    alias = block_env.root / "by-id-alias"
    alias.symlink_to(dev)
    proc = block_env.cli("dg", "init", DG, str(dev), str(alias), check=False)
    assert proc.returncode == InvalidArgument.exit_code and "named twice" in proc.stderr, proc.stderr
    assert subprocess.run(["blkid", "-p", str(dev)], capture_output=True).returncode != 0, \
        "the refused init wrote a filesystem on the device"
    assert json.loads(block_env.cli("--json", "dg", "list").stdout) == []
