"""Finding and fixing disagreements between the catalog, image files, loop devices and mounts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from storage import mountpoints, recovery, steps, trees
from storage.catalog.base import VolumeRec
from storage.group import DiskGroup
from storage.kernel import fs, loop, mounts


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str
    detail: str
    fixed: bool = False

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}{' (fixed)' if self.fixed else ''}"


def check(dg: DiskGroup, repair: bool = False) -> list[Finding]:
    """Compare the catalog with the kernel and the disks; with ``repair``, make them agree."""
    out: list[Finding] = []
    if repair:
        for line in recovery.recover(dg):
            out.append(Finding("intent", line.split(":")[0], line, True))
    else:
        out += [Finding("intent", i.key, f"unfinished {i.op}") for i in dg.catalog.intents()]
    with dg.locks.hold(exclusive_dg=repair, shared_dg=True):
        out += _check(dg, repair)
    return out


@dataclass
class _Scan:
    """What one check knows of the disk group: catalog rows, and its image files by identity."""

    dg: DiskGroup
    repair: bool
    vols: dict[str, VolumeRec]
    wanted: dict[Path, str]  # image path -> volume, from the catalog
    online: set[str]
    busy: set[str]  # keys with an intent: their owner may be at work, nothing of theirs is touched
    disk_devs: set[tuple[int, int]] = field(default_factory=set)  # device numbers of our disks
    files: dict[loop.FileId, Path] = field(default_factory=dict)  # our image files, by identity

    def owner(self, ident: loop.FileId) -> str | None:
        img = self.files.get(ident)
        return None if img is None else self.wanted.get(img, img.name.rsplit(".", 2)[0])


def _check(dg: DiskGroup, repair: bool) -> list[Finding]:
    """Loop devices and mounts are ours when the kernel says so: a loop device is this disk group's when
    its backing file lives on one of our disks (by device number), and a volume's when that file is the
    volume's image (by inode). Names and paths of mounts are never parsed, so nothing of another disk
    group (or of another instance with the same paths) is ever reported or touched."""
    tree_vols = {v.name for v in dg.catalog.volumes() if trees.is_tree(v)}  # no image: storage.trees
    scan = _Scan(dg, repair, {v.name: v for v in dg.catalog.volumes()},
                 {dg.image(sd.disk, sd.volume, sd.idx): sd.volume for sd in dg.catalog.subdisks()
                  if sd.volume not in tree_vols},
                 {d.name for d in dg.catalog.disks() if d.state == "online"},
                 {i.key for i in dg.catalog.intents()})
    # a volume attached on another node is that node's: its mounts and loop devices (on one kernel,
    # lab nodes see them) are never stray here
    scan.busy |= {a.volume for a in dg.catalog.attachments() if a.node != dg.node}
    # this disk group's image files, by identity: a catalog volume's, or an orphan's (by its file name)
    for d in dg.catalog.disks():
        vdir = dg.disk_dir(d.name) / "vols"
        if d.name not in scan.online or not vdir.is_dir():
            continue
        if d.kind != "dir":  # a directory disk has no mount: its filesystem is shared with others' files
            entry = mounts.mounted_at(dg.disk_dir(d.name))
            if entry is None:
                continue
            scan.disk_devs |= mounts.devices_of(entry)
        for img in vdir.glob("*.img"):
            ident = loop.identity(img)
            if ident is not None:
                scan.files[ident] = img
    out = _orphan_images(scan) + _missing_images(scan) + _missing_trees(scan)
    # loop devices on files of our disks (attached now: repairs above may have detached some); on a
    # directory disk's filesystem only those on our images, since any other file there is not ours
    ours: dict[str, loop.FileId] = {}
    for dev in loop.attached():
        ident = loop.backing_id(dev)
        if ident is not None and (ident[:2] in scan.disk_devs or ident in scan.files):
            ours[dev] = ident
    mounted_vols = {n for n, v in scan.vols.items() if mountpoints.mounted_here(dg, v)}
    found, used = _stray_mounts(scan, ours)
    out += found
    out += _stray_loops(scan, ours, used, mounted_vols)
    out += _mount_records(scan, mounted_vols)
    out += _foreign_mounts(scan, mounted_vols)
    out += _attachments(scan, mounted_vols)
    return out


def _attachments(scan: _Scan, mounted_vols: set[str]) -> list[Finding]:
    """Attachments that disagree with the mounts this node sees, and attachments of nodes whose lease ran
    out (whoever mounts the volume next takes them; until then they are reported)."""
    dg, out = scan.dg, list[Finding]()
    leases = {rec.node: rec for rec in dg.catalog.leases()}
    if not leases:
        return out  # one node: no attachments are kept
    now = time.time()
    attached = {a.volume: a for a in dg.catalog.attachments()}
    for name, a in sorted(attached.items()):
        lease = leases.get(a.node)
        if lease is None or lease.expires <= now:
            out.append(Finding("expired-attachment", name, f"attached on node {a.node}, whose lease "
                               + ("expired " + time.strftime("%H:%M:%S", time.localtime(lease.expires))
                                  if lease else "is gone") + "; the next node to mount it takes it"))
        elif a.node == dg.node and name not in mounted_vols and name not in scan.busy:
            fixed = False
            if scan.repair and not [m for m in dg.catalog.mounts(name) if m.node == dg.node]:
                dg.catalog.detach(name, dg.node)
                fixed = True
            out.append(Finding("idle-attachment", name, "attached on this node but not mounted here", fixed))
    mine = leases.get(dg.node)
    pending = {i.key for i in dg.catalog.intents()}
    for name in sorted(mounted_vols - pending):
        held = attached.get(name)
        if held is None or held.node != dg.node:
            out.append(Finding("unattached-mount", name, f"mounted here but attached on "
                               f"{'node ' + held.node if held else 'no node'}"
                               + ("" if mine and mine.expires > now else "; this node holds no live lease")
                               + "; unmount it here (veritas vol umount --force)"))
    return out


def _orphan_images(scan: _Scan) -> list[Finding]:
    """Images without catalog rows."""
    out = []
    for img in sorted(scan.files.values()):
        name = img.name.rsplit(".", 2)[0]
        if img in scan.wanted or name in scan.busy:
            continue
        fixed = False
        if scan.repair:
            loop.detach_image(img, scan.dg.runner)
            img.unlink(missing_ok=True)
            fixed = True
        out.append(Finding("orphan-image", str(img), "no volume in the catalog owns it", fixed))
    return out


def _missing_images(scan: _Scan) -> list[Finding]:
    """Catalog rows without images."""
    out = []
    for img, vol in scan.wanted.items():
        disk = img.parent.parent.name
        if disk in scan.online and not img.exists() and vol not in scan.busy:
            v = scan.vols[vol]
            state, _lost = steps.health(scan.dg, v)
            fixed = False
            if scan.repair and state == "failed":
                steps.teardown(scan.dg, vol)
                fixed = True
            out.append(Finding("missing-image", vol, f"{img} is missing (volume {state})", fixed))
    return out


def _missing_trees(scan: _Scan) -> list[Finding]:
    """fstype=none volumes whose directory is gone from an online disk: reported, never recreated empty."""
    out = []
    for name, v in sorted(scan.vols.items()):
        tree = trees.tree_of(scan.dg, v)
        if tree is None or name in scan.busy or tree.parent.parent.name not in scan.online or trees.exists(scan.dg, v):
            continue
        out.append(Finding("missing-tree", name, f"{tree} is missing; the volume's data is gone,"
                           f" remove it (veritas vol rm {name})"))
    return out


def _stray_mounts(scan: _Scan, ours: dict[str, loop.FileId]) -> tuple[list[Finding], set[str]]:
    """Mounts of our loop devices that are not a catalog volume at its own mount point; and the devices
    that mounts still use."""
    out = []
    by_num = {loop.devnum(dev): dev for dev in ours}
    used: set[str] = set()
    for e in mounts.table():
        devs = [by_num[n] for n in mounts.devices_of(e) if n in by_num]
        if not devs:
            continue  # not ours: another disk group's, another instance's, or no loop device at all
        holder = scan.owner(ours[devs[0]])
        if holder in scan.busy or (holder in scan.vols and e.target == str(scan.dg.mountpoint(holder))):
            used.update(devs)
            continue
        fixed = False
        if scan.repair:
            fs.umount(Path(e.target), scan.dg.runner)
            fixed = True
        else:
            used.update(devs)
        what = f"volume {holder}'s" if holder in scan.vols else "an image no volume owns:"
        out.append(Finding("stray-mount", e.target, f"mounts {devs[0]}, {what} {scan.files.get(ours[devs[0]])},"
                           " which is not its volume's mount point", fixed))
    return out, used


def _stray_loops(scan: _Scan, ours: dict[str, loop.FileId], used: set[str], mounted_vols: set[str]) -> list[Finding]:
    """Loop devices on our images that nothing mounted needs."""
    out = []
    for dev, ident in sorted(ours.items()):
        holder = scan.owner(ident)
        if holder in mounted_vols or holder in scan.busy:
            continue
        fixed = False
        if scan.repair and dev not in used:
            loop.detach(dev, scan.dg.runner)
            fixed = True
        where = scan.files.get(ident, "a deleted image")
        out.append(Finding("stray-loop", dev, f"attached to {where} but its volume is not mounted", fixed))
    return out


def _mount_records(scan: _Scan, mounted_vols: set[str]) -> list[Finding]:
    """Catalog mount records of this node with nothing mounted, and mounted volumes nobody counts."""
    dg, out = scan.dg, []
    for m in dg.catalog.mounts():
        if m.node == dg.node and m.volume not in mounted_vols and m.volume not in scan.busy:
            fixed = False
            if scan.repair:
                dg.catalog.remove_mount(m.volume, m.node, m.mount_id)
                fixed = True
            out.append(Finding("stale-mount-record", m.volume, f"mount id {m.mount_id} but not mounted", fixed))
    for name in sorted(mounted_vols):
        if name in scan.busy:
            continue
        if not [m for m in dg.catalog.mounts(name) if m.node == dg.node]:
            out.append(Finding("uncounted-mount", name, f"mounted at {dg.mountpoint(name)} with no mount id"
                               " recorded; unmount it or mount it again through veritas"))
    return out


def _foreign_mounts(scan: _Scan, mounted_vols: set[str]) -> list[Finding]:
    """A volume's mount point held by a filesystem that is not the volume: reported, never unmounted."""
    dg, out = scan.dg, []
    for name in sorted(scan.vols):
        entry = mounts.mounted_at(dg.mountpoint(name))
        if entry is not None and name not in mounted_vols and name not in scan.busy:
            other = mountpoints.claimant(dg, name)
            out.append(Finding("foreign-mount", str(dg.mountpoint(name)),
                               f"holds {entry.source} ({entry.fstype}), not volume {name}"
                               + (f"; it is the mount point of {other}" if other else "")
                               + "; volume " + name + " cannot be mounted until it goes"))
    return out
