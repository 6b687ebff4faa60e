"""Snapshot cache policy: invalidate (or, with ``autogrow``, grow) a snapshot before it overcommits its disk.

The physics. A space-optimised snapshot shares its source's extents. Every write to the source that
lands on a shared extent gives the source a new block and leaves the old one to the snapshot alone:
the snapshot's unshared bytes (FIEMAP, reflink.unshared_bytes) grow, and so does what the disk holds,
although no reservation grew. Writes into a mounted snapshot do the same. What must stay bounded is,
per disk, ``sum over snapshots of unshared bytes <= their reservations``; past that, the disk's free
space is no longer enough for what every other volume was promised, and they get ENOSPC.

The policy (``decide``, pure, unit-tested):

- cache rule: a snapshot whose unshared bytes, projected ``horizon`` seconds ahead at the rate seen
  between two passes, reach its reservation is exhausted. With ``autogrow`` it first grows its
  reservation from the disk's unreserved space (at 80 % of it, by max(20 %, twice the projected growth,
  16 MiB)); when there is no such space it is exhausted like any other.
- disk rule (the safety net for what FIEMAP cannot attribute: extents that only snapshots still share,
  copy-on-write preallocation of images made before this policy): per disk,
  ``slack = free - promised - unreserved`` must stay above ``LOW_WATER``, where ``promised`` is what
  volumes may still allocate within their reservations. A new disk starts with the 64 MiB
  (group.DISK_RESERVE) it keeps out of every reservation; that reserve is the headroom that absorbs
  what grows between two passes. Below the low water, snapshots on that disk are invalidated, those
  past their reservation first.

storage.snapcache measures, and acts on what ``decide`` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from storage.units import MiB, format_size

LOW_WATER = 16 * MiB  # slack a disk keeps beyond every promise; below it the disk rule acts
AUTOGROW_AT = 0.8  # fraction of the reservation at which autogrow grows it
AUTOGROW_MIN = 16 * MiB


@dataclass(frozen=True)
class SubdiskUse:
    """One image of a valid snapshot as measured: ``rate`` is its unshared growth in bytes/s."""

    volume: str
    idx: int
    disk: str
    size: int
    reserved: int
    unshared: int
    rate: float = 0.0
    autogrow: bool = False


@dataclass(frozen=True)
class DiskState:
    """``free``: the disk's free bytes (statvfs); ``promised``: what volumes may still allocate within
    their reservations; ``unreserved``: capacity not given to any reservation."""

    free: int
    promised: int
    unreserved: int

    @property
    def slack(self) -> int:
        return self.free - self.promised - self.unreserved


@dataclass(frozen=True)
class Action:
    kind: str  # "grow" | "invalidate"
    volume: str
    reason: str = ""
    grow: Mapping[int, int] = field(default_factory=dict)  # subdisk idx -> bytes added to its reservation


def _mib_down(n: float) -> int:
    return max(0, int(n) // MiB * MiB)


def _mib_up(n: float) -> int:
    return -(-int(n) // MiB) * MiB


def decide(uses: Iterable[SubdiskUse], disks: Mapping[str, DiskState], horizon: float,
           low_water: int = LOW_WATER) -> list[Action]:
    """The actions that keep every disk's promises: grow or invalidate snapshots (see module doc)."""
    uses = sorted(uses, key=lambda u: (u.volume, u.idx))
    unreserved = {d: s.unreserved for d, s in disks.items()}
    grows: dict[str, dict[int, int]] = {}
    invalid: dict[str, str] = {}
    for u in uses:
        if u.volume in invalid or u.reserved >= u.size:
            continue  # a snapshot cannot diverge by more than its size
        ahead = max(u.rate, 0.0) * horizon
        projected = min(u.size, u.unshared + ahead)
        give = 0
        if u.autogrow and projected >= u.reserved * AUTOGROW_AT:
            # at least past what is projected: a snapshot already beyond its cache (one made before
            # this policy) catches up in one step
            want = min(_mib_up(max(u.reserved / 5, 2 * ahead, AUTOGROW_MIN, projected - u.reserved + AUTOGROW_MIN)),
                       u.size - u.reserved)
            give = min(want, _mib_down(unreserved.get(u.disk, 0)))
            if give > 0:
                unreserved[u.disk] -= give
                grows.setdefault(u.volume, {})[u.idx] = give
        if projected >= u.reserved + give:
            if u.autogrow:
                why = "autogrow found no free space in the disk group"
            else:
                why = "take it again with a larger cachesize, or with autogrow=on"
            invalid[u.volume] = (f"its cache of {format_size(u.reserved + give)} on disk {u.disk} ran out"
                                 f" ({format_size(u.unshared)} no longer shared with its source); {why}")
    for vol in invalid:
        for idx, give in grows.pop(vol, {}).items():
            unreserved[next(u.disk for u in uses if u.volume == vol and u.idx == idx)] += give

    for disk, st in sorted(disks.items()):
        here = [u for u in uses if u.disk == disk]
        slack = st.slack + sum(max(0, u.unshared - u.reserved) for u in here if u.volume in invalid)
        if slack >= low_water:
            continue
        why = (f"disk {disk} kept only {format_size(max(slack, 0))} beyond what its volumes were"
               " promised; the snapshot was invalidated to keep the other volumes writable")
        live = [u for u in here if u.volume not in invalid]
        # those past their reservation first: releasing them recovers their overshoot
        for u in sorted((u for u in live if u.unshared > u.reserved), key=lambda u: u.reserved - u.unshared):
            invalid[u.volume] = why
            grows.pop(u.volume, None)
            slack += u.unshared - u.reserved
            if slack >= low_water:
                break
        rest = sorted((u for u in live if u.volume not in invalid), key=lambda u: -u.unshared)
        if slack < low_water and rest:
            # what FIEMAP charges to nobody (extents only snapshots share): the largest goes, one per
            # pass, and the next pass measures again
            invalid[rest[0].volume] = why
            grows.pop(rest[0].volume, None)
    out = [Action("invalidate", v, reason) for v, reason in sorted(invalid.items())]
    out += [Action("grow", v, grow=g) for v, g in sorted(grows.items()) if v not in invalid]
    return out


# ------------------------------------------------------------------------------- measuring and acting


