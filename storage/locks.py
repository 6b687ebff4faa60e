"""Inter-process locks (flock) that die with their holder.

Volumes hash onto a fixed set of lock stripes, so lock files never leak and a lock a dead process
held is free again, which is also how recovery tells an abandoned intent from one still in progress.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import LockTimeout

STRIPES = 64


class LockDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name

    def stripe(self, key: str) -> str:
        return f"vol.{zlib.crc32(key.encode()) % STRIPES:02d}.lock"

    @contextmanager
    def hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False,
             timeout: float = 120.0) -> Iterator[None]:
        """Hold the disk group lock (shared, or exclusive) and the stripes of ``keys``, in a fixed order."""
        fds: list[int] = []
        try:
            if exclusive_dg or shared_dg:
                fds.append(self._acquire("dg.lock", fcntl.LOCK_EX if exclusive_dg else fcntl.LOCK_SH, timeout))
            for name in sorted({self.stripe(k) for k in keys}):
                fds.append(self._acquire(name, fcntl.LOCK_EX, timeout))
            yield
        finally:
            for fd in reversed(fds):
                os.close(fd)

    def try_hold_key(self, key: str) -> int | None:
        """Take ``key``'s stripe without waiting; the fd to close, or None when someone holds it."""
        fd = os.open(self._path(self.stripe(key)), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def _acquire(self, name: str, mode: int, timeout: float) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
            if time.monotonic() > deadline:
                os.close(fd)
                raise LockTimeout(f"timed out after {timeout:.0f} s waiting for lock {self._path(name)};"
                                  " another veritas operation is still running")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
