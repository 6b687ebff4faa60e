"""Finishing operations a killed process left half done, rolled forward or back by kind.

An intent whose volume lock stripe is free has no live owner (flock dies with its process). make, snap
and mount roll back; rm, umount and grow roll forward; repair drops a half-built replacement.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from storage.catalog.base import IntentRec
from storage.diskgroup import DiskGroup
from storage.errors import NoSpace, VeritasError
from storage.kernel import fs, loop, mounts


def recover(dg: DiskGroup) -> list[str]:
    """Recover every abandoned intent; returns a line per action taken."""
    done: list[str] = []
    for intent in dg.catalog.intents():
        fd = dg.locks.try_hold_key(intent.key)
        if fd is None:
            continue  # its owner is alive and still working
        try:
            # re-read: the owner may have finished between listing and locking
            current = {i.key: i for i in dg.catalog.intents()}.get(intent.key)
            if current is None:
                continue
            done.append(_recover_one(dg, current))
        except VeritasError as exc:
            print(f"veritas: recovery of {intent.op} on {intent.key} failed: {exc}", file=sys.stderr)
        finally:
            os.close(fd)
    return done


def recover_held(dg: DiskGroup, key: str) -> str | None:
    """Recover the intent on ``key`` whose lock the caller holds: its owner is dead (a live one would
    hold the lock). For long-lived openers, which recover at open only. None when there is no intent."""
    intent = {i.key: i for i in dg.catalog.intents()}.get(key)
    return _recover_one(dg, intent) if intent is not None else None


def _recover_one(dg: DiskGroup, intent: IntentRec) -> str:
    from storage import volumes

    key, op = intent.key, intent.op
    if key == "@dg":
        return _recover_dg(dg, intent)
    v = dg.catalog.volume(key)
    if v is None:
        dg.catalog.finish_intent(key)
        return f"{op} {key}: nothing left to do"
    if op in ("make", "snap"):
        frozen = intent.data.get("frozen")
        if frozen:
            fs.thaw(Path(frozen), dg.runner)
        volumes.teardown(dg, key)
        return f"{op} {key}: rolled back"
    if op == "rm":
        volumes.teardown(dg, key)
        return f"rm {key}: rolled forward"
    if op == "mount":
        mine = [m for m in dg.catalog.mounts(key) if m.node == dg.node]
        if not mine:
            volumes._unmount_kernel(dg, v)
            dg.catalog.finish_intent(key)
            return f"mount {key}: rolled back"
        dg.catalog.finish_intent(key)
        return f"mount {key}: completed"
    if op == "umount":
        mine = [m for m in dg.catalog.mounts(key) if m.node == dg.node]
        for m in mine:
            if intent.data.get("force") or m.mount_id == intent.data.get("mount_id"):
                dg.catalog.remove_mount(key, m.node, m.mount_id)
        if not [m for m in dg.catalog.mounts(key) if m.node == dg.node]:
            volumes._unmount_kernel(dg, v)
        dg.catalog.finish_intent(key)
        return f"umount {key}: rolled forward"
    if op == "grow":
        try:  # a grow killed before (or while) reserving: its images and filesystem never got there
            volumes.reserve_growth(dg, key, [int(n) for n in intent.data.get("sizes") or []])
        except NoSpace:
            dg.catalog.finish_intent(key)
            return f"grow {key}: rolled back (its space was taken meanwhile)"
        volumes._grow_steps(dg, v, int(intent.data["size"]))
        return f"grow {key}: rolled forward"
    if op == "repair":
        scratch = intent.data.get("scratch")
        if scratch and mounts.mounted_at(Path(scratch)):
            volumes._unmount_at(dg, v, Path(scratch))
        _drop_orphan_images(dg, key)
        dg.catalog.finish_intent(key)
        return f"repair {key}: abandoned, run veritas vol repair {key} again"
    dg.catalog.finish_intent(key)
    return f"unknown intent {op} on {key}: dropped"


def _drop_orphan_images(dg: DiskGroup, volume: str) -> None:
    """Delete images of ``volume`` that no subdisk record points at (a half-built replacement)."""
    wanted = {dg.image(sd.disk, volume, sd.idx) for sd in dg.catalog.subdisks(volume)}
    for d in dg.catalog.disks():
        vols = dg.disk_dir(d.name) / "vols"
        if not vols.is_dir():
            continue
        for img in vols.glob(f"{volume}.*.img"):
            if img not in wanted and img.name.rsplit(".", 2)[0] == volume:
                loop.detach_image(img, dg.runner)
                img.unlink(missing_ok=True)


def _recover_dg(dg: DiskGroup, intent: IntentRec) -> str:
    if intent.op == "adddisk":
        disk = str(intent.data.get("disk"))
        if disk not in {d.name for d in dg.catalog.disks()}:
            target = dg.disk_dir(disk)
            fs.umount(target, dg.runner)
            src = Path(str(intent.data.get("source")))
            loop.detach_image(src, dg.runner)
            try:
                target.rmdir()
            except OSError:
                pass
            if intent.data.get("created"):
                src.unlink(missing_ok=True)  # veritas made this image: a half-formatted copy helps nobody
        dg.catalog.finish_intent("@dg")
        return f"adddisk {disk}: rolled back ({json.dumps(dict(intent.data))})"
    dg.catalog.finish_intent("@dg")
    return f"dg {intent.op}: dropped"
