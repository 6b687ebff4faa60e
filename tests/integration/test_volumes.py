"""Volumes and the disk groups that hold them, as a user drives them: library calls and the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from storage import diskgroup, snapshots, volumes
from storage.errors import InUse, InvalidArgument, NoSpace, Unsupported
from storage.kernel import loop, mounts
from storage.units import GiB, MiB


def under(env, what: str) -> list[str]:
    """Loop devices (backing files) or mount points under the test's private root."""
    prefix = str(env.root) + "/"
    if what == "loops":
        return sorted(b for b in loop.attached().values() if b.startswith(prefix))
    return sorted(e.target for e in mounts.table() if e.target.startswith(prefix))


def image_loops(dg, name: str) -> list[str]:
    return [d for p in volumes.images(dg, dg.catalog.volume(name)) for d in loop.find(p)]


def cli_json(env, *args: str):
    return json.loads(env.cli("--json", *args).stdout)


# ------------------------------------------------------------------ mount counting


def test_mount_is_counted_per_mount_id(env, dg):
    volumes.make(dg, "v1", "400m")
    mp = volumes.mount(dg, "v1", "idA")
    assert volumes.mount(dg, "v1", "idB") == mp
    assert {m["mount_id"] for m in volumes.info(dg, "v1")["mounts"]} == {"idA", "idB"}
    (mp / "f").write_text("data")

    assert volumes.umount(dg, "v1", "idA") is False
    assert mounts.mounted_at(mp) is not None, "unmounting one ID unmounted a volume another ID uses"
    assert (mp / "f").read_text() == "data"
    assert image_loops(dg, "v1")

    assert volumes.umount(dg, "v1", "idB") is True
    assert mounts.mounted_at(mp) is None
    assert image_loops(dg, "v1") == []
    assert volumes.info(dg, "v1")["mounts"] == []


def test_umount_of_unknown_id_is_harmless(env, dg):
    volumes.make(dg, "v1", "400m")
    volumes.umount(dg, "v1", "never-mounted")  # not mounted at all
    assert volumes.info(dg, "v1")["mounted"] is False
    mp = volumes.mount(dg, "v1", "idA")
    assert volumes.umount(dg, "v1", "stranger") is False
    assert mounts.mounted_at(mp) is not None
    assert [m["mount_id"] for m in volumes.info(dg, "v1")["mounts"]] == ["idA"]
    env.cli("vol", "umount", "v1", "--id", "another-stranger")
    assert mounts.mounted_at(mp) is not None
    assert volumes.umount(dg, "v1", "idA") is True
    assert mounts.mounted_at(mp) is None


# ------------------------------------------------------------------ remove, protect, grow


@pytest.mark.parametrize("argv, killed_at", [
    (["vol", "make", "-g", "testdg", "x", "300m"], "make.mkfs"),
    (["vol", "rm", "-g", "testdg", "x"], "rm.detached"),
    (["snap", "make", "-g", "testdg", "src", "x"], "snap.cloned"),
])
def test_make_in_a_long_open_disk_group_finishes_a_killed_operation_on_the_name(env, dg, argv, killed_at):
    """A disk group opened before another process was killed mid-operation on a name (the plugin keeps
    one open) recovers that operation when the name is made again, instead of refusing it or, worse,
    counting the half-made volume as made."""
    volumes.make(dg, "src", "300m")
    if argv[1] == "rm":
        volumes.make(dg, "x", "300m")
    died = env.cli(*argv, check=False, env={"VERITAS_CRASH_AT": killed_at})
    assert died.returncode == -9, died
    assert dg.catalog.volume("x").state in ("creating", "removing")

    snap = argv[0] == "snap"
    v = snapshots.make(dg, "src", "x") if snap else volumes.make(dg, "x", "300m")
    assert v.state == "ok" and v.snapshot_of == ("src" if snap else None)
    mp = volumes.mount(dg, "x")
    (mp / "f").write_text("ok")
    volumes.umount(dg, "x")
    volumes.remove(dg, "x")
    volumes.remove(dg, "src")
    assert dg.catalog.intents() == [] and dg.catalog.volume("x") is None
    assert [b for b in under(env, "loops") if "/vols/" in b] == []  # no volume image left attached


