"""Crash-consistent checkpoints of an RVG's volumes, taken together.

Every mounted volume of the set is frozen, every image of every volume is reflink-cloned (a mirror or
stripe volume is btrfs over several images: all of them under the one freeze), and all are thawed; so
the checkpoint holds each filesystem as it was at one instant, and write order across the volumes is
kept at the checkpoint boundary. The freeze is recorded durably before it is taken and thawed by
``recover`` if the taker was killed: a freeze is never left behind.

Layout: clones beside their source images (a reflink never crosses filesystems), the records in the
disk group's root::

    disks/<disk>/repl/<rvg>/<seq>/<volume>.<idx>.img   the images of checkpoint <seq>
    repl/<rvg>/ckpt/<seq>.json                          its manifest: written last, so a checkpoint
                                                        exists exactly when its manifest does
    repl/<rvg>/consistent.json                          {"seq": N}: the last consistent checkpoint
    repl/<rvg>/frozen.json                              mount points a running take has frozen
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import crash, durable, recovery, snapshots, steps, trees
from storage.errors import InvalidArgument, NoSuchVolume, Unsupported, VeritasError
from storage.group import DiskGroup
from storage.kernel import fs, mounts, reflink
from storage.replication import store
from storage.replication.errors import NoSuchCheckpoint
from storage.units import check_name

log = logging.getLogger("veritas")


@dataclass(frozen=True)
class ImageRef:
    """One image of a volume in a checkpoint: where it lives and how big it was."""

    volume: str
    idx: int
    disk: str
    size: int

    @property
    def key(self) -> str:
        return f"{self.volume}.{self.idx}"


@dataclass(frozen=True)
class Checkpoint:
    rvg: str
    seq: int
    created: float
    volumes: tuple[str, ...]
    images: tuple[ImageRef, ...]
    frozen: tuple[str, ...]  # the volumes that were mounted, hence frozen
    freeze_seconds: float

    def path(self, dg: DiskGroup, img: ImageRef) -> Path:
        return image_dir(dg, img.disk, self.rvg, self.seq) / f"{img.key}.img"

    def image(self, key: str) -> ImageRef:
        for i in self.images:
            if i.key == key:
                return i
        raise NoSuchCheckpoint(f"checkpoint {self.seq} of RVG {self.rvg} has no image {key}")


def meta_dir(dg: DiskGroup, rvg: str) -> Path:
    return dg.root / "repl" / rvg


def image_dir(dg: DiskGroup, disk: str, rvg: str, seq: int) -> Path:
    return dg.disk_dir(disk) / "repl" / rvg / str(seq)


def _lock(rvg: str) -> str:
    return f"@rvg.{rvg}"


def _validate(dg: DiskGroup, volumes: Sequence[str]) -> None:
    if not volumes:
        raise InvalidArgument("a checkpoint needs at least one volume")
    seen: set[str] = set()
    for v in volumes:
        if v in seen:
            raise InvalidArgument(f"volume {v} is named twice; name each volume of the RVG once")
        seen.add(v)
        if dg.catalog.volume(v) is None:
            raise NoSuchVolume(f"no such volume: {v} in disk group {dg.name}")


def take(dg: DiskGroup, rvg: str, volumes: Sequence[str], seq: int | None = None) -> Checkpoint:
    """Checkpoint ``volumes`` together as RVG ``rvg``'s next sequence number (or ``seq``, which must
    not go back: a new primary's first checkpoint keeps the number of the replica it was made from)
    and record it as the last consistent one. Bad input (no volume, one named twice, an unknown one,
    an fstype=none one, a degraded one) raises before anything is frozen or written."""
    check_name(rvg, "RVG name")
    _validate(dg, volumes)
    with dg.locks.hold(_lock(rvg), *volumes):
        recover(dg, rvg)
        for v in volumes:
            recovery.recover_held(dg, v)
        recs = [steps.ready(dg, v) for v in volumes]
        refs: list[ImageRef] = []
        for rec in recs:
            if trees.is_tree(rec):
                raise Unsupported(f"volume {rec.name} has no image of its own (fstype=none): it cannot be"
                                  f" replicated; make it with fstype=xfs")
            for sd in dg.catalog.subdisks(rec.name):
                img = dg.image(sd.disk, rec.name, sd.idx)
                if not img.exists():
                    raise InvalidArgument(f"volume {rec.name} is degraded (disk {sd.disk}); repair it before"
                                          f" checkpointing its RVG")
                refs.append(ImageRef(rec.name, sd.idx, sd.disk, 0))
        nxt = _next_seq(dg, rvg)
        if seq is not None and seq < nxt:
            raise InvalidArgument(f"checkpoint {seq} of RVG {rvg} would go back: the next is {nxt}")
        seq = nxt if seq is None else seq
        mounted = [v for v in volumes if steps.is_mounted(dg, v)]
        meta = meta_dir(dg, rvg)
        (meta / "ckpt").mkdir(parents=True, exist_ok=True)
        dirs = {image_dir(dg, r.disk, rvg, seq) for r in refs}
        try:
            for d in sorted(dirs):
                d.mkdir(parents=True, exist_ok=True)
            sized, secs = _clone_frozen(dg, rvg, seq, refs, mounted)
            crash.point("repl.ckpt.cloned")
            ck = Checkpoint(rvg, seq, time.time(), tuple(volumes), tuple(sized), tuple(mounted), secs)
            durable.sync_files([ck.path(dg, r) for r in sized])
            store.write_json(meta / "ckpt" / f"{seq}.json", _to_json(ck))
            crash.point("repl.ckpt.recorded")
            store.write_json(meta / "consistent.json", {"seq": seq})
        except BaseException:
            if not (meta / "ckpt" / f"{seq}.json").exists():
                for d in dirs:
                    store.remove_tree(d)
            raise
        return ck


def _clone_frozen(dg: DiskGroup, rvg: str, seq: int, refs: list[ImageRef],
                  mounted: list[str]) -> tuple[list[ImageRef], float]:
    """Freeze ``mounted``, clone every image, thaw all (whatever failed); the images with their sizes."""
    marker = meta_dir(dg, rvg) / "frozen.json"
    targets = [str(dg.mountpoint(v)) for v in mounted]
    if targets:  # with each mount's device: recover thaws a path only while the same filesystem is there
        devs = [mounts.device_at(Path(t)) for t in targets]
        store.write_json(marker, {"mountpoints": targets, "devices": devs, "volumes": mounted})
    frozen: list[Path] = []
    out: list[ImageRef] = []
    t0 = time.perf_counter()
    try:
        for t in targets:
            fs.freeze(Path(t), dg.runner)
            frozen.append(Path(t))
        crash.point("repl.ckpt.frozen")
        for r in refs:
            src = dg.image(r.disk, r.volume, r.idx)
            snapshots.cow_hint(src)  # the volume's next writes copy one block, not a 32-block extent
            dst = image_dir(dg, r.disk, rvg, seq) / f"{r.key}.img"
            reflink.clone(src, dst)
            out.append(ImageRef(r.volume, r.idx, r.disk, os.stat(dst).st_size))
    finally:
        secs = time.perf_counter() - t0
        _thaw_all(dg, frozen)
        if targets:
            store.remove_tree(marker)
    return out, secs


def _thaw_all(dg: DiskGroup, targets: Sequence[Path], devices: Sequence[str | None] | None = None) -> list[Path]:
    """Thaw each of ``targets``, all of them even when one fails; then raise the first failure. With
    ``devices`` (recovery), a target is thawed only while the filesystem of that device is mounted
    there (None: by path). The targets thawed."""
    first: VeritasError | OSError | None = None
    devs = list(devices) if devices is not None else [None] * len(targets)
    thawed: list[Path] = []
    for t, dev in reversed(list(zip(targets, devs, strict=True))):
        try:
            if fs.thaw_if_same(t, dev, dg.runner):
                thawed.append(t)
        except (VeritasError, OSError) as exc:
            log.error("thawing %s: %s", t, exc)
            first = first or exc
    if first is not None:
        raise first
    return thawed[::-1]


def recover(dg: DiskGroup, rvg: str) -> list[str]:
    """Finish what a killed take left: thaw what it froze, remove clones without a manifest and
    temporary records. What was done, as messages (empty when nothing was left). Holds the RVG's lock
    and those of the volumes it thaws (a snapshot of one of them may be freezing it meanwhile)."""
    meta = meta_dir(dg, rvg)
    marker = meta / "frozen.json"
    rec = store.read_json(marker)
    with dg.locks.hold(_lock(rvg), *(rec.get("volumes", []) if rec else [])):
        done: list[str] = []
        rec = store.read_json(marker)
        if rec is not None:
            targets = rec["mountpoints"]
            devs = rec.get("devices") or [None] * len(targets)
            thawed = _thaw_all(dg, [Path(t) for t in targets], devs)
            store.remove_tree(marker)
            if thawed:
                done.append(f"thawed {', '.join(str(t) for t in thawed)}")
            if len(thawed) < len(targets):
                done.append("left alone " + ", ".join(t for t in targets if Path(t) not in thawed)
                            + ": another filesystem is mounted there now")
        done += [f"removed {p}" for p in store.remove_tmp(meta) + store.remove_tmp(meta / "ckpt")]
        known = set(_seqs(dg, rvg))
        for d in dg.catalog.disks():
            base = dg.disk_dir(d.name) / "repl" / rvg
            if not base.is_dir():
                continue
            for sub in base.iterdir():
                if not (sub.name.isdigit() and int(sub.name) in known):
                    store.remove_tree(sub)
                    done.append(f"removed {sub}")
        return done


def _seqs(dg: DiskGroup, rvg: str) -> list[int]:
    d = meta_dir(dg, rvg) / "ckpt"
    if not d.is_dir():
        return []
    return sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit())


def _next_seq(dg: DiskGroup, rvg: str) -> int:
    rec = store.read_json(meta_dir(dg, rvg) / "consistent.json")
    return max([0, *_seqs(dg, rvg), rec["seq"] if rec else 0]) + 1


def _to_json(ck: Checkpoint) -> dict[str, object]:
    return {"rvg": ck.rvg, "seq": ck.seq, "created": ck.created, "volumes": list(ck.volumes),
            "frozen": list(ck.frozen), "freeze_seconds": ck.freeze_seconds,
            "images": [{"volume": i.volume, "idx": i.idx, "disk": i.disk, "size": i.size} for i in ck.images]}


def _from_json(raw: Any) -> Checkpoint:
    return Checkpoint(str(raw["rvg"]), int(raw["seq"]), float(raw["created"]), tuple(raw["volumes"]),
                      tuple(ImageRef(str(i["volume"]), int(i["idx"]), str(i["disk"]), int(i["size"]))
                            for i in raw["images"]),
                      tuple(raw["frozen"]), float(raw["freeze_seconds"]))


def list_checkpoints(dg: DiskGroup, rvg: str) -> list[Checkpoint]:
    """The RVG's checkpoints, oldest first."""
    return [get(dg, rvg, s) for s in _seqs(dg, rvg)]


