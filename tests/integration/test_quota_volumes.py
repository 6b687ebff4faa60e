"""fstype=none volumes: a directory on a disk's filesystem, held to its size by that filesystem's quota,
bind-mounted with no loop device and no filesystem of its own (storage.trees).

This kernel has no XFS or ext4 quotas (CONFIG_XFS_QUOTA, CONFIG_QFMT_V2 unset), so the filesystem that
holds such a volume is a btrfs with quotas enabled: here on a zram device this test makes and removes
again. Disks that cannot hold a directory to a size (veritas's own XFS disks, a host XFS, a btrfs with
quotas off) refuse fstype=none with the reason, and nothing changes.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import diskgroup, snapshots, volumes
from storage.errors import InvalidArgument, Unsupported, VeritasError
from storage.kernel import loop, mounts, qgroup
from tests.integration.conftest import Env

DG = "quotadg"
MiB = 1024 * 1024


@dataclass
class Host:
    """The host's filesystems for directory disks: btrfs with quotas enabled at ``btrfs`` (and XFS at
    ``xfs`` when asked), each on a zram device of this test's own."""

    base: Path
    btrfs: Path
    mounted: list[Path]

    def dir(self, name: str, under: Path | None = None) -> Path:
        d = (under or self.btrfs) / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def mount_new(self, dev: Path, fstype: str, name: str) -> Path:
        target = self.base / name
        target.mkdir()
        subprocess.run(["mount", "-t", fstype, str(dev), str(target)], check=True)
        self.mounted.append(target)
        return target


