"""A mount point belongs to exactly one volume on the host.

``<mount_root>/<volume>_<diskgroup>`` collides across disk groups: volume ``a_b`` of disk group ``c`` and
volume ``a`` of ``b_c`` both map to ``a_b_c``. ``make`` refuses the second name; and since a collision
can still arise (two state roots sharing a mount root, disk groups made before this check), a volume
counts as mounted only when its own device is mounted there, and nothing unmounts another's mount.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import diskgroup, doctor, snapshots, volumes
from storage.config import Config, load_config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.errors import InUse
from storage.kernel import loop, mounts


def _dg(config: Config, root: Path, name: str, size: str = "2g", ndisks: int = 1) -> DiskGroup:
    (root / "disks").mkdir(exist_ok=True)
    specs = [DiskSpec.parse(f"{root}/disks/{config.state_root.name}-{name}-{i}.img={size}") for i in range(ndisks)]
    return diskgroup.init(config, name, specs)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _state(dg: DiskGroup) -> tuple[Any, ...]:
    """What a refused call must leave unchanged: catalog rows, image files, and the loop devices and
    mounts under the test's root (other tests run beside this one)."""
    root = str(dg.config.state_root.parent) + "/"
    files = sorted(str(p) for d in dg.catalog.disks() for p in (dg.disk_dir(d.name) / "vols").glob("*"))
    return ([v.name for v in dg.catalog.volumes()], [i.key for i in dg.catalog.intents()], files,
            sorted(d for d, b in loop.attached().items() if b.startswith(root)),
            sorted(e.target for e in mounts.table() if e.target.startswith(root)))


@pytest.fixture
def second(env: Any) -> Iterator[Config]:
    """A second state root with the same mount root as ``env`` (two instances, one mount root)."""
    path = env.root / "second.conf"
    path.write_text(env.config_path.read_text().replace(f"{env.root}/state", f"{env.root}/state2"))
    cfg = load_config(path)
    assert cfg.mount_root == env.config.mount_root and cfg.state_root != env.config.state_root
    try:
        yield cfg
    finally:
        for name in diskgroup.list_names(cfg):
            g = diskgroup.open_dg(cfg, name)
            for v in g.catalog.volumes():
                for m in g.catalog.mounts(v.name):
                    g.catalog.remove_mount(v.name, m.node, m.mount_id)
            diskgroup.destroy(g, force=True)


def test_make_refuses_a_mount_point_another_disk_group_has(env: Any) -> None:
    c, b_c = _dg(env.config, env.root, "c"), _dg(env.config, env.root, "b_c")
    try:
        volumes.make(c, "a_b", "400m")
        before = _state(b_c)
        with pytest.raises(InUse, match=r"mount point of volume a_b of disk group c"):
            volumes.make(b_c, "a", "400m")
        assert _state(b_c) == before
        volumes.make(b_c, "src", "400m")
        before = _state(b_c)
        with pytest.raises(InUse, match=r"mount point of volume a_b of disk group c"):
            snapshots.make(b_c, "src", "a")  # a snapshot is a volume with a mount point too
        assert _state(b_c) == before
        # the other way round
        volumes.make(b_c, "q", "400m")  # q_b_c: claimed by nothing in c
        with pytest.raises(InUse, match=r"volume q of disk group b_c"):
            volumes.make(c, "q_b", "400m")
        before = _state(c)
        with pytest.raises(InUse, match=r"mount point of volume q of disk group b_c"):
            snapshots.make(c, "a_b", "q_b")
        assert _state(c) == before
        # through the CLI: exit code of InUse, the message names the volume
        proc = env.cli("vol", "make", "-g", "c", "q_b", "400m", check=False)
        assert proc.returncode == InUse.exit_code and "volume q of disk group b_c" in proc.stderr, proc.stderr
        assert c.catalog.volume("q_b") is None
        volumes.mount(c, "a_b")
        assert volumes.info(c, "a_b")["mounted"] is True
        volumes.umount(c, "a_b")
    finally:
        c.close()
        b_c.close()


def test_make_refuses_a_mount_point_that_holds_a_mount(env: Any, dg: DiskGroup) -> None:
    mp = dg.mountpoint("busy")
    mp.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mp)], check=True)
    try:
        before = _state(dg)
        with pytest.raises(InUse, match=r"already has tmpfs \(tmpfs\) mounted"):
            volumes.make(dg, "busy", "400m")
        assert _state(dg) == before
    finally:
        subprocess.run(["umount", str(mp)], check=True)


