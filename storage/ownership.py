"""Which node a volume is attached on, when several nodes share a disk group (issue 10).

A node holds a lease in the disk group's catalog while its plugin runs (plugin.lease renews it); a volume
is attached on one node at a time (Catalog.attach, a compare-and-set) and only a node with a live lease
attaches. A disk group nobody holds a lease in is used by one node: attachments are not used at all, and
mounting is as before. Everything here runs under the volume's lock (the caller holds it).
"""

from __future__ import annotations

import time

from storage.catalog.base import AttachRec, LeaseRec
from storage.errors import InUse, LeaseStale
from storage.group import DiskGroup


def leases(dg: DiskGroup) -> dict[str, LeaseRec]:
    return {rec.node: rec for rec in dg.catalog.leases()}


def claim(dg: DiskGroup, name: str) -> None:
    """Attach volume ``name`` on this node before it is mounted here, or raise InUse naming the node
    that holds it (and record that this node wants it, so a holder whose engine is gone lets it go).

    Mount records of nodes whose lease ran out are dropped: their node lost the volume with its lease
    and will never unmount it (its plugin, when it comes back, does not touch the volume again).
    """
    held = leases(dg)
    now = time.time()
    mine = held.get(dg.node)
    live = mine is not None and mine.expires > now
    if not [n for n in held if n != dg.node] and not live:
        return  # one node, whose plugin is not running (the CLI alone): nobody to share it with
    if not live:
        raise InUse(f"node {dg.node} holds no live lease in disk group {dg.name}, which other nodes share"
                    f" ({', '.join(sorted(held))}); start its plugin (veritas plugin serve), which renews it")
    assert mine is not None
    left = mine.expires - now
    if left < mine.ttl / 2:
        # its plugin fences once half the TTL passed without a renewal: a volume attached now would be
        # stopped again at once (a Mount that came between the catalog answering and the next renewal)
        raise LeaseStale(f"node {dg.node}'s lease in disk group {dg.name} has {left:.1f} s of {mine.ttl:.0f} s left:"
                    " its renewals have not reached the catalog lately, and its plugin fences it at half;"
                    " retry once the plugin renews (it logs each failed renewal)")
    was_mine = any(a.volume == name and a.node == dg.node for a in dg.catalog.attachments())
    try:
        dg.catalog.attach(name, dg.node)
    except InUse:
        holder = next((a.node for a in dg.catalog.attachments() if a.volume == name), None)
        if holder is not None and holder != dg.node:
            dg.catalog.want(name, dg.node)
        raise
    for m in dg.catalog.mounts(name):
        if m.node == dg.node:
            continue
        lease = held.get(m.node)
        if lease is None or lease.expires > now:
            # mounted there before leases were kept, or by a node that lives: never take it from under it
            if not was_mine:
                dg.catalog.detach(name, dg.node)
            raise InUse(f"volume {name} is mounted on node {m.node}; unmount it there first")
        dg.catalog.remove_mount(name, m.node, m.mount_id)


def release(dg: DiskGroup, name: str) -> None:
    """The volume is no longer mounted on this node: let another node attach it."""
    if dg.catalog.leases():
        dg.catalog.detach(name, dg.node)


def holder(dg: DiskGroup, name: str) -> tuple[AttachRec, float] | None:
    """The volume's attachment and its holder's lease expiry (0 without a lease), or None."""
    att = next((a for a in dg.catalog.attachments() if a.volume == name), None)
    if att is None:
        return None
    lease = leases(dg).get(att.node)
    return att, (lease.expires if lease is not None else 0.0)
