"""Contract tests every Catalog backend must pass (SqliteCatalog, MemoryCatalog and EtcdCatalog, the
last on a real etcd: tests/etcd_server.py), and every CatalogStore (SqliteStore, MemoryStore, EtcdStore).

The ``catalog`` fixture is parametrized over the backends; every test in the contract section runs
against each of them. SQLite-only behaviour (persistence, several processes on one file) is tested
separately at the end.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage.catalog import (
    Catalog,
    DiskGroupRec,
    DiskRec,
    IntentRec,
    MountRec,
    SubdiskRec,
    VolumeRec,
)
from storage.catalog.base import AttachRec, CatalogStore, LeaseRec
from storage.catalog.etcd import Etcd, EtcdCatalog
from storage.catalog.etcd_store import EtcdStore
from storage.catalog.memory import MemoryCatalog
from storage.catalog.memory_store import MemoryStore
from storage.catalog.sqlite import SqliteCatalog
from storage.catalog.sqlite_store import SqliteStore
from storage.errors import (
    AlreadyExists,
    AttachedElsewhere,
    IntentPending,
    InUse,
    NoSpace,
    NoSuchDiskGroup,
    NoSuchVolume,
)
from storage.locks import Locks
from storage.units import GiB, MiB

DG = DiskGroupRec(name="testdg", uuid="0f8e2c3a-1111-2222-3333-444455556666", imported_on=None,
                  created=1700000000.25)
D1 = DiskRec(name="d1", source="/srv/img/d1.img", kind="file", size=10 * GiB)
D2 = DiskRec(name="d2", source="/dev/sdb", kind="block", size=20 * GiB, state="online")
CAP = {"d1": 1000 * MiB, "d2": 2000 * MiB}


def vol(name: str, size: int = 100 * MiB, **kw: object) -> VolumeRec:
    fields: dict[str, object] = {"layout": "concat", "fstype": "xfs", "created": 1700000100.5}
    fields.update(kw)
    return VolumeRec(name, size, **fields)  # type: ignore[arg-type]


def sd(volume: str, idx: int, disk: str, reserved: int, size: int | None = None) -> SubdiskRec:
    return SubdiskRec(volume=volume, idx=idx, disk=disk, size=reserved if size is None else size,
                      reserved=reserved)


def intent(key: str, op: str = "create", created: float = 1700000200.0, **data: object) -> IntentRec:
    return IntentRec(key=key, op=op, data=data, created=created)


def _prefix() -> str:
    """A key prefix of its own for each test on the session's etcd."""
    return f"/vtest/{uuid.uuid4().hex}"