def test_another_volume_at_the_mount_point_is_not_this_volume(env: Any, second: Config) -> None:
    """Two state roots share the mount root: a_b of c (first) is mounted at a_b_c; volume a of b_c
    (second) must not count a_b's mount as its own: mount refuses, info and list say unmounted, and
    unmount, remove and doctor --repair of b_c leave a_b's mount alone."""
    c, b_c = _dg(env.config, env.root, "c"), _dg(second, env.root, "b_c")
    try:
        volumes.make(c, "a_b", "400m")
        volumes.make(b_c, "a", "400m")  # allowed: c lives under another state root, a_b is not mounted
        mp = volumes.mount(c, "a_b")
        assert mp == b_c.mountpoint("a")
        _write(mp / "owner", b"a_b")

        with pytest.raises(InUse, match=r"not this volume"):
            volumes.mount(b_c, "a", "ctr1")
        assert b_c.catalog.mounts("a") == []
        assert not volumes.is_mounted(b_c, "a")
        info = volumes.info(b_c, "a")
        assert (info["mounted"], info["used"]) == (False, None)
        assert [r["mounted"] for r in volumes.list_volumes(b_c)] == [False]
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["python3", "-m", "storage.cli", *args], capture_output=True, text=True,
                                  env={**os.environ, "VERITAS_CONFIG": str(second.source)}, check=False,
                                  cwd=Path(__file__).resolve().parents[2])

        proc = cli("vol", "mount", "-g", "b_c", "a")  # the reported answer was success
        assert proc.returncode == InUse.exit_code and "not this volume" in proc.stderr, proc
        proc = cli("--json", "vol", "info", "-g", "b_c", "a")
        assert proc.returncode == 0 and json.loads(proc.stdout)["mounted"] is False, proc
        assert volumes.is_mounted(c, "a_b") and volumes.info(c, "a_b")["mounted"] is True

        # doctor of b_c: reports the foreign mount at a's mount point, touches nothing of c
        found = doctor.check(b_c, repair=True)
        assert [(f.kind, f.fixed) for f in found] == [("foreign-mount", False)], found
        assert "volume a_b of disk group c" not in found[0].detail  # c is not under b_c's state root
        volumes.umount(b_c, "a")
        volumes.remove(b_c, "a", force=True)
        assert volumes.is_mounted(c, "a_b") and (mp / "owner").read_bytes() == b"a_b"
        assert doctor.check(c) == []
        volumes.umount(c, "a_b")
    finally:
        c.close()
        b_c.close()


def test_doctor_repair_leaves_another_disk_groups_mounts(env: Any) -> None:
    """b_c has no volume a; the mount at a_b_c is c's volume a_b. doctor --repair of b_c keeps it."""
    c, b_c = _dg(env.config, env.root, "c"), _dg(env.config, env.root, "b_c")
    try:
        volumes.make(c, "a_b", "400m")
        volumes.make(b_c, "other", "400m")
        mp = volumes.mount(c, "a_b")
        _write(mp / "f", b"data")
        assert doctor.check(b_c) == []
        assert doctor.check(b_c, repair=True) == []
        proc = env.cli("doctor", "-g", "b_c", "--repair")
        assert proc.stdout.strip() == "no problems found"
        assert volumes.is_mounted(c, "a_b") and (mp / "f").read_bytes() == b"data"
        assert doctor.check(c) == []
        volumes.umount(c, "a_b")
    finally:
        c.close()
        b_c.close()


def test_btrfs_mirror_counts_as_mounted_by_its_members(env: Any) -> None:
    """A btrfs mount shows an anonymous device number: a redundant volume is known by its members."""
    g = _dg(env.config, env.root, "m", size="2g", ndisks=2)
    try:
        volumes.make(g, "mir", "400m", layout="mirror")
        mp = volumes.mount(g, "mir")
        entry = mounts.mounted_at(mp)
        assert entry is not None and entry.fstype == "btrfs" and entry.major_minor.startswith("0:")
        assert volumes.is_mounted(g, "mir") and volumes.info(g, "mir")["mounted"] is True
        assert volumes.list_volumes(g)[0]["mounted"] is True
        assert doctor.check(g) == []
        assert volumes.umount(g, "mir") is True
        assert not volumes.is_mounted(g, "mir")
    finally:
        g.close()
