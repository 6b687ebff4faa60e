"""The SRL: a bounded on-disk log of the encoded delta sets the secondary has not acknowledged, and the
DCM it falls back to when a set would not fit.

Layout under ``root``::

    entries/<seq>/<volume>.<idx>.delta   the delta set that takes the secondary to checkpoint <seq>
    entries/<seq>/ranges.json            its changed ranges per image (what a switch to DCM keeps)
    acked.json                           {"seq": N}: the last checkpoint the secondary acknowledged
    dcm.json                             present in DCM mode: {"since": acked, "upto": latest,
                                         "ranges": {image: [[offset, length], ...]}} merged

An entry is built in ``entries/.tmp.<seq>`` and renamed into place (an atomic append); a killed append
leaves only that temporary directory, which ``recover`` removes (the torn tail). ``limit`` bounds the
bytes of all entries together: an append that would pass it raises SrlOverflow and writes nothing,
and the caller switches to DCM (``to_dcm``), which drops the pending entries and keeps their ranges, so
one resync delta built from them later (deltaset.plan_ranges) brings the secondary up to date.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import crash, durable
from storage.errors import InvalidArgument
from storage.replication import store
from storage.replication.deltaset import ImagePlan, write
from storage.replication.errors import SrlOverflow
from storage.replication.extents import Range, merge


@dataclass(frozen=True)
class Dcm:
    since: int
    upto: int
    ranges: dict[str, list[Range]]


def merge_maps(a: Mapping[str, Iterable[Range]], b: Mapping[str, Iterable[Range]]) -> dict[str, list[Range]]:
    """Per image, the union of the ranges of ``a`` and ``b``, merged."""
    return {k: merge([*a.get(k, []), *b.get(k, [])]) for k in sorted(set(a) | set(b))}


@dataclass(frozen=True)
class SrlState:
    """What ``peek`` saw: the acknowledged seq, the DCM if any, the pending entries and their bytes."""

    acked: int
    dcm: Dcm | None
    pending: tuple[int, ...]
    used: int


def _entry_bytes(d: Path) -> int:
    n = 0
    try:
        names = os.listdir(d)
    except FileNotFoundError:  # acknowledged (or dropped for the DCM) meanwhile
        return 0
    for f in names:
        try:
            n += os.stat(d / f).st_size
        except FileNotFoundError:
            pass
    return n


def _read_dcm(root: Path) -> Dcm | None:
    return _dcm_of(store.read_json(root / "dcm.json"))


def _dcm_of(raw: Any) -> Dcm | None:
    if raw is None:
        return None
    return Dcm(int(raw["since"]), int(raw["upto"]),
               {k: [(int(o), int(n)) for o, n in v] for k, v in raw["ranges"].items()})


def peek(root: Path, tries: int = 20) -> SrlState:
    """The SRL under ``root`` as it is, read-only: nothing is created, recovered or removed, so a status
    read is safe beside the link service appending, acknowledging or switching to DCM (Srl() recovers,
    which is the owner's business). Entries and records may vanish under the read; the acknowledged
    seq and the DCM record are read before and after the entries, and the read is retried until they
    agree, so the figures are of one state (the DCM drops the entries: none count then; an entry's
    temporary directory is a torn or running append, never counted)."""
    ent = root / "entries"
    for _ in range(tries):
        before = (store.read_json(root / "acked.json"), store.read_json(root / "dcm.json"))
        acked = int(before[0]["seq"]) if before[0] else 0
        try:
            names = os.listdir(ent)
        except FileNotFoundError:
            names = []
        pending = tuple(sorted(int(n) for n in names if n.isdigit() and int(n) > acked)) if before[1] is None else ()
        used = sum(_entry_bytes(ent / str(seq)) for seq in pending)
        after = (store.read_json(root / "acked.json"), store.read_json(root / "dcm.json"))
        if after == before:
            break
    return SrlState(acked, _dcm_of(before[1]), pending, used)


class Srl:
    def __init__(self, root: Path, limit: int) -> None:
        if limit <= 0:
            raise InvalidArgument(f"SRL size limit must be positive, not {limit}")
        self.root = root
        self.limit = limit
        self.entries = root / "entries"
        self.entries.mkdir(parents=True, exist_ok=True)
        self.recover()

    def recover(self) -> list[str]:
        """Remove a torn tail (a killed append's temporary directory), temporary records, and entries a
        killed ack or switch to DCM had already given up (acknowledged, or covered by the DCM)."""
        done = [str(p) for p in store.remove_tmp(self.root)]
        acked, dcm = self.acked, self.dcm_active
        for p in self.entries.iterdir():
            if p.name.startswith(".tmp.") or (p.name.isdigit() and (dcm or int(p.name) <= acked)):
                store.remove_tree(p)
                done.append(str(p))
        return done

    @property
    def acked(self) -> int:
        rec = store.read_json(self.root / "acked.json")
        return int(rec["seq"]) if rec else 0

    def pending(self) -> list[int]:
        """Sequence numbers of the entries not yet acknowledged, oldest first."""
        acked = self.acked
        return sorted(int(p.name) for p in self.entries.iterdir() if p.name.isdigit() and int(p.name) > acked)

    def entry(self, seq: int) -> list[Path]:
        return sorted((self.entries / str(seq)).glob("*.delta"))

    def used(self) -> int:
        return sum(f.stat().st_size for s in self.pending() for f in (self.entries / str(s)).iterdir())

    def would_overflow(self, nbytes: int) -> bool:
        return self.used() + nbytes > self.limit

    @property
    def dcm_active(self) -> bool:
        return (self.root / "dcm.json").exists()

    def dcm(self) -> Dcm | None:
        return _read_dcm(self.root)

    def _last(self) -> int:
        d = self.dcm()
        return max([self.acked, *self.pending(), d.upto if d else 0])

    def append(self, seq: int, plans: Sequence[ImagePlan]) -> list[Path]:
        """Log the delta set to checkpoint ``seq``. :raises SrlOverflow: it would pass the limit
        (nothing written); :raises InvalidArgument: in DCM mode, or ``seq`` not after the last one."""
        if self.dcm_active:
            raise InvalidArgument("the SRL is in DCM mode: add the changes to the DCM (dcm_add) until resync")
        if seq <= self._last():
            raise InvalidArgument(f"SRL entry {seq} is not after the last one ({self._last()})")
        size = sum(p.encoded_size for p in plans)
        if self.would_overflow(size):
            raise SrlOverflow(f"SRL {self.root}: delta set {seq} ({size} bytes) would pass the limit of"
                              f" {self.limit} bytes ({self.used()} in use): switch to DCM and resync")
        tmp = self.entries / f".tmp.{seq}.{os.getpid()}"
        tmp.mkdir()
        try:
            files = write(plans, tmp)
            store.write_json(tmp / "ranges.json", {p.ref.key: p.ranges for p in plans})
            crash.point("repl.srl.written")
            os.rename(tmp, self.entries / str(seq))
        except BaseException:
            store.remove_tree(tmp)
            raise
        durable.sync_dir(self.entries)
        crash.point("repl.srl.appended")
        return [self.entries / str(seq) / f.name for f in files]

    def _entry_ranges(self, seq: int) -> dict[str, list[Range]]:
        raw = store.read_json(self.entries / str(seq) / "ranges.json") or {}
        return {k: [(int(o), int(n)) for o, n in v] for k, v in raw.items()}

    def ack(self, seq: int) -> None:
        """The secondary holds checkpoint ``seq``: free every entry up to it; a DCM it covers is done."""
        if seq < self.acked:
            raise InvalidArgument(f"ack of {seq} after {self.acked}: acknowledgements go forward")
        store.write_json(self.root / "acked.json", {"seq": seq})
        for s in self.pending():
            if s <= seq:
                store.remove_tree(self.entries / str(s))
        d = self.dcm()
        if d is not None and seq >= d.upto:
            store.remove_tree(self.root / "dcm.json")

    def to_dcm(self, seq: int, ranges: Mapping[str, Iterable[Range]]) -> Dcm:
        """Switch to DCM mode with the changes up to checkpoint ``seq`` (``ranges``, which did not fit)
        and those of every pending entry; the entries are dropped once the DCM is durable."""
        acc: dict[str, list[Range]] = {}
        for s in self.pending():
            acc = merge_maps(acc, self._entry_ranges(s))
        acc = merge_maps(acc, ranges)
        d = Dcm(self.acked, seq, acc)
        store.write_json(self.root / "dcm.json", {"since": d.since, "upto": d.upto, "ranges": d.ranges})
        crash.point("repl.srl.dcm")
        for s in self.pending():
            store.remove_tree(self.entries / str(s))
        return d

    def dcm_add(self, seq: int, ranges: Mapping[str, Iterable[Range]]) -> Dcm:
        """Add the changes up to checkpoint ``seq`` to the DCM."""
        d = self.dcm()
        if d is None:
            raise InvalidArgument("the SRL is not in DCM mode")
        if seq <= d.upto:
            raise InvalidArgument(f"DCM already covers checkpoint {seq} (up to {d.upto})")
        n = Dcm(d.since, seq, merge_maps(d.ranges, ranges))
        store.write_json(self.root / "dcm.json", {"since": n.since, "upto": n.upto, "ranges": n.ranges})
        return n
