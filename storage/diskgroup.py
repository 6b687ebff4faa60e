"""Disk groups: sets of disks (XFS with reflink on an image file or block device) plus a catalog.

Layout of a disk group root (``<state_root>/dg/<name>``)::

    catalog.db          the catalog (SQLite, WAL)
    locks/              flock stripes
    disks/<disk>/       each disk's XFS, mounted; images under vols/, identity in .veritas-disk
    tmp/                scratch mount points for offline work (grow, repair, new identity)
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage import crash, durable
from storage.catalog.base import DiskGroupRec, DiskRec, IntentRec, VolumeRec
from storage.catalog.sqlite import SqliteCatalog
from storage.config import Config
from storage.errors import (
    AlreadyExists,
    InUse,
    InvalidArgument,
    NoSuchDiskGroup,
    VeritasError,
)
from storage.kernel import fs, loop, mounts
from storage.locks import LockDir
from storage.runner import Runner, run
from storage.units import MiB, check_name, parse_size

_IDENTITY = ".veritas-disk"
_DG_KEY = "@dg"
DISK_RESERVE = 64 * MiB  # left free on each disk for XFS metadata and log growth


@dataclass(frozen=True)
class DiskSpec:
    """A disk named on the command line: a block device, or an image file (created sparse if missing)."""

    source: Path
    size: int | None = None

    @classmethod
    def parse(cls, text: str, default_size: int | None = None) -> DiskSpec:
        path, sep, size = text.partition("=")
        if not path.startswith("/"):
            raise InvalidArgument(f"disk {text!r}: give an absolute path to a block device or image file")
        return cls(Path(path), parse_size(size, "disk size") if sep else default_size)


class DiskGroup:
    """An imported disk group on this node: its catalog, locks, paths and disks."""

    def __init__(self, config: Config, name: str, runner: Runner = run, _creating: bool = False) -> None:
        self.config = config
        self.name = check_name(name, "disk group name")
        self.runner = runner
        self.root = config.dg_parent / name
        # a disk group being created keeps its catalog under another name until its disks are ready
        self.catalog_path = self.root / ("catalog.db.new" if _creating else "catalog.db")
        if not self.catalog_path.exists():
            raise NoSuchDiskGroup(f"no such disk group: {name} (create it with veritas dg init {name} DISK...)")
        self.catalog = SqliteCatalog(self.catalog_path)
        self.locks = LockDir(self.root / "locks")
        self.node = config.node

    # paths
    def disk_dir(self, disk: str) -> Path:
        return self.root / "disks" / disk

    def image(self, disk: str, volume: str, idx: int) -> Path:
        return self.disk_dir(disk) / "vols" / f"{volume}.{idx}.img"

    def mountpoint(self, volume: str) -> Path:
        return self.config.mount_root / f"{volume}_{self.name}"

    def scratch(self, what: str) -> Path:
        p = self.root / "tmp" / f"{what}.{os.getpid()}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    # state
    def ensure_imported_here(self) -> None:
        rec = self.catalog.diskgroup()
        if rec.imported_on is None:
            raise InUse(f"disk group {self.name} is deported; run veritas dg import {self.name}")
        if rec.imported_on != self.node:
            raise InUse(f"disk group {self.name} is imported on node {rec.imported_on}, not {self.node};"
                        f" deport it there first (or import with --force if that node is dead)")

    def online_disks(self) -> None:
        """Make sure every disk's filesystem is mounted (after a reboot, or a lost disk coming back)."""
        for d in self.catalog.disks():
            target = self.disk_dir(d.name)
            if mounts.mounted_at(target) is not None:
                if d.state != "online":
                    self.catalog.set_disk_state(d.name, "online")
                continue
            try:
                _bring_online(d, target, self.runner)
                _check_identity(target, self.catalog.diskgroup(), d.name)
                state = "online"
            except VeritasError:
                state = "missing"
            if state != d.state:
                self.catalog.set_disk_state(d.name, state)

    def capacity(self) -> dict[str, int]:
        """Usable bytes of each online disk."""
        return {d.name: d.size for d in self.catalog.disks() if d.state == "online"}

    def free(self) -> dict[str, int]:
        used = self.catalog.reserved()
        return {name: cap - used.get(name, 0) for name, cap in self.capacity().items()}

    def summary(self) -> dict[str, object]:
        rec = self.catalog.diskgroup()
        disks = self.catalog.disks()
        used = self.catalog.reserved()
        return {
            "name": self.name,
            "uuid": rec.uuid,
            "imported_on": rec.imported_on,
            "disks": [{"name": d.name, "source": d.source, "kind": d.kind, "size": d.size,
                       "free": d.size - used.get(d.name, 0), "state": d.state} for d in disks],
            "size": sum(d.size for d in disks),
            "free": sum(d.size - used.get(d.name, 0) for d in disks if d.state == "online"),
            "volumes": len(self.catalog.volumes()),
        }

    def close(self) -> None:
        self.catalog.close()

    # disk management
    def add_disks(self, specs: Sequence[DiskSpec], force: bool = False) -> list[str]:
        """Format and add disks; each disk is recorded only once its filesystem is ready."""
        with self.locks.hold(exclusive_dg=True):
            names = []
            taken = {d.name for d in self.catalog.disks()}
            n = 1
            for spec in specs:
                while f"{self.name}{n:02d}" in taken:
                    n += 1
                name = f"{self.name}{n:02d}"
                taken.add(name)
                created = not spec.source.exists()  # an image we create is ours to delete on rollback
                from storage import recovery

                recovery.recover_held(self, _DG_KEY)  # a killed adddisk's half-made disk goes first
                self.catalog.put_intent(IntentRec(_DG_KEY, "adddisk", {"disk": name, "source": str(spec.source),
                                                                       "created": created}, time.time()))
                crash.point("adddisk.recorded")
                try:
                    rec = _format_disk(self, name, spec, force)
                except BaseException:
                    if created:
                        spec.source.unlink(missing_ok=True)
                    self.catalog.finish_intent(_DG_KEY)
                    raise
                self.catalog.add_disk(rec)
                self.catalog.finish_intent(_DG_KEY)
                names.append(name)
            return names


