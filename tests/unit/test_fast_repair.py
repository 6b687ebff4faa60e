"""Repair of a degraded mirror on the fake kernel, and recovery of a repair killed midway."""

from __future__ import annotations

import pytest

from storage import volumes
from storage.errors import InvalidArgument
from tests.unit.conftest import World


def _degrade(world: World) -> str:
    """Make a btrfs mirror and lose one of its images; returns the disk that held it."""
    dg = world.dg
    volumes.make(dg, "m", "400m", layout="mirror", fstype="btrfs")
    lost = dg.catalog.subdisks("m")[1]
    dg.image(lost.disk, "m", lost.idx).unlink()
    assert volumes.health(dg, dg.catalog.volume("m"))[0] == "degraded"  # type: ignore[arg-type]
    return lost.disk


@pytest.mark.parametrize("mounted", [True, False])
def test_repair_rebuilds_the_lost_subdisk_on_another_disk(world: World, mounted: bool) -> None:
    dg = world.dg
    lost = _degrade(world)
    if mounted:
        volumes.mount(dg, "m", "m1", degraded=True)
    volumes.repair(dg, "m")
    v = dg.catalog.volume("m")
    assert v is not None and volumes.health(dg, v) == ("ok", [])
    assert lost not in {sd.disk for sd in dg.catalog.subdisks("m")} and dg.catalog.intents() == []
    assert volumes.is_mounted(dg, "m") == mounted
    assert not list(dg.root.glob("tmp/repair-*/*")), "repair left its scratch mount"


def test_repair_of_a_layout_without_redundancy_is_refused_and_changes_nothing(world: World) -> None:
    volumes.make(world.dg, "c", "400m")
    before = world.state()
    with pytest.raises(InvalidArgument, match="no redundancy"):
        volumes.repair(world.dg, "c")
    assert world.state() == before


@pytest.mark.parametrize("point", ["repair.recorded", "repair.replaced"])
def test_killed_repair_is_abandoned_and_can_run_again(world: World, monkeypatch: pytest.MonkeyPatch,
                                                      point: str) -> None:
    _degrade(world)
    world.kill_at(monkeypatch, point, lambda dg: volumes.repair(dg, "m"))
    dg = world.dg = world.reopen()
    assert dg.catalog.intents() == [] and world.vol_loops() == []
    wanted = {dg.image(sd.disk, "m", sd.idx) for sd in dg.catalog.subdisks("m")}
    assert {p for p in dg.root.glob("disks/*/vols/m.*")} <= wanted, "a half-built replacement was left"
    volumes.repair(dg, "m")
    assert volumes.health(dg, dg.catalog.volume("m")) == ("ok", [])  # type: ignore[arg-type]