def test_rm_refused_while_mounted(env, dg):
    volumes.make(dg, "v1", "400m")
    mp = volumes.mount(dg, "v1")
    with pytest.raises(InUse, match="mounted"):
        volumes.remove(dg, "v1")
    assert dg.catalog.volume("v1") is not None and mounts.mounted_at(mp) is not None
    proc = env.cli("vol", "rm", "v1", check=False)
    assert proc.returncode == InUse.exit_code and "mounted" in proc.stderr
    assert dg.catalog.volume("v1") is not None and mounts.mounted_at(mp) is not None
    volumes.umount(dg, "v1")
    volumes.remove(dg, "v1")
    assert dg.catalog.volume("v1") is None


def test_rm_refused_while_it_has_snapshots(env, dg):
    volumes.make(dg, "v1", "400m")
    snapshots.make(dg, "v1", "snapA")
    snapshots.make(dg, "v1", "snapB")
    with pytest.raises(InUse, match=r"snapA.*snapB|snapB.*snapA"):
        volumes.remove(dg, "v1")
    proc = env.cli("vol", "rm", "v1", check=False)
    assert proc.returncode != 0 and "snapA" in proc.stderr and "snapB" in proc.stderr
    assert {v.name for v in dg.catalog.volumes()} == {"v1", "snapA", "snapB"}
    assert all(p.exists() for p in volumes.images(dg, dg.catalog.volume("v1")))
    volumes.remove(dg, "snapA")
    volumes.remove(dg, "snapB")
    volumes.remove(dg, "v1")
    assert dg.catalog.volumes() == []


def test_protected_volume_needs_force(env, dg):
    volumes.make(dg, "keep", "400m", protect="true")
    assert volumes.info(dg, "keep")["protect"] is True
    with pytest.raises(InUse, match="protected.*--force"):
        volumes.remove(dg, "keep")
    proc = env.cli("vol", "rm", "keep", check=False)
    assert proc.returncode != 0 and "protected" in proc.stderr
    assert dg.catalog.volume("keep") is not None
    env.cli("vol", "rm", "keep", "--force")
    assert dg.catalog.volume("keep") is None


def test_grow_refuses_shrink(env, dg):
    volumes.make(dg, "v1", "500m")
    free = dg.free()
    with pytest.raises(InvalidArgument, match=r"is [\d.]+ [MG]iB; it cannot shrink to [\d.]+ [MG]iB"):
        volumes.grow(dg, "v1", "400m")
    proc = env.cli("vol", "grow", "v1", "300m", check=False)
    assert proc.returncode != 0 and "shrink" in proc.stderr
    assert dg.catalog.volume("v1").size == 500 * MiB
    assert dg.free() == free
    assert all(p.stat().st_size == 500 * MiB for p in volumes.images(dg, dg.catalog.volume("v1")))


# ------------------------------------------------------------------ list and info


def test_list_shows_every_volume(env, dg):
    volumes.make(dg, "a1", "400m")
    volumes.make(dg, "b2", "400m", layout="mirror")
    snapshots.make(dg, "a1", "a1snap")
    volumes.mount(dg, "b2")
    rows = {r["name"]: r for r in volumes.list_volumes(dg)}
    assert set(rows) == {"a1", "b2", "a1snap"}
    assert rows["b2"]["mounted"] and not rows["a1"]["mounted"]
    assert rows["a1snap"]["snapshot_of"] == "a1"
    assert rows["b2"]["layout"] == "mirror" and rows["b2"]["fstype"] == "btrfs"
    cli_rows = {r["name"]: r for r in cli_json(env, "vol", "list")}
    assert set(cli_rows) == {"a1", "b2", "a1snap"} and cli_rows["b2"]["mounted"]
    text = env.cli("vol", "list").stdout
    for name in ("a1", "b2", "a1snap", str(dg.mountpoint("b2"))):
        assert name in text
    volumes.umount(dg, "b2")


