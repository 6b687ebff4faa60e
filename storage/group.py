"""The disk group record: a set of disks plus a catalog and locks, as one node sees it once the group
is imported; and adding disks to it.

A disk is an XFS with reflink that veritas makes on an image file or a block device (kinds "file" and
"block"), or a directory on a reflink-capable filesystem the host already has (kind "dir": XFS made
with reflink=1, or btrfs), used as it is: no loop device and no filesystem of our own, only the space
given to it (``PATH=SIZE``), its ``vols/`` and its identity file. Directories of one filesystem fail
together: they are one failure domain, and redundant layouts keep their copies in distinct ones.

Opening, importing, deporting, creating and destroying disk groups live in storage.dglife.

Its catalog and locks come from a catalog store (storage.catalog.base.CatalogStore; by default the
SQLite one, which keeps them in this same root). Layout of a disk group root (``<state_root>/dg/<name>``)::

    disks/<disk>/       each disk's XFS, mounted; images under vols/, identity in .veritas-disk;
                        for a directory disk, a symbolic link to that directory
    tmp/                scratch mount points for offline work (grow, repair, new identity)
"""

from __future__ import annotations

import errno
import json
import logging
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
from storage.errors import AlreadyExists, InUse, InvalidArgument, NoSpace, VeritasError
from storage.kernel import fs, loop, mounts, reflink
from storage.runner import Runner, run
from storage.units import MiB, check_name, format_size, parse_size

log = logging.getLogger("veritas")

_IDENTITY = ".veritas-disk"
DG_KEY = "@dg"  # the intent key of operations on the disk group itself (adddisk)
DISK_RESERVE = 64 * MiB  # left free on each disk for XFS metadata and log growth


@dataclass(frozen=True)
class DiskSpec:
    """A disk named on the command line: a block device, an image file (created sparse if missing), or an
    existing directory on a reflink-capable filesystem (its size is required: the space it may use)."""

    source: Path
    size: int | None = None

    @classmethod
    def parse(cls, text: str, default_size: int | None = None) -> DiskSpec:
        path, sep, size = text.partition("=")
        if not path.startswith("/"):
            raise InvalidArgument(f"disk {text!r}: give an absolute path to a block device, image file or directory")
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
        # a shared group (dg init -s) is every node's; so is one whose nodes hold leases in it
        if rec.imported_on != self.node and not rec.shared and not self._shares_lease():
            raise InUse(f"disk group {self.name} is imported on node {rec.imported_on}, not {self.node};"
                        f" deport it there first (or import with --force if that node is dead)")

    def _shares_lease(self) -> bool:
        """Whether this node shares the disk group imported on another node: it holds a live lease in
        its catalog (its plugin renews one), so volumes are attached on one node at a time
        (storage.ownership) and the import no longer has to be exclusive."""
        now = time.time()
        return any(rec.node == self.node and rec.expires > now for rec in self.catalog.leases())

    def online_disks(self) -> None:
        """Make sure every disk's filesystem is mounted (after a reboot, or a lost disk coming back)."""
        for d in self.catalog.disks():
            target = self.disk_dir(d.name)
            if d.kind != "dir" and mounts.mounted_at(target) is not None:
                if d.state != "online":
                    self.catalog.set_disk_state(d.name, "online")
                continue
            rec = self.catalog.diskgroup()
            try:
                _bring_online(d, target, self.runner, rec)
                state = "online"
            except VeritasError as exc:
                if d.kind != "dir" and mounts.mounted_at(target) is not None:
                    # it came online meanwhile: another node of the site mounted it and the mount
                    # propagated here between the check above and this node's own mount ("already mounted")
                    if d.state != "online":
                        self.catalog.set_disk_state(d.name, "online")
                    continue
                state = "missing"
                log.warning("disk %s of disk group %s is not online on node %s: %s", d.name, self.name,
                            self.node, exc)
                if rec.imported_on not in (None, self.node):
                    # a node sharing the group another imported: its failure is its own (a mount that
                    # has not propagated yet, a disk it cannot reach); the catalog's state is every
                    # node's, and marking the disk missing would starve the importer of its space
                    continue
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
            "accept_shared_domain": rec.accept_shared_domain,
            "shared": rec.shared,
            "disks": [{"name": d.name, "source": d.source, "kind": d.kind, "size": d.size,
                       "free": d.size - used.get(d.name, 0), "state": d.state} for d in disks],
            "size": sum(d.size for d in disks),
            "free": sum(d.size - used.get(d.name, 0) for d in disks if d.state == "online"),
            "volumes": len(self.catalog.volumes()),
        }

    def failure_domains(self) -> dict[str, str]:
        """Each disk's failure domain, as a description: a directory disk's is the filesystem it lies on
        (by device number: two paths to one filesystem are one domain); any other disk is its own."""
        out = {}
        for d in self.catalog.disks():
            out[d.name] = (_filesystem(Path(d.source)) if d.kind == "dir" else None) or f"disk {d.name}"
        return out

    def shared_domains(self, disks: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
        """Failure domains holding more than one disk (of ``disks``, e.g. a volume's, when given), with
        their disks: directory disks of one filesystem."""
        by: dict[str, list[str]] = {}
        for disk, dom in sorted(self.failure_domains().items()):
            if disks is None or disk in disks:
                by.setdefault(dom, []).append(disk)
        return [(dom, names) for dom, names in sorted(by.items()) if len(names) > 1]

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
                                                                       "created": created,
                                                                       "dir": spec.source.is_dir()}, time.time()))
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
    """``store``, or the configured one: SQLite catalogs in the disk group roots, locks beside them; or
    with ``[cluster] catalog = etcd``, catalogs and locks in etcd (the disks stay under the state root)."""
    if store is not None:
        return store
    if config.cluster.catalog == "etcd":
        from storage.catalog.etcd_store import shared_store  # etcd3gw is needed only by who uses it

        return shared_store(config.cluster.etcd_endpoints, lock_ttl=config.cluster.lease_ttl)
    return SqliteStore(config.dg_parent, config.state_root)


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
            raise InvalidArgument(f"disk {src} is neither a block device, a regular file nor a directory")
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


