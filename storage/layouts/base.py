"""The layout-engine interface: how a volume's size becomes images on distinct disks and a filesystem.

Every engine passes one contract suite (tests/integration/test_layout_contract.py) against real loop
devices. Engines hold no state; the volume service records what they decide in the catalog.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.config import VolumeDefaults
from storage.errors import InUse, InvalidArgument, NoSpace, SharedFailureDomain
from storage.kernel import btrfs_super, fs, loop
from storage.runner import Runner, run
from storage.units import MiB, format_size, round_up


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
    takes_nmirror: bool = False  # the config's nmirror is this layout's default
    takes_ncol: bool = False  # the config's ncol is this layout's default

    def shape_for(self, size: int, fstype: str | None, nmirror: int | None, ncol: int | None,
                  defaults: VolumeDefaults) -> Shape:
        """shape() with the config file's fstype, nmirror and ncol where the request left them open.

        The configured fstype applies to the layouts that can use it, and like the built-in XFS it
        yields to what the size allows (ext4 below XFS's minimum); asked for explicitly, it does not.
        """
        if self.takes_nmirror and nmirror is None:
            nmirror = defaults.nmirror
        if self.takes_ncol and ncol is None:
            ncol = defaults.ncol
        if fstype is None and defaults.fstype in self.fstypes and defaults.fstype != self.fstypes[0]:
            try:
                return self.shape(size, defaults.fstype, nmirror, ncol)
            except InvalidArgument:
                pass  # too small for it: the layout's own choice, as without a configured fstype
        return self.shape(size, fstype, nmirror, ncol)

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
              runner: Runner = run, options: Sequence[str] = ()) -> None:
        opts = ["degraded"] if degraded and shape.fstype == "btrfs" else []
        fs.mount(devices, target, shape.fstype, options=[*opts, *options], runner=runner)

    def detach(self, devices: Sequence[str], shape: Shape, runner: Runner = run) -> None:
        """Detach the loop devices of an unmounted volume; btrfs forgets them first, so a reused loop
        device carries no stale registration."""
        if shape.fstype == "btrfs" and devices:
            fs.forget_btrfs(devices, runner)
        for d in devices:
            loop.detach(d, runner)

    def check_grow_online(self, shape: Shape) -> None:
        """:raises InUse: when the filesystem cannot grow while mounted here (ext4: offline only)."""
        if shape.fstype == "ext4":
            raise InUse("ext4 cannot grow while mounted on this host (online resize needs CAP_SYS_RESOURCE);"
                        " unmount the volume and grow it again, or use fstype=xfs")

    def grow(self, devices: Sequence[str], shape: Shape, target: Path | None, scratch: Callable[[], Path],
             runner: Runner = run) -> None:
        """Grow the filesystem to fill its (already grown and refreshed) devices: online at ``target``
        when mounted there, else offline: ext4 on the devices, the others mounted at ``scratch()``."""
        if target is not None:
            fs.grow(shape.fstype, devices, target, runner)
        elif shape.fstype == "ext4":
            fs.grow("ext4", devices, None, runner)
        else:
            where = scratch()
            self.mount(devices, shape, where, runner=runner)
            try:
                fs.grow(shape.fstype, devices, where, runner)
            finally:
                fs.umount(where, runner)
                where.rmdir()

    def new_identity(self, images: Sequence[Path], shape: Shape, scratch: Callable[[], Path],
                     runner: Runner = run) -> None:
        """Give a clone's filesystem its own identity so it mounts beside its source. btrfs rewrites the
        fsid on the image files (no device with the source's fsid appears); XFS and ext4 are changed on
        loop devices attached for it, with ``scratch()`` for XFS's log replay."""
        if shape.fstype == "btrfs":
            btrfs_super.new_fsid(list(images))
            return
        devs = [loop.attach(p, runner) for p in images]
        where = scratch()
        try:
            fs.new_uuid(shape.fstype, devs, where, runner)
        finally:
            fs.umount(where, runner)
            try:
                where.rmdir()
            except OSError:
                pass
            self.detach([d for p in images for d in loop.find(p)], shape, runner)

    def replace(self, idx: int, new_dev: str, target: Path, runner: Runner = run) -> None:
        """Rebuild subdisk ``idx`` onto ``new_dev`` in the filesystem mounted (degraded) at ``target``."""
        raise InvalidArgument(f"layout {self.name} keeps no redundancy: a lost subdisk cannot be rebuilt")

    def restore_redundancy(self, shape: Shape, target: Path, runner: Runner = run) -> None:
        """After replacing, rewrite what was written degraded with the full profile, and verify it.

        :raises Degraded: if chunks of a weaker profile remain.
        """
        raise InvalidArgument(f"layout {self.name} keeps no redundancy to restore")

    @staticmethod
    def place(sizes: Sequence[int], free: Mapping[str, int], layout: str, group: str = "the disk group",
              domains: Mapping[str, str] | None = None) -> list[str]:
        """Choose a distinct disk for each image, emptiest first, so load spreads across the group; with
        ``domains`` (disk -> failure domain), each in a distinct failure domain too.

        :raises NoSpace: saying, in human units, what is needed and what free space there is.
        :raises SharedFailureDomain: when only disks sharing a failure domain have room for the images.
        """
        if domains is None:
            return LayoutEngine._place(sizes, free, layout, group, None)
        try:
            return LayoutEngine._place(sizes, free, layout, group, domains)
        except NoSpace:
            chosen = LayoutEngine._place(sizes, free, layout, group, None)  # the plain NoSpace, if that
        shared = sorted({domains.get(d, d) for d in chosen})
        by = {dom: sorted(d for d in chosen if domains.get(d, d) == dom) for dom in shared}
        where = "; ".join(f"{', '.join(ds)} on {dom}" for dom, ds in by.items() if len(ds) > 1)
        raise SharedFailureDomain(
            f"layout {layout} keeps copies on {len(sizes)} disks that must fail apart, but the disks of {group}"
            f" with room share a failure domain ({where}): directories of one filesystem are lost together."
            " Add a disk on another filesystem or device, or pass --force (veritas vol make --force) to accept"
        )

    @staticmethod
    def _place(sizes: Sequence[int], free: Mapping[str, int], layout: str, group: str,
               domains: Mapping[str, str] | None) -> list[str]:
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        candidates = sorted(free, key=lambda d: (-free[d], d))
        chosen: dict[int, str] = {}
        used: set[str] = set()
        taken: set[str] = set()  # failure domains used
        for i in order:
            disk = next((d for d in candidates if d not in used and free[d] >= sizes[i]
                         and (domains is None or domains.get(d, d) not in taken)), None)
            if disk is None:
                n = len(sizes)
                disks = f"{n} disk{'s' if n != 1 else ''}"
                if len(free) < n:
                    raise NoSpace(
                        f"layout {layout} needs {disks}, {group} has {len(free)} online;"
                        " add disks with veritas dg adddisk"
                    )
                each = " each" if n > 1 else ""
                largest = max(free.values(), default=0)
                if n == 1:
                    there = f"the largest free space on a disk of {group} is {format_size(largest, long=True)}"
                else:
                    roomy = sum(1 for d in free if free[d] >= sizes[i])
                    listed = ", ".join(f"{d} {format_size(free[d], long=True)}" for d in candidates)
                    there = (f"{roomy} disk{'s' if roomy != 1 else ''} of {group} {'has' if roomy == 1 else 'have'}"
                             f" that much (free: {listed})")
                raise NoSpace(
                    f"layout {layout} needs {disks} with {format_size(sizes[i], long=True)} free{each};"
                    f" {there}; choose a smaller size or add disks"
                )
            chosen[i] = disk
            used.add(disk)
            if domains is not None:
                taken.add(domains.get(disk, disk))
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