def test_info_reports_used_mounted_and_devices(env, dg):
    volumes.make(dg, "v1", "500m")
    i = volumes.info(dg, "v1")
    assert i["mounted"] is False and i["devices"] == [] and i["used"] is None
    assert i["size"] == 500 * MiB and i["layout"] == "concat" and i["health"] == "ok"
    mp = volumes.mount(dg, "v1")
    i = volumes.info(dg, "v1")
    assert i["mounted"] is True and i["mountpoint"] == str(mp)
    assert len(i["devices"]) == 1 and i["devices"][0].startswith("/dev/loop")
    assert loop.attached()[i["devices"][0]] == i["subdisks"][0]["image"]
    used0 = i["used"]
    assert isinstance(used0, int) and used0 > 0
    with open(mp / "big", "wb") as fh:
        fh.write(os.urandom(40 * MiB))
        os.fsync(fh.fileno())
    used1 = volumes.info(dg, "v1")["used"]
    assert used1 >= used0 + 38 * MiB
    cli = cli_json(env, "vol", "info", "v1")
    assert cli["mounted"] is True and cli["devices"] == i["devices"] and cli["used"] >= used1 - MiB
    volumes.umount(dg, "v1")


# ------------------------------------------------------------------ layouts


def test_auto_layout_mirrors_with_two_disks_with_room(env, dg):
    rec = volumes.make(dg, "v1", "500m", layout="auto")
    assert rec.layout == "mirror" and rec.fstype == "btrfs"
    disks = [sd.disk for sd in dg.catalog.subdisks("v1")]
    assert len(set(disks)) == 2


def test_auto_layout_concat_on_one_disk(env):
    one = env.make_dg("onedg", ndisks=1)
    try:
        rec = volumes.make(one, "v1", "500m", layout="auto")
        assert rec.layout == "concat" and rec.fstype == "xfs"
        # and on two disks of which only one has room for the request
        one.add_disks([diskgroup.DiskSpec(env.disk_image("small"), GiB)])
        assert sorted(one.free().values())[0] < 2 * GiB
        rec = volumes.make(one, "v2", "2g", layout="auto")
        assert rec.layout == "concat"
    finally:
        one.close()


def test_auto_layout_with_too_little_space(env, dg):
    free = dg.free()
    too_big = max(free.values()) + 100 * MiB
    with pytest.raises(NoSpace):
        volumes.make(dg, "huge", too_big, layout="auto")
    assert dg.catalog.volumes() == [] and dg.free() == free
    assert not [p for d in free for p in (dg.disk_dir(d) / "vols").iterdir()]


