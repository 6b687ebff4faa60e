"""A volume of an RVG is neither removed nor grown as if unreplicated, on either site (fake kernel):
each refusal is typed, names the RVG and what to do, and changes nothing. Plugin Remove included."""

from __future__ import annotations

import pytest

from plugin.driver import Driver
from storage import volumes
from storage.errors import ReplicatedVolume, SecondaryVolume
from storage.replication import rvg
from tests.unit.conftest import World


def _rvg(world: World, role: str, vols: tuple[str, ...] = ("v1",)) -> None:
    with rvg.locked(world.dg):
        rvg.create(world.dg, rvg.Rvg("rvg1", vols, 1 << 20, role), need_volumes=role == "primary")


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_rm_and_grow_of_an_rvg_volume_are_refused_and_change_nothing(world: World, role: str) -> None:
    dg = world.dg
    volumes.make(dg, "v1", "400m")  # on a secondary: a volume kept from when this site was primary
    volumes.make(dg, "other", "400m")
    _rvg(world, role)
    before = world.state()
    err = ReplicatedVolume if role == "primary" else SecondaryVolume
    for op, what in ((lambda: volumes.remove(dg, "v1"), "removed"),
                     (lambda: volumes.remove(dg, "v1", force=True), "removed"),
                     (lambda: volumes.grow(dg, "v1", "800m"), "grown")):
        with pytest.raises(err) as exc:
            op()
        assert type(exc.value) is err
        assert "RVG rvg1" in str(exc.value) and f"cannot be {what}" in str(exc.value)
        assert ("stoprep rvg1" if role == "primary" else "takeover rvg1") in str(exc.value)
        assert world.state() == before
    volumes.grow(dg, "other", "800m")  # a volume in no RVG is unaffected
    volumes.remove(dg, "other")


def test_a_secondary_volume_with_no_local_record_names_its_rvg(world: World) -> None:
    _rvg(world, "secondary")
    before = world.state()
    for op in (lambda: volumes.remove(world.dg, "v1"), lambda: volumes.grow(world.dg, "v1", "1g")):
        with pytest.raises(SecondaryVolume, match="secondary of RVG rvg1"):
            op()
    assert world.state() == before


def test_plugin_remove_of_an_rvg_volume_is_refused(world: World) -> None:
    drv = Driver(world.config, runner=world.kernel, store=world.store)
    volumes.make(world.dg, "v1", "400m")
    _rvg(world, "primary")
    before = world.state()
    with pytest.raises(ReplicatedVolume, match="RVG rvg1"):
        drv.remove("v1")
    assert world.state() == before
    assert [v["Name"] for v in drv.list()] == ["v1"]


def test_destroy_force_still_removes_an_rvg_volume(world: World) -> None:
    from storage import diskgroup

    volumes.make(world.dg, "v1", "400m")
    _rvg(world, "primary")
    diskgroup.destroy(world.dg, force=True)
    assert not (world.config.dg_parent / "fastdg").exists()


def test_destroy_of_a_secondary_site_with_no_volumes_is_refused(world: World) -> None:
    """A secondary's data is its replica, in no volume record: destroy without --force would take it."""
    from storage import diskgroup
    from storage.errors import InUse

    _rvg(world, "secondary")
    replica = rvg.replica_root(world.dg, "rvg1")
    replica.mkdir(parents=True)
    before = world.state()
    with pytest.raises(InUse, match=r"holds RVGs \(rvg1 \(secondary\)\)"):
        diskgroup.destroy(world.dg)
    assert world.state() == before and replica.is_dir() and rvg.get(world.dg, "rvg1").role == "secondary"
