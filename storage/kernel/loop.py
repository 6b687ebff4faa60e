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

FileId = tuple[int, int, int]  # (major, minor) of the filesystem holding a file, and its inode


def _decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's huge_encode_dev() form (what loop_info64.lo_device holds) as (major, minor)."""
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def identity(path: Path) -> FileId | None:
    """What the kernel knows ``path``'s file by: its filesystem's device number and its inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def backing_id(dev: str) -> FileId | None:
    """Identity of the file behind loop device ``dev``, as the kernel holds it (what ``losetup -j``
    compares); None when ``dev`` is not attached or cannot be opened."""
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
    return (*_decode_dev(lo_device), lo_inode)


def backing_id_of(major: int, minor: int) -> FileId | None:
    """Identity of the file behind the loop device numbered ``major:minor`` (a mount's device, say)."""
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{major}:{minor}"))
    except OSError:
        return None
    if not name.startswith("loop"):
        return None
    return backing_id(f"/dev/{name}")


def owns(dev: str, image: Path) -> bool:
    """True when loop device ``dev`` is backed by ``image`` itself, not by a file of the same path in
    another mount namespace (two instances can each have a /var/lib/veritas/images/x.img)."""
    ident = identity(image)
    return ident is not None and backing_id(dev) == ident


def find(image: Path) -> list[str]:
    """Loop devices currently backed by ``image``, told apart by backing (device, inode), never by path.

    sysfs shows a backing file's path as seen from the mount namespace that attached it, so another
    instance's image can show exactly our path, and ours can show a path without its prefix once the
    namespace that attached it is gone. The path only preselects by file name (which the kernel keeps
    current); the inode decides.
    """
    ident = identity(image)
    if ident is None:
        return []
    found = []
    for dev, back in attached().items():
        if os.path.basename(back) == image.name and backing_id(dev) == ident:
            found.append(dev)
    return sorted(found)


SECTOR = 4096


def attach(image: Path, runner: Runner = run, direct_io: bool = True) -> str:
    """Attach ``image`` with 4 KiB sectors and return its device; reuse a device already backed by it.

    Reuse matters: two loop devices on one image would give two mounts divergent caches. 4 KiB
    sectors matter because direct I/O to a reflinked XFS file must be block aligned: a volume made
    with 512-byte sectors could not be mounted again once snapshotted.
    """
    return attach_tracked(image, runner, direct_io)[0]


def attach_tracked(image: Path, runner: Runner = run, direct_io: bool = True) -> tuple[str, bool]:
    """Like attach, and say whether this call attached the device (True) or found it attached.

    A caller that rolls back detaches only what it attached: a device it merely found may serve
    someone else (a mount of this volume in another namespace, say).
    """
    existing = find(image)
    if existing:
        return existing[0], False
    argv = ["losetup", "--find", "--show", f"--sector-size={SECTOR}"]
    if direct_io:
        argv.append("--direct-io=on")
    argv.append(str(image))
    last: CommandFailed | None = None
    for attempt in range(5):
        try:
            dev = runner(argv).stdout.strip()
        except CommandFailed as exc:  # losetup races with concurrent attachers for a free device
            last = exc
            existing = find(image)
            if existing:
                return existing[0], False
            time.sleep(0.05 * (attempt + 1))
            continue
        if not owns(dev, image):
            raise CommandFailed(argv, 0, f"losetup answered {dev}, which is not backed by {image}")
        return dev, True
    if last is None:  # pragma: no cover - the loop above either returns or records an error
        raise CommandFailed(argv, 1, "losetup failed")
    raise last


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
