"""Per-volume IOPS limits written into cgroups for the volume's loop devices.

cgroup v1 (blkio.throttle.*_iops_device) and v2 (io.max). Under v1 throttling is not hierarchical and
buffered writes are flushed by kernel threads in the root cgroup, so the root cgroup also gets the limit
(the writeback path). The kernel files are the state: which cgroups limit a volume is read back from
them, so a live change reaches every cgroup without remembering anything in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.errors import InvalidArgument, VeritasError

V1_ROOT = Path("/sys/fs/cgroup/blkio")
V2_ROOT = Path("/sys/fs/cgroup")
_V1_FILES = ("blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device")
DOCKER_PARENT = "docker"  # the cgroup parent of Docker's cgroupfs driver when a container names none


@dataclass(frozen=True)
class Hierarchy:
    root: Path
    version: int

    @classmethod
    def detect(cls) -> Hierarchy:
        if (V1_ROOT / _V1_FILES[1]).exists():
            return cls(V1_ROOT, 1)
        if (V2_ROOT / "cgroup.controllers").exists():
            return cls(V2_ROOT, 2)
        raise VeritasError("no cgroup IO controller found (neither v1 blkio nor v2 io); IOPS limits need one")

    def resolve(self, cgroup: str | os.PathLike[str]) -> Path:
        """A cgroup given as an absolute path, or relative to the hierarchy root (e.g. docker/<id>)."""
        p = Path(cgroup)
        path = p if p.is_absolute() else self.root / p
        path = path.resolve()
        if path != self.root and self.root not in path.parents:
            raise InvalidArgument(f"cgroup {cgroup} is not inside {self.root}")
        return path


def container_cgroup(parent: str | None, container_id: str) -> str:
    """The cgroup, relative to the hierarchy root, that Docker's cgroupfs driver gives a container:
    ``PARENT/ID``, with the container's CgroupParent or else "docker".

    Mount makes it ahead of the container's start, so its limit binds from the first I/O.
    :raises InvalidArgument: for an ID that is not one path component (it would name another cgroup).
    """
    if not container_id or "/" in container_id or container_id in (".", ".."):
        raise InvalidArgument(f"container ID {container_id!r} cannot name a cgroup")
    return f"{(parent or DOCKER_PARENT).strip('/')}/{container_id}"


def cgroup_of_pid(h: Hierarchy, pid: int) -> Path | None:
    """The cgroup of process ``pid`` in hierarchy ``h`` (v1 blkio, or the v2 unified path), or None."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        _hid, ctrls, path = line.split(":", 2)
        if h.version == 1 and "blkio" in ctrls.split(","):
            return h.root / path.lstrip("/")
        if ctrls == "":
            unified = h.root / path.lstrip("/")
    return unified if h.version == 2 else None


def _dev_key(dev: tuple[int, int]) -> str:
    return f"{dev[0]}:{dev[1]}"


def set_limit(h: Hierarchy, cgroup: Path, devices: Sequence[tuple[int, int]], iops: int) -> None:
    """Limit read and write IOPS of ``devices`` in ``cgroup`` to ``iops`` (0 removes the limit)."""
    if iops < 0:
        raise InvalidArgument("maxiops must be zero (unlimited) or a positive integer")
    for dev in devices:
        if h.version == 1:
            for name in _V1_FILES:
                (cgroup / name).write_text(f"{_dev_key(dev)} {iops}\n")
        else:
            limit = str(iops) if iops else "max"
            (cgroup / "io.max").write_text(f"{_dev_key(dev)} riops={limit} wiops={limit}\n")


def limits(h: Hierarchy, cgroup: Path) -> dict[str, int]:
    """Write-IOPS limits in force in ``cgroup``, by "major:minor"."""
    out: dict[str, int] = {}
    try:
        if h.version == 1:
            text = (cgroup / _V1_FILES[1]).read_text()
            for line in text.splitlines():
                key, _, val = line.partition(" ")
                if val.strip().isdigit():
                    out[key] = int(val)
        else:
            for line in (cgroup / "io.max").read_text().splitlines():
                key, *fields = line.split()
                for f in fields:
                    if f.startswith("wiops=") and f[6:] != "max":
                        out[key] = int(f[6:])
    except OSError:
        pass
    return out


def cgroups_limiting(h: Hierarchy, devices: Iterable[tuple[int, int]]) -> list[Path]:
    """Every cgroup (the root included) holding a limit for any of ``devices``."""
    keys = {_dev_key(d) for d in devices}
    found = []
    for dirpath, _dirs, _files in os.walk(h.root):
        p = Path(dirpath)
        if keys & limits(h, p).keys():
            found.append(p)
    return found


def apply_writeback(h: Hierarchy, devices: Sequence[tuple[int, int]], iops: int) -> None:
    """v1 only: limit the root cgroup, where kernel flusher threads write buffered data back."""
    if h.version == 1:
        set_limit(h, h.root, devices, iops)
