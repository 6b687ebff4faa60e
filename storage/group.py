"""The disk group record: a set of disks (XFS with reflink on an image file or block device) plus a
catalog and locks, as one node sees it once the group is imported; and adding disks to it.

Opening, importing, deporting, creating and destroying disk groups live in storage.dglife.

Its catalog and locks come from a catalog store (storage.catalog.base.CatalogStore; by default the
SQLite one, which keeps them in this same root). Layout of a disk group root (``<state_root>/dg/<name>``)::

    disks/<disk>/       each disk's XFS, mounted; images under vols/, identity in .veritas-disk
    tmp/                scratch mount points for offline work (grow, repair, new identity)
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage import crash, durable
from storage.catalog.base import CatalogStore, DiskGroupRec, DiskRec, IntentRec
from storage.catalog.sqlite_store import SqliteStore
from storage.config import Config
from storage.errors import AlreadyExists, InUse, InvalidArgument, VeritasError
from storage.kernel import fs, loop, mounts
from storage.runner import Runner, run
from storage.units import MiB, check_name, parse_size

_IDENTITY = ".veritas-disk"
DG_KEY = "@dg"  # the intent key of operations on the disk group itself (adddisk)
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

    def __init__(self, config: Config, name: str, runner: Runner = run, *, creating: bool = False,
                 store: CatalogStore | None = None) -> None:
        self.config = config
        self.name = check_name(name, "disk group name")
        self.runner = runner
        self.store = store_of(config, store)
        self.root = config.dg_parent / name
        # a disk group being created has an unpublished catalog until its disks are ready
        self.catalog = self.store.open(name, partial=creating)
        self.locks = self.store.locks(name)
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
                _bring_online(d, target, self.runner, self.catalog.diskgroup())
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
                _refuse_member(self, spec.source)
                created = not spec.source.exists()  # an image we create is ours to delete on rollback
                finish_dg_intent(self)  # a killed adddisk's half-made disk goes first
                self.catalog.put_intent(IntentRec(DG_KEY, "adddisk", {"disk": name, "source": str(spec.source),
                                                                       "created": created}, time.time()))
                crash.point("adddisk.recorded")
                try:
                    rec = _format_disk(self, name, spec, force)
                except BaseException:
                    if created:
                        spec.source.unlink(missing_ok=True)
                    self.catalog.finish_intent(DG_KEY)
                    raise
                self.catalog.add_disk(rec)
                self.catalog.finish_intent(DG_KEY)
                names.append(name)
            return names


def store_of(config: Config, store: CatalogStore | None = None) -> CatalogStore:
    """``store``, or the configured one: SQLite catalogs in the disk group roots, locks beside them."""
    return store if store is not None else SqliteStore(config.dg_parent, config.state_root)


def list_names(config: Config, store: CatalogStore | None = None) -> list[str]:
    return store_of(config, store).names()


def disk_key(path: Path) -> object:
    """What a disk is, whatever name it is given: a block device by its number, a file by (device,
    inode); a path that does not exist (or cannot be reached) by its resolved path."""
    try:
        st = path.stat()
    except OSError:
        return path.resolve()
    if stat.S_ISBLK(st.st_mode):
        return ("block", st.st_rdev)
    return ("file", st.st_dev, st.st_ino)


def _refuse_member(dg: DiskGroup, source: Path) -> None:
    """Refuse, before anything is written, a source that already is one of the group's disks under any
    name, online or not: a lost disk keeps its record (and its source) for repair to report and replace."""
    key = disk_key(source)
    for d in dg.catalog.disks():
        if disk_key(Path(d.source)) == key or Path(d.source) == source.resolve():
            hint = "" if d.state == "online" else "; a replacement needs a name of its own"
            raise AlreadyExists(f"disk {source} is already disk {d.name} of {dg.name} ({d.state}){hint}")


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


def _bring_online(d: DiskRec, target: Path, runner: Runner, dg: DiskGroupRec) -> None:
    """Mount disk ``d`` at ``target`` if what its source holds is that disk; otherwise leave it as found.

    A block device's name is not its identity (sdX and zramN are handed out again): a foreign disk
    left mounted here would count as online at the next open, by its mount alone.
    """
    src = Path(d.source)
    if not src.exists():
        raise VeritasError(f"disk {d.name}: {src} is missing")
    dev, attached = loop.attach_tracked(src, runner) if d.kind == "file" else (str(src), False)
    target.mkdir(parents=True, exist_ok=True)
    mounted = False
    try:
        fs.mount([dev], target, "xfs", runner=runner)
        mounted = True
        _check_identity(target, dg, d.name)
    except VeritasError:
        if mounted:
            fs.umount(target, runner)
        if attached:  # a device found attached may hold this disk mounted elsewhere: not ours to drop
            loop.detach(dev, runner)
        raise


def take_offline(d: DiskRec, target: Path, runner: Runner) -> None:
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



def finish_dg_intent(dg: DiskGroup, intent: IntentRec | None = None) -> str | None:
    """Finish an operation on the disk group itself that a killed process left (an adddisk is rolled
    back, anything else dropped); call with the disk group lock held exclusively. None when there is none.
    """
    if intent is None:
        intent = {i.key: i for i in dg.catalog.intents()}.get(DG_KEY)
        if intent is None:
            return None
    if intent.op != "adddisk":
        dg.catalog.finish_intent(DG_KEY)
        return f"dg {intent.op}: dropped"
    disk = str(intent.data.get("disk"))
    if disk not in {d.name for d in dg.catalog.disks()}:
        target = dg.disk_dir(disk)
        fs.umount(target, dg.runner)
        src = Path(str(intent.data.get("source")))
        loop.detach_image(src, dg.runner)
        try:
            target.rmdir()
        except OSError:
            pass
        if intent.data.get("created"):
            src.unlink(missing_ok=True)  # veritas made this image: a half-formatted copy helps nobody
    dg.catalog.finish_intent(DG_KEY)
    return f"adddisk {disk}: rolled back ({json.dumps(dict(intent.data))})"
