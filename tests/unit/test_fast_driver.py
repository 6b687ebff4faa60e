"""The plugin's Driver on the fake kernel and the memory store: Docker's calls become storage calls."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from plugin.driver import Driver
from storage.catalog.memory_store import MemoryStore
from storage.config import Config
from storage.errors import InvalidArgument, NoSuchVolume, VeritasError
from storage.units import GiB, MiB
from tests.unit.conftest import World
from tests.unit.fakekernel import install


@pytest.fixture
def driver(world: World) -> Driver:
    return Driver(world.config, store=world.store, runner=world.kernel)


def test_create_get_mount_unmount_remove(world: World, driver: Driver) -> None:
    driver.create("web", {"size": "400m"})
    got = driver.get("web")
    assert got["Name"] == "web" and got["Status"]["size"] == "400M" and got["Status"]["mounts"] == 0
    assert driver.path("web") == ""
    mp = driver.mount("web", "id1")
    assert mp == str(world.dg.mountpoint("web")) and driver.path("web") == mp
    assert driver.get("web")["Status"]["mounts"] == 1
    driver.unmount("web", "id1")
    assert driver.path("web") == ""
    driver.remove("web")
    with pytest.raises(NoSuchVolume):
        driver.get("web")
    assert driver.list() == []


def test_list_shows_made_volumes_with_their_mount_points(world: World, driver: Driver) -> None:
    driver.create("a", {})
    driver.create("b", {"layout": "mirror", "fstype": "btrfs", "size": "400m"})
    assert driver.list() == [{"Name": n, "Mountpoint": str(world.dg.mountpoint(n))} for n in ("a", "b")]


def test_an_identical_create_is_idempotent_a_different_one_refused(driver: Driver) -> None:
    driver.create("v", {"size": "400m", "fstype": "ext4"})
    driver.create("v", {"size": "400m", "fstype": "ext4"})
    with pytest.raises(VeritasError):
        driver.create("v", {"size": "500m"})
    assert driver.get("v")["Status"]["size"] == "400M"


def test_bad_options_are_refused_before_any_step(world: World, driver: Driver) -> None:
    before = world.state()
    with pytest.raises(InvalidArgument):
        driver.create("v", {"size": "400m", "colour": "blue"})
    with pytest.raises(InvalidArgument):
        driver.create("bad/name", {})
    assert world.state() == before


def test_create_a_snapshot_with_sourcevol(world: World, driver: Driver) -> None:
    driver.create("src", {"size": "400m"})
    driver.mount("src", "id1")
    driver.create("snap", {"sourcevol": "src"})
    status = driver.get("snap")["Status"]
    assert status["sourcevol"] == "src" and status["state"] == "valid"
    assert driver.get("src")["Status"]["snapshots"] == ["snap"]
    mp = driver.mount("snap", "id2")  # beside its source: it got its own filesystem identity
    assert driver.path("snap") == mp and driver.path("src")


def test_the_default_disk_group_is_made_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = install(monkeypatch)
    config = Config(diskgroup="dockerdg", state_root=tmp_path / "state", mount_root=tmp_path / "mnt",
                    node="node1", default_disk_size=2 * GiB, default_disk_count=2)
    store = MemoryStore()
    d = Driver(config, store=store, runner=kernel)
    d.create("v", {"size": "300m"})
    assert store.names() == ["dockerdg"]
    assert sorted(p.name for p in (config.state_root / "images").iterdir()) == ["dockerdg-disk1.img",
                                                                                "dockerdg-disk2.img"]
    again = Driver(dataclasses.replace(config), store=store, runner=kernel)  # the next process
    assert [v["Name"] for v in again.list()] == ["v"]
    assert again.dg.catalog.volume("v").size == 300 * MiB  # type: ignore[union-attr]