def _make(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Catalog:
    if kind == "sqlite":
        return SqliteCatalog(tmp_path / "catalog.db")
    if kind == "etcd":
        server = request.getfixturevalue("etcd_server")
        return EtcdCatalog(Etcd([server.endpoint]), _prefix() + "/", label="testdg")
    return MemoryCatalog()


@pytest.fixture(params=["sqlite", "memory", "etcd"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    cat = _make(request.param, tmp_path, request)
    try:
        yield cat
    finally:
        cat.close()


@pytest.fixture
def ready(catalog: Catalog) -> Catalog:
    """An initialised catalog with disks d1 and d2."""
    catalog.init(DG)
    catalog.add_disk(D1)
    catalog.add_disk(D2)
    return catalog


def create(cat: Catalog, v: VolumeRec, sds: list[SubdiskRec], capacity: dict[str, int] | None = None,
           it: IntentRec | None = None) -> None:
    cat.create_volume(v, sds, it or intent(v.name), CAP if capacity is None else capacity)


def snapshot(cat: Catalog) -> tuple[object, ...]:
    """Everything a caller can read, to prove a failed call changed nothing."""
    return (cat.volumes(), cat.subdisks(), cat.mounts(), cat.intents(), cat.reserved(), cat.disks())


# ---------------------------------------------------------------------------------------- disk group


def test_diskgroup_before_init_raises(catalog: Catalog) -> None:
    with pytest.raises(NoSuchDiskGroup):
        catalog.diskgroup()


def test_init_records_diskgroup(catalog: Catalog) -> None:
    catalog.init(DG)
    assert catalog.diskgroup() == DG


def test_init_twice_raises_already_exists_and_keeps_first(catalog: Catalog) -> None:
    catalog.init(DG)
    other = DiskGroupRec(name="otherdg", uuid="different", imported_on="nodeX", created=5.0)
    with pytest.raises(AlreadyExists):
        catalog.init(other)
    with pytest.raises(AlreadyExists):
        catalog.init(DG)
    assert catalog.diskgroup() == DG


def test_set_imported_round_trip(catalog: Catalog) -> None:
    catalog.init(DG)
    catalog.set_imported("node-a")
    got = catalog.diskgroup()
    assert got.imported_on == "node-a"
    assert got == DiskGroupRec(DG.name, DG.uuid, "node-a", DG.created)
    catalog.set_imported("node-b")
    assert catalog.diskgroup().imported_on == "node-b"
    catalog.set_imported(None)
    assert catalog.diskgroup() == DG


def test_accept_shared_domain_round_trips_and_defaults_to_refusing(catalog: Catalog) -> None:
    """The group's acceptance of copies in one failure domain is recorded at init and kept; a group made
    without it refuses (the default), and importing or deporting never changes it."""
    assert DG.accept_shared_domain is False
    catalog.init(DiskGroupRec("onehost", "u-1", "node1", 7.0, accept_shared_domain=True))
    assert catalog.diskgroup() == DiskGroupRec("onehost", "u-1", "node1", 7.0, True)
    catalog.set_imported(None)
    catalog.set_imported("node2")
    assert catalog.diskgroup().accept_shared_domain is True


def test_a_group_made_without_acceptance_refuses_shared_domains(catalog: Catalog) -> None:
    catalog.init(DG)
    assert catalog.diskgroup().accept_shared_domain is False
    assert catalog.diskgroup().shared is False


def test_shared_round_trips_through_import_and_deport(catalog: Catalog) -> None:
    """A shared disk group (dg init -s) stays shared whoever imports or deports it."""
    catalog.init(DiskGroupRec("shareddg", "u-2", "node1", 8.0, shared=True))
    assert catalog.diskgroup() == DiskGroupRec("shareddg", "u-2", "node1", 8.0, False, True)
    catalog.set_imported(None)
    catalog.set_imported("node2")
    assert catalog.diskgroup().shared is True and catalog.diskgroup().accept_shared_domain is False


# --------------------------------------------------------------------------------------------- disks


def test_disks_empty_then_round_trip(catalog: Catalog) -> None:
    catalog.init(DG)
    assert catalog.disks() == []
    missing = DiskRec(name="d0", source="/srv/img/d0.img", kind="file", size=123456789, state="missing")
    for d in (D2, missing, D1):
        catalog.add_disk(d)
    assert sorted(catalog.disks(), key=lambda d: d.name) == [missing, D1, D2]


@pytest.mark.parametrize(
    "dup",
    [
        DiskRec(name="d1", source="/srv/img/new.img", kind="file", size=GiB),  # same name
        DiskRec(name="dnew", source="/srv/img/d1.img", kind="file", size=GiB),  # same source
        DiskRec(name="d1", source="/srv/img/d1.img", kind="file", size=GiB),  # both
    ],
    ids=["name", "source", "both"],
)
def test_add_disk_duplicate_raises_already_exists(ready: Catalog, dup: DiskRec) -> None:
    before = ready.disks()
    with pytest.raises(AlreadyExists):
        ready.add_disk(dup)
    assert ready.disks() == before


def test_set_disk_state(ready: Catalog) -> None:
    ready.set_disk_state("d1", "missing")
    by_name = {d.name: d for d in ready.disks()}
    assert by_name["d1"].state == "missing"
    assert by_name["d1"] == DiskRec(D1.name, D1.source, D1.kind, D1.size, "missing")
    assert by_name["d2"] == D2
    ready.set_disk_state("d1", "online")
    assert {d.name: d for d in ready.disks()}["d1"] == D1


def test_remove_disk(ready: Catalog) -> None:
    ready.remove_disk("d2")
    assert ready.disks() == [D1]
    # the freed name and source can be added again
    ready.add_disk(D2)
    assert sorted(ready.disks(), key=lambda d: d.name) == [D1, D2]


def test_remove_disk_refused_while_subdisk_lives_on_it(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    with pytest.raises(InUse):
        ready.remove_disk("d1")
    assert D1 in ready.disks()
    assert ready.subdisks("v1") == [sd("v1", 0, "d1", 100 * MiB)]
    # d2 holds nothing and can go
    ready.remove_disk("d2")
    assert ready.disks() == [D1]
    # once the volume is gone, d1 can go too
    ready.delete_volume("v1")
    ready.remove_disk("d1")
    assert ready.disks() == []


def test_remove_disk_refused_after_subdisk_moved_onto_it(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    ready.update_subdisk("v1", 0, CAP, disk="d2")
    ready.remove_disk("d1")  # nothing on d1 any more
    with pytest.raises(InUse):
        ready.remove_disk("d2")
    assert ready.disks() == [D2]


# ------------------------------------------------------------------------------------------- volumes


def test_volume_absent_is_none(ready: Catalog) -> None:
    assert ready.volume("nope") is None
    assert ready.volumes() == []
    assert ready.subdisks() == []
    assert ready.subdisks("nope") == []
    assert ready.reserved() == {}


def test_create_volume_records_volume_subdisks_and_intent(ready: Catalog) -> None:
    v = vol("v1", 300 * MiB, layout="mirror", nmirror=2, ncol=1, maxiops=500, cachesize=7 * MiB,
            state="creating", protect=True)
    sds = [sd("v1", 1, "d2", 300 * MiB, 299 * MiB), sd("v1", 0, "d1", 300 * MiB, 299 * MiB)]
    it = intent("v1", "create", disks=["d1", "d2"], step=0)
    create(ready, v, sds, it=it)
    got = ready.volume("v1")
    assert got == v
    assert got is not None and got.protect is True and got.snapshot_of is None
    assert ready.volumes() == [v]
    # ordered by idx, whatever the insertion order
    assert ready.subdisks("v1") == [sds[1], sds[0]]
    assert ready.intents() == [it]


def test_volume_fields_round_trip_snapshot(ready: Catalog) -> None:
    src = vol("src", 200 * MiB)
    snap = vol("snap1", 200 * MiB, layout="snapshot", snapshot_of="src", cachesize=60 * MiB,
               protect=False, state="ok", created=1700000999.75)
    create(ready, src, [sd("src", 0, "d1", 200 * MiB)])
    create(ready, snap, [sd("snap1", 0, "d1", 60 * MiB)])
    assert ready.volume("snap1") == snap
    got = ready.volume("snap1")
    assert got is not None and got.protect is False and got.snapshot_of == "src"
    assert ready.volumes() == [snap, src]  # by name


def test_snapshot_cache_fields_round_trip_and_update(ready: Catalog) -> None:
    """autogrow and invalid (storage.snapcache) are kept as given and changed by update_volume."""
    create(ready, vol("src", 200 * MiB), [sd("src", 0, "d1", 200 * MiB)])
    snap = vol("s1", 200 * MiB, snapshot_of="src", cachesize=60 * MiB, autogrow=True)
    create(ready, snap, [sd("s1", 0, "d1", 60 * MiB)])
    assert ready.volume("s1") == snap
    assert ready.volume("src") == vol("src", 200 * MiB) and ready.volume("src").invalid == ""  # type: ignore[union-attr]
    ready.update_volume("s1", invalid="its cache ran out", autogrow=False)
    got = ready.volume("s1")
    assert got is not None and got.invalid == "its cache ran out" and got.autogrow is False


def test_provisioning_round_trips_and_defaults_to_thin(ready: Catalog) -> None:
    create(ready, vol("thin1"), [sd("thin1", 0, "d1", 100 * MiB)])
    create(ready, vol("thick1", provisioning="thick"), [sd("thick1", 0, "d1", 100 * MiB)])
    assert ready.volume("thin1") == vol("thin1") and ready.volume("thin1").provisioning == "thin"  # type: ignore[union-attr]
    assert ready.volume("thick1") == vol("thick1", provisioning="thick")
    assert [v.provisioning for v in ready.volumes()] == ["thick", "thin"]


def test_create_volume_duplicate_name_changes_nothing(ready: Catalog) -> None:
    v = vol("v1", 100 * MiB)
    create(ready, v, [sd("v1", 0, "d1", 100 * MiB)], it=intent("v1", "create", step=1))
    before = snapshot(ready)
    again = vol("v1", 500 * MiB, layout="stripe", state="creating")
    with pytest.raises(AlreadyExists):
        create(ready, again, [sd("v1", 0, "d2", 500 * MiB), sd("v1", 1, "d1", 50 * MiB)],
               it=intent("v1", "other", step=9))
    assert snapshot(ready) == before
    assert ready.volume("v1") == v


def test_create_volume_no_space_records_nothing(ready: Catalog) -> None:
    with pytest.raises(NoSpace):
        create(ready, vol("big", 1001 * MiB), [sd("big", 0, "d1", 1001 * MiB)])
    assert ready.volume("big") is None
    assert ready.volumes() == []
    assert ready.subdisks() == []
    assert ready.subdisks("big") == []
    assert ready.intents() == []
    assert ready.reserved() == {}


def test_create_volume_no_space_on_second_disk_records_nothing(ready: Catalog) -> None:
    create(ready, vol("keep"), [sd("keep", 0, "d2", 1500 * MiB)])
    before = snapshot(ready)
    # the first subdisk fits on d1, the second does not fit on d2: all or nothing
    with pytest.raises(NoSpace):
        create(ready, vol("m", 600 * MiB), [sd("m", 0, "d1", 600 * MiB), sd("m", 1, "d2", 600 * MiB)])
    assert snapshot(ready) == before
    assert ready.volume("m") is None


def test_create_volume_sums_subdisks_on_same_disk(ready: Catalog) -> None:
    # each subdisk fits alone, together they exceed d1
    with pytest.raises(NoSpace):
        create(ready, vol("s", 1000 * MiB), [sd("s", 0, "d1", 600 * MiB), sd("s", 1, "d1", 600 * MiB)])
    assert ready.volumes() == [] and ready.subdisks() == [] and ready.intents() == []


def test_create_volume_counts_existing_reservations(ready: Catalog) -> None:
    create(ready, vol("a"), [sd("a", 0, "d1", 700 * MiB)])
    with pytest.raises(NoSpace):
        create(ready, vol("b"), [sd("b", 0, "d1", 301 * MiB)])
    assert ready.volume("b") is None
    # exactly filling the disk is allowed
    create(ready, vol("c"), [sd("c", 0, "d1", 300 * MiB)])
    assert ready.reserved() == {"d1": 1000 * MiB}
    with pytest.raises(NoSpace):
        create(ready, vol("d"), [sd("d", 0, "d1", 1)])


def test_create_volume_disk_without_capacity_is_no_space(ready: Catalog) -> None:
    with pytest.raises(NoSpace):
        create(ready, vol("v"), [sd("v", 0, "d2", MiB)], capacity={"d1": 1000 * MiB})
    assert ready.volumes() == [] and ready.intents() == []


def test_reserved_sums_per_disk(ready: Catalog) -> None:
    # reserved, not size, is what counts
    create(ready, vol("a"), [sd("a", 0, "d1", 100 * MiB, 90 * MiB), sd("a", 1, "d2", 200 * MiB, 10 * MiB)])
    create(ready, vol("b"), [sd("b", 0, "d1", 50 * MiB), sd("b", 1, "d1", 25 * MiB)])
    assert ready.reserved() == {"d1": 175 * MiB, "d2": 200 * MiB}
    ready.delete_volume("a")
    assert ready.reserved() == {"d1": 75 * MiB}


def test_subdisks_all_volumes_ordered(ready: Catalog) -> None:
    create(ready, vol("b"), [sd("b", 1, "d2", 10 * MiB), sd("b", 0, "d1", 10 * MiB)])
    create(ready, vol("a"), [sd("a", 0, "d2", 20 * MiB)])
    assert ready.subdisks() == [sd("a", 0, "d2", 20 * MiB), sd("b", 0, "d1", 10 * MiB),
                                sd("b", 1, "d2", 10 * MiB)]
    assert ready.subdisks("b") == [sd("b", 0, "d1", 10 * MiB), sd("b", 1, "d2", 10 * MiB)]


def test_update_volume(ready: Catalog) -> None:
    v = vol("v1", state="creating")
    create(ready, v, [sd("v1", 0, "d1", 100 * MiB)])
    create(ready, vol("other"), [sd("other", 0, "d1", 10 * MiB)])
    ready.update_volume("v1", state="ok", protect=True, size=200 * MiB, maxiops=42)
    got = ready.volume("v1")
    assert got == vol("v1", 200 * MiB, state="ok", protect=True, maxiops=42)
    assert got is not None and got.protect is True
    ready.update_volume("v1", protect=False, snapshot_of="other")
    assert ready.volume("v1") == vol("v1", 200 * MiB, state="ok", maxiops=42, snapshot_of="other")
    ready.update_volume("v1", snapshot_of=None)
    assert ready.volume("v1") == vol("v1", 200 * MiB, state="ok", maxiops=42)
    assert ready.volume("other") == vol("other")


def test_update_volume_missing_raises(ready: Catalog) -> None:
    with pytest.raises(NoSuchVolume):
        ready.update_volume("ghost", state="ok")
    assert ready.volume("ghost") is None


def test_update_volume_unknown_field_is_refused(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    with pytest.raises(ValueError):
        ready.update_volume("v1", bogus=1)
    with pytest.raises(ValueError):
        ready.update_volume("v1", state="ok", volume="renamed")
    assert ready.volume("v1") == vol("v1")


def test_update_subdisk_moves_to_other_disk(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB), sd("v1", 1, "d1", 50 * MiB)])
    ready.update_subdisk("v1", 1, CAP, disk="d2")
    assert ready.subdisks("v1") == [sd("v1", 0, "d1", 100 * MiB), sd("v1", 1, "d2", 50 * MiB)]
    assert ready.reserved() == {"d1": 100 * MiB, "d2": 50 * MiB}


def test_update_subdisk_no_space_leaves_it_unchanged(ready: Catalog) -> None:
    create(ready, vol("fill"), [sd("fill", 0, "d2", 1900 * MiB)])
    create(ready, vol("v1"), [sd("v1", 0, "d1", 200 * MiB)])
    before = snapshot(ready)
    with pytest.raises(NoSpace):
        ready.update_subdisk("v1", 0, CAP, disk="d2")
    with pytest.raises(NoSpace):
        ready.update_subdisk("v1", 0, CAP, size=1001 * MiB, reserved=1001 * MiB)
    assert snapshot(ready) == before
    assert ready.subdisks("v1") == [sd("v1", 0, "d1", 200 * MiB)]


def test_update_subdisk_grow_counts_only_the_difference(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 600 * MiB)])
    # 600 -> 1000 on a 1000 MiB disk fits because the old 600 is given back
    ready.update_subdisk("v1", 0, CAP, size=1000 * MiB, reserved=1000 * MiB)
    assert ready.subdisks("v1") == [sd("v1", 0, "d1", 1000 * MiB)]
    assert ready.reserved() == {"d1": 1000 * MiB}
    with pytest.raises(NoSpace):
        ready.update_subdisk("v1", 0, CAP, reserved=1000 * MiB + 1)
    assert ready.subdisks("v1") == [sd("v1", 0, "d1", 1000 * MiB)]


def test_update_subdisk_move_frees_old_disk(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 800 * MiB)])
    with pytest.raises(NoSpace):
        create(ready, vol("v2"), [sd("v2", 0, "d1", 800 * MiB)])
    ready.update_subdisk("v1", 0, CAP, disk="d2")
    assert ready.reserved() == {"d2": 800 * MiB}
    create(ready, vol("v2"), [sd("v2", 0, "d1", 1000 * MiB)])
    assert ready.reserved() == {"d1": 1000 * MiB, "d2": 800 * MiB}