def list_names(config: Config) -> list[str]:
    parent = config.dg_parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if (p / "catalog.db").exists())


def _prepare_source(spec: DiskSpec, force: bool, runner: Runner) -> str:
    src = spec.source
    if src.exists():
        if src.is_block_device():
            kind = "block"
        elif src.is_file():
            kind = "file"
            if spec.size and src.stat().st_size < spec.size:
                os.truncate(src, spec.size)
        else:
            raise InvalidArgument(f"disk {src} is neither a block device nor a regular file")
        num = f"{os.major(src.stat().st_rdev)}:{os.minor(src.stat().st_rdev)}" if kind == "block" else None
        if any(e.source == str(src) or e.major_minor == num for e in mounts.table()):  # by number: any name
            raise InUse(f"disk {src} is mounted; unmount it before adding it to a disk group")
        if kind == "file" and loop.find(src):
            raise InUse(f"disk {src} is attached to {loop.find(src)[0]}; detach it first")
        if not force and runner(["blkid", "-p", str(src)], check=False).returncode == 0:
            raise InUse(f"disk {src} already holds a filesystem or partition table; use --force to overwrite it")
        return kind
    if spec.size is None:
        raise InvalidArgument(f"disk {src} does not exist; give its size (PATH=SIZE or --size) to create it")
    if not src.parent.is_dir():
        raise InvalidArgument(f"cannot create disk image {src}: directory {src.parent} does not exist")
    with open(src, "xb"):
        pass
    os.truncate(src, spec.size)
    return "file"


def _bring_online(d: DiskRec, target: Path, runner: Runner) -> None:
    src = Path(d.source)
    if not src.exists():
        raise VeritasError(f"disk {d.name}: {src} is missing")
    dev, attached = loop.attach_tracked(src, runner) if d.kind == "file" else (str(src), False)
    target.mkdir(parents=True, exist_ok=True)
    try:
        fs.mount([dev], target, "xfs", runner=runner)
    except VeritasError:
        if attached:  # a device found attached may hold this disk mounted elsewhere: not ours to drop
            loop.detach(dev, runner)
        raise


def _take_offline(d: DiskRec, target: Path, runner: Runner) -> None:
    fs.umount(target, runner)
    if d.kind == "file":
        loop.detach_image(Path(d.source), runner)


def _check_identity(target: Path, dg: DiskGroupRec, disk: str) -> None:
    try:
        ident = json.loads((target / _IDENTITY).read_text())
    except (OSError, ValueError):
        raise VeritasError(f"{target} carries no veritas disk identity") from None
    if ident.get("dg_uuid") != dg.uuid or ident.get("disk") != disk:
        raise VeritasError(f"{target} belongs to disk group {ident.get('dg')} disk {ident.get('disk')},"
                           f" not {dg.name} disk {disk}")


