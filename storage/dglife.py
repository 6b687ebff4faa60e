"""Disk group lifecycle: create (init, the embedded default), open, import, deport, destroy.

The record these return, storage.group.DiskGroup, knows its disks, paths and catalog; this module is
what brings one into being on this node and takes it away again, finishing any abandoned operation on
the way in (storage.recovery) and removing volumes on the way out (destroy --force).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from storage import crash, recovery, rvgrole
from storage.catalog.base import CatalogStore, DiskGroupRec, VolumeRec
from storage.config import Config
from storage.errors import AlreadyExists, InUse, InvalidArgument
from storage.group import DiskGroup, DiskSpec, disk_key, release_dir, store_of, take_offline
from storage.kernel import fs, loop, mounts, reflink
from storage.runner import Runner, run
from storage.units import MiB, check_name
from storage.volops.remove import remove


def init(config: Config, name: str, specs: Sequence[DiskSpec], force: bool = False,
         runner: Runner = run, store: CatalogStore | None = None, shared: bool = False) -> DiskGroup:
    """Create disk group ``name`` on ``specs`` and import it on this node.

    ``force`` also records in the catalog that the group accepts redundant copies in one failure domain
    (directory disks of one filesystem; DiskGroupRec.accept_shared_domain). ``shared``: in use on every
    node that sees its root (DiskGroupRec.shared), as the vendor's ``vxdg -s init``."""
    check_name(name, "disk group name")
    config.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = store_of(config, store)
    with store.locks().hold(exclusive_dg=True):  # one disk group creation at a time
        return _init(config, name, specs, force, runner, store, accept_shared_domain=force, shared=shared)


def _init(config: Config, name: str, specs: Sequence[DiskSpec], force: bool, runner: Runner,
          store: CatalogStore, accept_shared_domain: bool = False, shared: bool = False) -> DiskGroup:
    if not specs:
        raise InvalidArgument("a disk group needs at least one disk")
    root = config.dg_parent / name
    if store.exists(name):
        raise AlreadyExists(f"disk group {name} already exists")
    seen: set[object] = set()
    for s in specs:
        key = disk_key(s.source)
        if key in seen:
            raise InvalidArgument(f"disk {s.source} is named twice")
        seen.add(key)
        if not s.source.exists() and s.size is None:
            raise InvalidArgument(f"disk {s.source} does not exist; give its size (PATH=SIZE or --size)")
    created = [s.source for s in specs if not s.source.exists()]  # removed again if init fails
    if root.exists() or store.is_partial(name):
        _discard_partial(store, name, root, runner)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    store.create(DiskGroupRec(name, str(uuid.uuid4()), config.node, time.time(),
                              accept_shared_domain=accept_shared_domain, shared=shared)).close()
    dg = DiskGroup(config, name, runner, creating=True, store=store)
    try:
        dg.add_disks(specs, force)
        crash.point("init.disks")
        dg.close()
        # publishing makes the disk group: killed before it, the next init discards the remains
        store.publish(name)
    except BaseException:
        destroy(dg, force=True)
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return DiskGroup(config, name, runner, store=store)


def _discard_partial(store: CatalogStore, name: str, root: Path, runner: Runner) -> None:
    """Remove what an init killed before it published its catalog left: disk mounts, loop devices."""
    store.discard(name)
    disks = root / "disks"
    if disks.is_dir():
        for d in disks.iterdir():
            if d.is_symlink():  # a directory disk: its identity and empty vols/ go, the link with the root
                _forget_dir_disk(d.resolve(), name)
                continue
            entry = mounts.mounted_at(d)
            fs.umount(d, runner)
            if entry is not None and entry.source.startswith("/dev/loop"):
                loop.detach(entry.source, runner)
    shutil.rmtree(root, ignore_errors=True)


