"""Making a volume: plan its layout, record the intent, make images and filesystem, roll back on failure."""

from __future__ import annotations

import logging
import time
from typing import Any

from storage import crash, durable, mountpoints, options, recovery, rvgrole, steps
from storage.catalog.base import SubdiskRec, VolumeRec
from storage.errors import InvalidArgument, SharedFailureDomain, VeritasError
from storage.group import DiskGroup
from storage.kernel import alloc, fs, loop
from storage.layouts import ENGINES, engine
from storage.layouts.base import LayoutEngine, Shape
from storage.units import check_name
from storage.volops import tree

log = logging.getLogger("veritas.volumes")

def make(dg: DiskGroup, name: str, size: str | int | None = None, *, spec: options.VolumeSpec | None = None,
         force: bool = False, **opts: Any) -> VolumeRec:
    """Create volume ``name``; returns its record. Options: see options.VOLUME_OPTIONS, or a spec parsed already.

    A redundant layout keeps its copies in distinct failure domains (storage.group: directory disks of
    one filesystem are one); ``force`` accepts copies that share one, and so does a disk group that
    accepts it (DiskGroupRec.accept_shared_domain), with a warning in the log, where no distinct
    domains have room. ``layout=auto`` still makes a concat there rather than a mirror that is none.

    Every option is checked before the first step; the config file's [volume] section gives the defaults.
    """
    check_name(name, "volume name")
    rvgrole.refuse_secondary(dg, name)
    if spec is None:
        spec = options.parse_volume(size, opts)
    elif size is not None or opts:
        raise InvalidArgument("make takes a parsed spec or options, not both")
    d = dg.config.volume  # fstype, nmirror and ncol are defaults per layout: see LayoutEngine.shape_for
    nbytes = d.size if spec.size is None else spec.size
    layout = d.layout if spec.layout is None else spec.layout
    maxiops = d.maxiops if spec.maxiops is None else spec.maxiops
    protect = d.protect if spec.protect is None else spec.protect
    provisioning = d.provisioning if spec.provisioning is None else spec.provisioning
    fstype, nmirror, ncol = spec.fstype, spec.nmirror, spec.ncol
    if fstype == "none":  # no image, no filesystem of its own: storage.volops.tree
        return tree.make(dg, name, nbytes, maxiops, protect)

    with dg.locks.hold(name), mountpoints.claim(dg, name):
        recovery.check_free(dg, name)
        def plan() -> tuple[VolumeRec, list[SubdiskRec]]:
            eng, shape, sizes, disks = _plan(dg, layout, nbytes, fstype, nmirror, ncol, force, volume=name)
            vol = VolumeRec(name, nbytes, eng.name, shape.fstype, shape.nmirror, shape.ncol, maxiops,
                            None, 0, "creating", time.time(), protect, provisioning=provisioning)
            return vol, [SubdiskRec(name, i, d, sz, sz) for i, (d, sz) in enumerate(zip(disks, sizes, strict=True))]

        vol, sds = steps.record_new(dg, plan)
        eng, shape = steps.engine_of(vol), steps.shape_of(vol)
        crash.point("make.recorded")
        try:
            paths = [dg.image(sd.disk, name, sd.idx) for sd in sds]
            for p, sd in zip(paths, sds, strict=True):
                with open(p, "xb") as fh:
                    fh.truncate(sd.size)
                    if provisioning == "thick":  # before mkfs: a disk without the room fails first
                        alloc.allocate(fh.fileno(), p, 0, sd.size)
            crash.point("make.images")
            attached = [loop.attach_tracked(p, dg.runner) for p in paths]
            devs = [dev for dev, _new in attached]
            # images made just now are blank; a device found already attached is probed before mkfs
            fs.refuse_formatted([dev for dev, new in attached if not new], dg.runner)
            crash.point("make.attached")
            eng.mkfs(devs, shape, name, dg.runner)
            crash.point("make.mkfs")
            steps.detach(dg, vol, paths)
            crash.point("make.detached")
            if provisioning == "thick":
                # mkfs discarded the whole device, which punched the image's allocation out again:
                # allocate once more (the filesystem's blocks are kept; the room was found above)
                for p, sd in zip(paths, sds, strict=True):
                    with open(p, "r+b") as img:
                        alloc.allocate(img.fileno(), p, 0, sd.size)
            durable.sync_files(paths)  # the images exist for good before the catalog says so
        except BaseException:
            steps.teardown(dg, name)
            raise
        dg.catalog.finish_intent(name, {"state": "ok"})
        crash.point("make.done")
    return steps.get(dg, name)


def _plan(dg: DiskGroup, layout: str, size: int, fstype: str | None, nmirror: int | None,
          ncol: int | None, force: bool = False,
          volume: str = "") -> tuple[LayoutEngine, Shape, list[int], list[str]]:
    free = dg.free()
    domains = None if force else dg.failure_domains()  # only redundant layouts are held to them
    if layout == "auto":
        mirror = ENGINES["mirror"]
        try:
            shape = mirror.shape_for(size, fstype, nmirror, ncol, dg.config.volume)
            sizes = mirror.subdisk_sizes(size, shape)
            return mirror, shape, sizes, LayoutEngine.place(sizes, free, "mirror", dg.name, domains)
        except VeritasError:
            layout = "concat"
            nmirror = ncol = None
    eng = engine(layout)
    shape = eng.shape_for(size, fstype, nmirror, ncol, dg.config.volume)
    sizes = eng.subdisk_sizes(size, shape)
    try:
        disks = LayoutEngine.place(sizes, free, eng.name, dg.name, domains if eng.redundant else None)
    except SharedFailureDomain:
        if not dg.catalog.diskgroup().accept_shared_domain:
            raise
        disks = LayoutEngine.place(sizes, free, eng.name, dg.name, None)
        where = "; ".join(f"{', '.join(ds)} on {dom}" for dom, ds in dg.shared_domains(disks))
        log.warning("disk group %s accepts copies in one failure domain: the copies of %s volume %s are"
                    " on disks that are lost together (%s); add a disk on another filesystem or device for"
                    " redundancy", dg.name, eng.name, volume, where)
    return eng, shape, sizes, disks