def _format_disk(dg: DiskGroup, name: str, spec: DiskSpec, force: bool) -> DiskRec:
    created = not spec.source.exists()
    kind = _prepare_source(spec, force, dg.runner)
    src = spec.source.resolve()
    # rollback detaches only a device this call attached, and unmounts only what it mounted
    dev, attached = loop.attach_tracked(src, dg.runner) if kind == "file" else (str(src), False)
    target = dg.disk_dir(name)
    mounted = False
    try:
        # an image made sparse just now, on a device attached just now, is known blank; anything else
        # is probed on the device itself (the file was probed by _prepare_source) unless forced
        if not force and kind == "file" and not (created and attached):
            fs.refuse_formatted([dev], dg.runner)
        fs.mkfs("xfs", [dev], reflink=True, runner=dg.runner)
        crash.point("adddisk.mkfs")
        target.mkdir(parents=True, exist_ok=True)
        fs.mount([dev], target, "xfs", runner=dg.runner)
        mounted = True
        rec = dg.catalog.diskgroup()
        (target / "vols").mkdir(exist_ok=True)
        durable.write_file(target / _IDENTITY, json.dumps({"dg": rec.name, "dg_uuid": rec.uuid, "disk": name}))
        total, free = fs.statvfs_size(target)
        if kind == "file":
            durable.sync_files([src])  # the image and its name, before the catalog records the disk
    except BaseException:
        if mounted:
            fs.umount(target, dg.runner)
        if attached:
            loop.detach(dev, dg.runner)
        raise
    return DiskRec(name, str(src), kind, max(free - DISK_RESERVE, 0), "online")


def init(config: Config, name: str, specs: Sequence[DiskSpec], force: bool = False,
         runner: Runner = run) -> DiskGroup:
    """Create disk group ``name`` on ``specs`` and import it on this node."""
    check_name(name, "disk group name")
    config.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with LockDir(config.state_root).hold(exclusive_dg=True):  # one disk group creation at a time
        return _init(config, name, specs, force, runner)


def _init(config: Config, name: str, specs: Sequence[DiskSpec], force: bool, runner: Runner) -> DiskGroup:
    if not specs:
        raise InvalidArgument("a disk group needs at least one disk")
    root = config.dg_parent / name
    if (root / "catalog.db").exists():
        raise AlreadyExists(f"disk group {name} already exists")
    seen = set()
    for s in specs:
        if s.source in seen:
            raise InvalidArgument(f"disk {s.source} is named twice")
        seen.add(s.source)
        if not s.source.exists() and s.size is None:
            raise InvalidArgument(f"disk {s.source} does not exist; give its size (PATH=SIZE or --size)")
    created = [s.source for s in specs if not s.source.exists()]  # removed again if init fails
    if root.exists():
        _discard_partial(config, root, runner)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    cat = SqliteCatalog(root / "catalog.db.new")
    try:
        cat.init(DiskGroupRec(name, str(uuid.uuid4()), config.node, time.time()))
    finally:
        cat.close()
    dg = DiskGroup(config, name, runner, _creating=True)
    try:
        dg.add_disks(specs, force)
        crash.point("init.disks")
        dg.close()
        # the rename publishes the disk group: killed before it, the next init discards the remains
        os.replace(root / "catalog.db.new", root / "catalog.db")
        durable.sync_dir(root)  # the rename is the publication: make it survive a power failure
        for suffix in ("-wal", "-shm"):
            (root / f"catalog.db.new{suffix}").unlink(missing_ok=True)
    except BaseException:
        destroy(dg, force=True)
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return DiskGroup(config, name, runner)


def _discard_partial(config: Config, root: Path, runner: Runner) -> None:
    """Remove what an init killed before it published its catalog left: disk mounts, loop devices."""
    disks = root / "disks"
    if disks.is_dir():
        for d in disks.iterdir():
            entry = mounts.mounted_at(d)
            fs.umount(d, runner)
            if entry is not None and entry.source.startswith("/dev/loop"):
                loop.detach(entry.source, runner)
    shutil.rmtree(root, ignore_errors=True)


def open_dg(config: Config, name: str, runner: Runner = run, recover: bool = True) -> DiskGroup:
    """Open an imported disk group, bring its disks online, and finish any abandoned operation."""
    dg = DiskGroup(config, name, runner)
    try:
        dg.ensure_imported_here()
        dg.online_disks()
        if recover:
            from storage import recovery

            recovery.recover(dg)
    except BaseException:
        dg.close()
        raise
    return dg


