"""Space-optimised snapshots: freeze, reflink-clone every image, thaw.

The clone still carries its source's filesystem UUID. A btrfs or ext4 one gets its own
(storage.steps.ensure_identity, done by its layout engine) before it is first attached, so taking the
snapshot costs no more than the clone itself. An XFS one keeps it and is mounted ``nouuid``: a new UUID
rewrites the whole 64 MiB log, which would unshare 64 MiB of the cache at the first mount.

A snapshot is a volume in its own right (mount, grow, remove). Its images share every unchanged extent
with the source; ``cachesize`` (default a percentage of the source) is what it reserves in the disk
group's accounting, and the bytes it no longer shares are reported as its cache use.
"""

from __future__ import annotations

import time
from pathlib import Path

from storage import crash, durable, mountpoints, options, recovery, steps, trees
from storage.catalog.base import IntentRec, SubdiskRec, VolumeRec
from storage.errors import InvalidArgument, NoSuchVolume, SnapshotInvalid, Unsupported
from storage.group import DiskGroup
from storage.kernel import fs, mounts, reflink
from storage.units import MiB, check_name, format_size, round_up

COWEXTSIZE = 4096  # copy-on-write preallocation of snapshotted images: one block (see reflink, snapcache)


def make(dg: DiskGroup, source: str, name: str, cachesize: str | int | None = None,
         autogrow: bool | str | None = None, maxiops: str | int | None = None) -> VolumeRec:
    """Snapshot ``source`` as volume ``name``; consistent even while the source is mounted and written.

    ``autogrow``: grow the cache from the disk group's free space rather than invalidate the snapshot
    when it runs out (storage.snapcache). ``maxiops`` (default: the source's) is recorded with the
    snapshot in the same catalog step, so a snapshot exists with its limit or not at all.
    """
    check_name(name, "snapshot name")
    given = (("cachesize", cachesize), ("autogrow", autogrow), ("maxiops", maxiops))
    spec = options.parse_snapshot(source, {k: v for k, v in given if v is not None})
    with dg.locks.hold(source, name), mountpoints.claim(dg, name):
        recovery.recover_held(dg, source)  # e.g. a killed make or grow of the source
        src = dg.catalog.volume(source)
        if src is None:
            raise NoSuchVolume(f"no such source volume: {source} in disk group {dg.name}")
        src = steps.ready(dg, source)
        if src.invalid:
            raise SnapshotInvalid(f"source {source} is an invalid snapshot ({src.invalid}); it has no data left")
        if trees.is_tree(src):
            raise Unsupported(f"volume {source} has no filesystem of its own (fstype=none): it is a directory on"
                              " the host's filesystem, which veritas never freezes, and it has no image to clone,"
                              " so no consistent snapshot of it can be taken; make the volume with fstype=xfs"
                              " to snapshot it")
        recovery.check_free(dg, name)
        if spec.cachesize is None:
            cache = round_up(src.size * dg.config.volume.cache_percent // 100, MiB)
        else:
            cache = spec.cachesize
        if cache > src.size:
            raise InvalidArgument(f"cachesize {format_size(cache, long=True)} is larger than the source volume"
                                  f" ({format_size(src.size, long=True)})")
        src_sds = dg.catalog.subdisks(source)
        missing = [sd.disk for sd in src_sds if not dg.image(sd.disk, source, sd.idx).exists()]
        if missing:
            raise InvalidArgument(f"source {source} is degraded (disks {', '.join(missing)});"
                                  f" repair it before taking a snapshot")
        per = -(-cache // len(src_sds))
        sds = [SubdiskRec(name, sd.idx, sd.disk, sd.size, per) for sd in src_sds]
        iops = src.maxiops if spec.maxiops is None else spec.maxiops
        vol = VolumeRec(name, src.size, src.layout, src.fstype, src.nmirror, src.ncol, iops,
                        source, cache, "creating", time.time(), False, identity_pending=True,
                        autogrow=bool(spec.autogrow), provisioning=src.provisioning)  # for display only
        frozen = str(dg.mountpoint(source)) if steps.is_mounted(dg, source) else None
        dev = mounts.device_at(Path(frozen)) if frozen else None  # recovery thaws only that filesystem
        intent = IntentRec(name, "snap", {"frozen": frozen, "frozen_dev": dev, "source": source},
                           time.time())  # recovery locks both
        dg.catalog.create_volume(vol, sds, intent, dg.capacity())
        crash.point("snap.recorded")
        try:
            _clone(dg, source, name, src_sds, frozen)
            durable.sync_files([dg.image(sd.disk, name, sd.idx) for sd in src_sds])
            crash.point("snap.cloned")
        except BaseException:
            if frozen:
                fs.thaw(dg.mountpoint(source), dg.runner)
            steps.teardown(dg, name)
            raise
        dg.catalog.finish_intent(name, {"state": "ok"})
        crash.point("snap.done")
    return steps.get(dg, name)


def _clone(dg: DiskGroup, source: str, name: str, src_sds: list[SubdiskRec], frozen: str | None) -> None:
    pairs = [(dg.image(sd.disk, source, sd.idx), dg.image(sd.disk, name, sd.idx)) for sd in src_sds]
    if frozen:
        fs.freeze(dg.mountpoint(source), dg.runner)
        crash.point("snap.frozen")
    try:
        for src, dst in pairs:
            cow_hint(src)  # before the source's first write after the clone
            reflink.clone(src, dst)
            cow_hint(dst)
    finally:
        if frozen:
            fs.thaw(dg.mountpoint(source), dg.runner)


def cow_hint(img: Path) -> None:
    """See COWEXTSIZE and storage.snapcache: with it the disk fills no faster than the snapshot's cache."""
    try:
        reflink.set_cowextsize(img, COWEXTSIZE)
    except OSError:
        pass


def parse_autogrow(raw: bool | str) -> bool:
    return options.autogrow_option(raw)