def test_update_subdisk_without_capacity_skips_the_check(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    ready.update_subdisk("v1", 0, reserved=5000 * MiB)
    assert ready.reserved() == {"d1": 5000 * MiB}


def test_update_subdisk_missing_raises(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    with pytest.raises(NoSuchVolume):
        ready.update_subdisk("v1", 7, CAP, disk="d2")
    with pytest.raises(NoSuchVolume):
        ready.update_subdisk("ghost", 0, CAP, disk="d2")
    assert ready.subdisks() == [sd("v1", 0, "d1", 100 * MiB)]


def test_delete_volume_removes_subdisks_mounts_and_intent(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB), sd("v1", 1, "d2", 100 * MiB)])
    create(ready, vol("v2"), [sd("v2", 0, "d1", 10 * MiB)], it=intent("v2", "grow"))
    ready.add_mount(MountRec("v1", "n1", "m1", 1.0))
    ready.add_mount(MountRec("v1", "n2", "m2", 2.0))
    keep_mount = MountRec("v2", "n1", "m3", 3.0)
    ready.add_mount(keep_mount)
    ready.delete_volume("v1")
    assert ready.volume("v1") is None
    assert ready.subdisks("v1") == []
    assert ready.mounts("v1") == []
    assert [i.key for i in ready.intents()] == ["v2"]
    # the other volume is untouched
    assert ready.volumes() == [vol("v2")]
    assert ready.subdisks() == [sd("v2", 0, "d1", 10 * MiB)]
    assert ready.mounts() == [keep_mount]
    assert ready.reserved() == {"d1": 10 * MiB}


def test_delete_volume_absent_is_fine(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    before = snapshot(ready)
    ready.delete_volume("ghost")
    assert snapshot(ready) == before
    ready.delete_volume("v1")
    ready.delete_volume("v1")
    assert ready.volumes() == []


def test_volume_name_reusable_after_delete(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 1000 * MiB)])
    ready.delete_volume("v1")
    v = vol("v1", 50 * MiB, layout="stripe")
    create(ready, v, [sd("v1", 0, "d1", 1000 * MiB)])
    assert ready.volume("v1") == v


# -------------------------------------------------------------------------------------------- mounts


