"""Processes and namespaces as the kernel names them: PIDs with their start times, namespace inodes.

The lab ends processes by PID only. A PID is trusted only together with the start time it had when the
lab recorded it, so a recycled PID is never signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # fields from 3 (state) on


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


@dataclass(frozen=True)
class Proc:
    """A PID and the start time that makes it this process and no later one."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        st = start_time(pid)
        return None if st is None else cls(pid, st)

    def alive(self) -> bool:
        return alive(self.pid) and start_time(self.pid) == self.start

    def to_json(self) -> list[int]:
        return [self.pid, self.start]

    @classmethod
    def from_json(cls, v: object) -> Proc | None:
        if isinstance(v, list) and len(v) == 2:
            return cls(int(v[0]), int(v[1]))
        return None


def ns_inode(pid: int | str, kind: str) -> int | None:
    """The inode of ``pid``'s namespace of ``kind`` (net, mnt, uts...), or None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


@dataclass
class Snapshot:
    """One pass over /proc: parent, network and mount namespace of every live process."""

    ppid: dict[int, int]
    net: dict[int, int | None]
    mnt: dict[int, int | None]

    @classmethod
    def take(cls) -> Snapshot:
        ppid: dict[int, int] = {}
        net: dict[int, int | None] = {}
        mnt: dict[int, int | None] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            f = _stat_fields(pid)
            if f is None or f[0] in ("Z", "X"):
                continue
            ppid[pid] = int(f[1])
            net[pid] = ns_inode(pid, "net")
            mnt[pid] = ns_inode(pid, "mnt")
        return cls(ppid, net, mnt)

    def descendants(self, roots: set[int]) -> set[int]:
        children: dict[int, list[int]] = {}
        for p, pp in self.ppid.items():
            children.setdefault(pp, []).append(p)
        out: set[int] = set()
        todo = [r for r in roots if r in self.ppid]
        while todo:
            p = todo.pop()
            if p in out:
                continue
            out.add(p)
            todo.extend(children.get(p, ()))
        return out

    def in_namespaces(self, net: int | None = None, mnt: int | None = None) -> set[int]:
        """Processes in network namespace ``net`` or mount namespace ``mnt``, and all their descendants
        (a container has namespaces of its own but descends from its shim, which is in the node's)."""
        roots = {p for p in self.ppid if (net is not None and self.net[p] == net)
                 or (mnt is not None and self.mnt[p] == mnt)}
        return self.descendants(roots)


def listening(pid: int, host: str, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on IPv4 ``host``:``port``, as the kernel shows
    it: the socket's inode in the table of the process's network namespace (/proc/PID/net/tcp, state
    0A) and among the process's open files."""
    want = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    inodes = {f[9] for f in (line.split() for line in lines) if len(f) > 9 and f[1] == want and f[3] == "0A"}
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                return True
        except OSError:
            continue
    return False


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (zombies included)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is not None and int(f[1]) == pid:
            out.append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents before children (zombies included)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children(p))
    return tree


def pids_with_arg(arg: str) -> list[int]:
    """PIDs of processes with ``arg`` as one of their command-line arguments."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in argv:
                out.append(int(entry))
    return out


def end_pids(pids: list[int], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal ``pids``, wait, then SIGKILL survivors."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_until_gone(members: Callable[[], set[int]], timeout: float = 20.0,
                    stuck: Callable[[set[int]], object] | None = None, stuck_after: float = 1.0) -> list[int]:
    """SIGKILL every PID ``members()`` returns, as a dead host's processes die: all at once. They are
    stopped first (SIGSTOP, again until no new member appears), so none forks or is re-parented out of
    sight while the others die; then killed, again until ``members()`` returns none. Returns the PIDs
    that outlived ``timeout`` (none, normally). ``stuck`` is called once with the PIDs still there
    ``stuck_after`` seconds after the first SIGKILL (a process in an uninterruptible wait, such as a
    write to a frozen filesystem, dies only once that wait ends)."""
    deadline = time.monotonic() + timeout
    first_kill: float | None = None
    stopped: set[int] = set()
    while time.monotonic() < deadline:
        new = members() - stopped
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped |= new
    while True:
        pids = members() | {p for p in stopped if alive(p)}
        if not pids:
            return []  # zombies hold no namespace; their parents (or init) reap them
        if time.monotonic() > deadline:
            return sorted(pids)
        if first_kill is None:
            first_kill = time.monotonic()
        elif stuck is not None and time.monotonic() - first_kill > stuck_after:
            stuck(pids)
            stuck = None
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