def _forget_dir_disk(src: Path, name: str) -> None:
    """Remove what an interrupted init of disk group ``name`` wrote in a directory disk, unless images
    are in it (an init writes none: they are someone's data then)."""
    vols = src / "vols"
    if vols.is_dir() and any(vols.glob("*.img")):
        return
    try:
        ident = json.loads((src / ".veritas-disk").read_text())
    except (OSError, ValueError):
        return
    if isinstance(ident, dict) and ident.get("dg") == name:
        (src / ".veritas-disk").unlink(missing_ok=True)
        try:
            vols.rmdir()
        except OSError:
            pass


def _online_unless_managed(dg: DiskGroup) -> None:
    """Bring the disks online under the shared lock, without waiting for it. Whoever holds the exclusive
    lock (destroy, deport, adddisk) is managing the disks itself: a destroy or deport that took a disk
    offline must not be undone behind its back (that left a mount and a loop device with no group to
    own them), and an open is not held up by a long adddisk; the next open brings them online."""
    with dg.locks.try_hold() as held:
        if held:
            dg.ensure_imported_here()  # again, under the lock: a deport may have ended meanwhile
            dg.online_disks()


def open_dg(config: Config, name: str, runner: Runner = run, recover: bool = True,
            store: CatalogStore | None = None) -> DiskGroup:
    """Open an imported disk group, bring its disks online, and finish any abandoned operation."""
    dg = DiskGroup(config, name, runner, store=store)
    try:
        dg.ensure_imported_here()
        _online_unless_managed(dg)
        if recover:
            recovery.recover(dg)
    except BaseException:
        dg.close()
        raise
    return dg


def import_dg(config: Config, name: str, force: bool = False, runner: Runner = run,
              store: CatalogStore | None = None) -> DiskGroup:
    dg = DiskGroup(config, name, runner, store=store)
    rec = dg.catalog.diskgroup()
    if rec.shared and rec.imported_on is not None:  # in use on every node already: only its disks here
        try:
            _online_unless_managed(dg)
            recovery.recover(dg)
        except BaseException:
            dg.close()
            raise
        return dg
    if rec.imported_on not in (None, config.node) and not force:
        dg.close()
        raise InUse(f"disk group {name} is imported on node {rec.imported_on}; deport it there first,"
                    " or use --force if that node is dead")
    # compare-and-set against the owner just read: a node importing meanwhile is not overwritten
    expect = (rec.imported_on,) if force else (None, config.node)
    try:
        dg.catalog.set_imported(config.node, expect=expect)
    except BaseException:
        dg.close()
        raise
    try:
        _online_unless_managed(dg)
        recovery.recover(dg)
    except BaseException:
        dg.close()
        raise
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
        dg.catalog.set_imported(None, expect=(dg.node,))


def _release_disks(dg: DiskGroup) -> None:
    for d in dg.catalog.disks():
        vols = dg.disk_dir(d.name) / "vols"
        if vols.is_dir():
            for img in vols.iterdir():
                loop.detach_image(img, dg.runner)
        take_offline(d, dg.disk_dir(d.name), dg.runner)


def destroy(dg: DiskGroup, force: bool = False) -> None:
    """Destroy the disk group. Refused while it holds volumes, unless ``force`` (which removes them).

    The exclusive lock is held from the check to the last removal, so no volume appears in between.
    """
    with dg.locks.hold(exclusive_dg=True):
        vols = dg.catalog.volumes()
        if vols and not force:
            raise InUse(f"disk group {dg.name} holds volumes ({', '.join(v.name for v in vols)});"
                        " remove them or use --force")
        held = rvgrole.rvgs(dg)
        if held and not force:  # a secondary's replica is in no volume record: it would go unasked
            raise InUse(f"disk group {dg.name} holds RVGs ({', '.join(f'{n} ({r})' for n, r in held)}), whose"
                        " replicated data would go with it; stop their replication, or use --force")
        crash.point("destroy.checked")
        # deepest snapshots first, so that every volume has none left when its turn comes
        for v in sorted(vols, key=lambda v: -_snapshot_depth(vols, v.name)):
            remove(dg, v.name, force=True, _cascade=True)
        _release_disks(dg)
        rec = dg.catalog.diskgroup()
        for d in dg.catalog.disks():
            if d.kind == "file" and Path(d.source).parent == dg.config.state_root / "images":
                Path(d.source).unlink(missing_ok=True)
            if d.kind == "dir":
                release_dir(d, dg.disk_dir(d.name), rec)
                if Path(d.source).parent == dg.config.state_root / "disks":  # the embedded default's
                    try:
                        Path(d.source).rmdir()
                    except OSError:
                        pass
        dg.close()
        dg.store.destroy(dg.name)  # its catalog and locks: a waiter for them learns it is gone
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