@pytest.fixture
def qhost(zram_devices: Callable[[int, str], list[Path]]) -> Iterator[tuple[Host, Callable[[], Path]]]:
    """A btrfs with quotas on a zram device, mounted outside the test's state root (its mounts are the
    host's, not leaks), and a maker of an XFS one; unmounted before the zram devices go."""
    base = Path(tempfile.mkdtemp(prefix="vquota-host-", dir="/tmp"))
    h = Host(base, base / "btrfs", [])
    try:
        (dev,) = zram_devices(1, "2G")
        subprocess.run(["mkfs.btrfs", "-q", "-f", str(dev)], check=True)
        h.btrfs = h.mount_new(dev, "btrfs", "btrfs")
        subprocess.run(["btrfs", "quota", "enable", str(h.btrfs)], check=True)

        def make_xfs() -> Path:
            (x,) = zram_devices(1, "1G")
            subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(x)], check=True)
            return h.mount_new(x, "xfs", "xfs")

        yield h, make_xfs
    finally:
        for t in reversed(h.mounted):
            subprocess.run(["umount", str(t)], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture
def qenv(qhost: tuple[Host, Callable[[], Path]], block_env: Env) -> tuple[Host, Callable[[], Path], Env]:
    """block_env torn down (disk groups destroyed) before the host filesystems go."""
    return qhost[0], qhost[1], block_env


def _init(e: Env, *disks: str) -> None:
    e.cli("dg", "init", DG, *disks, "--force")


def _info(e: Env, name: str) -> dict:
    return json.loads(e.cli("--json", "vol", "info", name, "-g", DG).stdout)


def _write(path: Path, nbytes: int) -> int:
    """Write ``nbytes`` of data to ``path`` (synced); the errno that stopped it, or 0."""
    chunk = os.urandom(MiB)
    try:
        with open(path, "wb") as fh:
            for _ in range(nbytes // MiB):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc.errno or -1
    return 0


def _ours_attached(e: Env, h: Host) -> list[str]:
    """Loop devices on files of the test's root or of its host filesystem (by backing device)."""
    devs = {os.stat(h.btrfs).st_dev} | {os.stat(p).st_dev for p in h.btrfs.rglob("*") if p.is_dir()}
    out = []
    for dev, back in loop.attached().items():
        ident = loop.backing_id(dev)
        if back.startswith(str(e.root) + "/") or (ident is not None and os.makedev(*ident[:2]) in devs):
            out.append(dev)
    return out


def _qgroups(fs: Path) -> set[str]:
    fsid = mounts.btrfs_fsid(fs)
    return {p.name for p in Path(f"/sys/fs/btrfs/{fsid}/qgroups").iterdir() if p.name.startswith("0_")}


def test_cli_volume_is_a_quota_limited_tree_with_no_loop_device(qenv):
    h, _xfs, e = qenv
    d1 = h.dir("d1")
    _init(e, f"{d1}=1g")
    before_qg = _qgroups(h.btrfs)
    e.cli("vol", "make", "tv", "64m", "fstype=none", "-g", DG)
    info = _info(e, "tv")
    assert info["fstype"] == "none" and info["layout"] == "concat"
    tree = Path(info["tree"])
    assert qgroup.is_subvolume(tree) and tree.resolve().parent == d1 / "vols"
    assert qgroup.usage(tree)[1] == 64 * MiB
    assert len(_qgroups(h.btrfs) - before_qg) == 1

    e.cli("vol", "mount", "tv", "-g", DG)
    mp = Path(_info(e, "tv")["mountpoint"])
    assert _info(e, "tv")["mounted"]
    assert _ours_attached(e, h) == [], "fstype=none attached a loop device"
    entry = mounts.mounted_at(mp)
    assert entry is not None and entry.fstype == "btrfs"
    assert (os.stat(mp).st_dev, os.stat(mp).st_ino) == (os.stat(tree).st_dev, os.stat(tree).st_ino)
    row = next(r for r in json.loads(e.cli("--json", "vol", "list", "-g", DG).stdout) if r["name"] == "tv")
    assert row["fstype"] == "none" and row["mounted"]

    # past its size the filesystem refuses the write
    assert _write(mp / "big", 100 * MiB) in (errno.EDQUOT, errno.ENOSPC)
    (mp / "big").unlink()
    assert _write(mp / "fits", 40 * MiB) == 0
    assert _info(e, "tv")["used"] >= 40 * MiB

    # grow raises the limit, online
    e.cli("vol", "grow", "tv", "160m", "-g", DG)
    assert qgroup.usage(tree)[1] == 160 * MiB
    assert _write(mp / "more", 80 * MiB) == 0
    assert _info(e, "tv")["size"] == 160 * MiB

    out = e.cli("doctor", "-g", DG, check=False).stdout
    assert "missing" not in out and "orphan" not in out, out

    e.cli("vol", "umount", "tv", "-g", DG)
    assert mounts.mounted_at(mp) is None and not _info(e, "tv")["mounted"]
    e.cli("vol", "mount", "tv", "-g", DG)  # data kept across unmount and mount
    assert (mp / "fits").stat().st_size == 40 * MiB
    proc = e.cli("vol", "rm", "tv", "-g", DG, check=False)
    assert proc.returncode != 0 and "mounted" in proc.stderr
    e.cli("vol", "umount", "tv", "-g", DG)
    e.cli("vol", "rm", "tv", "-g", DG)
    assert not tree.exists()
    assert _qgroups(h.btrfs) == before_qg, "the volume's qgroup was left behind"
    assert mounts.mounted_at(mp) is None


def test_something_else_at_the_mount_point_is_not_the_volume(qenv):
    """A mount is the volume's only when the kernel shows its tree's root there (device and inode)."""
    h, _xfs, e = qenv
    _init(e, f"{h.dir('d1')}=1g")
    e.cli("vol", "make", "tv", "64m", "fstype=none", "-g", DG)
    e.cli("vol", "make", "other", "64m", "fstype=none", "-g", DG)
    mp = Path(_info(e, "tv")["mountpoint"])
    decoy = Path(_info(e, "other")["tree"])  # same filesystem, another tree
    mp.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(decoy), str(mp)], check=True)
    try:
        assert not _info(e, "tv")["mounted"]
        proc = e.cli("vol", "mount", "tv", "-g", DG, check=False)
        assert proc.returncode != 0 and "not this volume" in proc.stderr, proc.stderr
        assert "foreign-mount" in e.cli("doctor", "-g", DG, check=False).stdout
    finally:
        subprocess.run(["umount", str(mp)], check=True)
    e.cli("vol", "mount", "tv", "-g", DG)
    assert _info(e, "tv")["mounted"]
    e.cli("vol", "umount", "tv", "-g", DG)


