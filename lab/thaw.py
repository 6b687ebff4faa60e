"""Thaw a filesystem that nothing mounts any more: ``unshare -m --propagation private python3 -m
lab.thaw DEV DIR`` (run by lab.core in a mount namespace of its own, so the host sees no mount).

A lab node shares the machine's kernel. When a node is killed while its link service has a volume
frozen for a checkpoint (between ``fsfreeze --freeze`` and ``--unfreeze``), the node's mount namespace
goes but the kernel keeps the frozen filesystem, and with it the volume's loop device and the disk's
filesystem under it. A dead host's kernel keeps nothing. Mounting the device again reaches that same
filesystem (the kernel reuses a live superblock of a block device), which can then be thawed and
unmounted: it then ends as it would have with the node. Exit 0: thawed; 3: it was not frozen.
"""

from __future__ import annotations

import subprocess
import sys


def main(dev: str, mnt: str) -> int:
    r = subprocess.run(["mount", dev, mnt], capture_output=True, text=True, check=False)
    if r.returncode != 0:  # a filesystem left read-only takes only a read-only mount
        r = subprocess.run(["mount", "-o", "ro", dev, mnt], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        print(f"mount {dev}: {r.stderr.strip()}", file=sys.stderr)
        return 1
    try:
        thawed = subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True, check=False).returncode == 0
    finally:
        subprocess.run(["umount", mnt], check=True)
    return 0 if thawed else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
