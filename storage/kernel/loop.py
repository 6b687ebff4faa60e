"""Loop devices: attach images with direct I/O, find them by backing file, detach."""

from __future__ import annotations

import fcntl
import os
import struct
import time
from pathlib import Path

from storage.errors import CommandFailed
from storage.runner import Runner, run

_SYS_BLOCK = Path("/sys/block")


def attached() -> dict[str, str]:
    """Map of /dev/loopN to backing file for every attached loop device (from sysfs, no subprocess)."""
    out: dict[str, str] = {}
    try:
        entries = list(os.scandir(_SYS_BLOCK))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not entry.name.startswith("loop"):
            continue
        try:
            backing = (Path(entry.path) / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.endswith(" (deleted)"):
            backing = backing[: -len(" (deleted)")]
        out[f"/dev/{entry.name}"] = backing
    return out


_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64: lo_device, lo_inode first


def _backing_id(dev: str) -> tuple[int, int] | None:
    """(device, inode) of the file behind ``dev``, as the kernel holds it (what ``losetup -j`` compares)."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError:
        return None
    finally:
        os.close(fd)
    lo_device, lo_inode = _LOOP_INFO64.unpack(info)[:2]
    return lo_device, lo_inode


def find(image: Path) -> list[str]:
    """Loop devices currently backed by ``image``.

    sysfs shows a backing file's path as seen from the mount namespace that attached it; once that
    namespace is gone (a managed plugin disabled and enabled again) the path loses its prefix, e.g.
    ``/images/x.img``. A device whose path differs but whose file name matches is compared by inode.
    """
    target = str(image)
    found = []
    ident: tuple[int, int] | None = None
    for dev, back in attached().items():
        if back == target:
            found.append(dev)
        elif os.path.basename(back) == image.name:
            if ident is None:
                try:
                    st = os.stat(image)
                    ident = (st.st_dev, st.st_ino)
                except OSError:
                    ident = (-1, -1)
            if _backing_id(dev) == ident:
                found.append(dev)
    return sorted(found)


SECTOR = 4096


def attach(image: Path, runner: Runner = run, direct_io: bool = True) -> str:
    """Attach ``image`` with 4 KiB sectors and return its device; reuse a device already backed by it.

    Reuse matters: two loop devices on one image would give two mounts divergent caches. 4 KiB
    sectors matter because direct I/O to a reflinked XFS file must be block aligned: a volume made
    with 512-byte sectors could not be mounted again once snapshotted.
    """
    existing = find(image)
    if existing:
        return existing[0]
    argv = ["losetup", "--find", "--show", f"--sector-size={SECTOR}"]
    if direct_io:
        argv.append("--direct-io=on")
    argv.append(str(image))
    last: CommandFailed | None = None
    for attempt in range(5):
        try:
            return runner(argv).stdout.strip()
        except CommandFailed as exc:  # losetup races with concurrent attachers for a free device
            last = exc
            existing = find(image)
            if existing:
                return existing[0]
            time.sleep(0.05 * (attempt + 1))
    raise last if last is not None else CommandFailed(argv, -1, "losetup was never run")


def _backing(name: str) -> str | None:
    try:
        return (_SYS_BLOCK / name / "loop" / "backing_file").read_text()
    except OSError:
        return None


def detach(dev: str, runner: Runner = run, wait: float = 2.0) -> None:
    """Detach ``dev``; a device that is already gone is not an error.

    While anyone else holds the device open (another process's ``losetup --find`` probing it, say) the
    kernel only marks it autoclear and detaches it at the last close: wait up to ``wait`` seconds for
    that, so the image is really released (its disk can be unmounted) when this returns.
    """
    name = Path(dev).name
    before = _backing(name)
    if before is None:
        return
    proc = runner(["losetup", "-d", dev], check=False)
    if proc.returncode != 0 and _backing(name) is not None:
        raise CommandFailed(["losetup", "-d", dev], proc.returncode, proc.stderr)
    deadline = time.monotonic() + wait
    while _backing(name) == before and time.monotonic() < deadline:
        time.sleep(0.01)


def detach_image(image: Path, runner: Runner = run) -> None:
    for dev in find(image):
        detach(dev, runner)


def refresh_size(dev: str, runner: Runner = run) -> None:
    """Make the loop device see its image's new size after a grow."""
    runner(["losetup", "-c", dev])


def devnum(dev: str) -> tuple[int, int]:
    st = os.stat(dev)
    return os.major(st.st_rdev), os.minor(st.st_rdev)
