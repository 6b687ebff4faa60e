"""Volumes on the fake kernel and the memory store: make, mount, umount, grow, remove of each layout,
and refusals that change nothing. Fast: no loop device, filesystem or mount of the host is touched."""

from __future__ import annotations

import pytest

from storage import volumes
from storage.errors import AlreadyExists, InUse, InvalidArgument, NoSpace, NoSuchVolume
from storage.units import MiB
from tests.unit.conftest import World

LAYOUTS = [("concat", "xfs"), ("concat", "ext4"), ("concat", "btrfs"), ("mirror", "btrfs"),
           ("stripe", "btrfs"), ("mirror-stripe", "btrfs")]


@pytest.mark.parametrize(("layout", "fstype"), LAYOUTS)
def test_make_mount_umount_remove(world: World, layout: str, fstype: str) -> None:
    dg = world.dg
    v = volumes.make(dg, "v1", "600m", layout=layout, fstype=fstype)
    assert (v.state, v.layout, v.fstype) == ("ok", layout, fstype)
    assert world.vol_loops() == [], "make leaves no device attached"
    assert all(p.exists() for p in volumes.images(dg, v))
    mp = volumes.mount(dg, "v1", "m1")
    assert volumes.is_mounted(dg, "v1") and mp == dg.mountpoint("v1")
    assert [m.mount_id for m in dg.catalog.mounts("v1")] == ["m1"]
    assert volumes.info(dg, "v1")["health"] == "ok"
    volumes.umount(dg, "v1", "m1")
    assert not volumes.is_mounted(dg, "v1") and world.vol_loops() == []
    volumes.remove(dg, "v1")
    assert dg.catalog.volumes() == [] and dg.catalog.subdisks() == [] and world.state()[-1] == []


def test_two_mount_ids_share_one_mount(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "v1", "400m")
    volumes.mount(dg, "v1", "a")
    volumes.mount(dg, "v1", "b")
    assert len(world.kernel.table()) == 4 + 1  # four disks and the volume, once
    volumes.umount(dg, "v1", "a")
    assert volumes.is_mounted(dg, "v1")
    volumes.umount(dg, "v1", "b")
    assert not volumes.is_mounted(dg, "v1")


@pytest.mark.parametrize(("layout", "fstype", "mounted"),
                         [("concat", "xfs", True), ("concat", "xfs", False), ("concat", "ext4", False),
                          ("mirror", "btrfs", True), ("stripe", "btrfs", False)])
def test_grow(world: World, layout: str, fstype: str, mounted: bool) -> None:
    dg = world.dg
    volumes.make(dg, "v1", "600m", layout=layout, fstype=fstype)
    if mounted:
        volumes.mount(dg, "v1", "m1")
    v = volumes.grow(dg, "v1", "900m")
    assert v.size == 900 * MiB and dg.catalog.intents() == []
    assert sum(sd.size for sd in dg.catalog.subdisks("v1")) >= 900 * MiB
    assert all(p.stat().st_size == sd.size for p, sd in zip(volumes.images(dg, v), dg.catalog.subdisks("v1"),
                                                             strict=True))
    assert volumes.is_mounted(dg, "v1") == mounted
    if not mounted:
        assert world.vol_loops() == []


def test_ext4_does_not_grow_mounted_and_changes_nothing(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "v1", "600m", fstype="ext4")
    volumes.mount(dg, "v1", "m1")
    before = world.state()
    with pytest.raises(InUse, match="ext4 cannot grow while mounted"):
        volumes.grow(dg, "v1", "900m")
    assert world.state() == before


@pytest.mark.parametrize(("call", "error"), [
    (lambda dg: volumes.make(dg, "v1", "400m"), AlreadyExists),
    (lambda dg: volumes.make(dg, "big", "100g"), NoSpace),
    (lambda dg: volumes.make(dg, "bad", "400m", layout="nonsense"), InvalidArgument),
    (lambda dg: volumes.make(dg, "bad/name", "400m"), InvalidArgument),
    (lambda dg: volumes.grow(dg, "v1", "100m"), InvalidArgument),
    (lambda dg: volumes.grow(dg, "v1", "100g"), NoSpace),
    (lambda dg: volumes.mount(dg, "nope", "m1"), NoSuchVolume),
    (lambda dg: volumes.remove(dg, "nope"), NoSuchVolume),
    (lambda dg: volumes.remove(dg, "mounted"), InUse),
])
def test_refusals_change_nothing(world: World, call: object, error: type[Exception]) -> None:
    dg = world.dg
    volumes.make(dg, "v1", "400m")
    volumes.make(dg, "mounted", "400m")
    volumes.mount(dg, "mounted", "m1")
    before = world.state()
    with pytest.raises(error):
        call(dg)  # type: ignore[operator]
    assert world.state() == before


def test_a_failed_mkfs_rolls_make_back(world: World) -> None:
    world.kernel.fail["mkfs.xfs"] = "mkfs.xfs: injected failure"
    before = world.state()
    with pytest.raises(Exception, match="injected failure"):
        volumes.make(world.dg, "v1", "400m")
    assert world.state() == before


def test_a_busy_umount_keeps_the_mount_and_its_record(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "v1", "400m")
    volumes.mount(dg, "v1", "m1")
    world.kernel.busy.add(str(dg.mountpoint("v1")))
    with pytest.raises(InUse, match="busy"):
        volumes.umount(dg, "v1", "m1")
    assert volumes.is_mounted(dg, "v1")
    world.kernel.busy.clear()
    volumes.umount(dg, "v1", "m1")
    assert not volumes.is_mounted(dg, "v1")


def test_something_else_at_the_mount_point_is_not_the_volume(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "v1", "400m")
    volumes.make(dg, "v2", "400m")
    volumes.mount(dg, "v2", "m1")
    # v2's filesystem mounted at v1's mount point: v1 is not mounted, and mounting it is refused
    mp = dg.mountpoint("v1")
    mp.mkdir(parents=True, exist_ok=True)
    dev = volumes.devices(dg, dg.catalog.volume("v2"))[0]  # type: ignore[arg-type]
    world.kernel(["mount", "-t", "xfs", "-o", "nouuid", dev, str(mp)])
    assert not volumes.is_mounted(dg, "v1")
    with pytest.raises(InUse, match="which is not this volume"):
        volumes.mount(dg, "v1", "m1")


def test_list_and_info(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "a", "400m")
    volumes.make(dg, "b", "400m", layout="mirror", fstype="btrfs")
    assert [r["name"] for r in volumes.list_volumes(dg)] == ["a", "b"]
    assert volumes.info(dg, "b")["layout"] == "mirror"
