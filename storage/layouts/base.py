"""The layout-engine interface: how a volume's size becomes images on distinct disks and a filesystem.

Every engine passes one contract suite (tests/integration/test_layout_contract.py) against real loop
devices. Engines hold no state; the volume service records what they decide in the catalog.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.errors import InvalidArgument, NoSpace
from storage.kernel import fs
from storage.runner import Runner, run
from storage.units import MiB, round_up


@dataclass(frozen=True)
class Shape:
    """A resolved request: filesystem, mirrors and columns as the engine will build them."""

    fstype: str
    nmirror: int
    ncol: int


class LayoutEngine(abc.ABC):
    name: str
    fstypes: tuple[str, ...]
    redundant: bool = False

    @abc.abstractmethod
    def shape(self, size: int, fstype: str | None, nmirror: int | None, ncol: int | None) -> Shape:
        """Validate and complete the request. :raises InvalidArgument: with what to use instead."""

    @abc.abstractmethod
    def subdisk_sizes(self, size: int, shape: Shape) -> list[int]:
        """Image sizes, one per subdisk; every image goes on a distinct disk."""

    @abc.abstractmethod
    def mkfs(self, devices: Sequence[str], shape: Shape, label: str, runner: Runner = run) -> None: ...

    def profile(self, shape: Shape) -> str | None:
        """btrfs data profile, for engines built on btrfs."""
        return None

    def missing_allowed(self, shape: Shape) -> int:
        """How many subdisks may be lost while the data stays readable."""
        return 0

    def mount(self, devices: Sequence[str], shape: Shape, target: Path, degraded: bool = False,
              runner: Runner = run) -> None:
        opts = ["degraded"] if degraded and shape.fstype == "btrfs" else []
        fs.mount(devices, target, shape.fstype, options=opts, runner=runner)

    @staticmethod
    def place(sizes: Sequence[int], free: Mapping[str, int], layout: str) -> list[str]:
        """Choose a distinct disk for each image, emptiest first, so load spreads across the group."""
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        candidates = sorted(free, key=lambda d: (-free[d], d))
        chosen: dict[int, str] = {}
        used: set[str] = set()
        for i in order:
            disk = next((d for d in candidates if d not in used and free[d] >= sizes[i]), None)
            if disk is None:
                roomy = sum(1 for d in free if free[d] >= min(sizes))
                if len(free) < len(sizes):
                    raise NoSpace(
                        f"layout {layout} needs {len(sizes)} disks, the disk group has {len(free)} online;"
                        " add disks with veritas dg adddisk"
                    )
                raise NoSpace(
                    f"layout {layout} needs {len(sizes)} disks with {sizes[i] // MiB} MiB free each,"
                    f" only {roomy} have room; choose a smaller size or add disks"
                )
            chosen[i] = disk
            used.add(disk)
        return [chosen[i] for i in range(len(sizes))]


def check_fstype(engine: LayoutEngine, fstype: str | None) -> str:
    if fstype is None:
        return engine.fstypes[0]
    if fstype not in ("xfs", "ext4", "btrfs"):
        raise InvalidArgument(f"unknown fstype {fstype!r}; valid: xfs, ext4, btrfs")
    if fstype not in engine.fstypes:
        raise InvalidArgument(
            f"layout {engine.name} uses {'/'.join(engine.fstypes)} (its redundancy is btrfs's own, there is"
            f" no device-mapper here); drop fstype={fstype} or use layout=concat"
        )
    return fstype


def mib(n: int) -> int:
    return round_up(n, MiB)
