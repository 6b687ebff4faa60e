"""Space-optimised snapshots: freeze, reflink-clone every image, thaw.

The clone still carries its source's filesystem UUID; it gets its own (volumes.ensure_identity) before
it is first attached, so taking the snapshot costs no more than the clone itself (for XFS a new UUID
rewrites the whole 64 MiB log, which would triple the time and unshare 64 MiB of the cache).

A snapshot is a volume in its own right (mount, grow, remove). Its images share every unchanged extent
with the source; ``cachesize`` (default a percentage of the source) is what it reserves in the disk
group's accounting, and the bytes it no longer shares are reported as its cache use.
"""

from __future__ import annotations

import time

from storage import crash, mountpoints
from storage.catalog.base import IntentRec, SubdiskRec, VolumeRec
from storage.diskgroup import DiskGroup
from storage.errors import InvalidArgument, NoSuchVolume
from storage.kernel import fs, reflink
from storage.units import MiB, check_name, parse_size, round_up
from storage.volumes import _get, _ready, check_free, is_mounted, teardown


def make(dg: DiskGroup, source: str, name: str, cachesize: str | int | None = None) -> VolumeRec:
    """Snapshot ``source`` as volume ``name``; consistent even while the source is mounted and written."""
    check_name(name, "snapshot name")
    check_name(source, "source volume name")
    with dg.locks.hold(source, name), mountpoints.claim(dg, name):
        src = dg.catalog.volume(source)
        if src is None:
            raise NoSuchVolume(f"no such source volume: {source} in disk group {dg.name}")
        src = _ready(dg, source)
        check_free(dg, name)
        if cachesize is None:
            cache = round_up(src.size * dg.config.volume.cache_percent // 100, MiB)
        else:
            cache = parse_size(cachesize, "cachesize")
        if cache > src.size:
            raise InvalidArgument(f"cachesize {cache} is larger than the source volume ({src.size} bytes)")
        src_sds = dg.catalog.subdisks(source)
        missing = [sd.disk for sd in src_sds if not dg.image(sd.disk, source, sd.idx).exists()]
        if missing:
            raise InvalidArgument(f"source {source} is degraded (disks {', '.join(missing)});"
                                  f" repair it before taking a snapshot")
        per = -(-cache // len(src_sds))
        sds = [SubdiskRec(name, sd.idx, sd.disk, sd.size, per) for sd in src_sds]
        vol = VolumeRec(name, src.size, src.layout, src.fstype, src.nmirror, src.ncol, src.maxiops,
                        source, cache, "creating", time.time(), False, identity_pending=True)
        frozen = str(dg.mountpoint(source)) if is_mounted(dg, source) else None
        dg.catalog.create_volume(vol, sds, IntentRec(name, "snap", {"frozen": frozen}, time.time()),
                                 dg.capacity())
        crash.point("snap.recorded")
        try:
            _clone(dg, source, name, src_sds, frozen)
            crash.point("snap.cloned")
        except BaseException:
            if frozen:
                fs.thaw(dg.mountpoint(source), dg.runner)
            teardown(dg, name)
            raise
        dg.catalog.finish_intent(name, {"state": "ok"})
        crash.point("snap.done")
    return _get(dg, name)


def _clone(dg: DiskGroup, source: str, name: str, src_sds: list[SubdiskRec], frozen: str | None) -> None:
    pairs = [(dg.image(sd.disk, source, sd.idx), dg.image(sd.disk, name, sd.idx)) for sd in src_sds]
    if frozen:
        fs.freeze(dg.mountpoint(source), dg.runner)
        crash.point("snap.frozen")
    try:
        for src, dst in pairs:
            reflink.clone(src, dst)
    finally:
        if frozen:
            fs.thaw(dg.mountpoint(source), dg.runner)

