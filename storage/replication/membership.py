"""What an RVG holds, changed on both sites (vradmin's delvol, delsec and delpri), over the link.

All three run on the primary with replication stopped (stoprep first: no checkpoint is being taken or
shipped, and the secondary applies nothing meanwhile), and check everything before they change
anything. The secondary's half goes first, through its link service: if it fails or the secondary does
not answer, this site is unchanged. Each half is idempotent (storage.replication.teardown), so after a
kill the same command finishes what was begun.

- delvol RVG VOL: VOL leaves the RVG on both sites. It stays a volume here; the secondary's copy of it
  is removed. The checkpoints kept for the secondary go too (they hold VOL): the next startrep is a
  full sync of the volumes left.
- delsec RVG: the secondary leaves; its replica is removed there. With ``force``, when it does not
  answer, only this site forgets it (run delsec with --force on that site later to drop its replica).
  On a secondary site, only with ``force``: that site's replica is dropped without asking the primary.
- delpri RVG: the RVG is removed from a primary that has no secondary (delsec first); its volumes stay,
  unreplicated.
"""

from __future__ import annotations

from typing import Any

from storage.errors import InUse, InvalidArgument, NoSuchVolume
from storage.group import DiskGroup
from storage.replication import link, rvg, teardown
from storage.replication.errors import LinkError, PeerUnreachable


def _stopped_primary(dg: DiskGroup, name: str, what: str) -> rvg.Rvg:
    r = rvg.get(dg, name)
    if r.role != "primary":
        raise InvalidArgument(f"RVG {name} is the secondary on this site: run {what} on its primary"
                              f" ({r.peer_addr or 'unknown'})")
    if r.state != "stopped":
        raise InUse(f"RVG {name} is {r.state}: stop replication first (veritas rvg stoprep {name}); nothing"
                    f" was changed")
    return r


def _ask_peer(r: rvg.Rvg, key: bytes, msg: dict[str, Any]) -> dict[str, Any]:
    conn = link.Conn(r.peer_addr, key)
    try:
        return conn.call(msg, "ok")
    finally:
        conn.close()


def delvol(dg: DiskGroup, name: str, volume: str, key: bytes) -> dict[str, Any]:
    """Take ``volume`` out of RVG ``name`` on both sites (see the module's docstring)."""
    with rvg.locked(dg), dg.locks.hold(link.sender_lock(name)):
        r = _stopped_primary(dg, name, "delvol")
        if volume not in r.volumes:
            raise NoSuchVolume(f"volume {volume} is not in RVG {name} (its volumes: {', '.join(r.volumes)})")
        if len(r.volumes) == 1:
            raise InvalidArgument(f"volume {volume} is RVG {name}'s only volume: an RVG keeps at least one;"
                                  f" remove the RVG instead (veritas rvg delsec {name}, then delpri {name})")
        if r.peer_addr:
            _ask_peer(r, key, {"type": "delvol", "rvg": name, "volume": volume})
        teardown.drop_checkpoints(dg, name)
        new = rvg.update(dg, name, volumes=tuple(v for v in r.volumes if v != volume), synced=False)
    return {**new.to_json(), "removed_volume": volume}


def delsec(dg: DiskGroup, name: str, key: bytes, secondary: str | None = None, *,
           force: bool = False) -> dict[str, Any]:
    """Remove RVG ``name``'s secondary (see the module's docstring). On a secondary site with ``force``:
    drop this site's replica and record."""
    with rvg.locked(dg), dg.locks.hold(link.sender_lock(name)):
        r = rvg.get(dg, name)
        if r.role == "secondary":
            if not force:
                raise InvalidArgument(f"RVG {name} is the secondary on this site: run delsec on its primary"
                                      f" ({r.peer_addr or 'unknown'}); --force drops this site's replica without"
                                      f" asking it")
            teardown.drop_secondary(dg, name)
            return {"rvg": name, "role": "secondary", "removed": True, "peer_told": False}
        r = _stopped_primary(dg, name, "delsec")
        if not r.peer_addr:
            raise InvalidArgument(f"RVG {name} has no secondary (veritas rvg delpri {name} removes the RVG)")
        if secondary is not None and secondary != r.peer_addr:
            link.parse_addr(secondary)
            raise InvalidArgument(f"{secondary} is not RVG {name}'s secondary ({r.peer_addr})")
        told = True
        try:
            _ask_peer(r, key, {"type": "delsec", "rvg": name})
        except PeerUnreachable as exc:
            if not force:
                raise PeerUnreachable(f"{exc}: delsec asks the secondary to drop its replica; bring its link"
                                      f" service back, or use --force to forget it on this site only (then run"
                                      f" `veritas rvg delsec {name} --force` on that site); nothing was changed")\
                    from None
            told = False
        except LinkError as exc:
            raise type(exc)(f"the secondary {r.peer_addr} refused delsec: {exc}; nothing was changed") from None
        old = r.peer_addr
        new = teardown.forget_peer(dg, name)
    return {**new.to_json(), "removed_secondary": old, "peer_told": told}


def delpri(dg: DiskGroup, name: str) -> dict[str, Any]:
    """Remove RVG ``name`` from this primary site (see the module's docstring)."""
    with rvg.locked(dg), dg.locks.hold(link.sender_lock(name)):
        r = _stopped_primary(dg, name, "delpri")
        if r.peer_addr:
            raise InUse(f"RVG {name} still has a secondary ({r.peer_addr}): remove it first (veritas rvg delsec"
                        f" {name}); nothing was changed")
        teardown.drop_primary(dg, name)
    return {"rvg": name, "removed": True, "volumes": list(r.volumes)}