def test_raid5_refused_pointing_at_mirror(env, dg):
    with pytest.raises(Unsupported, match="layout=mirror"):
        volumes.make(dg, "r5", "500m", layout="raid5")
    proc = env.cli("vol", "make", "r5", "500m", "layout=raid5", check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("veritas: error:") and "mirror" in proc.stderr
    assert dg.catalog.volumes() == []


# ------------------------------------------------------------------ disk groups


def sparse(path: Path) -> bool:
    st = path.stat()
    return st.st_blocks * 512 < st.st_size // 4


def test_dg_init_list_info_adddisk(env):
    d = env.root / "disks"
    d.mkdir()
    env.cli("dg", "init", "g1", f"{d}/a.img=1g", f"{d}/b.img=1g")
    env.cli("dg", "init", "g2", f"{d}/c.img", "--size", "1g")
    for name in ("a", "b", "c"):
        img = d / f"{name}.img"
        assert img.stat().st_size == GiB and sparse(img), img
    groups = {g["name"]: g for g in cli_json(env, "dg", "list")}
    assert set(groups) == {"g1", "g2"}
    assert len(groups["g1"]["disks"]) == 2 and len(groups["g2"]["disks"]) == 1
    assert groups["g1"]["imported_on"] == env.config.node
    assert "g1" in env.cli("dg", "list").stdout

    info = cli_json(env, "dg", "info", "g1")
    assert [x["state"] for x in info["disks"]] == ["online", "online"]
    assert {x["source"] for x in info["disks"]} == {f"{d}/a.img", f"{d}/b.img"}
    assert all(0 < x["free"] <= x["size"] < GiB for x in info["disks"])
    assert f"{d}/a.img" in env.cli("dg", "info", "g1").stdout

    env.cli("dg", "adddisk", "g1", f"{d}/e.img=1g")
    after = cli_json(env, "dg", "info", "g1")
    assert len(after["disks"]) == 3 and after["free"] > info["free"]
    # every disk is a mounted XFS, usable for a 3-way mirror
    env.cli("vol", "make", "-g", "g1", "m3", "300m", "layout=mirror", "nmirror=3")
    g1 = diskgroup.open_dg(env.config, "g1")
    try:
        assert len({sd.disk for sd in g1.catalog.subdisks("m3")}) == 3
    finally:
        g1.close()


def test_dg_destroy_refused_while_volumes_exist(env):
    d = env.root / "disks"
    d.mkdir()
    env.cli("dg", "init", "g1", f"{d}/a.img=1g", f"{d}/b.img=1g")
    env.cli("vol", "make", "-g", "g1", "alpha", "300m")
    env.cli("vol", "make", "-g", "g1", "beta", "300m", "layout=mirror")
    env.cli("vol", "mount", "-g", "g1", "alpha")
    proc = env.cli("dg", "destroy", "g1", check=False)
    assert proc.returncode == InUse.exit_code
    assert "alpha" in proc.stderr and "beta" in proc.stderr and "--force" in proc.stderr
    assert "g1" in diskgroup.list_names(env.config)
    assert {r["name"] for r in cli_json(env, "vol", "list", "-g", "g1")} == {"alpha", "beta"}

    env.cli("dg", "destroy", "g1", "--force")
    assert "g1" not in diskgroup.list_names(env.config)
    assert not (env.config.dg_parent / "g1").exists()
    assert under(env, "loops") == [] and under(env, "mounts") == []


def test_dg_deport_and_import(env):
    d = env.root / "disks"
    d.mkdir()
    env.cli("dg", "init", "g1", f"{d}/a.img=1g", f"{d}/b.img=1g")
    env.cli("vol", "make", "-g", "g1", "v1", "300m")
    env.cli("vol", "make", "-g", "g1", "m1", "300m", "layout=mirror")
    mp = Path(cli_json(env, "vol", "mount", "-g", "g1", "v1")["mountpoint"])
    payload = os.urandom(MiB)
    with open(mp / "data", "wb") as fh:
        fh.write(payload)
        os.fsync(fh.fileno())

    proc = env.cli("dg", "deport", "g1", check=False)
    assert proc.returncode == InUse.exit_code and "v1" in proc.stderr and "unmount" in proc.stderr
    assert mounts.mounted_at(mp) is not None

    env.cli("vol", "umount", "-g", "g1", "v1")
    env.cli("dg", "deport", "g1")
    assert under(env, "mounts") == [], "deport left disks or volumes mounted"
    assert under(env, "loops") == [], "deport left loop devices attached"
    assert cli_json(env, "dg", "info", "g1")["imported_on"] is None
    for args in (("vol", "mount", "-g", "g1", "v1"), ("vol", "make", "-g", "g1", "v2", "300m"),
                 ("vol", "rm", "-g", "g1", "m1")):
        proc = env.cli(*args, check=False)
        assert proc.returncode != 0 and "veritas dg import g1" in proc.stderr, (args, proc.stderr)
    assert under(env, "mounts") == [] and under(env, "loops") == []

    env.cli("dg", "import", "g1")
    info = cli_json(env, "dg", "info", "g1")
    assert info["imported_on"] == env.config.node and {x["state"] for x in info["disks"]} == {"online"}
    assert len(under(env, "mounts")) == 2
    mp = Path(cli_json(env, "vol", "mount", "-g", "g1", "v1")["mountpoint"])
    assert (mp / "data").read_bytes() == payload
    env.cli("vol", "umount", "-g", "g1", "v1")
    env.cli("vol", "mount", "-g", "g1", "m1")
    env.cli("vol", "umount", "-g", "g1", "m1")


def test_embedded_default_dg_is_created_on_first_make(env):
    assert diskgroup.list_names(env.config) == []
    info = cli_json(env, "vol", "make", "v1", "500m")
    assert info["diskgroup"] == env.config.diskgroup
    images = sorted((env.config.state_root / "images").iterdir())
    assert len(images) == env.config.default_disk_count == 3
    for img in images:
        assert img.stat().st_size == env.config.default_disk_size and sparse(img)
    dgs = cli_json(env, "dg", "list")
    assert [g["name"] for g in dgs] == [env.config.diskgroup]
    assert sorted(x["source"] for x in dgs[0]["disks"]) == [str(p) for p in images]
    # a second make uses the same disk group
    env.cli("vol", "make", "v2", "500m")
    assert diskgroup.list_names(env.config) == [env.config.diskgroup]
    assert sorted((env.config.state_root / "images").iterdir()) == images
    assert {r["name"] for r in cli_json(env, "vol", "list")} == {"v1", "v2"}


def _head(p: Path) -> tuple[int, int, str]:
    """Size, inode and a digest of the first MiB (where the disk's XFS superblock and log start)."""
    with open(p, "rb") as fh:
        return p.stat().st_size, p.stat().st_ino, hashlib.sha256(fh.read(1 << 20)).hexdigest()


def test_embedded_default_is_not_remade_over_images_whose_catalog_is_lost(env):
    """A default disk image holding a filesystem while its disk group has no catalog may hold volumes:
    the next use refuses, naming the image, and the image stays as it was. An init killed before it
    published its catalog (catalog.db.new left) is discarded and made again."""
    env.cli("vol", "make", "v1", "500m")
    dgname = env.config.diskgroup
    env.cli("dg", "deport", dgname)
    shutil.rmtree(env.config.dg_parent / dgname)  # the catalog is lost; the disk images remain
    images = sorted((env.config.state_root / "images").iterdir())
    before = {p: _head(p) for p in images}
    proc = env.cli("vol", "make", "v2", "500m", check=False)
    assert proc.returncode != 0 and "holds a filesystem" in proc.stderr and str(images[0]) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: _head(p) for p in images} == before
    assert diskgroup.list_names(env.config) == [] and under(env, "loops") == []
    # an interrupted init: its marker makes the leftovers discardable
    (env.config.dg_parent / dgname).mkdir(parents=True)
    (env.config.dg_parent / dgname / "catalog.db.new").write_bytes(b"")
    env.cli("vol", "make", "v2", "500m")
    assert {r["name"] for r in cli_json(env, "vol", "list")} == {"v2"}


