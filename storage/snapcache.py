"""Snapshot cache watching: measure snapshots' unshared bytes, and invalidate (or, with ``autogrow``,
grow) a snapshot before it overcommits its disk. Why and when is the policy of storage.cachepolicy.

An exhausted snapshot is invalidated, as VxVM does: the catalog says why (``invalid``), its images'
blocks are released (punched; the files and the catalog row stay so the user sees it and removes it),
it refuses to mount, and its source is untouched. A mounted one is first shut down (XFS and ext4:
every later I/O on it fails with EIO, so nothing reads the released blocks); a filesystem without a
shutdown ioctl keeps its reservation until it is unmounted, and its images are released again at each
pass. The watcher runs as a thread in the long-lived plugin process every ``INTERVAL`` seconds, and one
pass runs at each CLI call.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from storage import steps
from storage.cachepolicy import AUTOGROW_AT, AUTOGROW_MIN, LOW_WATER, Action, DiskState, SubdiskUse, decide
from storage.catalog.base import SubdiskRec, VolumeRec
from storage.errors import LockTimeout, NoSpace, VeritasError
from storage.group import DiskGroup
from storage.kernel import fs, reflink
from storage.snapshots import COWEXTSIZE
from storage.units import MiB, format_size

log = logging.getLogger("veritas.snapcache")

INTERVAL = 0.25  # seconds between passes of the plugin's watcher

__all__ = ["AUTOGROW_AT", "AUTOGROW_MIN", "INTERVAL", "LOW_WATER", "Action", "DiskState", "Memory", "SubdiskUse",
           "Watcher", "check", "check_quietly", "decide", "grow", "invalidate", "measure", "release"]

def _snapshots(dg: DiskGroup) -> tuple[dict[str, VolumeRec], list[SubdiskRec]]:
    return {v.name: v for v in dg.catalog.volumes()}, dg.catalog.subdisks()


@dataclass
class Memory:
    """What a long-lived watcher keeps between passes: each snapshot image's last (time, unshared),
    from which the rates come, and each disk's last full measurement, to skip FIEMAP on a quiet disk."""

    seen: dict[tuple[str, int], tuple[float, int]] = field(default_factory=dict)
    disks: dict[str, tuple[float, int, tuple[SubdiskRec, ...], list[SubdiskUse], int]] = field(default_factory=dict)


QUIET = 1 * MiB  # a disk whose free space fell by less than this since its last full measurement ...
REMEASURE = 2.0  # ... and that was measured less than this many seconds ago is not measured again


