"""Loop devices: attach images with direct I/O, find them by backing file, detach."""

from __future__ import annotations

import os
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


def find(image: Path) -> list[str]:
    """Loop devices currently backed by ``image``."""
    target = str(image)
    return sorted(dev for dev, back in attached().items() if back == target)


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
    assert last is not None
    raise last


def detach(dev: str, runner: Runner = run) -> None:
    """Detach ``dev``; a device that is already gone is not an error."""
    name = Path(dev).name
    if not (_SYS_BLOCK / name / "loop" / "backing_file").exists():
        return
    proc = runner(["losetup", "-d", dev], check=False)
    if proc.returncode != 0 and (_SYS_BLOCK / name / "loop" / "backing_file").exists():
        raise CommandFailed(["losetup", "-d", dev], proc.returncode, proc.stderr)


def detach_image(image: Path, runner: Runner = run) -> None:
    for dev in find(image):
        detach(dev, runner)


def refresh_size(dev: str, runner: Runner = run) -> None:
    """Make the loop device see its image's new size after a grow."""
    runner(["losetup", "-c", dev])


def devnum(dev: str) -> tuple[int, int]:
    st = os.stat(dev)
    return os.major(st.st_rdev), os.minor(st.st_rdev)
