"""Thin or thick provisioning (issue 9), on real loop devices and XFS disks.

Thin images are sparse: the disk's filesystem gives them room as the volume is written. Thick images are
allocated in full (fallocate) at make and grow, so a volume's first writes take nothing from the disk,
and a disk whose filesystem cannot hold a thick volume is found at make, not at a container's write.
Snapshots of thick volumes still share every extent with their source.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from storage import snapshots, volumes
from storage.errors import NoSpace
from storage.group import DiskGroup
from storage.kernel import loop, reflink
from storage.units import GiB, MiB


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def _images(dg: DiskGroup, name: str) -> list[Path]:
    return [dg.image(sd.disk, name, sd.idx) for sd in dg.catalog.subdisks(name)]


def _disk_free(dg: DiskGroup, disk: str) -> int:
    st = os.statvfs(dg.disk_dir(disk))
    return st.f_bavail * st.f_frsize


def _write_direct(path: Path, nbytes: int) -> None:
    """Write ``nbytes`` of non-zero data with O_DIRECT (the page cache defers nothing) and fsync."""
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={nbytes // MiB}", "oflag=direct",
                    "conv=fsync", "status=none"], check=True)


def _info(env, name: str) -> dict:
    return json.loads(env.cli("--json", "vol", "info", name).stdout)


def test_thick_make_allocates_every_image_and_thin_stays_sparse(env, dg):
    env.cli("vol", "make", "thin1", "1g")
    env.cli("vol", "make", "thick1", "1g", "provisioning=thick")
    env.cli("vol", "make", "thickm", "400m", "layout=mirror", "provisioning=thick")
    for name, size in (("thick1", GiB), ("thickm", 400 * MiB)):
        imgs = _images(dg, name)
        assert imgs and all(_allocated(p) >= size for p in imgs), [(p, _allocated(p)) for p in imgs]
        assert _info(env, name)["provisioning"] == "thick"
    (thin,) = _images(dg, "thin1")
    assert _allocated(thin) < 100 * MiB, _allocated(thin)  # what mkfs wrote, no more
    assert _info(env, "thin1")["provisioning"] == "thin"
    listed = {r["name"]: r["provisioning"] for r in json.loads(env.cli("--json", "vol", "list").stdout)}
    assert listed == {"thin1": "thin", "thick1": "thick", "thickm": "thick"}
    table = env.cli("vol", "list").stdout.splitlines()
    assert "PROV" in table[0].split() and any(line.split()[:1] == ["thick1"] and "thick" in line.split()
                                              for line in table[1:]), table
    assert "provisioning: thick" in env.cli("vol", "info", "thick1").stdout


@pytest.mark.parametrize("provisioning", ["thin", "thick"])
def test_first_writes_take_room_from_the_disk_only_when_thin(env, dg, provisioning):
    """512 MiB written with direct I/O into a fresh volume: the disk's free space drops by that much for
    a thin volume, and by next to nothing (XFS's metadata) for a thick one."""
    volumes.make(dg, "w1", "1g", provisioning=provisioning)
    (sd,) = dg.catalog.subdisks("w1")
    mp = volumes.mount(dg, "w1")
    try:
        before = _disk_free(dg, sd.disk)
        _write_direct(mp / "big", 512 * MiB)
        taken = before - _disk_free(dg, sd.disk)
    finally:
        volumes.umount(dg, "w1")
    if provisioning == "thick":
        assert abs(taken) < 8 * MiB, taken
    else:
        assert taken > 500 * MiB, taken


def test_thick_grow_allocates_the_added_range(env, dg):
    volumes.make(dg, "g1", "400m", provisioning="thick")
    volumes.mount(dg, "g1")
    try:
        volumes.grow(dg, "g1", "1g")  # online
    finally:
        volumes.umount(dg, "g1")
    (img,) = _images(dg, "g1")
    assert _allocated(img) >= GiB, _allocated(img)
    volumes.grow(dg, "g1", "1200m")  # offline
    assert _allocated(img) >= 1200 * MiB, _allocated(img)
    volumes.make(dg, "g2", "400m")  # thin grows stay sparse
    volumes.grow(dg, "g2", "1g")
    (img2,) = _images(dg, "g2")
    assert _allocated(img2) < 100 * MiB, _allocated(img2)


def _fill(dg: DiskGroup, leave: int) -> list[Path]:
    """Take all but ``leave`` bytes of every disk's filesystem with a file the accounting knows nothing of
    (as other files on a directory disk, or snapshots' changes past their caches would)."""
    junk = []
    for d in dg.catalog.disks():
        p = dg.disk_dir(d.name) / "junk.fill"
        with open(p, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, _disk_free(dg, d.name) - leave)
        junk.append(p)
    return junk


def test_thick_make_the_disk_cannot_hold_fails_cleanly(env, dg):
    junk = _fill(dg, 600 * MiB)
    try:
        assert all(n > GiB for n in dg.free().values())  # the accounting says yes
        mine = str(env.root) + "/"
        loops = sorted(b for b in loop.attached().values() if b.startswith(mine))
        free = {d.name: _disk_free(dg, d.name) for d in dg.catalog.disks()}
        with pytest.raises(NoSpace, match="cannot allocate 1 GiB for a thick volume.*provisioning=thin"):
            volumes.make(dg, "t1", "1g", provisioning="thick")
        assert dg.catalog.volumes() == [] and dg.catalog.intents() == [] and dg.catalog.subdisks() == []
        assert sorted(dg.root.glob("disks/*/vols/*")) == []
        assert sorted(b for b in loop.attached().values() if b.startswith(mine)) == loops
        after = {d.name: _disk_free(dg, d.name) for d in dg.catalog.disks()}
        assert all(abs(after[n] - free[n]) < 4 * MiB for n in free), (free, after)
        proc = env.cli("vol", "make", "t2", "1g", "provisioning=thick", check=False)
        assert proc.returncode != 0 and "cannot allocate" in proc.stderr, proc
        # a thick grow the disk cannot hold is refused before anything is recorded
        volumes.make(dg, "g1", "400m", provisioning="thick")
        with pytest.raises(NoSpace, match="needed to grow thick volume g1"):
            volumes.grow(dg, "g1", "1200m")
        assert dg.catalog.volume("g1").size == 400 * MiB and dg.catalog.intents() == []  # type: ignore[union-attr]
        assert [sd.size for sd in dg.catalog.subdisks("g1")] == [400 * MiB]
        volumes.remove(dg, "g1")
        volumes.make(dg, "t3", "1g")  # thin: the accounting decides, as before
    finally:
        for p in junk:
            p.unlink()


def test_snapshot_of_a_thick_volume_shares_its_extents(env, dg):
    """The clone shares every written extent (FIEMAP); XFS maps the source's allocated-but-unwritten
    extents into the clone as holes, so the snapshot takes no room from the disk and its cache use is ~0,
    while the source keeps its allocation (its first writes there still allocate nothing, and need no
    copy-on-write: nothing shares those extents)."""
    volumes.make(dg, "src", "1g", provisioning="thick")
    (sd,) = dg.catalog.subdisks("src")
    mp = volumes.mount(dg, "src")
    try:
        _write_direct(mp / "data", 200 * MiB)
        before = _disk_free(dg, sd.disk)
        snapshots.make(dg, "src", "s1")
        assert abs(before - _disk_free(dg, sd.disk)) < 4 * MiB, (before, _disk_free(dg, sd.disk))
        (img,) = _images(dg, "s1")
        (src_img,) = _images(dg, "src")
        assert reflink.unshared_bytes(img) < MiB, reflink.unshared_bytes(img)
        # what the source shares with it is at least the data written
        shared = _allocated(src_img) - reflink.unshared_bytes(src_img)
        assert shared >= 200 * MiB, shared
        assert _allocated(src_img) >= GiB  # still thick
        info = volumes.info(dg, "s1")
        assert info["cache_used"] < MiB and info["provisioning"] == "thick", info
        assert dg.catalog.subdisks("s1")[0].reserved == info["cachesize"]  # its cache, not its size
        _write_direct(mp / "more", 64 * MiB)  # the source's new writes land in its own allocation
        assert abs(before - _disk_free(dg, sd.disk)) < 8 * MiB
        assert reflink.unshared_bytes(img) < MiB
    finally:
        volumes.umount(dg, "src")


def test_the_config_default_applies_and_an_option_beats_it(env, dg):
    with env.config_path.open("a") as fh:
        fh.write("[volume]\nprovisioning = thick\n")
    env.cli("vol", "make", "d1", "400m")
    env.cli("vol", "make", "d2", "400m", "provisioning=thin")
    assert (_info(env, "d1")["provisioning"], _info(env, "d2")["provisioning"]) == ("thick", "thin")
    assert _allocated(_images(dg, "d1")[0]) >= 400 * MiB
    assert _allocated(_images(dg, "d2")[0]) < 100 * MiB


def test_bad_provisioning_is_refused_and_changes_nothing(env, dg):
    mine = str(env.root) + "/"
    loops = sorted(b for b in loop.attached().values() if b.startswith(mine))
    proc = env.cli("vol", "make", "b1", "400m", "provisioning=fat", check=False)
    assert proc.returncode == 2 and "provisioning must be thin or thick" in proc.stderr, proc
    text = env.config_path.read_text()
    env.config_path.write_text(text + "[volume]\nprovisioning = sparse\n")
    proc = env.cli("vol", "make", "b2", "400m", check=False)
    assert proc.returncode == 2 and "volume.provisioning = 'sparse' is not one of thin, thick" in proc.stderr, proc
    env.config_path.write_text(text)
    assert json.loads(env.cli("--json", "vol", "list").stdout) == []
    assert sorted(dg.root.glob("disks/*/vols/*")) == []
    assert sorted(b for b in loop.attached().values() if b.startswith(mine)) == loops


def test_repair_of_a_thick_mirror_allocates_the_new_copy(env):
    from tests.integration.test_mirror_repair import lose_disk

    dg = env.make_dg(ndisks=3)
    try:
        volumes.make(dg, "m1", "500m", layout="mirror", provisioning="thick")
        lose_disk(dg, dg.catalog.subdisks("m1")[0].disk)
    finally:
        dg.close()
    dg = env.open()
    try:
        volumes.repair(dg, "m1")
        imgs = _images(dg, "m1")
        assert len(imgs) == 2 and all(_allocated(p) >= 500 * MiB for p in imgs), [_allocated(p) for p in imgs]
    finally:
        dg.close()


@pytest.mark.parametrize("killed_at", ["make.images", "make.detached"])
def test_a_thick_make_killed_midway_is_rolled_back_and_made_again_in_full(env, dg, killed_at):
    """Killed after allocating (before mkfs), or after mkfs discarded the allocation: the next make of the
    name rolls the half-made one back, frees its room, and makes a fully allocated volume."""
    died = env.cli("vol", "make", "k1", "1g", "provisioning=thick", check=False, env={"VERITAS_CRASH_AT": killed_at})
    assert died.returncode == -9, died
    v = volumes.make(dg, "k1", "1g", provisioning="thick")
    assert v.state == "ok" and v.provisioning == "thick"
    (img,) = _images(dg, "k1")
    assert _allocated(img) >= GiB, _allocated(img)
    assert sorted(dg.root.glob("disks/*/vols/*")) == [img]
    assert dg.catalog.intents() == []
