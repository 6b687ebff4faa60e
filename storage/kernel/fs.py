"""Filesystem operations on block devices: make, mount, unmount, freeze, grow, new identity."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from storage.errors import CommandFailed, FsckFailed, InUse, InvalidArgument
from storage.kernel import mounts
from storage.runner import Runner, run

XFS_MIN = 300 * 1024 * 1024
BTRFS_MIN_DEVICE = 131072000


def signature(dev: str, runner: Runner = run) -> str | None:
    """The filesystem or partition table ``dev`` holds, probed on the device itself (blkid -p reads
    the superblocks, not a cache), or None when it is blank."""
    proc = runner(["blkid", "-p", "-o", "export", dev], check=False)
    if proc.returncode == 2:  # nothing found
        return None
    if proc.returncode not in (0, 8):  # 8: ambivalent, several signatures
        raise CommandFailed(["blkid", "-p", dev], proc.returncode, proc.stderr)
    fields = dict(line.partition("=")[::2] for line in proc.stdout.splitlines())
    return fields.get("TYPE") or fields.get("PTTYPE") or "unknown signature"


def refuse_formatted(devices: Sequence[str], runner: Runner = run) -> None:
    """Raise InUse if any of ``devices`` already holds a filesystem: mkfs runs on one only when the
    user forced it, since a device that is not blank may be someone else's."""
    for dev in devices:
        found = signature(dev, runner)
        if found is not None:
            raise InUse(f"{dev} already holds {found}; refusing to format it (use --force to overwrite)")


def mkfs(fstype: str, devices: Sequence[str], *, profile: str | None = None, meta_profile: str | None = None,
         label: str = "", runner: Runner = run, reflink: bool = False) -> None:
    """Make ``fstype`` on ``devices`` (several only for btrfs, with data/metadata profiles)."""
    if fstype == "xfs":
        argv = ["mkfs.xfs", "-q", "-f"]
        if reflink:
            argv += ["-m", "reflink=1"]
        if label:
            argv += ["-L", label[:12]]
        runner([*argv, devices[0]])
    elif fstype == "ext4":
        argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
        if label:
            argv += ["-L", label[:16]]
        runner([*argv, devices[0]])
    elif fstype == "btrfs":
        argv = ["mkfs.btrfs", "-q", "-f"]
        if profile:
            argv += ["-d", profile, "-m", meta_profile or ("dup" if profile == "single" else profile)]
        if label:
            argv += ["-L", label[:255]]
        runner([*argv, *devices])
    else:  # pragma: no cover - callers validate fstype
        raise ValueError(fstype)


XFS_MOUNT_OPTIONS = ("nouuid",)  # every XFS mount: a snapshot shares its source's UUID (new_uuid)