def test_disks_that_cannot_hold_a_directory_to_a_size_refuse_it_and_nothing_changes(qenv):
    h, make_xfs, e = qenv
    xfs = make_xfs()
    _init(e, f"{h.dir('on-xfs', xfs)}=500m", f"{e.disk_image('img')}=1g")
    proc = e.cli("vol", "make", "tv", "64m", "fstype=none", "-g", DG, check=False)
    assert proc.returncode != 0
    assert "fstype=none" in proc.stderr and "xfs filesystem" in proc.stderr and "CONFIG_XFS_QUOTA" in proc.stderr
    assert "image file" in proc.stderr and "fstype=xfs" in proc.stderr, proc.stderr

    # a btrfs directory disk whose quotas are off: refused with how to enable them; never enabled by us
    d1 = h.dir("d1")
    e.cli("dg", "adddisk", DG, f"{d1}=500m")
    subprocess.run(["btrfs", "quota", "disable", str(h.btrfs)], check=True)
    proc = e.cli("vol", "make", "tv", "64m", "fstype=none", "-g", DG, check=False)
    assert proc.returncode != 0 and f"btrfs quota enable {h.btrfs}" in proc.stderr, proc.stderr
    assert not qgroup.quotas_enabled(h.btrfs)
    assert json.loads(e.cli("--json", "vol", "list", "-g", DG).stdout) == []
    assert list((d1 / "vols").iterdir()) == []

    subprocess.run(["btrfs", "quota", "enable", str(h.btrfs)], check=True)
    e.cli("vol", "make", "tv", "64m", "fstype=none", "-g", DG)
    assert Path(_info(e, "tv")["tree"]).resolve().parent == d1 / "vols"  # the only disk that can hold it


@pytest.mark.parametrize("opts, words", [
    (["layout=mirror"], "layout=concat only"),
    (["layout=stripe"], "layout=concat only"),
    (["nmirror=2"], "no mirrors"),
    (["provisioning=thick"], "provisioning=thick"),
    (["fstype=nonesuch"], "unknown fstype"),
])
def test_bad_options_with_fstype_none_are_refused_before_anything_is_made(qenv, opts, words):
    h, _xfs, e = qenv
    d1 = h.dir("d1")
    _init(e, f"{d1}=1g")
    args = [o for o in opts if o.startswith("fstype=")] or ["fstype=none", *opts]
    proc = e.cli("vol", "make", "tv", "64m", *args, "-g", DG, check=False)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr
    assert json.loads(e.cli("--json", "vol", "list", "-g", DG).stdout) == []
    assert list((d1 / "vols").iterdir()) == []


def test_too_small_or_too_large_is_refused_and_size_is_rounded_to_mib(qenv):
    h, _xfs, e = qenv
    d1 = h.dir("d1")
    _init(e, f"{d1}=500m")
    assert "at least 32 MiB" in e.cli("vol", "make", "t", "16m", "fstype=none", "-g", DG, check=False).stderr
    assert "free" in e.cli("vol", "make", "t", "2g", "fstype=none", "-g", DG, check=False).stderr
    assert list((d1 / "vols").iterdir()) == []
    e.cli("vol", "make", "t", str(40 * MiB + 1), "fstype=none", "-g", DG)
    assert qgroup.usage(Path(_info(e, "t")["tree"]))[1] == 41 * MiB


def test_snapshot_of_a_tree_is_refused_with_why(qenv):
    h, _xfs, e = qenv
    _init(e, f"{h.dir('d1')}=1g")
    e.cli("vol", "make", "tv", "64m", "fstype=none", "-g", DG)
    dg = diskgroup.open_dg(e.config, DG)
    try:
        with pytest.raises(Unsupported, match="never freezes"):
            snapshots.make(dg, "tv", "snap")
        assert dg.catalog.volume("snap") is None
    finally:
        dg.close()


def test_deport_and_import_keep_the_tree_and_its_data(qenv):
    h, _xfs, e = qenv
    _init(e, f"{h.dir('d1')}=1g")
    e.cli("vol", "make", "tv", "64m", "fstype=none", "-g", DG)
    e.cli("vol", "mount", "tv", "-g", DG)
    mp = Path(_info(e, "tv")["mountpoint"])
    assert _write(mp / "data", 8 * MiB) == 0
    proc = e.cli("dg", "deport", DG, check=False)
    assert proc.returncode != 0 and "mounted" in proc.stderr
    e.cli("vol", "umount", "tv", "-g", DG)
    e.cli("dg", "deport", DG)
    e.cli("dg", "import", DG)
    e.cli("vol", "mount", "tv", "-g", DG)
    assert (mp / "data").stat().st_size == 8 * MiB
    assert _write(mp / "big", 100 * MiB) in (errno.EDQUOT, errno.ENOSPC)  # the limit came along
    e.cli("vol", "umount", "tv", "-g", DG)


def _points(e: Env, *args: str) -> list[str]:
    trace = e.root / "trace"
    trace.unlink(missing_ok=True)
    e.cli(*args, env={"VERITAS_CRASH_TRACE": str(trace)})
    return [p for p in dict.fromkeys(trace.read_text().split()) if p.split(".")[0] == args[1]]


