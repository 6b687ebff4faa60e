"""Reflink cloning (FICLONE) and shared-extent accounting (FIEMAP)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_SHARED = 0x2000
_HDR = struct.Struct("=QQIIII")
_EXT = struct.Struct("=QQQQQI12x")
_BATCH = 512


def clone(src: Path, dst: Path) -> None:
    """Make ``dst`` a reflink copy of ``src``; ``dst`` must not exist. Removes ``dst`` on failure."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            dfd = -1
            dst.unlink(missing_ok=True)
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
    finally:
        os.close(sfd)


def probe(directory: Path) -> OSError | None:
    """Try one reflink clone in ``directory``: None when it works, else the kernel's error (EOPNOTSUPP on
    ext4 and tmpfs, say). Whether a filesystem supports reflink is what FICLONE does, not its name: XFS
    made without reflink=1 refuses as ext4 does. Both probe files are removed again."""
    src = directory / f".veritas-probe.{os.getpid()}"
    dst = directory / f".veritas-probe.{os.getpid()}.clone"
    try:
        with open(src, "w+b") as sfh, open(dst, "wb") as dfh:  # "wb": a killed probe's leftovers are reused
            sfh.write(bytes(4096))
            sfh.flush()
            fcntl.ioctl(dfh.fileno(), FICLONE, sfh.fileno())
    except OSError as exc:
        return exc
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    return None


def extent_map(path: Path) -> list[tuple[int, int, int, int]]:
    """The FIEMAP extent map of ``path`` (flushed first: FIEMAP_FLAG_SYNC) in logical order, as
    (logical, physical, length, flags) tuples.

    :raises OSError: EOPNOTSUPP/ENOTTY where the filesystem has no FIEMAP.
    """
    out: list[tuple[int, int, int, int]] = []
    start = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            buf = bytearray(_HDR.size + _EXT.size * _BATCH)
            _HDR.pack_into(buf, 0, start, 0xFFFFFFFFFFFFFFFF - start, _FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _HDR.unpack_from(buf, 0)[3]
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                logical, physical, length, _r1, _r2, flags = _EXT.unpack_from(buf, _HDR.size + i * _EXT.size)
                out.append((logical, physical, length, flags))
                start = logical + length
                last = bool(flags & _EXTENT_LAST)
            if last:
                break
    finally:
        os.close(fd)
    return out


def unshared_bytes(path: Path) -> int:
    """Bytes of ``path`` stored in extents it shares with no other file (a snapshot's cache use)."""
    return sum(length for _lg, _ph, length, flags in extent_map(path) if not flags & _EXTENT_SHARED)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# struct fsxattr: xflags, extsize, nextents, projid, cowextsize, pad[8]
_FSXATTR = struct.Struct("=IIIII8x")
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_COWEXTSIZE = 0x00010000
FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32): XFS_IOC_GOINGDOWN, EXT4_IOC_SHUTDOWN, btrfs
_SHUTDOWN_NOLOGFLUSH = 0x2
_FALLOC_FL_KEEP_SIZE = 0x1
_FALLOC_FL_PUNCH_HOLE = 0x2


def set_cowextsize(path: Path, nbytes: int) -> bool:
    """Set the copy-on-write extent size hint of ``path``; True if it changed.

    XFS preallocates copy-on-write space in units of this hint (32 blocks by default): a random 4 KiB
    write into a shared extent then takes 128 KiB of the disk at once, so a rewrite of a snapshotted
    image consumes the disk far faster than the snapshot's unshared bytes grow. One block keeps the disk's
    consumption equal to what FIEMAP reports.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        xflags, extsize, nextents, projid, cow = _FSXATTR.unpack(buf)
        if xflags & _FS_XFLAG_COWEXTSIZE and cow == nbytes:
            return False
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR,
                    _FSXATTR.pack(xflags | _FS_XFLAG_COWEXTSIZE, extsize, nextents, projid, nbytes))
        return True
    finally:
        os.close(fd)


def punch(path: Path) -> None:
    """Release every data block of ``path`` (its size stays): shared extents lose one reference,
    unshared ones are freed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if size and libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def shutdown(mountpoint: Path) -> bool:
    """Shut the filesystem mounted at ``mountpoint`` down (every later I/O on it fails with EIO), without
    flushing its log; False when the filesystem has no shutdown ioctl."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("=I", _SHUTDOWN_NOLOGFLUSH))
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)
