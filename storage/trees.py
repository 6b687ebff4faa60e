"""Volumes with no filesystem of their own (fstype=none): a directory tree on one disk's filesystem.

The data path has no loop device and no second filesystem: the tree is bind-mounted at the volume's
mount point, and the disk's filesystem holds it to the volume's size. Only a filesystem that enforces
a directory's size can hold one: here a btrfs directory disk whose quotas the host enabled (the tree is
a subvolume, limited by its qgroup; writes past the size fail with EDQUOT). veritas never enables
quotas on, nor remounts, a host's filesystem; XFS (the disks veritas makes, or a host's XFS) would need
project quotas, which this kernel lacks (CONFIG_XFS_QUOTA) and veritas does not use.

A tree is ``<disk>/vols/<volume>.0.tree``; the volume's one subdisk record reserves its size on that
disk. Its mount is told by what the kernel says: the root of the mount at the mount point is the
tree's root directory (same device and inode), as a loop device is told by its backing file's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from storage.catalog.base import DiskRec, VolumeRec
from storage.errors import CommandFailed, InUse, VeritasError
from storage.group import DiskGroup
from storage.kernel import fs, mounts, qgroup

FSTYPE = "none"


def is_tree(v: VolumeRec) -> bool:
    return v.fstype == FSTYPE


def path(dg: DiskGroup, disk: str, volume: str) -> Path:
    return dg.disk_dir(disk) / "vols" / f"{volume}.0.tree"


def tree_of(dg: DiskGroup, v: VolumeRec) -> Path | None:
    """The volume's tree (whether or not it exists), or None for a volume without one."""
    sds = dg.catalog.subdisks(v.name)
    return path(dg, sds[0].disk, v.name) if is_tree(v) and sds else None


def refusal(dg: DiskGroup, d: DiskRec) -> str | None:
    """Why disk ``d`` cannot hold an fstype=none volume (a sentence), or None when it can."""
    if d.state != "online":
        return f"disk {d.name} is {d.state}"
    if d.kind != "dir":
        what = "an image file" if d.kind == "file" else "a block device"
        why = ("veritas does not use XFS project quotas" if qgroup.xfs_quota_in_kernel()
               else "this kernel has no XFS quota support (CONFIG_XFS_QUOTA)")
        return (f"disk {d.name} is the XFS veritas made on {what}, which cannot hold a directory to a size:"
                f" {why}")
    src = Path(d.source)
    if mounts.btrfs_fsid(src) is None:
        quota = ("project quotas (mount option prjquota), which this kernel lacks (CONFIG_XFS_QUOTA)"
                 if not qgroup.xfs_quota_in_kernel() else "project quotas, which veritas does not use")
        return f"directory disk {d.name} ({src}) lies on {_describe(src)}, not on btrfs; XFS would need {quota}"
    if not qgroup.quotas_enabled(src):
        return (f"directory disk {d.name} ({src}) lies on a btrfs with quotas disabled; enable them on the"
                f" host (btrfs quota enable {_mount_of(src)}): veritas never changes the host's filesystem")
    return None


def _describe(path: Path) -> str:
    """The filesystem ``path`` lies on, told by its device number, for messages."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return "a filesystem that cannot be read"
    num = f"{os.major(dev)}:{os.minor(dev)}"
    entry = next((e for e in reversed(mounts.table()) if e.major_minor == num), None)
    return f"the {entry.fstype} filesystem at {entry.target}" if entry else f"filesystem {num}"


def _mount_of(path: Path) -> str:
    """A mount point of the btrfs ``path`` lies on (by fsid), for messages; the path itself if none."""
    fsid = mounts.btrfs_fsid(path)
    for e in mounts.table():
        if e.fstype == "btrfs" and mounts.btrfs_fsid(Path(e.target)) == fsid:
            return e.target
    return str(path)


def refusal_text(reasons: list[str]) -> str:
    return ("fstype=none keeps a volume as a directory on a disk's filesystem, held to its size by that"
            " filesystem's quota, and no disk of this disk group can do that: " + "; ".join(reasons)
            + ". Add a directory disk on btrfs with quotas enabled, or use fstype=xfs")


def create(dg: DiskGroup, tree: Path, size: int) -> None:
    """Make the tree held to ``size``; a tree left by a killed make (no limit yet) gets its limit."""
    if not qgroup.is_subvolume(tree):
        qgroup.create(tree, size, dg.runner)
    else:
        qgroup.set_limit(tree, size, dg.runner)


def set_limit(dg: DiskGroup, v: VolumeRec, size: int) -> None:
    tree = tree_of(dg, v)
    if tree is not None:
        qgroup.set_limit(tree, size, dg.runner)


def remove(dg: DiskGroup, v: VolumeRec) -> None:
    """Delete the volume's tree and its quota; idempotent, and nothing for a volume without a tree."""
    tree = tree_of(dg, v)
    if tree is None:
        return
    if qgroup.is_subvolume(tree):
        qgroup.delete(tree, dg.runner)
    elif tree.is_dir() and not tree.is_symlink():  # never made a subvolume: not ours to keep either
        shutil.rmtree(tree)


def exists(dg: DiskGroup, v: VolumeRec) -> bool:
    tree = tree_of(dg, v)
    return tree is not None and qgroup.is_subvolume(tree)


def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def is_mount_of(dg: DiskGroup, v: VolumeRec, entry: mounts.MountEntry) -> bool:
    """``entry`` (the topmost mount at its target) mounts the volume's tree, as the kernel says: a btrfs
    mount of the tree's subvolume (mountinfo's subvolid, on the tree's filesystem by fsid) whose root is
    the tree's root directory (device and inode)."""
    tree = tree_of(dg, v)
    if tree is None or entry.fstype != "btrfs":
        return False
    mine = _ident(tree)
    if mine is None or mine[1] != qgroup.SUBVOL_ROOT_INO or _ident(Path(entry.target)) != mine:
        return False
    try:
        sid = qgroup.subvolume_id(tree)
    except VeritasError:
        return False
    return qgroup.mounted_subvolume(entry) == sid and mounts.btrfs_fsid(Path(entry.target)) == mounts.btrfs_fsid(tree)


def bind(dg: DiskGroup, v: VolumeRec, target: Path) -> None:
    """Bind-mount the volume's tree at ``target``, and check the kernel now shows it there."""
    tree = tree_of(dg, v)
    if tree is None or not qgroup.is_subvolume(tree):
        raise InUse(f"volume {v.name}'s directory {tree} is missing; its disk may be offline")
    dg.runner(["mount", "--bind", str(tree), str(target)])
    entry = mounts.mounted_at(target)
    if entry is None or not is_mount_of(dg, v, entry):
        if entry is not None:
            fs.umount(target, dg.runner)
        raise CommandFailed(["mount", "--bind", str(tree), str(target)], 0,
                            f"{target} does not show {tree} after the bind mount")


def devices(dg: DiskGroup, v: VolumeRec) -> list[str]:
    """The block devices holding the volume's tree, while it is mounted here: what an IOPS limit binds
    to (they carry every other user's I/O on that filesystem too)."""
    tree = tree_of(dg, v)
    entry = mounts.mounted_at(dg.mountpoint(v.name))
    if tree is None or entry is None or not is_mount_of(dg, v, entry):
        return []
    return qgroup.devices(tree)


def usage(dg: DiskGroup, v: VolumeRec) -> int | None:
    tree = tree_of(dg, v)
    if tree is None or not qgroup.is_subvolume(tree):
        return None
    return qgroup.usage(tree, dg.runner)[0]