def measure(dg: DiskGroup, memory: Memory | None = None) -> tuple[list[SubdiskUse], dict[str, DiskState]]:
    """Measure the disks that hold a valid snapshot.

    Unsharing a block always allocates one on the same disk (the source's copy, or the snapshot's own
    write), so while a disk's free space holds still and its subdisks are unchanged, its snapshots'
    unshared bytes cannot have grown: ``memory`` then reuses the last FIEMAP results (at least every
    REMEASURE seconds they are taken again).
    """
    vols, sds = _snapshots(dg)
    snap_disks = {sd.disk for sd in sds
                  if (v := vols.get(sd.volume)) is not None and v.snapshot_of and not v.invalid}
    uses: list[SubdiskUse] = []
    disks: dict[str, DiskState] = {}
    cap = dg.capacity()
    reserved: dict[str, int] = {}
    for sd in sds:
        reserved[sd.disk] = reserved.get(sd.disk, 0) + sd.reserved
    now = time.monotonic()
    previous = memory.seen if memory is not None else None
    for disk in sorted(snap_disks & set(cap)):
        _total, free = fs.statvfs_size(dg.disk_dir(disk))
        layout = tuple(s for s in sds if s.disk == disk)
        last = memory.disks.get(disk) if memory is not None else None
        if (last is not None and last[2] == layout and free > last[1] - QUIET
                and now - last[0] < REMEASURE):
            uses += [dataclasses.replace(u, rate=0.0) for u in last[3]]
            disks[disk] = DiskState(free, last[4], cap[disk] - reserved.get(disk, 0))
            continue
        here: list[SubdiskUse] = []
        promised = 0
        for sd in (s for s in sds if s.disk == disk):
            v = vols.get(sd.volume)
            img = dg.image(sd.disk, sd.volume, sd.idx)
            try:
                if v is not None and v.snapshot_of:
                    if v.invalid:
                        continue
                    unshared = reflink.unshared_bytes(img)
                    rate = 0.0
                    if previous is not None:
                        seen = previous.get((sd.volume, sd.idx))
                        if seen is not None and now > seen[0]:
                            rate = max(0.0, (unshared - seen[1]) / (now - seen[0]))
                        previous[(sd.volume, sd.idx)] = (now, unshared)
                    here.append(SubdiskUse(sd.volume, sd.idx, disk, sd.size, sd.reserved, unshared, rate,
                                           v.autogrow))
                    promised += max(0, sd.reserved - unshared)
                else:
                    promised += max(0, sd.size - reflink.allocated_bytes(img))
            except FileNotFoundError:
                promised += sd.reserved  # being made or removed: count what it may still take
        uses += here
        # promised was read after free: an allocation given back meanwhile (mkfs discarding a thick
        # image before it is allocated again, an image removed) lowered what the images hold but not
        # yet the free space read first, which would show a deficit that is not there and invalidate a
        # valid snapshot. The later of two readings counts that; a real deficit shows at the next pass.
        free = max(free, fs.statvfs_size(dg.disk_dir(disk))[1])
        disks[disk] = DiskState(free, promised, cap[disk] - reserved.get(disk, 0))
        if memory is not None:
            memory.disks[disk] = (now, free, layout, here, promised)
    return uses, disks


def invalidate(dg: DiskGroup, name: str, reason: str) -> bool:
    """Mark snapshot ``name`` invalid and release its blocks; call with its lock held. False if it is
    gone or was invalid already."""
    v = dg.catalog.volume(name)
    if v is None or not v.snapshot_of or v.invalid or v.state != "ok":
        return False
    stamp = datetime.now(tz=UTC).isoformat(timespec="seconds")
    dg.catalog.update_volume(name, invalid=f"{reason} (at {stamp})")
    mp = dg.mountpoint(name)
    shut = False
    if steps.is_mounted(dg, name):
        try:
            shut = reflink.shutdown(mp)
        except OSError as exc:
            log.warning("cannot shut down the filesystem of invalid snapshot %s: %s", name, exc)
    log.warning("snapshot %s invalidated: %s", name, reason)
    release(dg, name, shut_down=shut)
    return True


def release(dg: DiskGroup, name: str, shut_down: bool = False) -> None:
    """Punch an invalid snapshot's images, and give its reservation back once nothing can write to it
    (unmounted, or its filesystem shut down). Idempotent: each pass repeats it until done."""
    mounted = steps.is_mounted(dg, name)
    for sd in dg.catalog.subdisks(name):
        img = dg.image(sd.disk, name, sd.idx)
        try:
            if reflink.allocated_bytes(img) > 0:
                reflink.punch(img)
        except FileNotFoundError:
            pass
    if not mounted or shut_down:
        for sd in dg.catalog.subdisks(name):
            if sd.reserved:
                dg.catalog.update_subdisk(name, sd.idx, reserved=0)


def grow(dg: DiskGroup, name: str, add: Mapping[int, int]) -> bool:
    """Add ``add[idx]`` to each subdisk's reservation (all or none) and to the snapshot's cachesize; call
    with its lock held. False when the disk group no longer has the room."""
    v = dg.catalog.volume(name)
    if v is None or v.invalid or v.state != "ok":
        return False
    done: list[SubdiskRec] = []
    try:
        for sd in dg.catalog.subdisks(name):
            if add.get(sd.idx):
                dg.catalog.update_subdisk(name, sd.idx, capacity=dg.capacity(), reserved=sd.reserved + add[sd.idx])
                done.append(sd)
    except NoSpace:
        for sd in done:
            dg.catalog.update_subdisk(name, sd.idx, reserved=sd.reserved)
        return False
    dg.catalog.update_volume(name, cachesize=sum(sd.reserved for sd in dg.catalog.subdisks(name)))
    log.info("snapshot %s: cache grown by %s", name, format_size(sum(add.values())))
    return True


