"""concat: one image on one disk, XFS by default (ext4 below XFS's 300 MiB minimum, or when asked)."""

from __future__ import annotations

from collections.abc import Sequence

from storage.errors import InvalidArgument
from storage.kernel import fs
from storage.layouts.base import LayoutEngine, Shape, check_fstype, mib
from storage.runner import Runner, run
from storage.units import MiB

MIN_SIZE = 32 * MiB


class ConcatEngine(LayoutEngine):
    name = "concat"
    fstypes = ("xfs", "ext4", "btrfs")

    def shape(self, size: int, fstype: str | None, nmirror: int | None, ncol: int | None) -> Shape:
        if nmirror not in (None, 1) or ncol not in (None, 1):
            raise InvalidArgument("layout concat has one column and no mirrors; use layout=mirror or stripe")
        explicit = fstype is not None
        fstype = check_fstype(self, fstype)
        if size < MIN_SIZE:
            raise InvalidArgument(f"size must be at least {MIN_SIZE // MiB} MiB")
        if fstype == "xfs" and size < fs.XFS_MIN:
            if explicit:
                raise InvalidArgument("XFS needs at least 300 MiB; use a larger size or fstype=ext4")
            fstype = "ext4"
        if fstype == "btrfs" and size < fs.BTRFS_MIN_DEVICE:
            raise InvalidArgument("btrfs needs at least 125 MiB; use a larger size or fstype=ext4")
        return Shape(fstype, 1, 1)

    def subdisk_sizes(self, size: int, shape: Shape) -> list[int]:
        return [mib(size)]

    def mkfs(self, devices: Sequence[str], shape: Shape, label: str, runner: Runner = run) -> None:
        fs.mkfs(shape.fstype, devices, profile="single" if shape.fstype == "btrfs" else None,
                label=label, runner=runner)
