"""Reading volumes: the list and one volume's full state, from the catalog and the kernel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from storage import mountpoints, steps, trees
from storage.catalog.base import SubdiskRec, VolumeRec
from storage.group import DiskGroup
from storage.kernel import fs, mounts, reflink


def list_volumes(dg: DiskGroup) -> list[dict[str, Any]]:
    """One row per volume; cheap (one catalog query and one read of the mount table)."""
    mounted = {e.target for e in mounts.table()}
    root = str(dg.config.mount_root)
    rows = []
    # several nodes: the node each volume is attached on, and when that node's lease runs out
    attached = {a.volume: a.node for a in dg.catalog.attachments()}
    expires = {rec.node: rec.expires for rec in dg.catalog.leases()} if attached else {}
    domains = dg.failure_domains()
    sds: dict[str, list[SubdiskRec]] = {}
    for sd in dg.catalog.subdisks():
        sds.setdefault(sd.volume, []).append(sd)
    for v in dg.catalog.volumes():
        mp = f"{root}/{v.name}_{dg.name}"
        node = attached.get(v.name)
        rows.append({"name": v.name, "size": v.size, "layout": v.layout, "fstype": v.fstype,
                     "maxiops": v.maxiops, "snapshot_of": v.snapshot_of, "state": v.state,
                     "mountpoint": mp, "mounted": mp in mounted and mountpoints.mounted_here(dg, v),
                     "invalid": v.invalid, "provisioning": v.provisioning, "attached_on": node,
                     "lease_expires": expires.get(node) if node else None,
                     "redundant": steps.engine_of(v).redundant,
                     "shared_domain": shared_domain(v, sds.get(v.name, []), domains)})
    return rows


def shared_domain(v: VolumeRec, subdisks: Sequence[SubdiskRec], domains: Mapping[str, str]) -> str | None:
    """Why a redundant volume's copies are no redundancy, when some of them share a failure domain
    (directory disks of one filesystem; see DiskGroupRec.accept_shared_domain); None otherwise (and for
    layouts without copies)."""
    if not steps.engine_of(v).redundant:
        return None
    by: dict[str, list[str]] = {}
    for sd in subdisks:
        by.setdefault(domains.get(sd.disk, sd.disk), []).append(sd.disk)
    where = "; ".join(f"disks {', '.join(sorted(set(ds)))} on {dom}" for dom, ds in sorted(by.items())
                      if len(ds) > 1)
    return f"its copies share one failure domain: {where}" if where else None


def info(dg: DiskGroup, name: str) -> dict[str, Any]:
    v = steps.get(dg, name)
    out: dict[str, Any] = asdict(v)
    mp = dg.mountpoint(name)
    sds = dg.catalog.subdisks(name)
    out["mountpoint"] = str(mp)
    out["mounted"] = mountpoints.mounted_here(dg, v)  # by device: not whatever sits at the path
    out["mounts"] = [asdict(m) for m in dg.catalog.mounts(name)]
    out["diskgroup"] = dg.name
    out["subdisks"] = [{"idx": s.idx, "disk": s.disk, "size": s.size, "reserved": s.reserved,
                        "image": str(dg.image(s.disk, name, s.idx))} for s in sds]
    out["devices"] = steps.devices(dg, v)
    tree = trees.tree_of(dg, v)
    if tree is not None:  # no image: the directory, and the quota's count of what it holds
        out["tree"] = str(tree)
        for s in out["subdisks"]:
            s["image"] = None
    out["health"], out["lost_disks"] = steps.health(dg, v)
    out["shared_domain"] = shared_domain(v, sds, dg.failure_domains())
    out["snapshots"] = [s.name for s in dg.catalog.volumes() if s.snapshot_of == name]
    if tree is not None:
        out["used"] = trees.usage(dg, v)
    elif out["mounted"]:
        total, free = fs.statvfs_size(mp)
        out["used"] = total - free
    else:
        out["used"] = None
    if v.snapshot_of is not None:
        out["cache_used"] = sum(reflink.unshared_bytes(p) for p in steps.images(dg, v) if p.exists())
    return out
