"""Snapshots on the fake kernel and the memory store: made frozen and thawed, cloned with their
source's filesystem, given their own identity before first use, and refused without changing anything."""

from __future__ import annotations

import pytest

from storage import snapshots, volumes
from storage.errors import AlreadyExists, InvalidArgument, NoSuchVolume
from storage.units import MiB
from tests.unit.conftest import World


@pytest.mark.parametrize(("layout", "fstype"), [("concat", "xfs"), ("concat", "ext4"), ("mirror", "btrfs")])
@pytest.mark.parametrize("mounted", [True, False])
def test_snapshot_make_mount_remove(world: World, layout: str, fstype: str, mounted: bool) -> None:
    dg = world.dg
    volumes.make(dg, "src", "400m", layout=layout, fstype=fstype)
    if mounted:
        volumes.mount(dg, "src", "m1")
    s = snapshots.make(dg, "src", "snap1")
    assert s.snapshot_of == "src" and s.identity_pending and s.layout == layout
    assert s.cachesize == 120 * MiB  # 30 % of the source, the default
    assert world.kernel.frozen == set(), "the source is thawed again"
    freezes = [c for c in world.kernel.commands if c[0] == "fsfreeze"]
    assert freezes == ([["fsfreeze", "--freeze", str(dg.mountpoint("src"))],
                        ["fsfreeze", "--unfreeze", str(dg.mountpoint("src"))]] if mounted else [])
    volumes.mount(dg, "snap1", "m2")
    assert volumes.is_mounted(dg, "snap1") and not dg.catalog.volume("snap1").identity_pending  # type: ignore[union-attr]
    assert volumes.is_mounted(dg, "src") == mounted
    volumes.umount(dg, "snap1", "m2")
    volumes.remove(dg, "snap1")
    assert [v.name for v in dg.catalog.volumes()] == ["src"]


def test_a_source_with_snapshots_is_not_removed(world: World) -> None:
    dg = world.dg
    volumes.make(dg, "src", "400m")
    snapshots.make(dg, "src", "snap1")
    before = world.state()
    with pytest.raises(Exception, match="snap1"):
        volumes.remove(dg, "src")
    assert world.state() == before


@pytest.mark.parametrize(("source", "name", "kw", "error"), [
    ("nope", "s", {}, NoSuchVolume),
    ("src", "src", {}, AlreadyExists),
    ("src", "s", {"cachesize": "1g"}, InvalidArgument),
    ("src", "bad/name", {}, InvalidArgument),
])
def test_snapshot_refusals_change_nothing(world: World, source: str, name: str, kw: dict[str, str],
                                          error: type[Exception]) -> None:
    volumes.make(world.dg, "src", "400m")
    before = world.state()
    with pytest.raises(error):
        snapshots.make(world.dg, source, name, **kw)  # type: ignore[arg-type]
    assert world.state() == before and world.kernel.frozen == set()


def test_a_failed_clone_thaws_the_source_and_leaves_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.kernel import reflink

    dg = world.dg
    volumes.make(dg, "src", "400m")
    volumes.mount(dg, "src", "m1")
    before = world.state()

    def fail(_src: object, _dst: object) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(reflink, "clone", fail)
    with pytest.raises(OSError):
        snapshots.make(dg, "src", "snap1")
    assert world.state() == before and world.kernel.frozen == set()
