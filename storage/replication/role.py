"""This site's half of a role change: become primary from the replica's last consistent checkpoint
(promote), or secondary from one of this site's checkpoints (demote).

Both need the RVG's volumes unused here (not mounted, no container's mount), hold the ``@rvgs`` lock
and the volumes' locks throughout, and undo their own steps when one fails. The RVG record's role is
written last: it is the commit (a secondary's old volumes are removed only after it). Until it flips,
a secondary's volumes stay unmountable (storage.rvgrole), so nobody sees a half-made primary.
storage.replication.failover composes the two halves of migrate, takeover and fbsync over the link;
the link service runs the peer's half.

Promote makes each volume's images reflink clones of the replica's (a copy where the disk is another
filesystem). A btrfs one is flagged ``identity_pending``: it gets its own fsid at its first mount
(storage.steps.ensure_identity: its superblocks only), so it mounts beside a copy of the same
filesystem on this host; XFS is mounted nouuid instead (storage.kernel.fs.XFS_MOUNT_OPTIONS). Its
first checkpoint is taken from those images before that, under the replica's sequence number: the
checkpoint both sites hold, which fast-failback starts from.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from storage import crash, durable, steps
from storage.catalog.base import IntentRec, SubdiskRec, VolumeRec
from storage.errors import InUse, InvalidArgument
from storage.group import DiskGroup
from storage.kernel import reflink
from storage.layouts.base import LayoutEngine
from storage.replication import checkpoint, rvg, store
from storage.replication.apply import Replica
from storage.replication.errors import NoSuchCheckpoint
from storage.replication.srl import Srl
from storage.units import format_size

log = logging.getLogger("veritas")
SHAPE_FIELDS = ("size", "layout", "fstype", "nmirror", "ncol", "maxiops", "protect", "provisioning")


def shapes(dg: DiskGroup, volumes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """What a peer needs to make these volumes live from their images: layout, fstype, size..."""
    out: dict[str, dict[str, Any]] = {}
    for v in volumes:
        rec = steps.get(dg, v)
        out[v] = {f: getattr(rec, f) for f in SHAPE_FIELDS}
    return out


def check_adoptable(dg: DiskGroup, name: str, shapes_in: Mapping[str, Any]) -> None:
    """Refuse at addsec, not at a takeover in a disaster, a volume of the RVG that already exists on
    this (secondary) site and could not become the replica's: a takeover replaces its images by the
    replica's, so it must have the primary's shape, be no snapshot, and be unused. (VVR's procedure
    makes the secondary's volumes first, so a matching one is the normal case.)
    :raises InvalidArgument, InUse: naming the volume and the difference; nothing is changed."""
    for v, shape in shapes_in.items():
        rec = dg.catalog.volume(v)
        if rec is None or not isinstance(shape, Mapping):
            continue
        if rec.snapshot_of:
            raise InvalidArgument(f"volume {v} exists on this site as a snapshot of {rec.snapshot_of}: it cannot"
                                  f" become RVG {name}'s replicated volume; remove it here first")
        diffs = [f"{f} {_shown(f, getattr(rec, f))} here, {_shown(f, shape.get(f))} on the primary"
                 for f in ("size", "layout", "fstype", "nmirror", "ncol") if getattr(rec, f) != shape.get(f)]
        if diffs:
            raise InvalidArgument(f"volume {v} exists on this site with another shape than the primary's"
                                  f" ({'; '.join(diffs)}): a takeover would replace its images by the primary's."
                                  f" Remove it here (veritas vol rm -g {dg.name} {v}) or make it as on the primary")
    refuse_in_use(dg, name, tuple(shapes_in))


def _shown(field: str, val: Any) -> str:
    return format_size(val) if field == "size" and isinstance(val, int) else str(val)


def refuse_in_use(dg: DiskGroup, name: str, volumes: tuple[str, ...]) -> None:
    """:raises InUse: a volume of the RVG is mounted here or counted as a container's mount."""
    for v in volumes:
        if dg.catalog.volume(v) is not None and (steps.is_mounted(dg, v) or dg.catalog.mounts(v)):
            raise InUse(f"volume {v} of RVG {name} is mounted on this site (or used by a container): stop"
                        f" its users and unmount it first; a role change needs the RVG's volumes unused")


def copy_image(src: Path, dst: Path) -> None:
    """``dst`` as a reflink clone of ``src``, or a sparse copy where they are on different filesystems."""
    try:
        reflink.clone(src, dst)
        return
    except OSError:
        pass
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        off = 0
        while off < size:
            try:
                off = os.lseek(fi.fileno(), off, os.SEEK_DATA)
            except OSError:
                break  # only a hole is left
            end = os.lseek(fi.fileno(), off, os.SEEK_HOLE)
            while off < end:
                buf = os.pread(fi.fileno(), min(1 << 20, end - off), off)
                os.pwrite(fo.fileno(), buf, off)
                off += len(buf)
        os.fsync(fo.fileno())


def _undo(undo: list[Callable[[], None]]) -> None:
    for fn in reversed(undo):
        try:
            fn()
        except Exception as exc:  # undo all that can be undone, report the rest
            log.error("rolling back: %s", exc)


def by_volume(keys: list[str], volume: str) -> list[tuple[int, str]]:
    """The replica keys (``volume.idx``) of ``volume``, by image index."""
    return sorted((int(k.rsplit(".", 1)[1]), k) for k in keys if k.rsplit(".", 1)[0] == volume)


def promote(dg: DiskGroup, name: str, peer_addr: str, *, state: str, common: bool, autofb: bool = False,
            shapes_in: Mapping[str, Any] | None = None) -> int:
    """Make this site RVG ``name``'s primary from its replica's last consistent checkpoint; its seq.

    ``common``: record that checkpoint as the one both sites keep (a takeover: fbsync starts from it).
    :raises NoSuchCheckpoint: the replica holds none (startrep never completed). Nothing changed then,
    nor on any other failure.
    """
    with rvg.locked(dg):
        r = rvg.get(dg, name)
        with dg.locks.hold(*r.volumes):
            if r.role != "secondary":
                raise InvalidArgument(f"RVG {name} is already primary on this site")
            rep = Replica(rvg.replica_root(dg, name), name)
            rep.recover()
            seq = rep.seq
            if seq == 0:
                raise NoSuchCheckpoint(f"RVG {name}: this site's replica holds no consistent checkpoint (the"
                                       f" initial sync never completed): there is nothing to become primary from")
            keys = rep.keys()
            shp = dict(shapes_in or store.read_json(rvg.shapes_path(dg, name)) or {})
            for v in r.volumes:
                rec = dg.catalog.volume(v)
                have = by_volume(keys, v)
                if not have:
                    raise NoSuchCheckpoint(f"RVG {name}: the replica holds no image of volume {v}")
                if rec is None and v not in shp:
                    raise InvalidArgument(f"RVG {name}: no record of volume {v}'s layout on this site (addsec"
                                          f" records it): make this site secondary again with addsec")
                if rec is not None and len(dg.catalog.subdisks(v)) != len(have):
                    raise InvalidArgument(f"volume {v} here has {len(dg.catalog.subdisks(v))} images and its"
                                          f" replica {len(have)}: remove the local volume {v} first")
            refuse_in_use(dg, name, r.volumes)
            undo: list[Callable[[], None]] = []
            prevs: list[Path] = []
            try:
                for v in r.volumes:
                    _make_live(dg, rep, v, by_volume(keys, v), shp.get(v), undo, prevs)
                crash.point("role.promote.volumes")
                checkpoint.drop_all(dg, name)  # a secondary's leftovers from when it was primary
                checkpoint.take(dg, name, r.volumes, seq=seq)
                undo.append(lambda: checkpoint.drop_all(dg, name))
                srl_root = rvg.srl_root(dg, name)
                store.remove_tree(srl_root)
                undo.append(lambda: store.remove_tree(srl_root))
                Srl(srl_root, r.srl_size).ack(seq)  # the peer holds it: the SRL starts after it
                crash.point("role.promote.checkpoint")
                rvg.update(dg, name, role="primary", state=state, synced=True, peer_addr=peer_addr or r.peer_addr,
                           common_seq=seq if common else 0, autofb=autofb)
            except BaseException:
                _undo(undo)
                raise
            for p in prevs:
                p.unlink(missing_ok=True)
            store.remove_tree(rvg.replica_root(dg, name))
    log.info("RVG %s: this site is now primary, from checkpoint %d", name, seq)
    return seq


def _make_live(dg: DiskGroup, rep: Replica, v: str, have: list[tuple[int, str]], shape: Mapping[str, Any] | None,
               undo: list[Callable[[], None]], prevs: list[Path]) -> None:
    """Volume ``v``'s images become clones of the replica's: a new record, or the images of the
    record this site kept from when it was primary (the old ones kept as ``.prev`` until the commit)."""
    rec = dg.catalog.volume(v)
    if rec is None:
        assert shape is not None
        sizes = [os.stat(rep.image(k)).st_size for _i, k in have]
        first = dg.catalog.disks()[0].name  # where the replica is: a reflink, not a copy
        disks = [first] if len(have) == 1 else LayoutEngine.place(sizes, dg.free(), str(shape["layout"]), dg.name)
        vol = VolumeRec(v, int(shape["size"]), str(shape["layout"]), str(shape["fstype"]), int(shape["nmirror"]),
                        int(shape["ncol"]), int(shape["maxiops"]), None, 0, "creating", time.time(),
                        bool(shape["protect"]), identity_pending=shape["fstype"] == "btrfs",
                        provisioning=str(shape["provisioning"]))
        sds = [SubdiskRec(v, i, d, sz, sz) for (i, _k), d, sz in zip(have, disks, sizes, strict=True)]
        dg.catalog.create_volume(vol, sds, IntentRec(v, "make", {}, time.time()), dg.capacity())
        undo.append(lambda: steps.teardown(dg, v))  # recovery tears it down too if this process dies
        paths = [dg.image(sd.disk, v, sd.idx) for sd in sds]
        for (_i, k), p in zip(have, paths, strict=True):
            copy_image(rep.image(k), p)
        durable.sync_files(paths)
        dg.catalog.finish_intent(v, {"state": "ok"})
        return
    paths = steps.images(dg, rec)
    steps.detach(dg, rec, paths)
    for (_i, k), p in zip(have, paths, strict=True):
        prev = p.with_name(p.name + ".prev")
        if p.exists():
            os.rename(p, prev)
            prevs.append(prev)
            undo.append(_restorer(prev, p))
        copy_image(rep.image(k), p)
    durable.sync_files(paths)
    was = rec.identity_pending
    dg.catalog.update_volume(v, identity_pending=rec.fstype == "btrfs")
    undo.append(lambda: dg.catalog.update_volume(v, identity_pending=was))


def _restorer(prev: Path, p: Path) -> Callable[[], None]:
    return lambda: os.replace(prev, p)


def demote(dg: DiskGroup, name: str, seq: int, peer_addr: str) -> None:
    """Make this site RVG ``name``'s secondary holding its checkpoint ``seq`` (the peer's first, as
    primary). Once the role is recorded, the live volumes are removed: a secondary's data is its
    replica (a reflink of the checkpoint), and its volume names refuse mount and make until a promote
    makes them again. :raises NoSuchCheckpoint: no checkpoint ``seq``; :raises InUse: a volume is
    mounted or has snapshots (nothing changed)."""
    with rvg.locked(dg):
        r = rvg.get(dg, name)
        with dg.locks.hold(*r.volumes):
            if r.role != "primary":
                raise InvalidArgument(f"RVG {name} is already secondary on this site")
            refuse_in_use(dg, name, r.volumes)
            for v in r.volumes:
                snaps = [s.name for s in dg.catalog.volumes() if s.snapshot_of == v]
                if snaps:
                    raise InUse(f"volume {v} of RVG {name} has snapshots ({', '.join(snaps)}): a secondary keeps"
                                f" none; remove them first")
            ck = checkpoint.get(dg, name, seq)
            root = rvg.replica_root(dg, name)
            new, old = root.with_name("replica.new"), root.with_name("replica.old")
            store.remove_tree(new)
            store.remove_tree(old)
            undo: list[Callable[[], None]] = [lambda: store.remove_tree(new)]
            try:
                (new / str(seq)).mkdir(parents=True)
                for img in ck.images:
                    copy_image(ck.path(dg, img), new / str(seq) / f"{img.key}.img")
                durable.sync_dir(new / str(seq))
                store.write_json(new / "consistent.json", {"seq": seq, "rvg": name})
                store.write_json(rvg.shapes_path(dg, name), shapes(dg, r.volumes))
                crash.point("role.demote.replica")
                if root.exists():
                    os.rename(root, old)
                    undo.append(lambda: os.rename(old, root))
                os.rename(new, root)
                undo.append(lambda: os.rename(root, new))
                durable.sync_dir(root.parent)
                crash.point("role.demote.switched")
                rvg.update(dg, name, role="secondary", state="stopped", synced=False, peer_addr=peer_addr,
                           common_seq=0, autofb=False)
            except BaseException:
                _undo(undo)
                raise
            store.remove_tree(old)
            checkpoint.drop_all(dg, name)
            store.remove_tree(rvg.srl_root(dg, name))
            for v in r.volumes:
                steps.teardown(dg, v)
    log.info("RVG %s: this site is now secondary of %s, at checkpoint %d", name, peer_addr, seq)
