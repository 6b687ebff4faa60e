"""Role changes across the two sites (vradmin's migrate, takeover, fbsync, resync), over the link.

- migrate (on the primary, planned): the RVG's volumes unused, a final checkpoint shipped and applied
  (the secondary holds the primary's last checkpoint, or nothing changes), the secondary promoted,
  this site demoted to its secondary at that checkpoint. A failure after the peer's promote asks the
  peer to demote again, so both roles are as they were.
- takeover (on the secondary, its primary unreachable): this site becomes primary from its replica's
  last consistent checkpoint, and keeps that checkpoint as the one in common with the old primary.
- fbsync (on the new primary): the old primary lists the ranges it changed since the common
  checkpoint and becomes secondary at it (its own writes since are discarded, as VVR's are); this
  site ships the ranges changed on either side, read from a new checkpoint. Never a full copy.
- resync (on the primary): the DCM's ranges when it tracks any, else a full sync of allocated extents.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from storage import crash
from storage.errors import InUse, InvalidArgument
from storage.group import DiskGroup
from storage.replication import checkpoint, deltaset, link, role, rvg, store
from storage.replication.errors import (
    AuthFailed,
    LinkError,
    NoCommonCheckpoint,
    OutOfDate,
    PeerError,
    PeerUnreachable,
    ProtocolError,
)
from storage.replication.srl import Srl, merge_maps, peek

log = logging.getLogger("veritas")


def _primary(dg: DiskGroup, name: str, what: str) -> rvg.Rvg:
    r = rvg.get(dg, name)
    if r.role != "primary":
        raise InvalidArgument(f"RVG {name} is the secondary on this site: run {what} on its primary ({r.peer_addr})")
    return r


def migrate(dg: DiskGroup, name: str, new_primary: str, key: bytes) -> dict[str, Any]:
    """Hand the primary role to the secondary at ``new_primary``; this site becomes its secondary."""
    link.parse_addr(new_primary)
    r = _primary(dg, name, "migrate")
    if r.peer_addr != new_primary:
        raise InvalidArgument(f"{new_primary} is not RVG {name}'s secondary ({r.peer_addr or 'none'})")
    if r.common_seq:
        raise InvalidArgument(f"RVG {name} was taken over and its old primary not yet resynchronised: fbsync first")
    if not r.synced or r.state != "replicating":
        raise OutOfDate(f"RVG {name} is {r.state}{'' if r.synced else ', never synced'}: its secondary is not"
                        f" kept up to date; {'resumerep' if r.state == 'paused' else 'startrep'} {name} first")
    role.refuse_in_use(dg, name, r.volumes)
    t0 = time.monotonic()
    conn = link.Conn(r.peer_addr, key)
    try:
        with rvg.locked(dg), dg.locks.hold(link.sender_lock(name)), dg.locks.hold(*r.volumes):
            role.refuse_in_use(dg, name, r.volumes)  # nobody mounted one meanwhile: they stay unused now
            r = rvg.get(dg, name)
            seq = link.tick(dg, r)  # the final checkpoint, of unmounted volumes
            sec = link.catch_up(dg, r, conn)
            if sec != seq:
                raise OutOfDate(f"RVG {name}: the secondary holds checkpoint {sec}, not the final {seq}: not up"
                                f" to date (nothing changed)")
            crash.point("role.migrate.shipped")
            conn.call({"type": "promote", "rvg": name, "seq": seq, "primary_addr": r.local_addr,
                       "shapes": role.shapes(dg, r.volumes)}, "ok")
            try:
                crash.point("role.migrate.promoted")
                role.demote(dg, name, seq, r.peer_addr)
            except BaseException:
                try:
                    conn.call({"type": "demote", "rvg": name, "seq": seq, "primary_addr": r.local_addr}, "ok")
                except (LinkError, OSError) as exc:
                    log.error("RVG %s: %s stays primary and so does this site: demote one (migrate failed"
                              " half-way and its peer could not be rolled back: %s)", name, new_primary, exc)
                raise
    finally:
        conn.close()
    return {"rvg": name, "seq": seq, "primary": new_primary, "secondary": r.local_addr,
            "seconds": round(time.monotonic() - t0, 3)}


PROBE_TIMEOUT = 3.0  # seconds to connect when asking the peer its role
# seconds to wait for each of its answers once connected: a live primary that is slow to answer (its
# disks busy) must not pass for gone, yet one whose kernel accepts but whose service hangs is gone
PROBE_ANSWER_TIMEOUT = 10.0


def probe_peer(r: rvg.Rvg, key: bytes, timeout: float = PROBE_TIMEOUT,
               answer_timeout: float = PROBE_ANSWER_TIMEOUT) -> str | None:
    """The role the peer's link service answers for RVG ``r`` (primary or secondary), or None when it
    cannot be reached at all (refused, timed out, reset: the one case a takeover may take for "gone").

    :raises AuthFailed: it answers but does not prove the key (it may well be a live primary);
    :raises ProtocolError: it answers in another protocol or version, or with a role that is none;
    :raises PeerError: it answers the role request with an error."""
    try:
        conn = link.Conn(r.peer_addr, key, timeout=timeout, io_timeout=answer_timeout)
    except PeerUnreachable:
        return None
    try:
        got = conn.call({"type": "role", "rvg": r.name}, "role").get("role")
    except PeerUnreachable:
        return None
    finally:
        conn.close()
    if got not in rvg.ROLES:
        raise ProtocolError(f"link to {r.peer_addr}: the peer answers role {got!r} for RVG {r.name}")
    return str(got)


def peer_role(r: rvg.Rvg, key: bytes, timeout: float = PROBE_TIMEOUT) -> str | None:
    """The role the peer's link service answers for RVG ``r``: primary or secondary; None when it cannot
    be reached (a takeover would not make two primaries then).
    :raises AuthFailed, ProtocolError, PeerError: a peer answers but cannot be trusted to be gone
    (see probe_peer): never a takeover on those."""
    return probe_peer(r, key, timeout)


MIGRATE_REFUSALS: dict[str, type[Exception]] = {"OutOfDate": OutOfDate, "InUse": InUse,
                                                "InvalidArgument": InvalidArgument}


def request_migrate(dg: DiskGroup, name: str, key: bytes) -> dict[str, Any]:
    """On the secondary: ask the primary's link service to migrate RVG ``name``'s primary role to this
    site (what ``migrate`` does run there; the RVGPrimary agent brings a secondary online this way).
    :raises OutOfDate, InUse: the primary refused, nothing changed (a later try may succeed);
    :raises LinkError: the primary is unreachable or broke off."""
    r = rvg.get(dg, name)
    if r.role != "secondary":
        raise InvalidArgument(f"RVG {name} is already primary on this site: nothing to migrate here")
    if not r.local_addr or not r.peer_addr:
        raise InvalidArgument(f"RVG {name} has no link addresses on this site: addsec {name} first")
    conn = link.Conn(r.peer_addr, key)
    try:
        reply = conn.call({"type": "migrate", "rvg": name, "new_primary": r.local_addr}, "migrated")
    finally:
        conn.close()
    if not reply.get("ok"):
        err = MIGRATE_REFUSALS.get(str(reply.get("kind")), InvalidArgument)
        raise err(f"the primary {r.peer_addr} refused to migrate: {reply.get('message', '')}")
    out = reply.get("result")
    return dict(out) if isinstance(out, dict) else {"rvg": name}


def takeover(dg: DiskGroup, name: str, key: bytes, autofb: bool = False, force: bool = False) -> dict[str, Any]:
    """Make this secondary the primary from its last consistent checkpoint, the primary being gone.

    Only a primary that cannot be reached is gone (connection refused, timed out, reset). A peer that
    answers as primary is refused always (two primaries: the planned way is migrate); one that answers
    but cannot be trusted (wrong key, another protocol version, an error) is refused unless ``force``:
    the administrator then vouches that it is no live primary. Nothing is changed by a refusal."""
    r = rvg.get(dg, name)
    if r.role == "primary":
        raise InvalidArgument(f"RVG {name} is already primary on this site: takeover runs on its secondary")
    try:
        peer = probe_peer(r, key)
    except (AuthFailed, ProtocolError, PeerError) as exc:
        if not force:
            raise type(exc)(f"RVG {name}: takeover refused: the primary's link service at {r.peer_addr} answers,"
                            f" so it is not gone, but it cannot be asked its role: {exc}. Fix the key"
                            f" (KeyFile / [replication] key_file) or the versions on both sites, or, if that site"
                            f" is down for good and only its service is left, takeover {name} --force") from None
        log.warning("RVG %s: taking over by force from a peer that answers but cannot be asked its role: %s",
                    name, exc)
        peer = None
    if peer == "primary":
        raise InUse(f"RVG {name}'s primary at {r.peer_addr} answers: use migrate {name} there (planned)"
                    f" rather than takeover; if that site must be abandoned, stop its link service first")
    seq = role.promote(dg, name, r.peer_addr, state="stopped", common=True, autofb=autofb)
    ck = checkpoint.get(dg, name, seq)
    return {"rvg": name, "seq": seq, "created": ck.created, "old_primary": r.peer_addr, "autofb": autofb}


def fbsync(dg: DiskGroup, name: str, key: bytes) -> dict[str, Any]:
    """Fast-failback: the old primary becomes secondary, sent only the extents changed on either side
    since the common checkpoint. The figures: bytes sent, and changed (ours, theirs, together)."""
    r = _primary(dg, name, "fbsync")
    if not r.common_seq:
        raise NoCommonCheckpoint(f"RVG {name} has no checkpoint in common with an old primary (no takeover"
                                 f" pending): resync {name} does a full or DCM resync")
    base = checkpoint.get(dg, name, r.common_seq)
    conn = link.Conn(r.peer_addr, key)
    try:
        with rvg.locked(dg), dg.locks.hold(link.sender_lock(name)):  # in migrate's order
            reply = conn.call({"type": "fbprep", "rvg": name, "seq": base.seq, "primary_addr": r.local_addr},
                              "fbprep")
            raw = reply.get("ranges")
            theirs = {str(k): [(int(o), int(n)) for o, n in v] for k, v in (raw or {}).items()}
            ck = checkpoint.take(dg, name, r.volumes)
            ours = {p.ref.key: p.ranges for p in deltaset.plan(dg, name, base.seq, ck.seq)}
            union = merge_maps(ours, theirs)
            plans = deltaset.plan_ranges(dg, name, base.seq, ck.seq, union)
            sent = sum(p.encoded_size for p in plans)
            conn.send_plans(name, base.seq, ck.seq, ck.created, plans)
            root = rvg.srl_root(dg, name)
            store.remove_tree(root)
            Srl(root, r.srl_size).ack(ck.seq)
            link.record_acked(dg, name, ck.seq)
            rvg.update(dg, name, state="replicating", synced=True, common_seq=0, autofb=False)
            link.prune(dg, name, ck.seq)
    finally:
        conn.close()

    def total(m: dict[str, list[tuple[int, int]]]) -> int:
        return sum(n for rs in m.values() for _o, n in rs)
    return {"rvg": name, "from_seq": base.seq, "to_seq": ck.seq, "bytes_sent": sent, "changed_bytes": total(union),
            "changed_here": total(ours), "changed_there": total(theirs)}


def resync(dg: DiskGroup, name: str, key: bytes, full: bool = False) -> dict[str, Any]:
    """Bring the secondary up to date now: the DCM's ranges when it tracks any (unless ``full``), else
    every allocated extent of a new checkpoint."""
    r = _primary(dg, name, "resync")
    if not r.peer_addr or not r.synced:
        raise InvalidArgument(f"RVG {name} has no synced secondary: addsec and startrep {name} first")
    if r.common_seq:
        raise InvalidArgument(f"RVG {name} was taken over: fbsync {name} brings its old primary back first")
    t0 = time.monotonic()
    # a look, not Srl(): its recovery would remove the running service's temporary files under it
    if peek(rvg.srl_root(dg, name)).dcm is not None and not full:
        conn = link.Conn(r.peer_addr, key)
        try:
            with dg.locks.hold(link.sender_lock(name)):
                seq = link.catch_up(dg, rvg.get(dg, name), conn)
        finally:
            conn.close()
        kind = "dcm"
    else:
        seq = link.full_sync(dg, r, key)
        kind = "full"
    return {"rvg": name, "kind": kind, "seq": seq, "seconds": round(time.monotonic() - t0, 3)}