def get(dg: DiskGroup, rvg: str, seq: int) -> Checkpoint:
    raw = store.read_json(meta_dir(dg, rvg) / "ckpt" / f"{seq}.json")
    if raw is None:
        raise NoSuchCheckpoint(f"RVG {rvg} has no checkpoint {seq}; list them to see which it keeps")
    return _from_json(raw)


def last_consistent(dg: DiskGroup, rvg: str) -> Checkpoint | None:
    rec = store.read_json(meta_dir(dg, rvg) / "consistent.json")
    if rec is None or rec["seq"] not in _seqs(dg, rvg):
        return None
    return get(dg, rvg, int(rec["seq"]))


def drop_all(dg: DiskGroup, rvg: str) -> None:
    """Delete every checkpoint of the RVG and its consistent record (a site that became secondary: its
    replica holds the state now, and its next checkpoints as primary restart from the replica's seq)."""
    for c in list_checkpoints(dg, rvg):
        delete(dg, rvg, c.seq)
    store.remove_tree(meta_dir(dg, rvg) / "consistent.json")


def delete(dg: DiskGroup, rvg: str, seq: int) -> None:
    """Delete checkpoint ``seq`` (its manifest first, so a killed delete leaves clones ``recover``
    removes, never a manifest without its images)."""
    with dg.locks.hold(_lock(rvg)):
        ck = get(dg, rvg, seq)
        store.remove_tree(meta_dir(dg, rvg) / "ckpt" / f"{seq}.json")
        crash.point("repl.ckpt.unrecorded")
        for d in sorted({image_dir(dg, i.disk, rvg, seq) for i in ck.images}):
            store.remove_tree(d)