def default_dg(config: Config, runner: Runner = run, store: CatalogStore | None = None) -> DiskGroup:
    """Open the configured disk group, creating the embedded default if it is missing: on directory disks
    under the state root when its filesystem has reflink, else on sparse images there."""
    name = config.diskgroup
    store = store_of(config, store)
    if not store.exists(name):
        config.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with store.locks().hold(exclusive_dg=True):
            if not store.exists(name) and reflink.probe(config.state_root) is None:
                # one host by definition: its directory disks share the state root's filesystem, and a
                # mirror asked through Docker (which cannot say --force) is made there with a warning
                _init(config, name, _default_dirs(config, name, store.is_partial(name)), False, runner,
                      store, accept_shared_domain=True).close()
            elif not store.exists(name):
                images = config.state_root / "images"
                images.mkdir(exist_ok=True, mode=0o700)
                interrupted = store.is_partial(name)
                specs = []
                for i in range(1, config.default_disk_count + 1):
                    img = images / f"{name}-disk{i}.img"
                    if img.exists():
                        _discard_default_image(name, img, interrupted, runner)
                    specs.append(DiskSpec(img, config.default_disk_size))
                # not forced: the images are made sparse just now, so they are known blank, and a
                # device that is not blank (another instance's) is never formatted
                _init(config, name, specs, False, runner, store, accept_shared_domain=True).close()
    return open_dg(config, name, runner, store=store)


def _default_dirs(config: Config, name: str, interrupted: bool) -> list[DiskSpec]:
    """The embedded default's directory disks, ``<state_root>/disks/<dg>-disk<i>``: each of
    default_disk_size, or an even share of the free space when that is less (so a small filesystem
    still gets its default disk group; its volumes then meet the real limit, not a promise)."""
    parent = config.state_root / "disks"
    parent.mkdir(exist_ok=True, mode=0o700)
    count = config.default_disk_count
    dirs = [parent / f"{name}-disk{i}" for i in range(1, count + 1)]
    for d in dirs:
        if d.is_dir():
            vols = d / "vols"
            if not interrupted and vols.is_dir() and any(vols.glob("*.img")):
                raise InUse(f"directory disk {d} holds volume images, but disk group {name} has no catalog:"
                            " its volumes may still be there. Move the directory away (or delete it if its"
                            " data is not wanted) before the default disk group is made again")
            _forget_dir_disk(d, name)
        d.mkdir(exist_ok=True, mode=0o700)
    _total, free = fs.statvfs_size(parent)
    share = (max(free - 64 * MiB, 0) // count) // MiB * MiB
    return [DiskSpec(d, min(config.default_disk_size, share)) for d in dirs]


def _discard_default_image(name: str, img: Path, interrupted: bool, runner: Runner) -> None:
    """Delete an embedded-default disk image that no catalog records, unless it may hold data.

    An init killed before it published its catalog leaves an unpublished catalog and images that only it
    wrote: those go. An image that holds a filesystem while no catalog at all is there belongs to a
    disk group whose catalog was lost; remaking the default on it would destroy its volumes.
    """
    if not interrupted and fs.signature(str(img), runner) is not None:
        raise InUse(f"disk image {img} holds a filesystem, but disk group {name}"
                    " has no catalog: its volumes may still be on it. Move the image away (or delete it"
                    " if its data is not wanted) before the default disk group is made again")
    img.unlink(missing_ok=True)