def test_add_mount_true_then_false(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    m = MountRec("v1", "node1", "abc123", 1700000300.5)
    assert ready.add_mount(m) is True
    assert ready.add_mount(m) is False
    # same ID recorded again with another timestamp is still a duplicate; the first record stays
    assert ready.add_mount(MountRec("v1", "node1", "abc123", 1700000999.0)) is False
    assert ready.mounts() == [m]


def test_same_mount_id_on_other_node_is_a_different_mount(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    assert ready.add_mount(MountRec("v1", "node1", "id", 1.0)) is True
    assert ready.add_mount(MountRec("v1", "node2", "id", 2.0)) is True
    assert len(ready.mounts("v1")) == 2


def test_remove_mount_true_then_false(ready: Catalog) -> None:
    create(ready, vol("v1"), [sd("v1", 0, "d1", 100 * MiB)])
    m1 = MountRec("v1", "node1", "m1", 1.0)
    m2 = MountRec("v1", "node1", "m2", 2.0)
    ready.add_mount(m1)
    ready.add_mount(m2)
    assert ready.remove_mount("v1", "node1", "m1") is True
    assert ready.remove_mount("v1", "node1", "m1") is False
    assert ready.remove_mount("v1", "node2", "m2") is False  # wrong node
    assert ready.remove_mount("other", "node1", "m2") is False  # wrong volume
    assert ready.mounts() == [m2]
    assert ready.remove_mount("v1", "node1", "never") is False
    # the removed ID can be recorded again
    assert ready.add_mount(m1) is True


def test_mounts_filter_by_volume(ready: Catalog) -> None:
    create(ready, vol("a"), [sd("a", 0, "d1", 10 * MiB)])
    create(ready, vol("b"), [sd("b", 0, "d1", 10 * MiB)])
    a2 = MountRec("a", "n2", "a2", 20.0)
    a1 = MountRec("a", "n1", "a1", 10.0)
    b1 = MountRec("b", "n1", "b1", 15.0)
    for m in (a2, b1, a1):
        assert ready.add_mount(m) is True
    assert ready.mounts("a") == [a1, a2]  # ordered by creation
    assert ready.mounts("b") == [b1]
    assert ready.mounts("c") == []
    assert sorted(ready.mounts(), key=lambda m: m.mount_id) == [a1, a2, b1]


# ------------------------------------------------------------------------------------------- intents


def test_put_intent_records_and_never_replaces(ready: Catalog) -> None:
    """An intent left by a killed worker is never overwritten: the next operation on its key is refused
    until the old one is recovered (finished), so what it had to undo is not forgotten."""
    assert ready.intents() == []
    first = intent("@dg", "adddisk", created=10.0, disk="d3")
    ready.put_intent(first)
    assert ready.intents() == [first]
    with pytest.raises(IntentPending):
        ready.put_intent(intent("@dg", "rmdisk", created=11.0, disk="d1", step=2))
    assert ready.intents() == [first]
    other = intent("v9", "create", created=12.0)
    ready.put_intent(other)
    assert sorted(ready.intents(), key=lambda i: i.key) == [first, other]
    ready.finish_intent("@dg")
    second = intent("@dg", "rmdisk", created=13.0, disk="d1")
    ready.put_intent(second)
    assert sorted(ready.intents(), key=lambda i: i.key) == [second, other]


def test_create_volume_refuses_a_pending_intent_on_its_key(ready: Catalog) -> None:
    left = intent("v1", "umount", mount_id="c1")
    ready.put_intent(left)
    before = snapshot(ready)
    with pytest.raises(IntentPending):
        create(ready, vol("v1", 100 * MiB), [sd("v1", 0, "d1", 100 * MiB)], it=intent("v1", "make"))
    assert snapshot(ready) == before
    assert ready.intents() == [left]


def test_intents_data_round_trips_nested(ready: Catalog) -> None:
    data = {
        "disks": ["d1", "d2"],
        "plan": {"subdisks": [{"idx": 0, "disk": "d1", "size": 100 * MiB}], "ncol": 2},
        "done": False,
        "ratio": 0.5,
        "note": None,
        "unicode": "vol\u00e9",
        "empty": {},
    }
    it = IntentRec(key="v1", op="create", data=data, created=1700000400.0)
    ready.put_intent(it)
    (got,) = ready.intents()
    assert got == it
    assert dict(got.data) == data
    assert got.data["plan"]["subdisks"][0]["size"] == 100 * MiB


def test_intent_data_is_a_snapshot(ready: Catalog) -> None:
    data: dict[str, object] = {"step": 1, "disks": ["d1"]}
    ready.put_intent(IntentRec(key="v1", op="create", data=data, created=1.0))
    data["step"] = 2
    data["disks"].append("d2")  # type: ignore[attr-defined]
    (got,) = ready.intents()
    assert dict(got.data) == {"step": 1, "disks": ["d1"]}
    # mutating what was read does not change what is stored either
    got.data["disks"].append("dX")  # type: ignore[index]
    (again,) = ready.intents()
    assert dict(again.data) == {"step": 1, "disks": ["d1"]}


def test_intents_ordered_by_creation(ready: Catalog) -> None:
    late = intent("b", created=30.0)
    early = intent("c", created=10.0)
    mid = intent("a", created=20.0)
    for it in (late, early, mid):
        ready.put_intent(it)
    assert ready.intents() == [early, mid, late]


def test_finish_intent_clears_intent_and_applies_update(ready: Catalog) -> None:
    create(ready, vol("v1", state="creating"), [sd("v1", 0, "d1", 100 * MiB)], it=intent("v1", "create"))
    create(ready, vol("v2", state="creating"), [sd("v2", 0, "d1", 100 * MiB)], it=intent("v2", "create"))
    ready.finish_intent("v1", {"state": "ok", "protect": True})
    assert ready.volume("v1") == vol("v1", state="ok", protect=True)
    assert [i.key for i in ready.intents()] == ["v2"]
    assert ready.volume("v2") == vol("v2", state="creating")


def test_finish_intent_without_update(ready: Catalog) -> None:
    ready.put_intent(intent("@dg", "adddisk", disk="d3"))
    create(ready, vol("v1", state="creating"), [sd("v1", 0, "d1", 100 * MiB)])
    ready.finish_intent("@dg")
    assert [i.key for i in ready.intents()] == ["v1"]
    ready.finish_intent("v1", {})
    assert ready.intents() == []
    assert ready.volume("v1") == vol("v1", state="creating")


def test_finish_intent_update_of_missing_volume_keeps_intent(ready: Catalog) -> None:
    it = intent("ghost", "create", step=3)
    ready.put_intent(it)
    with pytest.raises(NoSuchVolume):
        ready.finish_intent("ghost", {"state": "ok"})
    assert ready.intents() == [it]
    assert ready.volume("ghost") is None


def test_finish_intent_bad_update_keeps_intent_and_volume(ready: Catalog) -> None:
    v = vol("v1", state="creating")
    it = intent("v1", "create")
    create(ready, v, [sd("v1", 0, "d1", 100 * MiB)], it=it)
    with pytest.raises(ValueError):
        ready.finish_intent("v1", {"state": "ok", "bogus": 1})
    assert ready.intents() == [it]
    assert ready.volume("v1") == v


# ----------------------------------------------------------------------------------------- sqlite only


def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "cat.db"
    cat = SqliteCatalog(path)
    cat.init(DG)
    cat.add_disk(D1)
    v = vol("v1", protect=True)
    it = intent("v1", "create", plan={"a": [1, 2]})
    cat.create_volume(v, [sd("v1", 0, "d1", 100 * MiB)], it, CAP)
    cat.add_mount(MountRec("v1", "n1", "m1", 5.0))
    cat.close()
    again = SqliteCatalog(path)
    try:
        assert again.diskgroup() == DG
        assert again.disks() == [D1]
        assert again.volume("v1") == v
        assert again.subdisks() == [sd("v1", 0, "d1", 100 * MiB)]
        assert again.mounts() == [MountRec("v1", "n1", "m1", 5.0)]
        assert again.intents() == [it]
        with pytest.raises(AlreadyExists):
            again.init(DG)
    finally:
        again.close()


SLOT = 10 * MiB
WORKERS = 8
PER_WORKER = 10
FIT = 50


def _prepare_shared(path: Path) -> None:
    cat = SqliteCatalog(path)
    cat.init(DG)
    cat.add_disk(D1)
    cat.close()


def _create_many(path: str, worker: int, barrier: object,
                 out: object = None) -> tuple[int, int, list[str]]:
    """Top-level so multiprocessing can run it: create PER_WORKER volumes, count the outcomes."""
    cat = SqliteCatalog(Path(path), timeout=30.0)
    ok = nospace = 0
    other: list[str] = []
    try:
        barrier.wait()  # type: ignore[attr-defined]
        for i in range(PER_WORKER):
            name = f"w{worker}v{i}"
            try:
                cat.create_volume(vol(name, SLOT), [sd(name, 0, "d1", SLOT)], intent(name),
                                  {"d1": FIT * SLOT})
                ok += 1
            except NoSpace:
                nospace += 1
            except Exception as exc:  # reported to the parent, which fails the test
                other.append(f"{type(exc).__name__}: {exc}")
    finally:
        cat.close()
    if out is not None:
        out.put((worker, (ok, nospace, other)))  # type: ignore[attr-defined]
    return ok, nospace, other


def _check_shared(path: Path, results: list[tuple[int, int, list[str]]]) -> None:
    assert [r[2] for r in results] == [[]] * WORKERS
    assert sum(r[0] for r in results) == FIT
    assert sum(r[1] for r in results) == WORKERS * PER_WORKER - FIT
    cat = SqliteCatalog(path)
    try:
        assert cat.reserved() == {"d1": FIT * SLOT}
        assert len(cat.volumes()) == FIT
        assert len(cat.subdisks()) == FIT
        assert len(cat.intents()) == FIT
    finally:
        cat.close()


def test_sqlite_concurrent_processes_never_overcommit(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    _prepare_shared(path)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    out = ctx.Queue()
    procs = [ctx.Process(target=_create_many, args=(str(path), w, barrier, out)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=30) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * WORKERS
    _check_shared(path, [got[w] for w in range(WORKERS)])


def test_sqlite_concurrent_threads_never_overcommit(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    _prepare_shared(path)
    barrier = threading.Barrier(WORKERS)
    results: list[tuple[int, int, list[str]]] = [(0, 0, ["not run"])] * WORKERS

    def run(w: int) -> None:
        results[w] = _create_many(str(path), w, barrier)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    _check_shared(path, results)


def test_sqlite_one_catalog_shared_by_threads(tmp_path: Path) -> None:
    """A single SqliteCatalog object (as a threaded plugin server holds it) used by many threads."""
    path = tmp_path / "shared.db"
    _prepare_shared(path)
    cat = SqliteCatalog(path)
    barrier = threading.Barrier(WORKERS)
    errors: list[str] = []
    counts = {"ok": 0, "nospace": 0}
    lock = threading.Lock()

    def run(w: int) -> None:
        barrier.wait()
        for i in range(PER_WORKER):
            name = f"t{w}v{i}"
            try:
                cat.create_volume(vol(name, SLOT), [sd(name, 0, "d1", SLOT)], intent(name),
                                  {"d1": FIT * SLOT})
                key = "ok"
            except NoSpace:
                key = "nospace"
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                counts[key] += 1
            cat.volumes()
            cat.reserved()

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert errors == []
        assert counts == {"ok": FIT, "nospace": WORKERS * PER_WORKER - FIT}
        assert cat.reserved() == {"d1": FIT * SLOT}
    finally:
        cat.close()


def test_sqlite_migrates_a_catalog_made_before_snapshot_cache_columns(tmp_path: Path) -> None:
    """A catalog whose volume table predates autogrow/invalid opens, keeps its rows, and gains both; its
    snapshots (which nothing held to their cache before) get autogrow, its other volumes do not."""
    import sqlite3

    path = tmp_path / "catalog.db"
    old = sqlite3.connect(str(path))
    old.executescript("""
CREATE TABLE volume (
  name TEXT PRIMARY KEY, size INTEGER NOT NULL, layout TEXT NOT NULL, fstype TEXT NOT NULL,
  nmirror INTEGER NOT NULL, ncol INTEGER NOT NULL, maxiops INTEGER NOT NULL, snapshot_of TEXT,
  cachesize INTEGER NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, protect INTEGER NOT NULL,
  identity_pending INTEGER NOT NULL DEFAULT 0);
INSERT INTO volume VALUES ('s1', 209715200, 'concat', 'xfs', 1, 1, 0, 'src', 62914560, 'ok', 1.5, 0, 1);
INSERT INTO volume VALUES ('src', 209715200, 'concat', 'xfs', 1, 1, 0, NULL, 0, 'ok', 1.0, 0, 0);
""")
    old.commit()
    old.close()
    cat = SqliteCatalog(path)
    try:
        got = cat.volume("s1")
        assert got == VolumeRec("s1", 200 * MiB, "concat", "xfs", 1, 1, 0, "src", 60 * MiB, "ok", 1.5, False,
                                True, autogrow=True, invalid="")
        src = cat.volume("src")
        assert src is not None and src.autogrow is False and src.invalid == ""
        cat.update_volume("s1", invalid="cache ran out", autogrow=False)
    finally:
        cat.close()
    again = SqliteCatalog(path)  # a second open finds nothing to migrate and reads the new columns
    try:
        got = again.volume("s1")
        assert got is not None and got.invalid == "cache ran out" and got.autogrow is False
    finally:
        again.close()


def test_set_imported_is_a_compare_and_set(catalog: Catalog) -> None:
    """Ownership changes only from an owner the caller saw: a node importing a deported group cannot
    silently take it from a node that imported it meanwhile."""
    catalog.init(DG)
    catalog.set_imported("node1", expect=(None,))
    assert catalog.diskgroup().imported_on == "node1"
    with pytest.raises(InUse, match="imported on node node1"):
        catalog.set_imported("node2", expect=(None,))
    assert catalog.diskgroup().imported_on == "node1"
    catalog.set_imported(None, expect=("node1",))  # deport by its owner
    with pytest.raises(InUse, match="deported"):
        catalog.set_imported("node2", expect=("node1",))
    assert catalog.diskgroup().imported_on is None
    catalog.set_imported("node2")  # no expectation: a forced import
    assert catalog.diskgroup().imported_on == "node2"


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "catalog-0.1.0.db"


def test_sqlite_upgrades_a_catalog_made_by_release_0_1_0(tmp_path: Path) -> None:
    """tests/fixtures/catalog-0.1.0.db was made by release 0.1.0's own CLI (dg init on two disks, a
    concat volume v1 mounted, a mirror m1 with maxiops=50, a snapshot s1 of v1 with cachesize=100m).
    It opens, keeps every row, and is upgraded to the current schema version once."""
    import shutil
    import sqlite3

    from storage.catalog.sqlite import SCHEMA_VERSION

    path = tmp_path / "catalog.db"
    shutil.copy(FIXTURE, path)
    cat = SqliteCatalog(path)
    try:
        assert cat.diskgroup().name == "fixdg"
        assert [d.name for d in cat.disks()] == ["fixdg01", "fixdg02"]
        assert [v.name for v in cat.volumes()] == ["m1", "s1", "v1"]
        m1, s1, v1 = (cat.volume(n) for n in ("m1", "s1", "v1"))
        assert m1 is not None and m1.layout == "mirror" and m1.maxiops == 50 and len(cat.subdisks("m1")) == 2
        assert s1 is not None and s1.snapshot_of == "v1" and s1.cachesize == 100 * MiB
        assert s1.autogrow is True and s1.invalid == ""  # nothing held it to its cache before
        assert v1 is not None and v1.autogrow is False and v1.size == 400 * MiB
        assert {v.provisioning for v in cat.volumes()} == {"thin"}  # 0.1.0 made every image sparse
        assert [m.mount_id for m in cat.mounts("v1")] == ["admin"]
        assert cat.intents() == []
        # 0.1.0 refused mirrors in one failure domain (it had no directory disks): still refused
        assert cat.diskgroup().accept_shared_domain is False
        assert cat.diskgroup().shared is False  # imported on one node at a time, as 0.1.0 had it
    finally:
        cat.close()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_sqlite_upgrade_to_4_adds_the_acceptance_refusing_and_keeps_a_schema_3_group(tmp_path: Path) -> None:
    """A schema-3 catalog (the disk group table without accept_shared_domain) gains the column, its
    group refusing as before; a new group records acceptance, and reopening reads it back."""
    import sqlite3

    from storage.catalog.sqlite import SCHEMA_VERSION

    path = tmp_path / "catalog.db"
    old = sqlite3.connect(str(path))
    old.executescript("""
CREATE TABLE diskgroup (name TEXT PRIMARY KEY, uuid TEXT NOT NULL, imported_on TEXT, created REAL NOT NULL);
CREATE TABLE volume (
  name TEXT PRIMARY KEY, size INTEGER NOT NULL, layout TEXT NOT NULL, fstype TEXT NOT NULL,
  nmirror INTEGER NOT NULL, ncol INTEGER NOT NULL, maxiops INTEGER NOT NULL, snapshot_of TEXT,
  cachesize INTEGER NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, protect INTEGER NOT NULL,
  identity_pending INTEGER NOT NULL DEFAULT 0, autogrow INTEGER NOT NULL DEFAULT 0,
  invalid TEXT NOT NULL DEFAULT '', provisioning TEXT NOT NULL DEFAULT 'thin');
INSERT INTO diskgroup VALUES ('olddg', 'u-old', 'node1', 3.0);
PRAGMA user_version=3;
""")
    old.commit()
    old.close()
    cat = SqliteCatalog(path)
    try:
        assert cat.diskgroup() == DiskGroupRec("olddg", "u-old", "node1", 3.0, accept_shared_domain=False,
                                               shared=False)
    finally:
        cat.close()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 4
    db.close()
    fresh = SqliteCatalog(tmp_path / "new.db")
    try:
        fresh.init(DiskGroupRec("newdg", "u-new", "node1", 4.0, accept_shared_domain=True, shared=True))
    finally:
        fresh.close()
    again = SqliteCatalog(tmp_path / "new.db")
    try:
        assert again.diskgroup().accept_shared_domain is True and again.diskgroup().shared is True
    finally:
        again.close()


def test_sqlite_refuses_a_catalog_from_a_newer_release(tmp_path: Path) -> None:
    import sqlite3

    from storage.errors import CatalogError

    path = tmp_path / "catalog.db"
    SqliteCatalog(path).close()
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="schema version 99, newer than this veritas knows"):
        SqliteCatalog(path)


def test_sqlite_errors_come_back_as_storage_errors(tmp_path: Path) -> None:
    """A damaged catalog is a typed error with the file's name, not a backend exception."""
    from storage.errors import CatalogError

    path = tmp_path / "catalog.db"
    path.write_bytes(b"this is not a database" * 300)
    with pytest.raises(CatalogError, match=str(path)):
        SqliteCatalog(path)


# ------------------------------------------------------------------------- catalog stores (every backend)


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> CatalogStore:
    if kind == "sqlite":
        return SqliteStore(tmp_path / "dg", tmp_path / "shared-locks")
    if kind == "etcd":
        return EtcdStore([request.getfixturevalue("etcd_server").endpoint], prefix=_prefix())
    return MemoryStore()


@pytest.fixture(params=["sqlite", "memory", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CatalogStore]:
    s = _store(request.param, tmp_path, request)
    yield s
    if isinstance(s, EtcdStore):
        s.close()


def test_store_starts_empty(store: CatalogStore) -> None:
    assert store.names() == [] and not store.exists("testdg") and not store.is_partial("testdg")
    with pytest.raises(NoSuchDiskGroup, match="no such disk group: testdg"):
        store.open("testdg")
    with pytest.raises(NoSuchDiskGroup):
        store.open("testdg", partial=True)


def test_store_created_catalog_is_unpublished_until_publish(store: CatalogStore) -> None:
    cat = store.create(DG)
    cat.add_disk(D1)
    cat.close()
    assert store.is_partial("testdg") and not store.exists("testdg") and store.names() == []
    with pytest.raises(NoSuchDiskGroup):
        store.open("testdg")
    partial = store.open("testdg", partial=True)
    assert partial.diskgroup() == DG and partial.disks() == [D1]
    partial.close()
    store.publish("testdg")
    assert store.exists("testdg") and not store.is_partial("testdg") and store.names() == ["testdg"]
    cat = store.open("testdg")
    try:
        assert cat.diskgroup() == DG and cat.disks() == [D1]  # what was written before publishing
    finally:
        cat.close()


def test_store_refuses_to_create_a_published_disk_group(store: CatalogStore) -> None:
    store.create(DG).close()
    store.publish("testdg")
    with pytest.raises(AlreadyExists, match="disk group testdg already exists"):
        store.create(DiskGroupRec("testdg", "another-uuid", None, 1.0))
    assert not store.is_partial("testdg")
    cat = store.open("testdg")
    try:
        assert cat.diskgroup() == DG
    finally:
        cat.close()


def test_store_create_replaces_a_partial_one(store: CatalogStore) -> None:
    cat = store.create(DiskGroupRec("testdg", "old-uuid", None, 1.0))
    cat.add_disk(D1)
    cat.close()
    store.create(DG).close()
    cat = store.open("testdg", partial=True)
    try:
        assert cat.diskgroup() == DG and cat.disks() == []
    finally:
        cat.close()


def test_store_discard_removes_only_the_partial_catalog(store: CatalogStore) -> None:
    store.create(DG).close()
    store.discard("testdg")
    assert not store.is_partial("testdg") and not store.exists("testdg")
    with pytest.raises(NoSuchDiskGroup):
        store.publish("testdg")
    store.create(DG).close()
    store.publish("testdg")
    store.discard("testdg")  # nothing partial: the published one stays
    assert store.exists("testdg")
    store.discard("nothing")  # absent is not an error


def test_store_destroy_removes_published_and_partial(store: CatalogStore) -> None:
    store.create(DG).close()
    store.publish("testdg")
    other = DiskGroupRec("other", "u2", None, 2.0)
    store.create(other).close()
    store.destroy("testdg")
    store.destroy("other")
    store.destroy("never")  # absent is not an error
    assert store.names() == [] and not store.is_partial("other")
    with pytest.raises(NoSuchDiskGroup):
        store.open("testdg")
    store.create(DG).close()  # the name is free again
    store.publish("testdg")
    assert store.names() == ["testdg"]


def test_store_names_are_sorted_and_published_only(store: CatalogStore) -> None:
    for n in ("b", "a", "c"):
        store.create(DiskGroupRec(n, f"u-{n}", None, 1.0)).close()
    store.publish("c")
    store.publish("a")
    assert store.names() == ["a", "c"]


def test_store_locks_per_disk_group_and_store_wide(store: CatalogStore) -> None:
    store.create(DG).close()
    store.publish("testdg")
    one, two, other, wide = store.locks("testdg"), store.locks("testdg"), store.locks("x"), store.locks()
    assert all(isinstance(lk, Locks) for lk in (one, two, other, wide))
    with one.hold(exclusive_dg=True):
        with two.try_hold() as free:
            assert not free  # two handles on one disk group's locks conflict
        with other.try_hold(exclusive_dg=True) as free, wide.try_hold(exclusive_dg=True) as free2:
            assert free and free2  # other disk groups' and the store's own locks are apart


def test_store_destroy_fails_waiters_for_its_locks(store: CatalogStore) -> None:
    store.create(DG).close()
    store.publish("testdg")
    holder, waiter = store.locks("testdg"), store.locks("testdg")
    got: list[BaseException] = []

    def wait() -> None:
        try:
            with waiter.hold("v1", timeout=20):
                pass
        except BaseException as exc:
            got.append(exc)

    with holder.hold("v1", exclusive_dg=True):
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.1)
        store.destroy("testdg")
    t.join(20)
    assert not t.is_alive()
    assert len(got) == 1 and isinstance(got[0], NoSuchDiskGroup)


def test_sqlite_store_persists_across_store_objects(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "dg", tmp_path)
    store.create(DG).close()
    again = SqliteStore(tmp_path / "dg", tmp_path)
    assert again.is_partial("testdg") and not again.exists("testdg")
    store.publish("testdg")
    assert again.exists("testdg") and again.names() == ["testdg"]


# ---------------------------------------------------------------------- leases and attachments (issue 10)


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Timed:
    """A catalog with two volumes, its lease TTL, and a way to let time pass for it: a fake clock where
    the backend takes one (SQLite, memory: time passes at once), real sleeps where the server keeps time
    (etcd's leases), with a short TTL there. Tests say their waits as fractions of ``ttl``."""

    cat: Catalog
    advance: Callable[[float], None]
    now: Callable[[], float]
    ttl: float
    late: float = 0.0  # how long past its TTL the backend may still count a lease live
    slack: float = 1e-6  # how far an ``expires`` may be from what the test computes

    def expire(self, after: float = 0.0) -> None:
        """Let a lease renewed ``after`` seconds ago (0: just now) run out, on the backend's clock."""
        self.advance(max(0.0, self.ttl * 1.1 + self.late - after))


def _ready_two_volumes(cat: Catalog) -> None:
    cat.init(DG)
    cat.add_disk(D1)
    for name in ("v1", "v2"):
        create(cat, vol(name), [sd(name, 0, "d1", 10 * MiB)])
        cat.finish_intent(name)


def _make_timed(kind: str, tmp_path: Path, etcd_endpoint: str | None = None) -> Timed:
    if kind == "etcd":
        assert etcd_endpoint is not None
        # etcd's leases have whole seconds and the test server's expiry checks run every 0.5 s:
        # a 2 s TTL keeps the sleeps short with room for a loaded machine between renewals
        cat: Catalog = EtcdCatalog(Etcd([etcd_endpoint]), _prefix() + "/", label="testdg")
        _ready_two_volumes(cat)
        return Timed(cat, time.sleep, time.time, ttl=2.0, late=1.2, slack=1.0)
    clock = FakeClock()

    def advance(s: float) -> None:
        clock.now += s

    cat = SqliteCatalog(tmp_path / "catalog.db", clock=clock) if kind == "sqlite" else MemoryCatalog(clock)
    _ready_two_volumes(cat)
    return Timed(cat, advance, clock, ttl=10.0)


@pytest.fixture(params=["sqlite", "memory", "etcd"])
def timed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Timed]:
    endpoint = request.getfixturevalue("etcd_server").endpoint if request.param == "etcd" else None
    t = _make_timed(request.param, tmp_path, endpoint)
    try:
        yield t
    finally:
        t.cat.close()


TTL = 10.0  # for the SQLite-only tests below


def _lease(cat: Catalog, node: str) -> LeaseRec:
    return next(rec for rec in cat.leases() if rec.node == node)


def test_renew_lease_creates_and_extends(timed: Timed) -> None:
    cat, ttl = timed.cat, timed.ttl
    assert cat.leases() == []
    first = cat.renew_lease("nodeB", ttl)
    assert first.node == "nodeB" and first.ttl == ttl
    assert first.expires == pytest.approx(timed.now() + ttl, abs=timed.slack)
    timed.advance(ttl * 0.3)
    second = cat.renew_lease("nodeB", ttl)
    assert second.expires > first.expires
    assert second.expires == pytest.approx(timed.now() + ttl, abs=timed.slack)
    cat.renew_lease("nodeA", ttl * 3)
    assert [(rec.node, rec.ttl) for rec in cat.leases()] == [("nodeA", ttl * 3), ("nodeB", ttl)]
    listed = cat.leases()[1]
    assert listed.expires == pytest.approx(second.expires, abs=timed.slack) and listed.expires > timed.now()


def test_a_renewal_that_waited_runs_from_when_it_was_sent(timed: Timed, request: pytest.FixtureRequest) -> None:
    """A renewal that waited on the catalog (a locked SQLite file) is counted from when the node sent it,
    as the node's own fencing counts it; never from later than now. etcd counts its leases itself."""
    cat, ttl = timed.cat, timed.ttl
    sent = timed.now() - ttl * 0.4
    rec = cat.renew_lease("nodeA", ttl, sent=sent)
    if "etcd" in request.node.name:
        assert rec.expires == pytest.approx(timed.now() + ttl, abs=timed.slack)
    else:
        assert rec.expires == pytest.approx(sent + ttl) and _lease(cat, "nodeA").expires == pytest.approx(sent + ttl)
    later = cat.renew_lease("nodeA", ttl, sent=timed.now() + ttl)  # a clock ahead never lengthens it
    assert later.expires == pytest.approx(timed.now() + ttl, abs=timed.slack)


def test_attach_needs_a_live_lease_and_an_existing_volume(timed: Timed) -> None:
    cat = timed.cat
    with pytest.raises(InUse, match="node nodeA holds no live lease"):
        cat.attach("v1", "nodeA")
    cat.renew_lease("nodeA", timed.ttl)
    with pytest.raises(NoSuchVolume):
        cat.attach("nope", "nodeA")
    assert cat.attachments() == []
    timed.expire()
    with pytest.raises(InUse, match="no live lease"):
        cat.attach("v1", "nodeA")
    assert cat.attachments() == []
    (expired,) = cat.leases()  # still recorded, but run out as the backend judges it
    assert expired.node == "nodeA" and expired.expires <= timed.now()


def test_attach_is_exclusive_while_the_holder_lives(timed: Timed) -> None:
    cat = timed.cat
    cat.renew_lease("nodeA", timed.ttl)
    cat.renew_lease("nodeB", timed.ttl)
    got = cat.attach("v1", "nodeA")
    assert got == AttachRec("v1", "nodeA", pytest.approx(timed.now(), abs=1), None)
    assert cat.attach("v1", "nodeA") == got  # again on the holder: unchanged
    with pytest.raises(AttachedElsewhere, match="attached on node nodeA") as err:
        cat.attach("v1", "nodeB")
    assert "lease runs until" in str(err.value) and isinstance(err.value, InUse)  # the plugin waits on this type
    assert cat.attachments() == [got]
    assert cat.attach("v2", "nodeB").node == "nodeB"  # another volume is free
    assert [(a.volume, a.node) for a in cat.attachments()] == [("v1", "nodeA"), ("v2", "nodeB")]


def test_etcd_an_attachment_whose_lease_the_server_has_expired_is_taken_before_its_revocation(
        etcd_server: Any) -> None:
    """Between the server expiring a lease (time-to-live -1: it can never be renewed) and the revocation
    removing its keys, which under load takes a while to commit, the dead holder's attachment is still
    there. The next node attaches at once, as SQLite's lease end lets it, replacing exactly that key;
    before, it was refused until the revocation went through (seen: a node waiting past mount_wait)."""
    t = _make_timed("etcd", Path("/nonexistent"), etcd_server.endpoint)
    cat = t.cat
    assert isinstance(cat, EtcdCatalog)
    try:
        cat.renew_lease("nodeA", t.ttl)
        cat.renew_lease("nodeB", t.ttl)
        cat.attach("v1", "nodeA")
        held = cat.etcd.get("test", cat._k("attach/v1"))
        assert held is not None
        real = cat.etcd.time_to_live
        cat.etcd.time_to_live = lambda what, lease: -1 if lease == held["lease"] else real(what, lease)  # type: ignore[method-assign]
        got = cat.attach("v1", "nodeB")
        assert got.node == "nodeB" and [(a.volume, a.node) for a in cat.attachments()] == [("v1", "nodeB")]
        now = cat.etcd.get("test", cat._k("attach/v1"))
        assert now is not None and now["lease"] != held["lease"]  # on nodeB's lease now, not the dead one's
        cat.etcd.time_to_live = real  # type: ignore[method-assign]
        with pytest.raises(InUse, match="attached on node nodeB"):
            cat.attach("v1", "nodeA")  # nodeB's lease is live
    finally:
        cat.close()


def test_want_marks_the_holder_and_a_successful_attach_clears_it(timed: Timed) -> None:
    cat = timed.cat
    cat.renew_lease("nodeA", timed.ttl)
    cat.renew_lease("nodeB", timed.ttl)
    cat.want("v1", "nodeB")  # attached nowhere: nothing to mark
    assert cat.attachments() == []
    cat.attach("v1", "nodeA")
    cat.want("v1", "nodeA")  # the holder itself: no change
    assert cat.attachments()[0].wanted_by is None
    cat.want("v1", "nodeB")
    assert cat.attachments()[0].wanted_by == "nodeB"
    cat.attach("v1", "nodeA")  # the holder mounting it again does not forget that B waits
    assert cat.attachments()[0].wanted_by == "nodeB"
    assert cat.detach("v1", "nodeA") is True
    got = cat.attach("v1", "nodeB")
    assert got.node == "nodeB" and got.wanted_by is None


def test_detach_only_by_the_holder(timed: Timed) -> None:
    cat = timed.cat
    cat.renew_lease("nodeA", timed.ttl)
    cat.attach("v1", "nodeA")
    assert cat.detach("v1", "nodeB") is False
    assert cat.detach("v2", "nodeA") is False
    assert [a.node for a in cat.attachments()] == ["nodeA"]
    assert cat.detach("v1", "nodeA") is True
    assert cat.detach("v1", "nodeA") is False
    assert cat.attachments() == []


def test_expired_holder_is_taken_over(timed: Timed) -> None:
    cat, ttl = timed.cat, timed.ttl
    cat.renew_lease("nodeA", ttl)
    cat.attach("v1", "nodeA")
    cat.want("v1", "nodeB")
    timed.advance(ttl * 0.5)
    cat.renew_lease("nodeB", ttl)
    with pytest.raises(InUse, match="nodeA"):
        cat.attach("v1", "nodeB")  # A's lease still runs
    timed.expire(after=ttl * 0.5)
    cat.renew_lease("nodeB", ttl)  # B's lease thread renews meanwhile
    assert _lease(cat, "nodeA").expires <= timed.now()
    # A's record is worth nothing now: it may stay until someone takes the volume (SQLite, memory) or
    # have gone with A's lease (etcd); either way B takes the volume
    assert [(a.volume, a.node) for a in cat.attachments()] in ([("v1", "nodeA")], [])
    got = cat.attach("v1", "nodeB")
    assert got.node == "nodeB" and got.wanted_by is None and got.since == pytest.approx(timed.now(), abs=1)
    assert [(a.volume, a.node) for a in cat.attachments()] == [("v1", "nodeB")]


def test_an_expired_node_cannot_renew_or_detach_its_way_back(timed: Timed) -> None:
    """A node whose lease ran out lost its attachments: renewing gives it a lease again but none of
    them (whether or not another node took them meanwhile), and its detach cannot drop the taker's."""
    cat, ttl = timed.cat, timed.ttl
    cat.renew_lease("nodeA", ttl)
    cat.attach("v1", "nodeA")
    cat.attach("v2", "nodeA")
    timed.expire()
    cat.renew_lease("nodeB", ttl)
    cat.attach("v1", "nodeB")
    cat.renew_lease("nodeA", ttl)  # A comes back
    assert [(a.volume, a.node) for a in cat.attachments()] == [("v1", "nodeB")]  # v2 went with the lease
    assert cat.detach("v1", "nodeA") is False
    with pytest.raises(InUse, match="attached on node nodeB"):
        cat.attach("v1", "nodeA")
    assert [(a.volume, a.node) for a in cat.attachments()] == [("v1", "nodeB")]
    assert cat.attach("v2", "nodeA").node == "nodeA"  # free again, so A may take it anew


def test_renewing_a_live_lease_keeps_its_attachments(timed: Timed) -> None:
    cat, ttl = timed.cat, timed.ttl
    cat.renew_lease("nodeA", ttl)
    cat.attach("v1", "nodeA")
    for _ in range(5):  # longer than one TTL in all
        timed.advance(ttl / 4)
        cat.renew_lease("nodeA", ttl)
    assert [a.node for a in cat.attachments()] == ["nodeA"]
    cat.renew_lease("nodeA", ttl * 10)  # another TTL (etcd: a new lease): the attachment stays
    timed.expire()  # ...past the old TTL
    assert [a.node for a in cat.attachments()] == ["nodeA"]
    cat.renew_lease("nodeB", ttl)
    with pytest.raises(InUse, match="attached on node nodeA"):
        cat.attach("v1", "nodeB")


def test_drop_lease_releases_its_attachments(timed: Timed) -> None:
    cat = timed.cat
    cat.renew_lease("nodeA", timed.ttl)
    cat.renew_lease("nodeB", timed.ttl)
    cat.attach("v1", "nodeA")
    cat.attach("v2", "nodeB")
    cat.drop_lease("nodeA")
    cat.drop_lease("nodeC")  # absent: no error
    assert [rec.node for rec in cat.leases()] == ["nodeB"]
    assert [(a.volume, a.node) for a in cat.attachments()] == [("v2", "nodeB")]
    assert cat.attach("v1", "nodeB").node == "nodeB"


def test_delete_volume_drops_its_attachment(timed: Timed) -> None:
    cat = timed.cat
    cat.renew_lease("nodeA", timed.ttl)
    cat.attach("v1", "nodeA")
    cat.delete_volume("v1")
    assert cat.attachments() == []
    create(cat, vol("v1"), [sd("v1", 0, "d1", 10 * MiB)])
    cat.renew_lease("nodeB", timed.ttl)
    assert cat.attach("v1", "nodeB").node == "nodeB"  # the new volume of that name is free


def test_concurrent_attach_from_threads_exactly_one_wins(timed: Timed) -> None:
    cat = timed.cat
    nodes = [f"node{i}" for i in range(WORKERS)]
    for n in nodes:
        cat.renew_lease(n, timed.ttl)
    barrier = threading.Barrier(WORKERS)
    won: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def run(n: str) -> None:
        barrier.wait()
        try:
            cat.attach("v1", n)
            with lock:
                won.append(n)
        except InUse as exc:
            with lock:
                refused.append(str(exc))

    threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(won) == 1 and len(refused) == WORKERS - 1
    assert all(f"attached on node {won[0]}" in r for r in refused)
    assert [a.node for a in cat.attachments()] == won


def _attach_in_process(path: str, node: str, barrier: object, out: object) -> None:
    """Top-level for multiprocessing: one node, one process, one catalog object of its own."""
    cat = SqliteCatalog(Path(path), timeout=30.0)
    try:
        cat.renew_lease(node, TTL)
        barrier.wait()  # type: ignore[attr-defined]
        try:
            cat.attach("v1", node)
            result = "won"
        except InUse as exc:
            result = str(exc)
    finally:
        cat.close()
    out.put((node, result))  # type: ignore[attr-defined]


def test_sqlite_concurrent_attach_from_processes_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    _make_timed("sqlite", tmp_path).cat.close()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    out = ctx.Queue()
    nodes = [f"node{i}" for i in range(WORKERS)]
    procs = [ctx.Process(target=_attach_in_process, args=(str(path), n, barrier, out)) for n in nodes]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=30) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    winners = [n for n, r in got.items() if r == "won"]
    assert len(winners) == 1, got
    assert all(f"attached on node {winners[0]}" in r for n, r in got.items() if n != winners[0])
    cat = SqliteCatalog(path)
    try:
        assert [a.node for a in cat.attachments()] == winners
    finally:
        cat.close()


def test_sqlite_leases_and_attachments_persist_and_upgrade_from_0_1_0(tmp_path: Path) -> None:
    """The 0.1.0 catalog gains the (empty) lease and attachment tables, and they keep what is put in."""
    import shutil

    path = tmp_path / "catalog.db"
    shutil.copy(FIXTURE, path)
    cat = SqliteCatalog(path)
    try:
        assert cat.leases() == [] and cat.attachments() == []
        cat.renew_lease("nodeA", TTL)
        cat.attach("v1", "nodeA")
    finally:
        cat.close()
    again = SqliteCatalog(path)
    try:
        assert [rec.node for rec in again.leases()] == ["nodeA"]
        assert [(a.volume, a.node) for a in again.attachments()] == [("v1", "nodeA")]
    finally:
        again.close()
