"""Recovery on the fake kernel and the memory store: an operation killed at each of its crash points is
rolled back or forward by the next opener, as storage.recovery.HANDLERS says for its kind."""

from __future__ import annotations

import dataclasses

import pytest

from storage import recovery, snapshots, volumes
from storage.diskgroup import DiskSpec
from storage.units import GiB, MiB
from tests.unit.conftest import World


def _nothing_of(world: World, name: str) -> None:
    dg = world.dg
    assert dg.catalog.volume(name) is None and dg.catalog.subdisks(name) == [] and dg.catalog.intents() == []
    assert not list(dg.root.glob(f"disks/*/vols/{name}.*")), "images left"
    assert world.vol_loops() == [] and not volumes.is_mounted(dg, name)


@pytest.mark.parametrize("point", ["make.recorded", "make.images", "make.attached", "make.mkfs",
                                   "make.detached"])
@pytest.mark.parametrize("layout", ["concat", "mirror"])
def test_killed_make_is_rolled_back(world: World, monkeypatch: pytest.MonkeyPatch, point: str,
                                    layout: str) -> None:
    fstype = "btrfs" if layout == "mirror" else "xfs"
    world.kill_at(monkeypatch, point, lambda dg: volumes.make(dg, "v1", "400m", layout=layout, fstype=fstype))
    assert [i.op for i in world.dg.catalog.intents()] == ["make"]
    world.dg = world.reopen()
    _nothing_of(world, "v1")
    volumes.make(world.dg, "v1", "400m")  # the name is free again


