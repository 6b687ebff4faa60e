"""veritas doctor: finds each kind of disagreement between catalog, image files, loop devices and mounts,
fixes it with --repair, and leaves healthy volumes alone. Through the library and through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import doctor, volumes
from storage.diskgroup import DiskGroup
from storage.kernel import loop, mounts

DG = "testdg"


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def image_of(dg: DiskGroup, name: str) -> Path:
    sd = dg.catalog.subdisks(name)[0]
    return dg.image(sd.disk, name, sd.idx)


def attach_behind_back(image: Path) -> str:
    return subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def healthy(env: Any, dg: DiskGroup) -> Iterator[DiskGroup]:
    """The disk group with two healthy volumes that no repair may touch: one mounted, one not."""
    volumes.make(dg, "keep", "200m", fstype="ext4")
    write_file(volumes.mount(dg, "keep") / "data.bin", b"keep" * 4096)
    volumes.make(dg, "idle", "300m")
    write_file(volumes.mount(dg, "idle") / "data.bin", b"idle" * 4096)
    volumes.umount(dg, "idle")
    assert doctor.check(dg) == []
    yield dg
    # the healthy volumes came through untouched
    assert volumes.is_mounted(dg, "keep")
    assert [m.mount_id for m in dg.catalog.mounts("keep")] == ["admin"]
    assert (dg.mountpoint("keep") / "data.bin").read_bytes() == b"keep" * 4096
    assert not volumes.is_mounted(dg, "idle")
    mp = volumes.mount(dg, "idle")
    assert (mp / "data.bin").read_bytes() == b"idle" * 4096
    volumes.umount(dg, "idle")
    assert doctor.check(dg) == []


def expect_found_and_fixed(env: Any, dg: DiskGroup, want: set[tuple[str, str]],
                           repaired: set[tuple[str, str]] | None = None) -> None:
    """doctor reports exactly ``want`` ((kind, subject) pairs), in the library and the CLI; --repair fixes it
    and reports ``repaired`` (default ``want``: fewer when fixing one problem fixed another too)."""
    repaired = want if repaired is None else repaired
    found = doctor.check(dg)
    assert {(f.kind, f.subject) for f in found} == want, found
    assert not any(f.fixed for f in found)
    assert doctor.check(dg) == found  # looking changes nothing

    proc = env.cli("doctor", "-g", DG, check=False)
    assert proc.returncode == 1, proc
    for kind, subject in want:
        assert any(line.startswith(f"{DG}: {kind}: {subject}:") for line in proc.stdout.splitlines()), proc.stdout
    proc = env.cli("--json", "doctor", check=False)
    assert proc.returncode == 1
    assert len(json.loads(proc.stdout)) == len(want)

    proc = env.cli("doctor", "-g", DG, "--repair")
    lines = proc.stdout.splitlines()
    assert len(lines) == len(repaired), proc.stdout
    assert all(line.endswith("(fixed)") for line in lines), proc.stdout
    for kind, subject in repaired:
        assert any(line.startswith(f"{DG}: {kind}: {subject}:") for line in lines), proc.stdout

    assert doctor.check(dg) == []
    proc = env.cli("doctor")
    assert proc.returncode == 0 and proc.stdout.strip() == "no problems found"


def test_clean_disk_group_is_clean(env: Any, healthy: DiskGroup) -> None:
    proc = env.cli("doctor", "-g", DG)
    assert proc.stdout.strip() == "no problems found"
    proc = env.cli("doctor", "-g", DG, "--repair")
    assert proc.stdout.strip() == "no problems found"
    assert json.loads(env.cli("--json", "doctor").stdout) == []


def test_orphan_image(env: Any, healthy: DiskGroup) -> None:
    dg = healthy
    orphan = dg.disk_dir(dg.catalog.disks()[1].name) / "vols" / "ghost.0.img"
    subprocess.run(["cp", "--sparse=always", str(image_of(dg, "idle")), str(orphan)], check=True)
    expect_found_and_fixed(env, dg, {("orphan-image", str(orphan))})
    assert not orphan.exists()


def test_orphan_image_attached(env: Any, healthy: DiskGroup) -> None:
    """An orphan image that is also attached: repair detaches it before deleting it."""
    dg = healthy
    orphan = dg.disk_dir(dg.catalog.disks()[0].name) / "vols" / "lost.3.img"
    write_file(orphan, b"\0" * (1 << 20))
    dev = attach_behind_back(orphan)
    expect_found_and_fixed(env, dg, {("orphan-image", str(orphan)), ("stray-loop", dev)},
                           {("orphan-image", str(orphan))})  # deleting it detached it
    assert not orphan.exists()
    assert not loop.find(orphan)


def test_stray_loop(env: Any, healthy: DiskGroup) -> None:
    dg = healthy
    img = image_of(dg, "idle")
    dev = attach_behind_back(img)
    expect_found_and_fixed(env, dg, {("stray-loop", dev)})
    assert loop.find(img) == []


def test_stale_mount_record(env: Any, healthy: DiskGroup) -> None:
    """Unmounted behind veritas's back (umount -l): the mount record and the loop device are both stale."""
    dg = healthy
    volumes.make(dg, "gone", "300m")
    mp = volumes.mount(dg, "gone", "c1")
    write_file(mp / "data.bin", b"gone" * 4096)
    devs = volumes.devices(dg, dg.catalog.volume("gone"))
    subprocess.run(["umount", "-l", str(mp)], check=True)
    assert not volumes.is_mounted(dg, "gone")
    expect_found_and_fixed(env, dg, {("stale-mount-record", "gone"), ("stray-loop", devs[0])})
    assert dg.catalog.mounts("gone") == []
    assert loop.find(image_of(dg, "gone")) == []
    # and the volume is usable again, with its data
    env.cli("vol", "mount", "-g", DG, "gone")
    assert (dg.mountpoint("gone") / "data.bin").read_bytes() == b"gone" * 4096
    env.cli("vol", "rm", "-g", DG, "gone", "--force")


