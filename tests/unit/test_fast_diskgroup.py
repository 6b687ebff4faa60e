"""Disk groups on the memory store and the fake kernel: init, publish, deport/import by compare-and-set,
destroy, and mount points claimed across the store's disk groups."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from storage import diskgroup, volumes
from storage.diskgroup import DiskSpec
from storage.errors import AlreadyExists, InUse, InvalidArgument, NoSuchDiskGroup
from storage.units import GiB
from tests.unit.conftest import DG, World


def _specs(world: World, *names: str) -> list[DiskSpec]:
    return [DiskSpec(world.config.state_root.parent / "disks" / f"{n}.img", 2 * GiB) for n in names]


def test_init_publishes_only_a_complete_disk_group(world: World) -> None:
    assert world.store.names() == [DG] and not world.store.is_partial(DG)
    assert [d.name for d in world.dg.catalog.disks()] == [f"{DG}0{i}" for i in (1, 2, 3, 4)]
    with pytest.raises(AlreadyExists):
        diskgroup.init(world.config, DG, _specs(world, "x1"), runner=world.kernel, store=world.store)
    assert not (world.config.state_root.parent / "disks" / "x1.img").exists()


def test_a_failed_init_leaves_nothing(world: World) -> None:
    world.kernel.fail["mkfs.xfs"] = "mkfs.xfs: injected failure"
    with pytest.raises(Exception, match="injected failure"):
        diskgroup.init(world.config, "g2", _specs(world, "y1", "y2"), runner=world.kernel, store=world.store)
    assert world.store.names() == [DG] and not world.store.is_partial("g2")
    assert not (world.config.dg_parent / "g2").exists()
    assert not any("y1" in b or "y2" in b for b in world.kernel.attached().values())


def test_init_refuses_bad_disks_and_changes_nothing(world: World) -> None:
    with pytest.raises(InvalidArgument):
        diskgroup.init(world.config, "g2", [], runner=world.kernel, store=world.store)
    with pytest.raises(InvalidArgument, match="named twice"):
        diskgroup.init(world.config, "g2", _specs(world, "z", "z"), runner=world.kernel, store=world.store)
    assert world.store.names() == [DG] and not (world.config.dg_parent / "g2").exists()


def test_deport_and_import_change_the_owner_by_compare_and_set(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "v", "400m")
    volumes.mount(dg, "v", "m1")
    with pytest.raises(InUse, match="mounted volumes"):
        diskgroup.deport(dg)
    volumes.umount(dg, "v", "m1")
    diskgroup.deport(dg)
    assert dg.catalog.diskgroup().imported_on is None and world.kernel.table() == []
    with pytest.raises(InUse, match="deported"):
        diskgroup.open_dg(world.config, DG, world.kernel, store=world.store)
    other = diskgroup.import_dg(world.config, DG, runner=world.kernel, store=world.store)
    assert other.catalog.diskgroup().imported_on == "node1"
    assert [v.name for v in other.catalog.volumes()] == ["v"]
    volumes.mount(other, "v", "m1")


def test_destroy_is_refused_with_volumes_and_forced_removes_them(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "v", "400m")
    before = world.state()
    with pytest.raises(InUse, match="holds volumes"):
        diskgroup.destroy(dg)
    assert world.state() == before
    volumes.mount(dg, "v", "m1")
    diskgroup.destroy(dg, force=True)
    assert world.store.names() == [] and world.kernel.table() == [] and world.kernel.attached() == {}
    assert not (world.config.dg_parent / DG).exists()
    with pytest.raises(NoSuchDiskGroup):
        diskgroup.open_dg(world.config, DG, world.kernel, store=world.store)


def test_a_mount_point_another_disk_group_claims_is_refused(world: World, tmp_path: Path) -> None:
    """Volume a_b of disk group c and volume a of disk group b_c share the mount point a_b_c."""
    c = diskgroup.init(world.config, "c", _specs(world, "c1"), runner=world.kernel, store=world.store)
    b_c = diskgroup.init(world.config, "b_c", _specs(world, "bc1"), runner=world.kernel, store=world.store)
    volumes.make(c, "a_b", "400m")
    with pytest.raises(InUse, match="volume a_b of disk group c"):
        volumes.make(b_c, "a", "400m")
    assert b_c.catalog.volumes() == []


def test_an_open_racing_a_destroy_never_brings_its_disks_back(world: World) -> None:
    """A plugin's periodic open (the snapshot-cache watcher) landing while a destroy has taken a disk
    offline leaves the disks to the destroy. Before, it mounted the disk again behind the destroy, which
    then left that mount (and its loop device) with no group to own it."""
    volumes.make(world.dg, "v", "400m")
    disk_dirs = {str(world.dg.disk_dir(d.name)) for d in world.dg.catalog.disks()}
    world.dg.close()
    other: list[BaseException | None] = []

    def racing_open() -> None:
        try:
            diskgroup.open_dg(world.config, DG, world.kernel, store=world.store).close()
            other.append(None)
        except BaseException as exc:  # what the racing open ended with, for the test to check
            other.append(exc)

    opener = threading.Thread(target=racing_open)

    def runner(argv, **kw):  # type: ignore[no-untyped-def]
        out = world.kernel(argv, **kw)
        if argv[0] == "umount" and str(argv[-1]) in disk_dirs and not opener.is_alive() and not other:
            opener.start()  # the first disk is offline: another process opens the group now
            opener.join(timeout=1.0)  # without the lock it has mounted the disk again by now
        return out

    dg = diskgroup.open_dg(world.config, DG, runner, store=world.store)
    diskgroup.destroy(dg, force=True)
    opener.join(timeout=10)
    assert len(other) == 1 and (other[0] is None or isinstance(other[0], NoSuchDiskGroup)), other
    assert [m.target for m in world.kernel.table() if m.target in disk_dirs] == []
    assert DG not in world.store.names()