def _hint_cow(dg: DiskGroup) -> None:
    """Give every snapshot's and snapshotted source's image the one-block copy-on-write hint."""
    vols, sds = _snapshots(dg)
    involved = {v.name for v in vols.values() if v.snapshot_of and not v.invalid}
    involved |= {vols[n].snapshot_of or "" for n in involved}
    for sd in sds:
        if sd.volume in involved:
            try:
                reflink.set_cowextsize(dg.image(sd.disk, sd.volume, sd.idx), COWEXTSIZE)
            except OSError:
                pass  # absent, or a filesystem without the hint


def check(dg: DiskGroup, memory: Memory | None = None, horizon: float = 0.0,
          lock_timeout: float = 5.0) -> list[Action]:
    """One pass: measure, decide, act; also finish releasing invalid snapshots. Returns what it did."""
    _hint_cow(dg)
    uses, disks = measure(dg, memory)
    actions = decide(uses, disks, horizon)
    done: list[Action] = []
    for a in actions:
        try:
            with dg.locks.hold(a.volume, timeout=lock_timeout):
                ok = (invalidate(dg, a.volume, a.reason) if a.kind == "invalidate"
                      else grow(dg, a.volume, a.grow))
        except LockTimeout:
            log.warning("snapshot %s: its lock is busy; %s at the next pass", a.volume, a.kind)
            continue
        if ok:
            done.append(a)
    vols, sds = _snapshots(dg)
    for v in vols.values():
        if v.snapshot_of and v.invalid and v.state == "ok" and _unreleased(dg, v, sds):
            try:
                with dg.locks.hold(v.name, timeout=lock_timeout):
                    release(dg, v.name)
            except LockTimeout:
                pass
    if memory is not None:
        live = {(u.volume, u.idx) for u in uses}
        for key in [k for k in memory.seen if k not in live]:
            del memory.seen[key]
        if done:
            memory.disks.clear()  # measure afresh after acting
    return done


def _unreleased(dg: DiskGroup, v: VolumeRec, sds: list[SubdiskRec]) -> bool:
    for sd in sds:
        if sd.volume != v.name:
            continue
        if sd.reserved and not steps.is_mounted(dg, v.name):
            return True
        try:
            if reflink.allocated_bytes(dg.image(sd.disk, v.name, sd.idx)) > 0:
                return True
        except FileNotFoundError:
            pass
    return False


def check_quietly(dg: DiskGroup) -> None:
    """One pass for a short-lived caller (each CLI call): problems are reported, never raised."""
    try:
        check(dg)
    except (VeritasError, OSError) as exc:
        log.warning("snapshot cache check of disk group %s failed: %s", dg.name, exc)


class Watcher(threading.Thread):
    """The long-lived plugin process's watcher: a pass every ``interval`` seconds, on its own disk
    group handle (opened by ``opener``), reopened after any failure."""

    def __init__(self, opener: Callable[[], DiskGroup], interval: float = INTERVAL) -> None:
        super().__init__(name="snapshot-cache", daemon=True)
        self.opener = opener
        self.interval = interval
        self.stopping = threading.Event()
        self.passes = 0

    def run(self) -> None:
        dg: DiskGroup | None = None
        memory = Memory()
        took = 0.0
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                if dg is None:
                    dg = self.opener()
                check(dg, memory, horizon=2 * (self.interval + took))
                self.passes += 1
            except Exception as exc:  # the watcher must outlive any one failure
                log.warning("snapshot cache watcher: %s", exc)
                if dg is not None:
                    dg.close()
                dg = None
                self.stopping.wait(1.0)
            took = time.monotonic() - start
            self.stopping.wait(max(0.0, self.interval - took))
        if dg is not None:
            dg.close()

    def stop(self) -> None:
        self.stopping.set()