def test_kill_at_every_crash_point_of_make_and_mount_leaves_nothing_half_made(qenv):
    h, _xfs, e = qenv
    d1 = h.dir("d1")
    _init(e, f"{d1}=1g")
    base_qg = _qgroups(h.btrfs)
    make = ("vol", "make", "tv", "64m", "fstype=none", "-g", DG)
    points = _points(e, *make)
    assert {"make.recorded", "make.tree", "make.done"} <= set(points), points
    e.cli("vol", "rm", "tv", "-g", DG)
    for point in points:
        proc = e.cli(*make, env={"VERITAS_CRASH_AT": point}, check=False)
        assert proc.returncode == -9, (point, proc.stderr)
        rows = json.loads(e.cli("--json", "vol", "list", "-g", DG).stdout)  # the next start recovers
        if point == "make.done":
            assert [r["name"] for r in rows] == ["tv"]
            e.cli("vol", "rm", "tv", "-g", DG)
        else:
            assert rows == [], (point, rows)
        assert list((d1 / "vols").iterdir()) == [], point
        assert _qgroups(h.btrfs) == base_qg, point
        assert e.cli("doctor", "-g", DG, check=False).stdout.strip() == "no problems found", point

    e.cli(*make)
    mount = ("vol", "mount", "tv", "-g", DG)
    points = _points(e, *mount)
    assert {"mount.recorded", "mount.mounted", "mount.done"} <= set(points), points
    e.cli("vol", "umount", "tv", "-g", DG)
    mp = Path(_info(e, "tv")["mountpoint"])
    for point in points:
        proc = e.cli(*mount, env={"VERITAS_CRASH_AT": point}, check=False)
        assert proc.returncode == -9, (point, proc.stderr)
        info = _info(e, "tv")  # recovery: a mount not counted is rolled back, a counted one completed
        if point == "mount.done":
            assert info["mounted"] and info["mounts"], point
            e.cli("vol", "umount", "tv", "-g", DG)
        else:
            assert not info["mounted"] and info["mounts"] == [] and mounts.mounted_at(mp) is None, (point, info)
        assert e.cli("doctor", "-g", DG, check=False).stdout.strip() == "no problems found", point
    e.cli(*mount)
    assert _write(mp / "big", 100 * MiB) in (errno.EDQUOT, errno.ENOSPC)
    e.cli("vol", "umount", "tv", "-g", DG)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(opts=st.dictionaries(
    st.sampled_from(["size", "layout", "nmirror", "ncol", "provisioning", "maxiops", "protect"]),
    st.one_of(st.sampled_from(["concat", "mirror", "auto", "thick", "thin", "1", "2", "0", "16m", "64m",
                               "1g", "-1", "x", "", "yes"]), st.text(max_size=6))))
