"""The locks interface, and its flock implementation whose locks die with their holder.

Operations hold the disk group lock (shared, or exclusive) and the stripes of the volumes they touch,
always in one order. Recovery asks a different question of the same locks: is the owner of an abandoned
intent gone? With flock the answer is "its locks are free" (flock dies with its process), which holds
only on one host; a backend spanning hosts (etcd) answers it with the owner's lease instead. So callers
ask ``Locks.owner_gone``, never "is the lock free".

A thread that already holds a lock (the disk group lock exclusively, or a stripe) holds it again for
free: ``dg destroy`` removes volumes under the exclusive lock it checked them under, and recovery run
by an operation on its own key needs the locks the operation already took. flock conflicts between two
descriptors even inside one process, so without this a nested hold would wait for itself.

Leases (a node holds one it renews; DESIGN.md) have no caller yet: they join this interface with the
backend that needs them, rather than as methods nothing exercises.

Volumes hash onto a fixed set of lock stripes, so lock files never leak.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from storage.errors import LockTimeout, NoSuchDiskGroup

STRIPES = 64



def wanted(keys: tuple[str, ...], shared_dg: bool, exclusive_dg: bool) -> list[tuple[str, int]]:
    """The locks to take, in the one order every taker uses: disk group lock, then sorted stripes."""
    want: list[tuple[str, int]] = []
    if exclusive_dg or shared_dg:
        want.append(("dg.lock", fcntl.LOCK_EX if exclusive_dg else fcntl.LOCK_SH))
    want += [(name, fcntl.LOCK_EX) for name in sorted({stripe(k) for k in keys})]
    return want


def not_held(want: list[tuple[str, int]], held: dict[str, int],
             describe: Callable[[str], str]) -> list[tuple[str, int]]:
    """Of ``want``, those this thread does not hold yet (a thread takes its own locks again for free);
    refuses an upgrade of shared to exclusive, which would deadlock against another shared holder."""
    out = []
    for name, mode in want:
        have = held.get(name)
        if have is None:
            out.append((name, mode))
        elif have == fcntl.LOCK_SH and mode == fcntl.LOCK_EX:
            raise LockTimeout(f"lock {describe(name)} is held shared by this thread and cannot be"
                              " upgraded to exclusive; this is a bug in veritas, please report it")
    return out

class Locks(abc.ABC):
    """The locks of one disk group (or of a store's disk groups together, for what spans them)."""

    @abc.abstractmethod
    def hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False,
             timeout: float = 120.0) -> AbstractContextManager[None]:
        """Hold the disk group lock (shared, or exclusive) and the locks of ``keys``, in a fixed order.

        :raises LockTimeout: after ``timeout`` seconds, holding nothing new.
        :raises NoSuchDiskGroup: when the disk group was destroyed while this waited.
        """

    @abc.abstractmethod
    def try_hold(self, *keys: str, shared_dg: bool = True,
                 exclusive_dg: bool = False) -> AbstractContextManager[bool]:
        """Like hold, without waiting: yields False (holding nothing new) when any of the locks is taken."""

    def owner_gone(self, *keys: str, exclusive_dg: bool = False) -> AbstractContextManager[bool]:
        """For recovery: yields True, holding the locks an intent's owner took, when that owner is gone
        for good (it cannot come back and go on); False, holding nothing new, when it may be alive.

        Locally an owner is gone when its locks are free; a backend spanning hosts overrides this.
        """
        return self.try_hold(*keys, exclusive_dg=exclusive_dg)

    def gone(self) -> None:  # noqa: B027 - optional hook
        """The disk group was destroyed: every waiter for these locks fails with NoSuchDiskGroup."""


def stripe(key: str) -> str:
    """The stripe ``key`` hashes onto: a bounded set of locks, whatever the number of volumes."""
    return f"vol.{zlib.crc32(key.encode()) % STRIPES:02d}.lock"


