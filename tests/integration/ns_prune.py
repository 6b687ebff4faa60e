"""Run inside a fresh mount namespace: detach the copies of other tests' and the host's loop-backed
and /tmp mounts, so this namespace does not keep their filesystems (and loop devices) busy.

Usage: ns_prune.py KEEP_ROOT
"""

from __future__ import annotations

import ctypes
import sys

MNT_DETACH = 2


def main() -> None:
    keep = sys.argv[1].rstrip("/") + "/"
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    targets = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            target = left.split()[4].replace("\\040", " ")
            source = right.split()[1] if len(right.split()) > 1 else ""
            if (target + "/").startswith(keep):
                continue
            if target.startswith("/tmp/") or source.startswith("/dev/loop") or target.startswith("/dockerfs"):
                targets.append(target)
    for target in sorted(set(targets), key=lambda t: -t.count("/")):
        libc.umount2(target.encode(), MNT_DETACH)


if __name__ == "__main__":
    main()