def mount(devices: Sequence[str], target: Path, fstype: str, *, options: Sequence[str] = (),
          runner: Runner = run) -> None:
    """Mount ``devices`` at ``target``; btrfs members are scanned first (there is no udev here)."""
    if fstype == "btrfs":
        for dev in devices:
            runner(["btrfs", "device", "scan", dev])
    opts = list(options)
    if fstype == "xfs":
        opts += [o for o in XFS_MOUNT_OPTIONS if o not in opts]
    argv = ["mount", "-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    runner([*argv, devices[0], str(target)])


def umount(target: Path, runner: Runner = run) -> None:
    """Unmount ``target``; not mounted is success, busy is a typed InUse error."""
    if mounts.mounted_at(target) is None:
        return
    proc = runner(["umount", str(target)], check=False)
    if proc.returncode != 0 and mounts.mounted_at(target) is not None:
        if "busy" in (proc.stderr or "").lower():
            raise InUse(f"{target} is busy: a process still uses files on it; stop it and retry")
        raise CommandFailed(["umount", str(target)], proc.returncode, proc.stderr)


def forget_btrfs(devices: Sequence[str], runner: Runner = run) -> None:
    """Drop the kernel's btrfs registration of unmounted ``devices`` so a reused loop device is clean."""
    for dev in devices:
        runner(["btrfs", "device", "scan", "--forget", dev], check=False)


def freeze(target: Path, runner: Runner = run) -> None:
    runner(["fsfreeze", "--freeze", str(target)])


def thaw(target: Path, runner: Runner = run) -> None:
    """Thaw ``target``; a filesystem that is not frozen is not an error (used in recovery)."""
    proc = runner(["fsfreeze", "--unfreeze", str(target)], check=False)
    if proc.returncode != 0 and "Invalid argument" not in proc.stderr:
        raise CommandFailed(["fsfreeze", "--unfreeze", str(target)], proc.returncode, proc.stderr)


def thaw_if_same(target: Path, major_minor: str | None, runner: Runner = run) -> bool:
    """Thaw ``target`` in recovery only if the filesystem mounted there is still the one that was
    frozen, by the device number recorded at the freeze: between a killed freeze and its recovery the
    volume may have been unmounted and another filesystem mounted at the same path, frozen by someone
    else. ``None`` (a record from before the number was kept) thaws by path. Whether it thawed."""
    if major_minor is not None and mounts.device_at(target) != major_minor:
        return False
    thaw(target, runner)
    return True


def grow(fstype: str, devices: Sequence[str], target: Path | None, runner: Runner = run) -> None:
    """Grow the filesystem to fill its (already grown) devices; XFS/btrfs online, ext4 offline."""
    if fstype in ("xfs", "btrfs") and target is None:
        raise InvalidArgument(f"{fstype} grows only while mounted: give its mount point")
    if fstype == "xfs":
        runner(["xfs_growfs", str(target)])
    elif fstype == "btrfs":
        for devid in range(1, len(devices) + 1):
            runner(["btrfs", "filesystem", "resize", f"{devid}:max", str(target)])
    elif fstype == "ext4":
        if target is not None:
            raise InUse(
                "ext4 cannot grow while mounted on this host (online resize needs CAP_SYS_RESOURCE);"
                " unmount the volume and grow it again, or use fstype=xfs"
            )
        e2fsck(devices[0], runner)
        runner(["resize2fs", devices[0]])


def e2fsck(device: str, runner: Runner = run) -> None:
    """Check and fix the ext4 on ``device``. Exit 1 and 2 mean errors were corrected, which is fine;
    4 and above mean errors are left or the check failed, and nothing may touch the filesystem then.

    :raises FsckFailed: for exit codes 4 and above.
    """
    argv = ["e2fsck", "-f", "-y", device]  # -y with -p is a usage error
    proc = runner(argv, check=False)
    if proc.returncode >= 4 or proc.returncode < 0:
        raise FsckFailed(argv, proc.returncode, (proc.stderr or "") + (proc.stdout or "")
                         + "\ne2fsck left errors uncorrected or could not run; the filesystem was not changed")


def new_uuid(fstype: str, devices: Sequence[str], scratch: Path, runner: Runner = run) -> None:
    """Make a cloned filesystem ready to mount beside its source.

    XFS keeps its UUID and is mounted ``nouuid`` (XFS_MOUNT_OPTIONS), as XFS's own documentation has it
    for snapshots: a new UUID (``xfs_admin -U``) clears the whole log, 64 MiB on any volume above
    300 MiB, which the log of a fresh filesystem holds as unwritten extents a clone shares as holes, so
    the snapshot's first mount took 64 MiB of its cache (a 100 MiB cache was then exhausted by 8 MiB
    of writes). The clone of a frozen XFS has a dirty log: it is mounted once here to replay it.
    """
    if fstype == "xfs":
        scratch.mkdir(parents=True, exist_ok=True)
        runner(["mount", "-t", "xfs", "-o", ",".join(XFS_MOUNT_OPTIONS), devices[0], str(scratch)])
        runner(["umount", str(scratch)])
    elif fstype == "ext4":
        e2fsck(devices[0], runner)
        runner(["tune2fs", "-f", "-U", "random", devices[0]])
    elif fstype == "btrfs":
        raise ValueError("btrfs clones get their identity from btrfs_super.new_fsid on the image files")


def statvfs_size(path: Path) -> tuple[int, int]:
    """(total bytes, free bytes) of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