def test_any_options_with_fstype_none_make_a_tree_or_change_nothing(qenv, opts):
    h, _xfs, e = qenv
    if not (e.config.state_root / "dg" / DG).exists():
        _init(e, f"{h.dir('d1')}=1g")
    dg = diskgroup.open_dg(e.config, DG)
    try:
        before = dg.catalog.volumes()
        try:
            v = volumes.make(dg, "hv", **{**opts, "fstype": "none"})
        except VeritasError as exc:
            assert isinstance(exc, InvalidArgument) or type(exc).__name__ == "NoSpace", exc
            assert dg.catalog.volumes() == before
            assert list((h.btrfs / "d1" / "vols").iterdir()) == []
            return
        assert v.fstype == "none" and v.layout == "concat"
        tree = h.btrfs / "d1" / "vols" / "hv.0.tree"
        assert qgroup.usage(tree)[1] == -(-v.size // MiB) * MiB
        volumes.remove(dg, "hv", force=True)
        assert not tree.exists()
    finally:
        dg.close()


@pytest.fixture
def qstack(qhost: tuple[Host, Callable[[], Path]], stack):
    """The Docker stack, its default disk group given a directory disk on the quota btrfs; torn down
    before the host filesystem goes."""
    h, _ = qhost
    dg = diskgroup.default_dg(stack.env.config)
    dg.close()
    stack.env.cli("dg", "adddisk", "dockerdg", f"{h.dir('dock')}=1g")
    return h, stack


def test_container_writing_past_the_size_gets_edquot_and_maxiops_binds(qstack):
    from tests.integration.dockerstack import IMAGE

    h, stack = qstack
    node = stack.node
    node.cli("volume", "create", "-d", "veritas", "--name", "qv", "-o", "fstype=none", "-o", "size=64m")
    insp = json.loads(node.cli("volume", "inspect", "qv").stdout)[0]
    assert insp["Status"]["fstype"] == "none"
    proc = node.cli("run", "--rm", "--network", "none", "-v", "qv:/vol", IMAGE, "sh", "-c",
                    "dd if=/dev/zero of=/vol/big bs=1M count=100 conv=fsync; echo rc=$?", check=False)
    out = proc.stdout + proc.stderr
    assert "rc=1" in out and ("quota exceeded" in out.lower() or "no space" in out.lower()), out
    proc = node.cli("run", "--rm", "--network", "none", "-v", "qv:/vol", IMAGE, "sh", "-c",
                    "rm /vol/big; dd if=/dev/zero of=/vol/ok bs=1M count=32 conv=fsync && echo ok")
    assert "ok" in proc.stdout

    # maxiops: the limit goes on the block device that holds the tree's filesystem, and binds
    node.cli("volume", "create", "-d", "veritas", "--name", "slow", "-o", "fstype=none", "-o", "size=64m",
             "-o", "maxiops=100")
    out = node.cli("run", "--rm", "--network", "none", "-v", "slow:/vol", IMAGE, "sh", "-c",
                   "cat /sys/fs/cgroup/blkio/blkio.throttle.write_iops_device; cat /proc/uptime;"
                   " dd if=/dev/zero of=/vol/burst bs=4k count=300 oflag=direct 2>/dev/null;"
                   " cat /proc/uptime").stdout.splitlines()
    (dev,) = qgroup.devices(h.btrfs)
    rdev = os.stat(dev).st_rdev
    assert f"{os.major(rdev)}:{os.minor(rdev)} 100" in out[0], out
    took = float(out[2].split()[0]) - float(out[1].split()[0])
    assert took >= 2.5, f"300 direct writes took {took:.2f} s under a 100 IOPS limit on {dev}"
    start = time.monotonic()
    node.cli("run", "--rm", "--network", "none", "-v", "qv:/vol", IMAGE, "sh", "-c",
             "dd if=/dev/zero of=/vol/fast bs=4k count=300 oflag=direct")
    assert time.monotonic() - start < 30  # the unlimited volume on the same device is not held back
    node.cli("volume", "rm", "qv")
    node.cli("volume", "rm", "slow")
    assert list((h.btrfs / "dock" / "vols").iterdir()) == []


def test_plugin_kill9_and_restart_keep_a_tree_mounted_for_its_container(qstack):
    """Reconciliation at the plugin's start recognises the tree's bind mount as the volume's (by the
    kernel's subvolume id and root inode), keeps it for the running container, and releases it after."""
    from tests.integration.dockerstack import IMAGE

    h, stack = qstack
    node = stack.node
    node.cli("volume", "create", "-d", "veritas", "--name", "qv", "-o", "fstype=none", "-o", "size=64m")
    ctr = node.cli("run", "-d", "--network", "none", "-v", "qv:/vol", IMAGE, "sh", "-c",
                   "echo one > /vol/f; sleep 600").stdout.strip()
    mp = Path(json.loads(stack.env.cli("--json", "vol", "info", "qv").stdout)["mountpoint"])
    deadline = time.monotonic() + 30
    while not (mp / "f").exists():
        assert time.monotonic() < deadline, "the container never wrote"
        time.sleep(0.2)
    stack.plugin.kill9()
    stack.plugin.start()
    info = json.loads(stack.env.cli("--json", "vol", "info", "qv").stdout)
    assert info["mounted"] and len(info["mounts"]) == 1, info
    node.cli("exec", ctr, "sh", "-c", "echo two >> /vol/f")
    node.cli("rm", "-f", ctr)
    deadline = time.monotonic() + 30
    while json.loads(stack.env.cli("--json", "vol", "info", "qv").stdout)["mounted"]:
        assert time.monotonic() < deadline, "the tree stayed mounted after its container went"
        time.sleep(0.2)
    out = node.cli("run", "--rm", "--network", "none", "-v", "qv:/vol", IMAGE, "cat", "/vol/f").stdout
    assert out.split() == ["one", "two"]
    node.cli("volume", "rm", "qv")
    assert list((h.btrfs / "dock" / "vols").iterdir()) == []