def _prepare_dir(dg: DiskGroup, spec: DiskSpec, force: bool) -> None:
    """Check that directory ``spec.source`` can be a disk: a size, reflink, room, and not another group's
    disk (with ``force``, a leftover identity and images of a disk group that is gone are removed)."""
    src = spec.source
    if spec.size is None:
        raise InvalidArgument(f"directory disk {src}: give the space it may use (PATH=SIZE or --size)")
    err = reflink.probe(src)
    if err is not None:
        where = _filesystem(src) or "its filesystem"
        if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS):
            raise InvalidArgument(
                f"directory {src} lies on {where}, which has no reflink (FICLONE: {err.strerror}); veritas"
                " snapshots clone volume images by reflink. Use a directory on XFS made with reflink=1"
                " or on btrfs, or give a block device or an image file (PATH=SIZE) instead")
        raise InvalidArgument(f"directory {src}: cannot write a probe file in it ({err.strerror})")
    here = os.stat(src)
    for other in dg.catalog.disks():
        try:
            st = os.stat(other.source)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
            raise InUse(f"directory {src} already is disk {other.name} of disk group {dg.name}")
    vols = src / "vols"
    images = sorted(vols.glob("*.img")) if vols.is_dir() else []
    ident = src / _IDENTITY
    data: dict[str, object] = {}
    try:
        data = json.loads(ident.read_text())
    except (OSError, ValueError):
        pass
    live = data.get("dg") in dg.store.names() and (data.get("dg") != dg.name
                                                    or data.get("dg_uuid") == dg.catalog.diskgroup().uuid)
    if live:  # a live group's disk is never taken over, not even forced
        raise InUse(f"directory {src} is disk {data.get('disk')} of disk group {data.get('dg')};"
                    " it cannot be added to another disk group")
    if (ident.exists() or images) and not force:
        owner = f" (disk {data.get('disk')} of disk group {data.get('dg')})" if data else ""
        raise InUse(f"directory {src} already is a veritas disk{owner} or holds volume images in {vols};"
                    " use --force to take it over (its images are deleted)")
    for img in images:
        if loop.find(img):
            raise InUse(f"directory {src}: image {img} is attached to {loop.find(img)[0]}; detach it first")
    _check_room(dg, src.resolve(), spec.size)
    for img in images:
        img.unlink()
    ident.unlink(missing_ok=True)


