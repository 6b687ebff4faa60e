"""The image every lab node and test engine has: busybox from Debian's busybox-static (no registry is
reachable from the test machines)."""

from __future__ import annotations

import io
import tarfile

IMAGE = "localbusybox:latest"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "dd", "mkdir", "sync", "rm", "test", "touch", "wc", "true")


def busybox_tar() -> bytes:
    """A root filesystem tarball: /bin/busybox, its applets as symlinks, and the usual empty directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for name in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{name}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for d in ("tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
    return buf.getvalue()
