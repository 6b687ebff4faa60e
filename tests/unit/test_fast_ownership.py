"""Exclusive attachment through the storage core: two nodes on one disk group (the memory store and the
fake kernel), each with its own node name and mount root, as two plugins on one shared root are."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from storage import diskgroup, doctor, steps, volumes
from storage.diskgroup import DiskGroup
from storage.errors import InUse
from tests.unit.conftest import DG, World

TTL = 0.6


@pytest.fixture
def node2(world: World) -> Iterator[DiskGroup]:
    """The same disk group seen from node2, which holds a lease (its plugin runs)."""
    config = dataclasses.replace(world.config, node="node2", mount_root=world.config.mount_root.parent / "mnt2")
    world.dg.catalog.renew_lease("node1", TTL)
    world.dg.catalog.renew_lease("node2", TTL)
    dg = diskgroup.open_dg(config, DG, world.kernel, store=world.store)
    yield dg
    dg.close()


def attached(dg: DiskGroup) -> list[tuple[str, str, str | None]]:
    return [(a.volume, a.node, a.wanted_by) for a in dg.catalog.attachments()]


def test_a_node_without_a_lease_cannot_open_a_disk_group_imported_elsewhere(world: World) -> None:
    config = dataclasses.replace(world.config, node="node2")
    with pytest.raises(InUse, match="imported on node node1"):
        diskgroup.open_dg(config, DG, world.kernel, store=world.store)


def test_mount_on_a_second_node_is_refused_naming_the_holder_until_it_unmounts(world: World,
                                                                              node2: DiskGroup) -> None:
    volumes.make(world.dg, "v", "400m")
    volumes.mount(world.dg, "v", "id-a")
    assert attached(world.dg) == [("v", "node1", None)]
    before = world.kernel.state() if hasattr(world.kernel, "state") else None
    with pytest.raises(InUse, match="attached on node node1"):
        volumes.mount(node2, "v", "id-b")
    assert attached(world.dg) == [("v", "node1", "node2")]  # node1 learns node2 wants it
    assert not volumes.is_mounted(node2, "v")
    if before is not None:
        assert world.kernel.state() == before
    volumes.mount(world.dg, "v", "id-a2")  # a second user on the holder
    assert volumes.umount(world.dg, "v", "id-a") is False  # still used there: still attached
    with pytest.raises(InUse, match="node1"):
        volumes.mount(node2, "v", "id-b")
    assert volumes.umount(world.dg, "v", "id-a2") is True
    assert attached(world.dg) == []
    volumes.mount(node2, "v", "id-b")
    assert attached(world.dg) == [("v", "node2", None)] and volumes.is_mounted(node2, "v")
    with pytest.raises(InUse, match="attached on node node2"):
        volumes.mount(world.dg, "v", "id-a")
    volumes.umount(node2, "v", "id-b")


def test_an_expired_holder_is_taken_over_and_its_mount_records_dropped(world: World, node2: DiskGroup) -> None:
    volumes.make(world.dg, "v", "400m")
    volumes.mount(world.dg, "v", "id-a")
    time.sleep(TTL + 0.1)  # node1 dies: it renews no more, and its kernel's mount goes with it
    steps.unmount_kernel(world.dg, steps.get(world.dg, "v"))
    node2.catalog.renew_lease("node2", TTL)
    volumes.mount(node2, "v", "id-b")
    assert attached(node2) == [("v", "node2", None)]
    assert [(m.node, m.mount_id) for m in node2.catalog.mounts("v")] == [("node2", "id-b")]
    # node1 renews again: it does not get the volume back, nor can it mount it
    world.dg.catalog.renew_lease("node1", TTL)
    with pytest.raises(InUse, match="attached on node node2"):
        volumes.mount(world.dg, "v", "id-a")
    assert attached(node2) == [("v", "node2", "node1")]
    volumes.umount(node2, "v", "id-b")


def test_a_node_whose_lease_ran_out_cannot_mount_in_a_shared_disk_group(world: World, node2: DiskGroup) -> None:
    volumes.make(world.dg, "v", "400m")
    time.sleep(TTL + 0.1)
    node2.catalog.renew_lease("node2", TTL)
    with pytest.raises(InUse, match="node node1 holds no live lease"):
        volumes.mount(world.dg, "v", "id-a")
    assert attached(world.dg) == [] and world.dg.catalog.mounts() == []


def test_one_node_alone_mounts_without_any_lease(world: World) -> None:
    """No plugin keeps leases (the CLI on a single node): mounting is as it always was."""
    volumes.make(world.dg, "v", "400m")
    volumes.mount(world.dg, "v")
    assert world.dg.catalog.attachments() == [] and world.dg.catalog.leases() == []
    volumes.umount(world.dg, "v")


def test_doctor_reports_attachments_that_disagree_with_mounts(world: World, node2: DiskGroup) -> None:
    volumes.make(world.dg, "v", "400m")
    volumes.make(world.dg, "w", "400m")
    volumes.mount(world.dg, "v", "id-a")
    world.dg.catalog.attach("w", "node1")  # attached here, mounted nowhere (a crash in between)
    kinds = {(f.kind, f.subject) for f in doctor.check(world.dg)}
    assert ("idle-attachment", "w") in kinds and ("idle-attachment", "v") not in kinds
    fixed = [f for f in doctor.check(world.dg, repair=True) if f.kind == "idle-attachment"]
    assert [f.fixed for f in fixed] == [True]
    assert attached(world.dg) == [("v", "node1", None)]
    time.sleep(TTL + 0.1)
    node2.catalog.renew_lease("node2", TTL)
    kinds = {(f.kind, f.subject) for f in doctor.check(node2)}
    assert ("expired-attachment", "v") in kinds
    kinds = {(f.kind, f.subject) for f in doctor.check(world.dg)}
    assert ("expired-attachment", "v") in kinds
    # node2's doctor never touches node1's mount of a volume attached there
    world.dg.catalog.renew_lease("node1", TTL)
    volumes.mount(world.dg, "w", "id-w")
    doctor.check(node2, repair=True)
    assert volumes.is_mounted(world.dg, "w")
    volumes.umount(world.dg, "w", "id-w")
    volumes.umount(world.dg, "v", force=True)


@pytest.mark.parametrize("point", ["mount.recorded", "mount.attached", "mount.mounted"])
def test_a_killed_mount_rolled_back_releases_the_attachment(world: World, node2: DiskGroup,
                                                            monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """A mount killed after it attached the volume must not keep it from the other node for as long as
    this node lives: recovery rolls the mount back and detaches."""
    volumes.make(world.dg, "v", "400m")
    world.kill_at(monkeypatch, point, lambda dg: volumes.mount(dg, "v", "m1"))
    assert attached(world.dg) == [("v", "node1", None)]
    world.dg.catalog.renew_lease("node1", TTL)
    world.dg = world.reopen()
    assert attached(world.dg) == [] and world.dg.catalog.intents() == []
    node2.catalog.renew_lease("node2", TTL)
    volumes.mount(node2, "v", "id-b")
    volumes.umount(node2, "v", "id-b")


@pytest.mark.parametrize("point", ["umount.recorded", "umount.unmounted"])
def test_a_killed_umount_rolled_forward_releases_the_attachment(world: World, node2: DiskGroup,
                                                                monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    volumes.make(world.dg, "v", "400m")
    volumes.mount(world.dg, "v", "m1")
    world.kill_at(monkeypatch, point, lambda dg: volumes.umount(dg, "v", "m1"))
    world.dg.catalog.renew_lease("node1", TTL)
    world.dg = world.reopen()
    assert attached(world.dg) == [] and not volumes.is_mounted(world.dg, "v")


def test_a_node_whose_lease_is_past_half_cannot_mount_what_its_plugin_would_fence_at_once(
        world: World, node2: DiskGroup) -> None:
    """Its plugin fences once half the TTL passes without a renewal: a Mount that came between the catalog
    answering again and the next renewal got the volume only to have its container killed."""
    volumes.make(world.dg, "v", "400m")
    world.dg.catalog.renew_lease("node1", TTL)
    time.sleep(TTL / 2 + 0.05)
    with pytest.raises(InUse, match=r"node node1's lease .* left: its renewals have not reached the catalog"):
        volumes.mount(world.dg, "v", "id-a")
    assert attached(world.dg) == [] and world.dg.catalog.mounts() == [] and not volumes.is_mounted(world.dg, "v")
    world.dg.catalog.renew_lease("node1", TTL)
    volumes.mount(world.dg, "v", "id-a")
    assert attached(world.dg) == [("v", "node1", None)]
    volumes.umount(world.dg, "v", "id-a")


def test_a_sharing_node_that_cannot_bring_a_disk_online_leaves_the_catalogs_state_alone(
        world: World, node2: DiskGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk's state is one record for every node: a sharing node whose own mount failed (on one kernel:
    "already mounted", the importer's mount propagating meanwhile) once marked the importer's disks
    missing, and the importer's next Create found "0 online"."""
    from storage import group
    from storage.errors import VeritasError

    def fails(*_: object) -> None:
        raise VeritasError("mount failed (exit 32): already mounted")

    monkeypatch.setattr(group, "_bring_online", fails)
    monkeypatch.setattr(group.mounts, "mounted_at", lambda _target: None)
    before = [(d.name, d.state) for d in node2.catalog.disks()]
    assert all(state == "online" for _, state in before)
    node2.online_disks()
    assert [(d.name, d.state) for d in node2.catalog.disks()] == before
    world.dg.online_disks()  # the importer's own failure is the disk's state
    assert {d.state for d in world.dg.catalog.disks()} == {"missing"}
