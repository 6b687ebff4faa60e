"""One contract every layout engine passes, on real loop devices and real filesystems.

For each engine: make puts its images on distinct disks, data survives umount/mount, the filesystem
grows while mounted (ext4: offline only, with a clear refusal online), a snapshot taken while the source
is being written holds everything synced before it, mounts beside the source with its own filesystem
identity and is independent of it, and removing both returns every byte of the disk group's space.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage import snapshots, volumes
from storage.config import VolumeDefaults
from storage.errors import InUse, InvalidArgument
from storage.kernel import fs, loop, mounts
from storage.layouts import ENGINES
from storage.runner import run
from storage.units import MiB, parse_size


@dataclass(frozen=True)
class Case:
    id: str
    opts: dict[str, str] = field(default_factory=dict)
    size: str = "400m"
    grown: str = "700m"
    fstype: str = "xfs"
    nimages: int = 1
    profile: str | None = None  # btrfs data profile
    ndisks: int = 3


CASES = [
    Case("concat-xfs", {"layout": "concat"}),
    Case("concat-ext4", {"layout": "concat"}, size="200m", grown="300m", fstype="ext4"),
    Case("concat-btrfs", {"layout": "concat", "fstype": "btrfs"}, fstype="btrfs", profile="single"),
    Case("mirror2", {"layout": "mirror", "nmirror": "2"}, fstype="btrfs", nimages=2, profile="RAID1"),
    Case("mirror3", {"layout": "mirror", "nmirror": "3"}, fstype="btrfs", nimages=3, profile="RAID1C3"),
    Case("stripe", {"layout": "stripe", "ncol": "2"}, fstype="btrfs", nimages=2, profile="RAID0"),
    Case("mirror-stripe", {"layout": "mirror-stripe", "ncol": "2"}, fstype="btrfs", nimages=4,
         profile="RAID10", ndisks=4),
]


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fs_identity(dg, name: str, fstype: str) -> str:
    """The filesystem UUID (btrfs: fsid) of a mounted volume, read from the kernel's tools."""
    if fstype == "btrfs":
        out = subprocess.run(["btrfs", "filesystem", "show", str(dg.mountpoint(name))], capture_output=True,
                             text=True, check=True).stdout
        m = re.search(r"uuid:\s*([0-9a-f-]{36})", out)
        assert m, out
        return m.group(1)
    devs = volumes.info(dg, name)["devices"]
    assert len(devs) == 1, devs
    out = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", devs[0]], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out, f"blkid found no UUID on {devs[0]}"
    return out


def fs_size(mp: Path) -> int:
    st = os.statvfs(mp)
    return st.f_blocks * st.f_frsize


def data_profiles(mp: Path) -> set[str]:
    out = subprocess.run(["btrfs", "filesystem", "df", str(mp)], capture_output=True, text=True,
                         check=True).stdout
    return {m.group(1) for m in re.finditer(r"^Data,\s*([^:]+):", out, re.M)}


def vol_files(dg) -> set[Path]:
    return {p for d in dg.catalog.disks() for p in (dg.disk_dir(d.name) / "vols").glob("*")}


