"""Finding and fixing disagreements between the catalog, image files, loop devices and mounts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage import mountpoints, recovery, steps
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


def _check(dg: DiskGroup, repair: bool) -> list[Finding]:
    """Loop devices and mounts are ours when the kernel says so: a loop device is this disk group's when
    its backing file lives on one of our disks (by device number), and a volume's when that file is the
    volume's image (by inode). Names and paths of mounts are never parsed, so nothing of another disk
    group (or of another instance with the same paths) is ever reported or touched."""
    out: list[Finding] = []
    vols = {v.name: v for v in dg.catalog.volumes()}
    wanted: dict[Path, str] = {}
    for sd in dg.catalog.subdisks():
        wanted[dg.image(sd.disk, sd.volume, sd.idx)] = sd.volume
    online = {d.name for d in dg.catalog.disks() if d.state == "online"}
    busy = {i.key for i in dg.catalog.intents()}

    # this disk group's image files, by identity: a catalog volume's, or an orphan's (by its file name)
    disk_devs: set[tuple[int, int]] = set()
    files: dict[loop.FileId, Path] = {}
    for d in dg.catalog.disks():
        entry = mounts.mounted_at(dg.disk_dir(d.name))
        vdir = dg.disk_dir(d.name) / "vols"
        if d.name not in online or entry is None or not vdir.is_dir():
            continue
        disk_devs |= mounts.devices_of(entry)
        for img in vdir.glob("*.img"):
            ident = loop.identity(img)
            if ident is not None:
                files[ident] = img

    def owner(ident: loop.FileId) -> str | None:
        img = files.get(ident)
        return None if img is None else wanted.get(img, img.name.rsplit(".", 2)[0])

    # images without catalog rows
    for img in sorted(files.values()):
        name = img.name.rsplit(".", 2)[0]
        if img in wanted or name in busy:
            continue
        fixed = False
        if repair:
            loop.detach_image(img, dg.runner)
            img.unlink(missing_ok=True)
            fixed = True
        out.append(Finding("orphan-image", str(img), "no volume in the catalog owns it", fixed))

    # catalog rows without images
    for img, vol in wanted.items():
        disk = img.parent.parent.name
        if disk in online and not img.exists() and vol not in busy:
            v = vols[vol]
            state, _lost = steps.health(dg, v)
            fixed = False
            if repair and state == "failed":
                steps.teardown(dg, vol)
                fixed = True
            out.append(Finding("missing-image", vol, f"{img} is missing (volume {state})", fixed))

    # loop devices on files of our disks (attached now: repairs above may have detached some)
    ours: dict[str, loop.FileId] = {}
    for dev in loop.attached():
        ident = loop.backing_id(dev)
        if ident is not None and ident[:2] in disk_devs:
            ours[dev] = ident
    by_num = {loop.devnum(dev): dev for dev in ours}
    mounted_vols = {n for n, v in vols.items() if mountpoints.mounted_here(dg, v)}

    # mounts of our loop devices that are not a catalog volume at its own mount point
    used: set[str] = set()
    for e in mounts.table():
        devs = [by_num[n] for n in mounts.devices_of(e) if n in by_num]
        if not devs:
            continue  # not ours: another disk group's, another instance's, or no loop device at all
        holder = owner(ours[devs[0]])
        if holder in busy or (holder in vols and e.target == str(dg.mountpoint(holder))):
            used.update(devs)
            continue
        fixed = False
        if repair:
            fs.umount(Path(e.target), dg.runner)
            fixed = True
        else:
            used.update(devs)
        what = f"volume {holder}'s" if holder in vols else "an image no volume owns:"
        out.append(Finding("stray-mount", e.target, f"mounts {devs[0]}, {what} {files.get(ours[devs[0]])},"
                           " which is not its volume's mount point", fixed))

    # loop devices on our images that nothing mounted needs
    for dev, ident in sorted(ours.items()):
        holder = owner(ident)
        if holder in mounted_vols or holder in busy:
            continue
        fixed = False
        if repair and dev not in used:
            loop.detach(dev, dg.runner)
            fixed = True
        where = files.get(ident, "a deleted image")
        out.append(Finding("stray-loop", dev, f"attached to {where} but its volume is not mounted", fixed))

    # catalog mount records of this node with nothing mounted
    for m in dg.catalog.mounts():
        if m.node == dg.node and m.volume not in mounted_vols and m.volume not in busy:
            fixed = False
            if repair:
                dg.catalog.remove_mount(m.volume, m.node, m.mount_id)
                fixed = True
            out.append(Finding("stale-mount-record", m.volume, f"mount id {m.mount_id} but not mounted", fixed))

    # mounted volumes nobody counts
    for name in sorted(mounted_vols):
        if name in busy:
            continue
        if not [m for m in dg.catalog.mounts(name) if m.node == dg.node]:
            out.append(Finding("uncounted-mount", name, f"mounted at {dg.mountpoint(name)} with no mount id"
                               " recorded; unmount it or mount it again through veritas"))

    # a volume's mount point held by a filesystem that is not the volume: reported, never unmounted
    for name in sorted(vols):
        entry = mounts.mounted_at(dg.mountpoint(name))
        if entry is not None and name not in mounted_vols and name not in busy:
            other = mountpoints.claimant(dg, name)
            out.append(Finding("foreign-mount", str(dg.mountpoint(name)),
                               f"holds {entry.source} ({entry.fstype}), not volume {name}"
                               + (f"; it is the mount point of {other}" if other else "")
                               + "; volume " + name + " cannot be mounted until it goes"))
    return out
