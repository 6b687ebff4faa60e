"""Run inside a fresh mount namespace: detach the copies of other tests' and the host's loop-backed
and /tmp mounts and namespace files, so this namespace does not keep their filesystems (and loop
devices, and namespaces) busy.

Usage: python3 -m lab.nsprune KEEP_ROOT
"""

from __future__ import annotations

import ctypes
import sys

MNT_DETACH = 2


def prune(keep_root: str, also: tuple[str, ...] = ()) -> None:
    """Detach (lazily) every mount outside ``keep_root`` that is under /tmp/, /dockerfs or loop-backed,
    every namespace file (nsfs: a copy would keep another lab's or engine's namespace alive after its
    owner ended it), and every mount at or under one of ``also``."""
    keep = keep_root.rstrip("/") + "/"
    extra = tuple(a.rstrip("/") + "/" for a in also)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    targets = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            target = left.split()[4].replace("\\040", " ")
            source = right.split()[1] if len(right.split()) > 1 else ""
            fstype = right.split()[0] if right.split() else ""
            if (target + "/").startswith(extra) or fstype == "nsfs":
                targets.append(target)
                continue
            if (target + "/").startswith(keep):
                continue
            if target.startswith("/tmp/") or source.startswith("/dev/loop") or target.startswith("/dockerfs"):
                targets.append(target)
    for target in sorted(set(targets), key=lambda t: -t.count("/")):
        libc.umount2(target.encode(), MNT_DETACH)


def main() -> None:
    prune(sys.argv[1])


if __name__ == "__main__":
    main()
