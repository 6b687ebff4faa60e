"""Redundant and striped layouts on btrfs profiles across one loop device per image.

There is no device-mapper or MD RAID on these hosts, so btrfs provides the RAID: mirror is raid1
(raid1c3/raid1c4 for 3/4 mirrors), stripe is raid0 (metadata raid1), mirror-stripe is raid10.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from storage.errors import InvalidArgument
from storage.kernel import btrfs, fs
from storage.layouts.base import LayoutEngine, Shape, check_fstype, mib
from storage.runner import Runner, run

_MIN_DEV = mib(fs.BTRFS_MIN_DEVICE)


class _BtrfsEngine(LayoutEngine):
    fstypes = ("btrfs",)
    meta_profile: str | None = None

    def mkfs(self, devices: Sequence[str], shape: Shape, label: str, runner: Runner = run) -> None:
        fs.mkfs("btrfs", devices, profile=self.profile(shape), meta_profile=self.meta_profile or
                self.profile(shape), label=label, runner=runner)


class _RedundantEngine(_BtrfsEngine):
    """btrfs profiles that keep copies: a lost device is replaced, then the profile is restored."""

    redundant = True

    def replace(self, idx: int, new_dev: str, target: Path, runner: Runner = run) -> None:
        btrfs.replace(idx + 1, new_dev, target, runner)  # btrfs devids count from 1 in mkfs order

    def restore_redundancy(self, shape: Shape, target: Path, runner: Runner = run) -> None:
        btrfs.convert(self.profile(shape) or "raid1", target, runner)


def _count(value: int | None, default: int, lo: int, hi: int, what: str, layout: str) -> int:
    v = default if value is None else value
    if not lo <= v <= hi:
        raise InvalidArgument(f"layout {layout} takes {what} from {lo} to {hi}, got {v}")
    return v


class MirrorEngine(_RedundantEngine):
    name = "mirror"
    takes_nmirror = True

    def shape(self, size: int, fstype: str | None, nmirror: int | None, ncol: int | None) -> Shape:
        if ncol not in (None, 1):
            raise InvalidArgument("layout mirror has one column; use layout=mirror-stripe for columns")
        return Shape(check_fstype(self, fstype), _count(nmirror, 2, 2, 4, "nmirror", self.name), 1)

    def profile(self, shape: Shape) -> str:
        return {2: "raid1", 3: "raid1c3", 4: "raid1c4"}[shape.nmirror]

    def subdisk_sizes(self, size: int, shape: Shape) -> list[int]:
        return [max(mib(size), _MIN_DEV)] * shape.nmirror

    def missing_allowed(self, shape: Shape) -> int:
        return shape.nmirror - 1


class StripeEngine(_BtrfsEngine):
    name = "stripe"
    meta_profile = "raid1"
    takes_ncol = True

    def shape(self, size: int, fstype: str | None, nmirror: int | None, ncol: int | None) -> Shape:
        if nmirror not in (None, 1):
            raise InvalidArgument("layout stripe has no mirrors; use layout=mirror-stripe")
        return Shape(check_fstype(self, fstype), 1, _count(ncol, 2, 2, 16, "ncol", self.name))

    def profile(self, shape: Shape) -> str:
        return "raid0"

    def subdisk_sizes(self, size: int, shape: Shape) -> list[int]:
        return [max(mib(-(-size // shape.ncol)), _MIN_DEV)] * shape.ncol


class MirrorStripeEngine(_RedundantEngine):
    name = "mirror-stripe"
    takes_ncol = True

    def shape(self, size: int, fstype: str | None, nmirror: int | None, ncol: int | None) -> Shape:
        if nmirror not in (None, 2):
            raise InvalidArgument("layout mirror-stripe keeps exactly 2 mirrors (btrfs raid10)")
        return Shape(check_fstype(self, fstype), 2, _count(ncol, 2, 2, 8, "ncol", self.name))

    def profile(self, shape: Shape) -> str:
        return "raid10"

    def subdisk_sizes(self, size: int, shape: Shape) -> list[int]:
        return [max(mib(-(-size // shape.ncol)), _MIN_DEV)] * (2 * shape.ncol)

    def missing_allowed(self, shape: Shape) -> int:
        return 1