def test_stray_mount(env: Any, healthy: DiskGroup) -> None:
    """One of this disk group's images mounted behind veritas's back, under a name that is no volume's
    mount point: doctor knows it by the loop device's backing file, unmounts and detaches it."""
    dg = healthy
    dev = attach_behind_back(image_of(dg, "idle"))
    ghost = dg.config.mount_root / f"ghost_{DG}"
    ghost.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "xfs", dev, str(ghost)], check=True)
    try:
        expect_found_and_fixed(env, dg, {("stray-mount", str(ghost)), ("stray-loop", dev)})
        assert mounts.mounted_at(ghost) is None
        assert loop.find(image_of(dg, "idle")) == []
    finally:
        if mounts.mounted_at(ghost) is not None:
            subprocess.run(["umount", str(ghost)], check=False)


def test_foreign_mount_named_like_ours_is_left_alone(env: Any, healthy: DiskGroup) -> None:
    """A filesystem that is none of this disk group's, mounted at a path shaped like one of its mount
    points (``<mount_root>/<name>_<dg>``): not doctor's to report or unmount. At the mount point of one
    of its volumes it is reported (that volume cannot be mounted), and still not unmounted."""
    dg = healthy
    ghost = dg.config.mount_root / f"ghost_{DG}"
    idle = dg.mountpoint("idle")
    for d in (ghost, idle):
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True)
    try:
        for repair in (False, True):
            found = doctor.check(dg, repair=repair)
            assert [(f.kind, f.subject, f.fixed) for f in found] == [("foreign-mount", str(idle), False)], found
            assert "not volume idle" in found[0].detail
        assert mounts.mounted_at(ghost) is not None and mounts.mounted_at(idle) is not None
        assert not volumes.is_mounted(dg, "idle")
    finally:
        for d in (ghost, idle):
            while mounts.mounted_at(d) is not None:
                subprocess.run(["umount", str(d)], check=True)


def test_missing_image(env: Any, healthy: DiskGroup) -> None:
    """A concat volume whose only image is gone has lost its data: repair drops the catalog row."""
    dg = healthy
    volumes.make(dg, "lost", "300m")
    img = image_of(dg, "lost")
    img.unlink()
    expect_found_and_fixed(env, dg, {("missing-image", "lost")})
    assert dg.catalog.volume("lost") is None
    assert dg.catalog.subdisks("lost") == []
    env.cli("vol", "make", "-g", DG, "lost", "300m")  # the name and space are free again
    env.cli("vol", "rm", "-g", DG, "lost")


def test_everything_at_once(env: Any, healthy: DiskGroup) -> None:
    dg = healthy
    disks = [d.name for d in dg.catalog.disks()]
    orphan = dg.disk_dir(disks[2]) / "vols" / "ghost.0.img"
    write_file(orphan, b"x" * 4096)
    volumes.make(dg, "stale", "300m")
    mp = volumes.mount(dg, "stale")
    stale_dev = volumes.devices(dg, dg.catalog.volume("stale"))[0]
    subprocess.run(["umount", "-l", str(mp)], check=True)
    stray_dev = attach_behind_back(image_of(dg, "idle"))
    ghost = dg.config.mount_root / f"ghost_{DG}"
    ghost.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "xfs", stray_dev, str(ghost)], check=True)
    volumes.make(dg, "lost", "200m", fstype="ext4")
    image_of(dg, "lost").unlink()
    try:
        expect_found_and_fixed(env, dg, {
            ("orphan-image", str(orphan)),
            ("stale-mount-record", "stale"),
            ("stray-loop", stale_dev),
            ("stray-loop", stray_dev),
            ("stray-mount", str(ghost)),
            ("missing-image", "lost"),
        })
    finally:
        if mounts.mounted_at(ghost) is not None:
            subprocess.run(["umount", str(ghost)], check=False)
    assert sorted(v.name for v in dg.catalog.volumes()) == ["idle", "keep", "stale"]
    env.cli("vol", "rm", "-g", DG, "stale")
