"""Inter-process locks (flock) that die with their holder.

Volumes hash onto a fixed set of lock stripes, so lock files never leak and a lock a dead process
held is free again, which is also how recovery tells an abandoned intent from one still in progress.

A thread that already holds a lock (the disk group lock exclusively, or a stripe) holds it again for
free: ``dg destroy`` removes volumes under the exclusive lock it checked them under, and recovery run
by an operation on its own key needs the locks the operation already took. flock conflicts between two
descriptors even inside one process, so without this a nested hold would wait for itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import LockTimeout, NoSuchDiskGroup

STRIPES = 64


class LockDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._mine = threading.local()  # lock name -> flock mode this thread holds

    def _held(self) -> dict[str, int]:
        held: dict[str, int] | None = getattr(self._mine, "held", None)
        if held is None:
            held = self._mine.held = {}
        return held

    def _path(self, name: str) -> Path:
        return self.root / name

    def stripe(self, key: str) -> str:
        return f"vol.{zlib.crc32(key.encode()) % STRIPES:02d}.lock"

    def _wanted(self, keys: tuple[str, ...], shared_dg: bool, exclusive_dg: bool) -> list[tuple[str, int]]:
        """The locks to take, in the one order every taker uses: disk group lock, then sorted stripes."""
        want: list[tuple[str, int]] = []
        if exclusive_dg or shared_dg:
            want.append(("dg.lock", fcntl.LOCK_EX if exclusive_dg else fcntl.LOCK_SH))
        want += [(name, fcntl.LOCK_EX) for name in sorted({self.stripe(k) for k in keys})]
        return want

    def _needed(self, want: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Of ``want``, those this thread does not hold yet; refuses an upgrade of shared to exclusive."""
        held = self._held()
        out = []
        for name, mode in want:
            have = held.get(name)
            if have is None:
                out.append((name, mode))
            elif have == fcntl.LOCK_SH and mode == fcntl.LOCK_EX:
                raise LockTimeout(f"lock {self._path(name)} is held shared by this thread and cannot be"
                                  " upgraded to exclusive; this is a bug in veritas, please report it")
        return out

    @contextmanager
    def hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False,
             timeout: float = 120.0) -> Iterator[None]:
        """Hold the disk group lock (shared, or exclusive) and the stripes of ``keys``, in a fixed order."""
        taken: list[tuple[str, int]] = []
        held = self._held()
        try:
            for name, mode in self._needed(self._wanted(keys, shared_dg, exclusive_dg)):
                taken.append((name, self._acquire(name, mode, timeout)))
                held[name] = mode
            yield
        finally:
            for name, fd in reversed(taken):
                held.pop(name, None)
                os.close(fd)

    @contextmanager
    def try_hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False) -> Iterator[bool]:
        """Like hold, without waiting: yields False (holding nothing new) when any of the locks is taken.

        Recovery uses it: a lock that is taken means the operation that recorded the intent may be alive.
        """
        taken: list[tuple[str, int]] = []
        held = self._held()
        try:
            for name, mode in self._needed(self._wanted(keys, shared_dg, exclusive_dg)):
                fd = self._try(name, mode)
                if fd is None:
                    break
                taken.append((name, fd))
                held[name] = mode
            else:
                yield True
                return
            yield False
        finally:
            for name, fd in reversed(taken):
                held.pop(name, None)
                os.close(fd)

    def _try(self, name: str, mode: int) -> int | None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        self._check_still_there(fd, name)
        return fd

    def _check_still_there(self, fd: int, name: str) -> None:
        """A lock file removed while we waited (``dg destroy`` deletes the disk group root under its
        lock) locks nothing any more: the waiter must not go on with a disk group that is gone."""
        try:
            st = os.stat(self._path(name))
            same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            raise NoSuchDiskGroup(f"{self.root.parent} was destroyed while this operation waited for its"
                                  f" lock {name}")

    def _acquire(self, name: str, mode: int, timeout: float) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                self._check_still_there(fd, name)
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
