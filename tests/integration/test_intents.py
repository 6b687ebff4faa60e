"""One intent protocol: an intent is recovered only by a holder of exactly the locks its operation took,
and beginning work on a key that still carries a dead operation's intent finishes that intent first.

The killed operations run through the real CLI (kill -9 at a crash point); the long-lived opener is the
test's own DiskGroup, opened before the kill, as the plugin's is.
"""

from __future__ import annotations

import signal
import zlib

import pytest

from storage import diskgroup, recovery, volumes
from storage.diskgroup import DiskGroup
from storage.kernel import loop, mounts
from storage.locks import STRIPES

DG = "testdg"


def killed_at(env, point: str, *args: str) -> None:
    proc = env.cli(*args, check=False, env={"VERITAS_CRASH_AT": point})
    assert proc.returncode == -signal.SIGKILL, f"expected SIGKILL at {point}, got {proc.returncode}: {proc.stderr}"


def ids(dg: DiskGroup, name: str) -> list[str]:
    return [m.mount_id for m in dg.catalog.mounts(name)]


@pytest.mark.parametrize("point", ["umount.recorded", "umount.unmounted"])
def test_mount_finishes_a_killed_umount_first(env, dg: DiskGroup, point: str) -> None:
    """A umount killed by kill -9 is not overwritten by the next mount: its mount ID is released, and
    the last unmount of the new user really unmounts."""
    volumes.make(dg, "v1", "300m")
    env.cli("vol", "mount", "-g", DG, "v1", "--id", "c1")
    killed_at(env, point, "vol", "umount", "-g", DG, "v1", "--id", "c1")
    assert [i.op for i in dg.catalog.intents()] == ["umount"]

    volumes.mount(dg, "v1", "c2")  # the long-lived opener: no open-time recovery in between
    assert ids(dg, "v1") == ["c2"], "the killed umount's mount ID stays counted"
    assert dg.catalog.intents() == []
    assert volumes.umount(dg, "v1", "c2") is True
    assert mounts.mounted_at(dg.mountpoint("v1")) is None
    assert ids(dg, "v1") == [] and volumes.devices(dg, dg.catalog.volume("v1")) == []


def test_recovery_of_a_snapshot_waits_for_its_source_lock(env, dg: DiskGroup) -> None:
    """A snapshot holds its source's stripe too; so does its recovery (which may thaw the source)."""
    assert zlib.crc32(b"src") % STRIPES != zlib.crc32(b"snp") % STRIPES  # the test needs distinct stripes
    volumes.make(dg, "src", "300m")
    volumes.mount(dg, "src")
    killed_at(env, "snap.cloned", "snap", "make", "-g", DG, "src", "snp")
    other = DiskGroup(env.config, DG)  # another process's view: its own lock descriptors
    try:
        with other.locks.hold("src"):  # a live operation on the source
            assert recovery.recover(dg) == []
            assert [i.key for i in dg.catalog.intents()] == ["snp"]
            assert dg.catalog.volume("snp") is not None
        assert recovery.recover(dg) == ["snap snp: rolled back"]
    finally:
        other.close()
    assert dg.catalog.volume("snp") is None and dg.catalog.intents() == []


def test_recovery_of_a_volume_waits_for_the_exclusive_dg_lock(env, dg: DiskGroup) -> None:
    """Volume operations hold the disk group lock shared; an exclusive holder (adddisk, deport, destroy,
    doctor --repair) keeps their recovery out until it is done."""
    killed_at(env, "make.images", "vol", "make", "-g", DG, "mk", "300m")
    other = DiskGroup(env.config, DG)
    try:
        with other.locks.hold(exclusive_dg=True):
            assert recovery.recover(dg) == []
            assert [i.key for i in dg.catalog.intents()] == ["mk"]
        assert recovery.recover(dg) == ["make mk: rolled back"]
    finally:
        other.close()
    assert dg.catalog.volume("mk") is None


def test_adddisk_finishes_a_killed_adddisk_first(env, dg: DiskGroup) -> None:
    """A second adddisk in a long-lived opener rolls back the killed one's half-made disk first."""
    img = env.root / "extra.img"
    killed_at(env, "adddisk.mkfs", "dg", "adddisk", DG, f"{img}=1g")
    assert loop.find(img), "the killed adddisk left its loop device (what recovery must clean)"
    other = env.root / "other.img"
    names = dg.add_disks([diskgroup.DiskSpec(other, 2**30)])
    assert not loop.find(img) and not img.exists()
    assert dg.catalog.intents() == []
    assert [d.source for d in dg.catalog.disks() if d.name in names] == [str(other)]