def _filesystem(path: Path) -> str | None:
    """The filesystem ``path`` lies on, as a description that is the same for every path on it (by the
    device number the kernel gives the file; on btrfs, whose subvolumes each have one, by its fsid);
    None when ``path`` cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    fsid = mounts.btrfs_fsid(path)
    if fsid is not None:
        return f"the btrfs filesystem {fsid}"
    num = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    entry = next((e for e in reversed(mounts.table()) if e.major_minor == num), None)
    return f"the {entry.fstype} filesystem at {entry.target} (device {num})" if entry else f"filesystem {num}"


def _allocated(vols: Path) -> int:
    """Bytes the images under ``vols`` take on their filesystem."""
    total = 0
    for img in vols.glob("*.img") if vols.is_dir() else []:
        try:
            total += img.stat().st_blocks * 512
        except OSError:
            continue
    return total


def _check_room(dg: DiskGroup, src: Path, size: int) -> None:
    """Refuse a directory disk larger than its filesystem's free space, less what this group's other
    directory disks there may still take (their size less what their images already hold)."""
    _total, free = fs.statvfs_size(src)
    where = _filesystem(src)
    promised = sum(max(o.size - _allocated(Path(o.source) / "vols"), 0) for o in dg.catalog.disks()
                   if o.kind == "dir" and _filesystem(Path(o.source)) == where)
    if size > free - promised:
        taken = (f", of which {format_size(promised, long=True)} is promised to this group's other directory"
                 " disks there" if promised else "")
        raise NoSpace(f"directory disk {src}: {format_size(size, long=True)} asked, but {where} has"
                      f" {format_size(free, long=True)} free{taken}; give a smaller size (PATH=SIZE)")


def _format_dir(dg: DiskGroup, name: str, spec: DiskSpec, force: bool) -> DiskRec:
    """Make directory ``spec.source`` disk ``name``: checks, then vols/, identity file, link."""
    _prepare_dir(dg, spec, force)
    src = spec.source.resolve()
    size = spec.size or 0
    target = dg.disk_dir(name)
    made: list[Path] = []
    try:
        vols = src / "vols"
        if not vols.is_dir():
            vols.mkdir()
            made.append(vols)
        rec = dg.catalog.diskgroup()
        made.append(src / _IDENTITY)
        durable.write_file(src / _IDENTITY, json.dumps({"dg": rec.name, "dg_uuid": rec.uuid, "disk": name}))
        _link(target, src)
        made.append(target)
        crash.point("adddisk.dir")
    except BaseException:
        _undo_dir(made)
        raise
    return DiskRec(name, str(src), "dir", size, "online")


def _undo_dir(made: list[Path]) -> None:
    for p in reversed(made):
        try:
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                p.rmdir()
        except OSError:
            pass


def _link(target: Path, src: Path) -> None:
    """Make ``target`` (the disk's place in the group root) a link to directory ``src``."""
    if target.is_symlink():
        if Path(os.readlink(target)) == src:
            return
        target.unlink()
    elif target.is_dir():
        target.rmdir()  # an empty mount point left from before; anything in it is not ours to drop
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, target)


def release_dir(d: DiskRec, target: Path, dg: DiskGroupRec) -> None:
    """Give a destroyed group's directory disk back: its identity, its (empty) vols/ and link go."""
    src = Path(d.source)
    try:
        _check_identity(src, dg, d.name)
    except VeritasError:
        return  # not (or no longer) ours: another group's disk now
    try:
        (src / "vols").rmdir()
    except OSError:
        pass
    (src / _IDENTITY).unlink(missing_ok=True)
    if target.is_symlink():
        target.unlink()


def _bring_online(d: DiskRec, target: Path, runner: Runner, dg: DiskGroupRec) -> None:
    """Mount disk ``d`` at ``target`` if what its source holds is that disk; otherwise leave it as found.

    A block device's name is not its identity (sdX and zramN are handed out again): a foreign disk
    left mounted here would count as online at the next open, by its mount alone.
    """
    src = Path(d.source)
    if d.kind == "dir":  # nothing to attach or mount: the directory is there, and the link leads to it
        if not src.is_dir():
            raise VeritasError(f"disk {d.name}: directory {src} is missing")
        try:
            _link(target, src)
        except OSError as exc:
            raise VeritasError(f"disk {d.name}: cannot link {target} to {src}: {exc.strerror}") from None
        _check_identity(src, dg, d.name)  # the directory is the disk: it must still be this one
        return
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
    if d.kind == "dir":
        return  # nothing mounted, nothing attached: its volumes' loop devices are already detached
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
    if spec.source.is_dir():
        return _format_dir(dg, name, spec, force)
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
    if disk not in {d.name for d in dg.catalog.disks()} and intent.data.get("dir"):
        src = Path(str(intent.data.get("source"))).resolve()
        release_dir(DiskRec(disk, str(src), "dir", 0), dg.disk_dir(disk), dg.catalog.diskgroup())
        target = dg.disk_dir(disk)
        if target.is_symlink():
            target.unlink()
    elif disk not in {d.name for d in dg.catalog.disks()}:
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