def _nothing_left(env, before_files: set[Path], name: str) -> None:
    assert not (env.config.dg_parent / name).exists()
    assert name not in diskgroup.list_names(env.config)
    assert under(env, "loops") == [] and under(env, "mounts") == []
    assert set((env.root / "disks").iterdir()) == before_files


def test_dg_init_refusals_leave_nothing_behind(env):
    d = env.root / "disks"
    d.mkdir()
    fsimg = d / "has-fs.img"
    with open(fsimg, "wb") as fh:
        fh.truncate(GiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fsimg)], check=True, capture_output=True)
    before = set(d.iterdir())

    proc = env.cli("dg", "init", "g1", str(fsimg), check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr and "filesystem" in proc.stderr
    _nothing_left(env, before, "g1")
    blkid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(fsimg)], capture_output=True,
                           text=True, check=False)
    assert blkid.stdout.strip() == "ext4", "a refused init touched the disk"

    # a new image first, then the one holding a filesystem: the new one must not be left formatted
    proc = env.cli("dg", "init", "g1", f"{d}/new.img=1g", str(fsimg), check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr
    _nothing_left(env, before, "g1")

    proc = env.cli("dg", "init", "g1", "relative.img=1g", check=False)
    assert proc.returncode != 0 and "absolute" in proc.stderr
    assert proc.stderr.startswith("veritas: error:")
    _nothing_left(env, before, "g1")
    assert not (Path(__file__).resolve().parents[2] / "relative.img").exists()

    proc = env.cli("dg", "init", "g1", f"{d}/missing.img", check=False)
    assert proc.returncode != 0 and "size" in proc.stderr
    _nothing_left(env, before, "g1")

    env.cli("dg", "init", "g1", str(fsimg), "--force")
    assert cli_json(env, "dg", "info", "g1")["disks"][0]["state"] == "online"