def import_dg(config: Config, name: str, force: bool = False, runner: Runner = run) -> DiskGroup:
    dg = DiskGroup(config, name, runner)
    rec = dg.catalog.diskgroup()
    if rec.imported_on not in (None, config.node) and not force:
        dg.close()
        raise InUse(f"disk group {name} is imported on node {rec.imported_on}; deport it there first,"
                    " or use --force if that node is dead")
    dg.catalog.set_imported(config.node)
    dg.online_disks()
    from storage import recovery

    recovery.recover(dg)
    return dg


def deport(dg: DiskGroup) -> None:
    """Release the disk group's disks on this node; refused while any of its volumes is mounted."""
    with dg.locks.hold(exclusive_dg=True):
        busy = [m.volume for m in dg.catalog.mounts() if m.node == dg.node]
        busy += [v.name for v in dg.catalog.volumes() if mounts.mounted_at(dg.mountpoint(v.name))]
        if busy:
            raise InUse(f"disk group {dg.name} has mounted volumes ({', '.join(sorted(set(busy)))});"
                        " unmount them first")
        _release_disks(dg)
        dg.catalog.set_imported(None)


def _release_disks(dg: DiskGroup) -> None:
    for d in dg.catalog.disks():
        vols = dg.disk_dir(d.name) / "vols"
        if vols.is_dir():
            for img in vols.iterdir():
                loop.detach_image(img, dg.runner)
        _take_offline(d, dg.disk_dir(d.name), dg.runner)


def destroy(dg: DiskGroup, force: bool = False) -> None:
    """Destroy the disk group. Refused while it holds volumes, unless ``force`` (which removes them).

    The exclusive lock is held from the check to the last removal, so no volume appears in between.
    """
    from storage import volumes

    with dg.locks.hold(exclusive_dg=True):
        vols = dg.catalog.volumes()
        if vols and not force:
            raise InUse(f"disk group {dg.name} holds volumes ({', '.join(v.name for v in vols)});"
                        " remove them or use --force")
        crash.point("destroy.checked")
        # deepest snapshots first, so that every volume has none left when its turn comes
        for v in sorted(vols, key=lambda v: -_snapshot_depth(vols, v.name)):
            volumes.remove(dg, v.name, force=True, _cascade=True)
        _release_disks(dg)
        for d in dg.catalog.disks():
            if d.kind == "file" and Path(d.source).parent == dg.config.state_root / "images":
                Path(d.source).unlink(missing_ok=True)
        dg.close()
        shutil.rmtree(dg.root, ignore_errors=True)


def _snapshot_depth(vols: Sequence[VolumeRec], name: str) -> int:
    """0 for a volume that is no snapshot, 1 for a snapshot of one, 2 for a snapshot of a snapshot..."""
    by_name = {v.name: v for v in vols}
    depth, seen = 0, {name}
    v = by_name.get(name)
    while v is not None and v.snapshot_of is not None and v.snapshot_of not in seen:
        depth += 1
        seen.add(v.snapshot_of)
        v = by_name.get(v.snapshot_of)
    return depth


def default_dg(config: Config, runner: Runner = run) -> DiskGroup:
    """Open the configured disk group, creating the embedded default on sparse images if it is missing."""
    name = config.diskgroup
    if not (config.dg_parent / name / "catalog.db").exists():
        config.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        locks = LockDir(config.state_root)
        with locks.hold(exclusive_dg=True):
            if not (config.dg_parent / name / "catalog.db").exists():
                images = config.state_root / "images"
                images.mkdir(exist_ok=True, mode=0o700)
                interrupted = (config.dg_parent / name / "catalog.db.new").exists()
                specs = []
                for i in range(1, config.default_disk_count + 1):
                    img = images / f"{name}-disk{i}.img"
                    if img.exists():
                        _discard_default_image(name, img, interrupted, runner)
                    specs.append(DiskSpec(img, config.default_disk_size))
                # not forced: the images are made sparse just now, so they are known blank, and a
                # device that is not blank (another instance's) is never formatted
                _init(config, name, specs, False, runner).close()
    return open_dg(config, name, runner)


def _discard_default_image(name: str, img: Path, interrupted: bool, runner: Runner) -> None:
    """Delete an embedded-default disk image that no catalog records, unless it may hold data.

    An init killed before it published its catalog leaves ``catalog.db.new`` and images that only it
    wrote: those go. An image that holds a filesystem while no catalog at all is there belongs to a
    disk group whose catalog was lost; remaking the default on it would destroy its volumes.
    """
    if not interrupted and fs.signature(str(img), runner) is not None:
        raise InUse(f"disk image {img} holds a filesystem, but disk group {name}"
                    " has no catalog: its volumes may still be on it. Move the image away (or delete it"
                    " if its data is not wanted) before the default disk group is made again")
    img.unlink(missing_ok=True)
