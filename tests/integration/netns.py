"""Network namespaces of test engines: join one from Python, and find the processes still in one.

Test engines run in network namespaces of their own (``unshare -n``), so they can never touch the
host's interfaces (a ``--bridge=none`` dockerd in the host's namespace deletes the host engine's
``docker0``). Such a namespace has no name and no bind mount: it ends with its last process, so
ending those processes by PID is the whole clean-up.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def inode(pid: int | str = "self") -> int:
    """The network namespace of ``pid``, as the kernel names it (nsfs inode)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def members(ns_inode: int) -> list[int]:
    """PIDs of the processes whose network namespace is ``ns_inode``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ns_inode:
                    out.append(int(entry))
            except OSError:
                continue  # gone meanwhile
    return out


def call_in(ns_file: str | Path, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that joined the network namespace ``ns_file`` (e.g. /proc/PID/ns/net):
    sockets it opens live there. Only that thread moves (setns of a network namespace is per
    thread), and it ends before this returns, so it keeps no reference to the namespace."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns_file}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="netns-call")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
