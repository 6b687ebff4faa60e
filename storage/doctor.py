"""Finding and fixing disagreements between the catalog, image files, loop devices and mounts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage import recovery
from storage.diskgroup import DiskGroup
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
    from storage import volumes

    out: list[Finding] = []
    vols = {v.name: v for v in dg.catalog.volumes()}
    wanted: dict[Path, str] = {}
    for sd in dg.catalog.subdisks():
        wanted[dg.image(sd.disk, sd.volume, sd.idx)] = sd.volume
    online = {d.name for d in dg.catalog.disks() if d.state == "online"}
    busy = {i.key for i in dg.catalog.intents()}

    # images without catalog rows
    for d in dg.catalog.disks():
        vdir = dg.disk_dir(d.name) / "vols"
        if d.name not in online or not vdir.is_dir():
            continue
        for img in sorted(vdir.glob("*.img")):
            owner = img.name.rsplit(".", 2)[0]
            if img in wanted or owner in busy:
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
            state, _lost = volumes.health(dg, v)
            fixed = False
            if repair and state == "failed":
                volumes.teardown(dg, vol)
                fixed = True
            out.append(Finding("missing-image", vol, f"{img} is missing (volume {state})", fixed))

    # loop devices on our images that nothing mounted needs
    mounted_vols = {n for n in vols if mounts.mounted_at(dg.mountpoint(n))}
    prefix = str(dg.root / "disks") + "/"
    for dev, back in loop.attached().items():
        if not back.startswith(prefix):
            continue
        holder = wanted.get(Path(back))
        if holder in mounted_vols or holder in busy:
            continue
        if holder is None and Path(back).name.rsplit(".", 2)[0] in busy:
            continue
        fixed = False
        if repair and not mounts.targets_of({dev}):
            loop.detach(dev, dg.runner)
            fixed = True
        out.append(Finding("stray-loop", dev, f"attached to {back} but its volume is not mounted", fixed))

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

    # mount points of volumes that no longer exist
    root = str(dg.config.mount_root) + "/"
    suffix = f"_{dg.name}"
    for e in mounts.table():
        if e.target.startswith(root) and e.target.endswith(suffix):
            name = e.target[len(root):-len(suffix)]
            if name not in vols:
                fixed = False
                if repair:
                    fs.umount(Path(e.target), dg.runner)
                    fixed = True
                out.append(Finding("stray-mount", e.target, "no such volume in the catalog", fixed))
    return out