class Writer(threading.Thread):
    """Appends to a file on the volume until stopped, fsyncing now and then: a busy application."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.path, "wb") as fh:
                chunk = os.urandom(256 * 1024)
                while not self.stop.is_set():
                    fh.write(chunk)
                    self.written += len(chunk)
                    if self.written % (2 * MiB) == 0:
                        os.fsync(fh.fileno())
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layout_contract(env, case: Case) -> None:
    dg = env.make_dg(ndisks=case.ndisks)
    try:
        _contract(env, dg, case)
    finally:
        dg.close()


def _contract(env, dg, case: Case) -> None:
    free0 = dg.free()
    files0 = vol_files(dg)

    # make: one image per subdisk, each on a different disk, nothing attached or mounted afterwards
    rec = volumes.make(dg, "v", case.size, **case.opts)
    assert rec.fstype == case.fstype
    info = volumes.info(dg, "v")
    disks = [sd["disk"] for sd in info["subdisks"]]
    assert len(disks) == case.nimages
    assert len(set(disks)) == len(disks), f"images share a disk: {disks}"
    for sd in info["subdisks"]:
        assert Path(sd["image"]).is_file()
        assert Path(sd["image"]).parent == dg.disk_dir(sd["disk"]) / "vols"
    assert info["devices"] == [] and not info["mounted"]
    assert sum(free0.values()) - sum(dg.free().values()) == sum(sd["reserved"] for sd in info["subdisks"])

    # mount, write, umount, mount again: the data is still there
    if case.fstype == "ext4":
        time.sleep(1.1)  # mounted in a later second than mkfs: offline resize must check the fs first
    mp = volumes.mount(dg, "v")
    assert mounts.mounted_at(mp).fstype == case.fstype
    if case.profile:
        assert data_profiles(mp) == {case.profile}
    first = os.urandom(3 * MiB + 123)
    write_synced(mp / "first.bin", first)
    assert volumes.umount(dg, "v") is True
    assert mounts.mounted_at(mp) is None
    assert volumes.info(dg, "v")["devices"] == []
    mp = volumes.mount(dg, "v")
    assert (mp / "first.bin").read_bytes() == first

    # grow
    before = fs_size(mp)
    if case.fstype == "ext4":
        with pytest.raises(InUse, match="ext4 cannot grow while mounted.*unmount"):
            volumes.grow(dg, "v", case.grown)
        assert dg.catalog.volume("v").size == rec.size
        assert fs_size(mp) == before
        volumes.umount(dg, "v")
        volumes.grow(dg, "v", case.grown)
        mp = volumes.mount(dg, "v")
    else:
        volumes.grow(dg, "v", case.grown)
        assert mounts.mounted_at(mp) is not None, "online grow unmounted the volume"
    assert fs_size(mp) > before + 50 * MiB, (before, fs_size(mp))
    assert dg.catalog.volume("v").size > rec.size
    assert (mp / "first.bin").read_bytes() == first
    grown_free = dg.free()

    # snapshot while mounted and being written
    second = os.urandom(2 * MiB + 7)
    write_synced(mp / "second.bin", second)
    writer = Writer(mp / "busy.bin")
    writer.start()
    try:
        while writer.written < 4 * MiB and writer.is_alive():
            time.sleep(0.01)
        snapshots.make(dg, "v", "s")
        busy_during_snap = writer.is_alive() and writer.written > 0
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    assert busy_during_snap
    sinfo = volumes.info(dg, "s")
    assert sinfo["snapshot_of"] == "v" and sinfo["fstype"] == case.fstype
    assert sorted(sd["disk"] for sd in sinfo["subdisks"]) == sorted(disks)
    reserved = sum(sd["reserved"] for sd in sinfo["subdisks"])
    assert sum(grown_free.values()) - sum(dg.free().values()) == reserved
    assert sinfo["cachesize"] <= reserved < sinfo["cachesize"] + case.nimages

    smp = volumes.mount(dg, "s")
    assert smp != mp and mounts.mounted_at(mp) is not None and mounts.mounted_at(smp) is not None
    assert (smp / "first.bin").read_bytes() == first
    assert (smp / "second.bin").read_bytes() == second
    assert (smp / "busy.bin").exists()
    # its own filesystem identity, except XFS's: mounted nouuid, as a new UUID would rewrite the log
    assert (fs_identity(dg, "s", case.fstype) == fs_identity(dg, "v", case.fstype)) == (case.fstype == "xfs")

    # independent both ways
    write_synced(smp / "only-in-snap.bin", b"snap")
    write_synced(mp / "only-in-source.bin", b"source")
    write_synced(smp / "first.bin", b"overwritten in snapshot")
    assert not (mp / "only-in-snap.bin").exists()
    assert not (smp / "only-in-source.bin").exists()
    assert (mp / "first.bin").read_bytes() == first
    volumes.umount(dg, "s")
    volumes.umount(dg, "v")
    mp = volumes.mount(dg, "v")
    assert (mp / "first.bin").read_bytes() == first and not (mp / "only-in-snap.bin").exists()
    volumes.umount(dg, "v")

    # remove the snapshot, then the source: every image, device and byte of space comes back
    snap_images = [Path(sd["image"]) for sd in sinfo["subdisks"]]
    volumes.remove(dg, "s")
    assert dg.free() == grown_free
    assert not any(p.exists() for p in snap_images)
    volumes.remove(dg, "v")
    assert dg.free() == free0
    assert vol_files(dg) == files0
    assert dg.catalog.volumes() == []
    prefix = str(env.root) + "/"
    assert not [d for d, b in loop.attached().items() if b.startswith(prefix) and "/vols/" in b]


# ------------------------------------------------------------------ each engine's methods, directly
#
# The same cases, without the volume service: the engine makes, grows (offline, then online where its
# filesystem can), detaches, gives a copy of its images their own identity, and replaces a lost device
# (redundant engines) or refuses to (the others), on loop devices over image files it is handed.


def _opt(case: Case, key: str) -> int | None:
    return int(case.opts[key]) if key in case.opts else None


def image_uuid(img: Path) -> str:
    """The filesystem UUID (btrfs: fsid) in an image file, probed on the file itself."""
    out = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out, f"blkid found no UUID in {img}"
    return out


def _grow_images(imgs: list[Path], sizes: list[int]) -> None:
    for img, sz in zip(imgs, sizes, strict=True):
        with open(img, "ab") as fh:  # made sparse, or extended
            fh.truncate(sz)


def _clean(eng, shape, work: Path) -> None:
    """Unmount and detach whatever this test left under ``work`` (after a failure)."""
    prefix = str(work) + "/"
    for e in sorted(mounts.table(), key=lambda e: -len(e.target)):
        if e.target.startswith(prefix):
            fs.umount(Path(e.target), run)
    eng.detach([d for d, b in loop.attached().items() if b.startswith(prefix)], shape, run)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_engine_methods_directly(env, case: Case) -> None:
    eng = ENGINES[case.opts["layout"]]
    size = parse_size(case.size)
    shape = eng.shape_for(size, case.opts.get("fstype"), _opt(case, "nmirror"), _opt(case, "ncol"), VolumeDefaults())
    assert shape.fstype == case.fstype
    sizes = eng.subdisk_sizes(size, shape)
    assert len(sizes) == case.nimages
    work = env.root / "engine"
    work.mkdir()
    n = itertools.count()

    def scratch() -> Path:
        p = work / f"scratch{next(n)}"
        p.mkdir()
        return p

    imgs = [work / f"src.{i}.img" for i in range(len(sizes))]
    mp = work / "mp"
    mp.mkdir()
    data = os.urandom(MiB + 17)
    try:
        _grow_images(imgs, sizes)
        devs = [loop.attach(p, run) for p in imgs]
        eng.mkfs(devs, shape, "eng", run)
        if case.fstype == "ext4":
            time.sleep(1.1)  # mounted in a later second than mkfs: offline resize must check the fs first
        eng.mount(devs, shape, mp, runner=run)
        before = fs_size(mp)
        write_synced(mp / "data.bin", data)
        fs.umount(mp, run)

        # detach: every loop device goes
        eng.detach(devs, shape, run)
        assert [d for p in imgs for d in loop.find(p)] == []

        # grow offline: on the devices for ext4, at a scratch mount for the others, which it removes
        _grow_images(imgs, eng.subdisk_sizes(parse_size(case.grown), shape))
        devs = [loop.attach(p, run) for p in imgs]
        eng.grow(devs, shape, None, scratch, run)
        assert not [e for e in mounts.table() if e.target.startswith(str(work / "scratch"))]
        eng.mount(devs, shape, mp, runner=run)
        grown = fs_size(mp)
        assert grown > before + 50 * MiB, (before, grown)
        assert (mp / "data.bin").read_bytes() == data

        # grow online, where the filesystem can; ext4 refuses while mounted
        if case.fstype == "ext4":
            with pytest.raises(InUse, match="ext4 cannot grow while mounted"):
                eng.check_grow_online(shape)
        else:
            eng.check_grow_online(shape)
            _grow_images(imgs, [p.stat().st_size + 256 * MiB for p in imgs])
            for d in devs:
                loop.refresh_size(d, run)
            eng.grow(devs, shape, mp, scratch, run)
            assert mounts.mounted_at(mp) is not None
            assert fs_size(mp) > grown + 50 * MiB, (grown, fs_size(mp))
        fs.umount(mp, run)
        eng.detach(devs, shape, run)

        # a copy of the images, made ready by new_identity, mounts beside its source: btrfs and ext4
        # with an identity of their own, XFS with its source's (mounted nouuid: a new UUID would
        # rewrite its whole log, which a snapshot would pay for from its cache)
        clones = [work / f"clone.{i}.img" for i in range(len(imgs))]
        for src, dst in zip(imgs, clones, strict=True):
            subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
        assert image_uuid(clones[0]) == image_uuid(imgs[0])
        eng.new_identity(clones, shape, scratch, run)
        assert (image_uuid(clones[0]) == image_uuid(imgs[0])) == (case.fstype == "xfs")
        assert [d for p in clones for d in loop.find(p)] == [], "new_identity left a device attached"
        devs = [loop.attach(p, run) for p in imgs]
        cdevs = [loop.attach(p, run) for p in clones]
        cmp_ = work / "clone-mp"
        cmp_.mkdir()
        eng.mount(devs, shape, mp, runner=run)
        eng.mount(cdevs, shape, cmp_, runner=run)
        assert (cmp_ / "data.bin").read_bytes() == data and (mp / "data.bin").read_bytes() == data
        fs.umount(cmp_, run)
        fs.umount(mp, run)
        eng.detach(cdevs, shape, run)
        eng.detach(devs, shape, run)

        # replace a lost device and restore the profile; an engine without redundancy refuses
        if not eng.redundant:
            with pytest.raises(InvalidArgument, match="no redundancy"):
                eng.replace(0, "/dev/null", mp, run)
            with pytest.raises(InvalidArgument, match="no redundancy"):
                eng.restore_redundancy(shape, mp, run)
            return
        imgs[0].unlink()
        devs = [loop.attach(p, run) for p in imgs[1:]]
        eng.mount(devs, shape, mp, degraded=True, runner=run)
        new = work / "new.0.img"
        _grow_images([new], [imgs[1].stat().st_size])
        ndev = loop.attach(new, run)
        eng.replace(0, ndev, mp, run)
        eng.restore_redundancy(shape, mp, run)
        assert data_profiles(mp) == {case.profile}
        assert (mp / "data.bin").read_bytes() == data
        fs.umount(mp, run)
        eng.detach([ndev, *devs], shape, run)
    finally:
        _clean(eng, shape, work)
