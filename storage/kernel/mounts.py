"""The kernel's mount table, read from /proc/self/mountinfo."""

from __future__ import annotations

import fcntl
import os
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: str
    major_minor: str
    super_options: str = ""  # the filesystem's own (btrfs: subvolid=N names the subvolume mounted)
    root: str = "/"  # the directory of the filesystem mounted here (a bind of a subtree: that subtree)


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def table(pid: int | None = None) -> list[MountEntry]:
    """The mounts of our mount namespace, or of process ``pid``'s. :raises OSError: if it is gone."""
    entries = []
    with open(f"/proc/{'self' if pid is None else pid}/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 6 or len(rf) < 2:
                continue
            entries.append(
                MountEntry(
                    source=_unescape(rf[1]),
                    target=_unescape(lf[4]),
                    fstype=rf[0],
                    options=lf[5],
                    major_minor=lf[2],
                    super_options=rf[2] if len(rf) > 2 else "",
                    root=_unescape(lf[3]),
                )
            )
    return entries


def mounted_at(target: Path) -> MountEntry | None:
    """The topmost mount at ``target``, or None."""
    t = str(target)
    found = None
    for e in table():
        if e.target == t:
            found = e
    return found


def device_at(target: Path) -> str | None:
    """The device number (``major:minor``) of the topmost mount at ``target``, or None."""
    entry = mounted_at(target)
    return entry.major_minor if entry else None


def targets_of(devices: set[str]) -> list[str]:
    """Mount points whose source is one of ``devices`` (or whose device number is)."""
    nums = set()
    for d in devices:
        try:
            st = os.stat(d)
            nums.add(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        except OSError:
            continue
    return [e.target for e in table() if e.source in devices or e.major_minor in nums]


_BTRFS_IOC_FS_INFO = 0x8400941F  # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args), 1024 bytes; fsid at 16


def btrfs_fsid(path: Path) -> str | None:
    """The fsid of the btrfs ``path`` lies on, or None when it is not on btrfs. Each btrfs subvolume has
    a device number of its own, so the fsid is what tells two of them apart from two filesystems."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = fcntl.ioctl(fd, _BTRFS_IOC_FS_INFO, bytes(1024))
    except OSError:
        return None
    finally:
        os.close(fd)
    return str(uuid.UUID(bytes=bytes(info[16:32])))


def _btrfs_members(target: Path) -> set[tuple[int, int]]:
    """Device numbers of the member devices of the btrfs mounted at ``target`` (from its fsid's sysfs
    directory), or none when ``target`` holds no btrfs."""
    fsid = btrfs_fsid(target)
    if fsid is None:
        return set()
    out: set[tuple[int, int]] = set()
    try:
        members = list(os.scandir(f"/sys/fs/btrfs/{fsid}/devices"))
    except OSError:
        return out
    for m in members:
        try:
            major, _, minor = Path(m.path, "dev").read_text().strip().partition(":")
            out.add((int(major), int(minor)))
        except (OSError, ValueError):
            continue
    return out


def devices_of(entry: MountEntry) -> set[tuple[int, int]]:
    """The block devices a mount stands on, by number: the mount's own device, and for btrfs (whose
    mount shows an anonymous device number) every member device."""
    major, _, minor = entry.major_minor.partition(":")
    out = {(int(major), int(minor))}
    if entry.fstype == "btrfs":
        out |= _btrfs_members(Path(entry.target))
    return out
