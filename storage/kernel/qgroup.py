"""Size limits on directory trees: btrfs subvolumes held to a size by their qgroup.

A volume with no filesystem of its own (fstype=none) is a directory tree on a disk's filesystem; the
filesystem, not veritas, must refuse writes past its size. Of the filesystems here only btrfs can: this
kernel has neither XFS quotas (CONFIG_XFS_QUOTA) nor the generic quota formats ext4's project quotas
need (CONFIG_QFMT_V2). What the kernel says is read from sysfs (/sys/fs/btrfs/<fsid>/qgroups), never
parsed from command output.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from storage.errors import VeritasError
from storage.kernel import mounts
from storage.runner import Runner, run

SUBVOL_ROOT_INO = 256  # BTRFS_FIRST_FREE_OBJECTID: the inode number of every subvolume's root directory


def xfs_quota_in_kernel() -> bool:
    """The running kernel was built with XFS quota support (it then publishes its quota statistics)."""
    return os.path.exists("/proc/fs/xfs/xqmstat")


def quotas_enabled(path: Path) -> bool:
    """``path`` lies on a btrfs whose quotas (qgroups) are enabled."""
    fsid = mounts.btrfs_fsid(path)
    return fsid is not None and os.path.isdir(f"/sys/fs/btrfs/{fsid}/qgroups")


def is_subvolume(path: Path) -> bool:
    """``path`` is the root of a btrfs subvolume (by its inode number, on btrfs)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_ino == SUBVOL_ROOT_INO and mounts.btrfs_fsid(path) is not None


_BTRFS_IOC_INO_LOOKUP = 0xD0009412  # _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args), 4096 bytes


def subvolume_id(path: Path, runner: Runner = run) -> int:
    """The id of the subvolume ``path`` lies in (the kernel's answer to INO_LOOKUP with tree id 0), which
    is also the id of its level-0 qgroup (0/ID)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise VeritasError(f"cannot open {path}: {exc.strerror}") from None
    try:
        buf = bytearray(struct.pack("=QQ", 0, SUBVOL_ROOT_INO) + bytes(4080))
        fcntl.ioctl(fd, _BTRFS_IOC_INO_LOOKUP, buf, True)
    except OSError as exc:
        raise VeritasError(f"{path} is not on btrfs, or its subvolume cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return int(struct.unpack("=Q", bytes(buf[:8]))[0])


def mounted_subvolume(entry: mounts.MountEntry) -> int | None:
    """The subvolume id a btrfs mount shows (its subvolid= option), or None."""
    for opt in entry.super_options.split(","):
        key, _, val = opt.partition("=")
        if key == "subvolid" and val.isdigit():
            return int(val)
    return None


def create(path: Path, limit: int, runner: Runner = run) -> int:
    """Make subvolume ``path`` held to ``limit`` bytes (referenced); returns its id."""
    runner(["btrfs", "subvolume", "create", str(path)])
    set_limit(path, limit, runner)
    return subvolume_id(path, runner)


def set_limit(path: Path, limit: int, runner: Runner = run) -> None:
    """Hold subvolume ``path`` to ``limit`` bytes referenced: writes beyond fail with EDQUOT."""
    runner(["btrfs", "qgroup", "limit", str(limit), str(path)])


def usage(path: Path, runner: Runner = run) -> tuple[int, int | None]:
    """(bytes referenced, limit or None) of subvolume ``path``, as the kernel accounts them once the
    running transaction is committed (which this does first: qgroups count at commit)."""
    runner(["btrfs", "filesystem", "sync", str(path)])
    fsid = mounts.btrfs_fsid(path)
    qg = Path(f"/sys/fs/btrfs/{fsid}/qgroups/0_{subvolume_id(path, runner)}")
    try:
        used = int((qg / "referenced").read_text())
        cap = int((qg / "max_referenced").read_text())
    except (OSError, ValueError) as exc:
        raise VeritasError(f"cannot read the qgroup of {path} from {qg}: {exc}") from None
    return used, (cap if cap > 0 else None)


def delete(path: Path, runner: Runner = run) -> None:
    """Delete subvolume ``path`` and its qgroup (a deleted subvolume's qgroup otherwise stays, stale)."""
    if not is_subvolume(path):
        return
    sid = subvolume_id(path, runner)
    parent = path.parent
    runner(["btrfs", "subvolume", "delete", "--commit-after", str(path)])
    # a qgroup goes only once the kernel has cleaned the deleted tree: wait for that (bounded), then
    # destroy it; if it still cannot go, a stale qgroup with no subvolume stays, limiting nothing
    runner(["btrfs", "subvolume", "sync", str(parent), str(sid)], check=False, timeout=60)
    runner(["btrfs", "qgroup", "destroy", f"0/{sid}", str(parent)], check=False)


def devices(path: Path) -> list[str]:
    """The block devices (``/dev/NAME``) of the btrfs that holds ``path``, checked by device number."""
    fsid = mounts.btrfs_fsid(path)
    if fsid is None:
        return []
    out = []
    try:
        members = sorted(os.scandir(f"/sys/fs/btrfs/{fsid}/devices"), key=lambda e: e.name)
    except OSError:
        return []
    for m in members:
        try:
            num = Path(m.path, "dev").read_text().strip()
            st = os.stat(f"/dev/{m.name}")
        except OSError:
            continue
        if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == num:
            out.append(f"/dev/{m.name}")
    return out