def test_a_live_owners_intent_is_left_to_it(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An owner stopped at a crash point but not killed still holds its locks: recovery must wait."""
    from tests.unit import fakekernel

    fakekernel.kill_at(monkeypatch, "make.images", lambda: volumes.make(world.dg, "v1", "400m"),
                       abandon=lambda _t: None)
    dg = world.reopen()
    assert recovery.recover(dg) == []
    assert [i.op for i in dg.catalog.intents()] == ["make"] and dg.catalog.volume("v1") is not None


@pytest.mark.parametrize("point", ["rm.recorded", "rm.detached", "rm.images"])
def test_killed_remove_is_rolled_forward(world: World, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    volumes.make(world.dg, "v1", "400m")
    world.kill_at(monkeypatch, point, lambda dg: volumes.remove(dg, "v1"))
    world.dg = world.reopen()
    _nothing_of(world, "v1")


@pytest.mark.parametrize("point", ["mount.recorded", "mount.attached", "mount.mounted"])
def test_killed_mount_is_rolled_back(world: World, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    volumes.make(world.dg, "v1", "400m")
    world.kill_at(monkeypatch, point, lambda dg: volumes.mount(dg, "v1", "m1"))
    dg = world.dg = world.reopen()
    assert dg.catalog.intents() == [] and dg.catalog.mounts() == []
    assert not volumes.is_mounted(dg, "v1") and world.vol_loops() == []
    volumes.mount(dg, "v1", "m1")  # and it mounts again
    assert volumes.is_mounted(dg, "v1")


def test_killed_mount_after_recording_its_id_completes(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    volumes.make(world.dg, "v1", "400m")
    world.kill_at(monkeypatch, "mount.done", lambda dg: volumes.mount(dg, "v1", "m1"))
    dg = world.dg = world.reopen()
    assert dg.catalog.intents() == [] and [m.mount_id for m in dg.catalog.mounts("v1")] == ["m1"]
    assert volumes.is_mounted(dg, "v1")


@pytest.mark.parametrize("point", ["umount.recorded", "umount.unmounted"])
def test_killed_umount_is_rolled_forward(world: World, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    volumes.make(world.dg, "v1", "400m")
    volumes.mount(world.dg, "v1", "m1")
    world.kill_at(monkeypatch, point, lambda dg: volumes.umount(dg, "v1", "m1"))
    dg = world.dg = world.reopen()
    assert dg.catalog.intents() == [] and dg.catalog.mounts() == []
    assert not volumes.is_mounted(dg, "v1") and world.vol_loops() == []


@pytest.mark.parametrize("point", ["grow.recorded", "grow.reserved", "grow.images", "grow.fs"])
@pytest.mark.parametrize("mounted", [True, False])
def test_killed_grow_is_rolled_forward(world: World, monkeypatch: pytest.MonkeyPatch, point: str,
                                       mounted: bool) -> None:
    volumes.make(world.dg, "v1", "400m")
    if mounted:
        volumes.mount(world.dg, "v1", "m1")
    world.kill_at(monkeypatch, point, lambda dg: volumes.grow(dg, "v1", "700m"))
    dg = world.dg = world.reopen()
    v = dg.catalog.volume("v1")
    assert v is not None and v.size == 700 * MiB and dg.catalog.intents() == []
    assert all(p.stat().st_size == sd.size for p, sd in zip(volumes.images(dg, v), dg.catalog.subdisks("v1"),
                                                             strict=True))
    assert volumes.is_mounted(dg, "v1") == mounted


@pytest.mark.parametrize("point", ["snap.recorded", "snap.frozen", "snap.cloned"])
def test_killed_snapshot_is_rolled_back_and_its_source_thawed(world: World, monkeypatch: pytest.MonkeyPatch,
                                                              point: str) -> None:
    volumes.make(world.dg, "src", "400m")
    volumes.mount(world.dg, "src", "m1")
    world.kill_at(monkeypatch, point, lambda dg: snapshots.make(dg, "src", "snap1"))
    dg = world.dg = world.reopen()
    assert dg.catalog.volume("snap1") is None and dg.catalog.intents() == []
    assert not list(dg.root.glob("disks/*/vols/snap1.*"))
    assert world.kernel.frozen == set() and volumes.is_mounted(dg, "src")


def test_a_killed_snapshots_recovery_leaves_another_filesystem_at_the_sources_path_frozen(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery thaws the source by the device it froze, not by its path: if the source was unmounted
    meanwhile and another filesystem mounted and frozen there by someone else, that one stays frozen."""
    volumes.make(world.dg, "src", "400m")
    volumes.make(world.dg, "other", "400m")
    volumes.mount(world.dg, "src", "m1")
    volumes.mount(world.dg, "other", "m1")
    target = str(world.dg.mountpoint("src"))
    world.kill_at(monkeypatch, "snap.frozen", lambda dg: snapshots.make(dg, "src", "snap1"))
    k = world.kernel
    assert target in k.frozen
    assert k(["umount", target]).returncode == 0 and target not in k.frozen
    theirs = next(m for m in k.mounted if m.entry.target == str(world.dg.mountpoint("other")))
    k.mounted.append(dataclasses.replace(theirs, entry=dataclasses.replace(theirs.entry, target=target)))
    assert k(["fsfreeze", "--freeze", target]).returncode == 0
    world.dg = world.reopen()
    assert world.dg.catalog.volume("snap1") is None and world.dg.catalog.intents() == []
    assert target in k.frozen, "recovery thawed a filesystem it had not frozen"


@pytest.mark.parametrize("point", ["adddisk.recorded", "adddisk.mkfs"])
def test_killed_adddisk_is_rolled_back(world: World, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    img = world.config.state_root.parent / "disks" / "d5.img"
    before = world.dg.catalog.disks()
    world.kill_at(monkeypatch, point, lambda dg: dg.add_disks([DiskSpec(img, 2 * GiB)]))
    dg = world.dg = world.reopen()
    assert dg.catalog.disks() == before and dg.catalog.intents() == []
    assert not img.exists() and not any(back == str(img) for back in world.kernel.attached().values())


def test_recover_held_finishes_a_dead_operations_intent_for_the_next_one(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived opener (the plugin) does not reopen: its next operation on the key recovers."""
    volumes.make(world.dg, "v1", "400m")
    world.kill_at(monkeypatch, "umount.recorded", lambda dg: volumes.umount(dg, "v1"))
    dg = world.reopen_without_recovery()
    assert [i.op for i in dg.catalog.intents()] == ["umount"]
    volumes.mount(dg, "v1", "m2")  # finishes the umount first, then mounts
    assert dg.catalog.intents() == [] and [m.mount_id for m in dg.catalog.mounts("v1")] == ["m2"]
