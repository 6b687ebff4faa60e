"""This site's half of taking an RVG apart: a volume out of it, the secondary out of it, the RVG gone.

Each step is idempotent and the RVG record is changed last, so a process killed at any point leaves
a record that still names what is left, and running the same command again finishes the job. What a
site's replication keeps besides the record is removed with it: the primary's checkpoints (reflink
clones, which hold space as the volumes change) and its SRL; the secondary's replica. The volumes of
a primary are never touched: after delpri they are ordinary volumes. A secondary has no volumes of
its own (its data is the replica), so dropping a secondary drops its copy of the data.

storage.replication.membership runs these on both sites over the link; the link service runs the
secondary's half (``drop_secondary_volume``, ``drop_secondary``).
"""

from __future__ import annotations

import logging

from storage import crash, rvgrole
from storage.group import DiskGroup
from storage.replication import checkpoint, role, rvg, store
from storage.replication.apply import Replica
from storage.replication.errors import NoSuchCheckpoint

log = logging.getLogger("veritas")


def drop_checkpoints(dg: DiskGroup, name: str) -> None:
    """Delete the primary's checkpoints and SRL, keeping the sequence's number (consistent.json), so the
    next checkpoint follows the secondary's replica rather than starting again from 1."""
    for c in checkpoint.list_checkpoints(dg, name):
        checkpoint.delete(dg, name, c.seq)
    checkpoint.recover(dg, name)
    store.remove_tree(rvg.srl_root(dg, name))


def _forget(dg: DiskGroup, name: str) -> None:
    """The record (the commit), then the RVG's directories on the root (its link state, shapes and
    checkpoint records) and on every disk."""
    store.remove_tree(rvgrole.record_path(dg, name))
    for d in dg.catalog.disks():
        base = dg.disk_dir(d.name)
        store.remove_tree(base / "repl" / name)
        store.remove_tree(base / "rlink" / name)
    store.remove_tree(checkpoint.meta_dir(dg, name))


def drop_secondary_volume(dg: DiskGroup, name: str, volume: str) -> bool:
    """On a secondary (caller holds ``rvg.locked`` and the sender lock): forget ``volume``: its images
    in the replica, its shape, then its name in the record. False when it was not in the RVG."""
    r = rvg.get(dg, name)
    if volume not in r.volumes:
        return False
    rep = Replica(rvg.replica_root(dg, name), name)
    try:
        for _idx, key in role.by_volume(rep.keys(), volume):
            store.remove_tree(rep.image(key))
    except NoSuchCheckpoint:
        pass  # no replica (addsec killed early): nothing to remove
    shapes = store.read_json(rvg.shapes_path(dg, name))
    if isinstance(shapes, dict) and volume in shapes:
        del shapes[volume]
        store.write_json(rvg.shapes_path(dg, name), shapes)
    rvg.update(dg, name, volumes=tuple(v for v in r.volumes if v != volume))
    log.info("RVG %s: volume %s taken out; its replica here is removed", name, volume)
    return True


def drop_secondary(dg: DiskGroup, name: str) -> None:
    """On a secondary (caller holds ``rvg.locked`` and the sender lock): remove the replica, then the
    record, then the RVG's directories; its volume names are free on this site afterwards."""
    store.remove_tree(rvg.replica_root(dg, name))
    crash.point("repl.delsec.replica")
    _forget(dg, name)
    log.info("RVG %s: this site is no longer its secondary; its replica is removed", name)


def forget_peer(dg: DiskGroup, name: str) -> rvg.Rvg:
    """On the primary (caller holds ``rvg.locked`` and the sender lock): no secondary any more. The
    checkpoints and SRL kept for it go; the record says stopped, never synced, no peer."""
    drop_checkpoints(dg, name)
    crash.point("repl.delsec.checkpoints")
    store.remove_tree(checkpoint.meta_dir(dg, name) / "link.json")
    return rvg.update(dg, name, peer_addr="", local_addr="", synced=False, state="stopped", common_seq=0,
                      autofb=False)


def drop_primary(dg: DiskGroup, name: str) -> None:
    """On a primary without a secondary (caller holds ``rvg.locked`` and the sender lock): the
    checkpoints, the SRL, then the record and the directories. The volumes stay, unreplicated."""
    drop_checkpoints(dg, name)
    crash.point("repl.delpri.checkpoints")
    _forget(dg, name)
    log.info("RVG %s removed; its volumes stay, unreplicated", name)
