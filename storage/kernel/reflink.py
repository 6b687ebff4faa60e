"""Reflink cloning (FICLONE) and shared-extent accounting (FIEMAP)."""

from __future__ import annotations

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


def unshared_bytes(path: Path) -> int:
    """Bytes of ``path`` stored in extents it shares with no other file (a snapshot's cache use)."""
    total = 0
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
                logical, _phys, length, _r1, _r2, flags = _EXT.unpack_from(buf, _HDR.size + i * _EXT.size)
                if not flags & _EXTENT_SHARED:
                    total += length
                start = logical + length
                last = bool(flags & _EXTENT_LAST)
            if last:
                break
    finally:
        os.close(fd)
    return total


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512
