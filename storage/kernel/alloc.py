"""Allocating a thick volume's images (fallocate): room taken from the disk's filesystem up front."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from storage.errors import NoSpace
from storage.units import format_size


def allocate(fd: int, path: Path, offset: int, length: int) -> None:
    """Allocate ``length`` bytes of an image from ``offset`` (unwritten extents: nothing is written),
    so the volume's first writes take no room from the disk. The disk group's accounting reserves the
    full size of every volume, but the disk's filesystem may still lack the room (snapshots' changes
    beyond their caches, other files on a directory disk): this finds out, before anything relies on it.

    :raises NoSpace: if the disk's filesystem cannot hold it.
    """
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"the filesystem holding {path} cannot allocate {format_size(length, long=True)} for a"
                          " thick volume (it has less room than the disk group's accounting says); free room on"
                          " that disk, or use provisioning=thin") from None
        raise


def free_bytes(path: Path) -> int:
    """Bytes the filesystem holding ``path`` can still allocate to an unprivileged-equivalent writer."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