class FlockLocks(Locks):
    """flock files in ``root``: released by the kernel when their holder dies, on this host only."""

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
        return stripe(key)

    def _needed(self, keys: tuple[str, ...], shared_dg: bool, exclusive_dg: bool) -> list[tuple[str, int]]:
        return not_held(wanted(keys, shared_dg, exclusive_dg), self._held(), lambda name: str(self._path(name)))

    @contextmanager
    def hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False,
             timeout: float = 120.0) -> Iterator[None]:
        """Hold the disk group lock (shared, or exclusive) and the stripes of ``keys``, in a fixed order."""
        taken: list[tuple[str, int]] = []
        held = self._held()
        try:
            for name, mode in self._needed(keys, shared_dg, exclusive_dg):
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

        def release() -> None:
            while taken:
                name, fd = taken.pop()
                held.pop(name, None)
                os.close(fd)

        try:
            for name, mode in self._needed(keys, shared_dg, exclusive_dg):
                fd = self._try(name, mode)
                if fd is None:
                    release()  # all or nothing: a refused try holds nothing new while the caller goes on
                    break
                taken.append((name, fd))
                held[name] = mode
            else:
                yield True
                return
            yield False
        finally:
            release()

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

    def gone(self) -> None:
        """Remove the lock files: a waiter that then takes one finds it unlinked (NoSuchDiskGroup)."""
        for path in [self._path("dg.lock"), *(self._path(f"vol.{i:02d}.lock") for i in range(STRIPES))]:
            path.unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:
            pass  # not empty (a store-wide root holds more), or gone already

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


class LockTable:
    """The state of a set of in-process locks, shared by every MemoryLocks handle on it, by holder
    thread (a thread stands for a process: see abandon)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.shared: dict[str, list[int]] = {}  # lock name -> holder threads (one entry per hold)
        self.excl: dict[str, int] = {}  # lock name -> holder thread
        self.destroyed = False

    def abandon(self, thread: int) -> None:
        """Free every lock ``thread`` holds, as the kernel frees a killed process's flocks: the thread
        must never run again (tests stop it for good at a crash point)."""
        with self.cond:
            for name in [n for n, t in self.excl.items() if t == thread]:
                del self.excl[name]
            for holders in self.shared.values():
                holders[:] = [t for t in holders if t != thread]
            self.cond.notify_all()


class MemoryLocks(Locks):
    """In-process locks with the flock semantics, for fast tests of the upper layers on the memory store.

    Like a flock file opened by two objects, two handles on one LockTable conflict even in one thread,
    and a handle holds again for free what its thread holds through it. An owner is gone when its locks
    are free.
    """

    def __init__(self, name: str = "", table: LockTable | None = None) -> None:
        self.name = name
        self._t = table if table is not None else LockTable()
        self._mine = threading.local()

    def _held(self) -> dict[str, int]:
        held: dict[str, int] | None = getattr(self._mine, "held", None)
        if held is None:
            held = self._mine.held = {}
        return held

    def _wanted(self, keys: tuple[str, ...], shared_dg: bool, exclusive_dg: bool) -> list[tuple[str, int]]:
        return not_held(wanted(keys, shared_dg, exclusive_dg), self._held(), str)

    def _free(self, name: str, mode: int) -> bool:
        return name not in self._t.excl and (mode == fcntl.LOCK_SH or not self._t.shared.get(name))

    def _take(self, name: str, mode: int) -> None:
        if mode == fcntl.LOCK_EX:
            self._t.excl[name] = threading.get_ident()
        else:
            self._t.shared.setdefault(name, []).append(threading.get_ident())
        self._held()[name] = mode

    def _release(self, taken: list[tuple[str, int]]) -> None:
        with self._t.cond:
            for name, mode in reversed(taken):
                self._held().pop(name, None)
                me = threading.get_ident()
                if mode == fcntl.LOCK_EX:
                    if self._t.excl.get(name) == me:
                        self._t.excl.pop(name)
                elif me in self._t.shared.get(name, []):
                    self._t.shared[name].remove(me)
            self._t.cond.notify_all()

    @contextmanager
    def hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False,
             timeout: float = 120.0) -> Iterator[None]:
        taken: list[tuple[str, int]] = []
        t = self._t
        try:
            for name, mode in self._wanted(keys, shared_dg, exclusive_dg):
                with t.cond:
                    if not t.cond.wait_for(lambda n=name, m=mode: t.destroyed or self._free(n, m),  # type: ignore[misc]
                                           timeout):
                        raise LockTimeout(f"timed out after {timeout:.0f} s waiting for lock {name};"
                                          " another veritas operation is still running")
                    if t.destroyed:
                        raise NoSuchDiskGroup(f"disk group {self.name} was destroyed while this operation"
                                              f" waited for its lock {name}")
                    self._take(name, mode)
                    taken.append((name, mode))
            yield
        finally:
            self._release(taken)

    @contextmanager
    def try_hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False) -> Iterator[bool]:
        taken: list[tuple[str, int]] = []
        try:
            with self._t.cond:
                want = self._wanted(keys, shared_dg, exclusive_dg)
                free = all(self._free(n, m) for n, m in want)
                if free:
                    for name, mode in want:
                        self._take(name, mode)
                        taken.append((name, mode))
            yield free
        finally:
            self._release(taken)

    def gone(self) -> None:
        with self._t.cond:
            self._t.destroyed = True
            self._t.cond.notify_all()
