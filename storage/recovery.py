"""Finishing operations a killed process left half done, rolled forward or back by kind.

One protocol for every intent: an operation records its intent holding its locks, and only a holder of
exactly those locks recovers it, once the locks interface says its owner is gone (``locks.Locks.owner_gone``;
locally: flock dies with its process). ``recover`` (at open) takes them without waiting and leaves an
intent whose owner may be alive to it; ``recover_held`` serves an operation that holds them already
and finds a dead one's intent on its key. ``HANDLERS`` says what each operation's recovery does: make,
snap and mount roll back; rm, umount and grow roll forward; repair drops a half-built replacement; adddisk rolls back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storage import ownership, steps
from storage.catalog.base import IntentRec, VolumeRec
from storage.errors import AlreadyExists, InUse, NoSpace, VeritasError
from storage.group import DG_KEY, DiskGroup, finish_dg_intent
from storage.kernel import fs, loop, mounts


@dataclass(frozen=True)
class LockSet:
    """The locks an operation takes: the disk group lock (shared or exclusive) and volume stripes."""

    keys: tuple[str, ...] = ()
    exclusive_dg: bool = False


@dataclass(frozen=True)
class Handler:
    """How to recover one kind of operation: the locks it took, and what finishing it does."""

    locks: Callable[[IntentRec], LockSet]
    finish: Callable[[DiskGroup, IntentRec], str]


def recover(dg: DiskGroup) -> list[str]:
    """Recover every abandoned intent; returns a line per action taken."""
    done: list[str] = []
    for intent in dg.catalog.intents():
        need = _handler(intent).locks(intent)
        with dg.locks.owner_gone(*need.keys, exclusive_dg=need.exclusive_dg) as gone:
            if not gone:
                continue  # its owner may be alive and still working
            # re-read: the owner may have finished between listing and locking
            current = _intent(dg, intent.key)
            if current is None:
                continue
            try:
                done.append(_recover_one(dg, current))
            except VeritasError as exc:
                print(f"veritas: recovery of {intent.op} on {intent.key} failed: {exc}", file=sys.stderr)
    return done


def recover_held(dg: DiskGroup, key: str) -> str | None:
    """Recover the intent on ``key`` for a caller that holds the locks of an operation on ``key``.

    Its owner is dead (a live one would hold those locks). Locks the dead operation took beyond the
    caller's (a snapshot's source stripe) are taken without waiting; taken, this raises InUse.
    None when there is no intent.
    """
    intent = _intent(dg, key)
    if intent is None:
        return None
    need = _handler(intent).locks(intent)
    with dg.locks.owner_gone(*need.keys, exclusive_dg=need.exclusive_dg) as gone:
        if not gone:
            raise InUse(f"an unfinished {intent.op} on {key} cannot be recovered now: another operation"
                        " holds its locks; retry shortly")
        return _recover_one(dg, intent)


def check_free(dg: DiskGroup, name: str) -> None:
    """Refuse a volume name in use; call with its lock held.

    A row left 'creating' or 'removing' under a free lock is a killed process's: it is finished first
    (rolled back or forward), as the next open would, so that a long-lived opener such as the plugin
    neither refuses the name nor takes a half-made volume for a real one.
    """
    v = dg.catalog.volume(name)
    if v is not None and v.state != "ok":
        recover_held(dg, name)
        v = dg.catalog.volume(name)
    if v is not None:
        raise AlreadyExists(f"volume {name} already exists in disk group {dg.name}")


def _intent(dg: DiskGroup, key: str) -> IntentRec | None:
    return {i.key: i for i in dg.catalog.intents()}.get(key)


def _recover_one(dg: DiskGroup, intent: IntentRec) -> str:
    if intent.key != DG_KEY and dg.catalog.volume(intent.key) is None:
        dg.catalog.finish_intent(intent.key)
        return f"{intent.op} {intent.key}: nothing left to do"
    return _handler(intent).finish(dg, intent)


def _volume(dg: DiskGroup, intent: IntentRec) -> VolumeRec:
    v = dg.catalog.volume(intent.key)
    if v is None:  # _recover_one checked; a handler runs with the volume's locks held
        raise VeritasError(f"volume {intent.key} vanished while its {intent.op} was recovered")
    return v


def _roll_back_make(dg: DiskGroup, intent: IntentRec) -> str:
    frozen = intent.data.get("frozen")
    if frozen:
        fs.thaw_if_same(Path(frozen), intent.data.get("frozen_dev"), dg.runner)
    steps.teardown(dg, intent.key)
    return f"{intent.op} {intent.key}: rolled back"


def _roll_forward_rm(dg: DiskGroup, intent: IntentRec) -> str:
    steps.teardown(dg, intent.key)
    return f"rm {intent.key}: rolled forward"


def _finish_mount(dg: DiskGroup, intent: IntentRec) -> str:
    key = intent.key
    mine = [m for m in dg.catalog.mounts(key) if m.node == dg.node]
    if not mine:
        steps.unmount_kernel(dg, _volume(dg, intent))
        ownership.release(dg, key)
        dg.catalog.finish_intent(key)
        return f"mount {key}: rolled back"
    dg.catalog.finish_intent(key)
    return f"mount {key}: completed"


def _roll_forward_umount(dg: DiskGroup, intent: IntentRec) -> str:
    key = intent.key
    mine = [m for m in dg.catalog.mounts(key) if m.node == dg.node]
    for m in mine:
        if intent.data.get("force") or m.mount_id == intent.data.get("mount_id"):
            dg.catalog.remove_mount(key, m.node, m.mount_id)
    if not [m for m in dg.catalog.mounts(key) if m.node == dg.node]:
        steps.unmount_kernel(dg, _volume(dg, intent))
        ownership.release(dg, key)
    dg.catalog.finish_intent(key)
    return f"umount {key}: rolled forward"


def _roll_forward_grow(dg: DiskGroup, intent: IntentRec) -> str:
    key = intent.key
    try:  # a grow killed before (or while) reserving: its images and filesystem never got there
        steps.reserve_growth(dg, key, [int(n) for n in intent.data.get("sizes") or []])
    except NoSpace:
        dg.catalog.finish_intent(key)
        return f"grow {key}: rolled back (its space was taken meanwhile)"
    steps.grow_steps(dg, _volume(dg, intent), int(intent.data["size"]))
    return f"grow {key}: rolled forward"


def _abandon_repair(dg: DiskGroup, intent: IntentRec) -> str:
    key = intent.key
    scratch = intent.data.get("scratch")
    if scratch and mounts.mounted_at(Path(scratch)):
        steps.unmount_at(dg, _volume(dg, intent), Path(scratch))
    _drop_orphan_images(dg, key)
    dg.catalog.finish_intent(key)
    return f"repair {key}: abandoned, run veritas vol repair {key} again"


def _drop_unknown(dg: DiskGroup, intent: IntentRec) -> str:
    dg.catalog.finish_intent(intent.key)
    return f"unknown intent {intent.op} on {intent.key}: dropped"


def _volume_locks(intent: IntentRec) -> LockSet:
    return LockSet((intent.key,))


def _snap_locks(intent: IntentRec) -> LockSet:
    source = intent.data.get("source")
    return LockSet((intent.key, str(source)) if source else (intent.key,))


def _dg_locks(intent: IntentRec) -> LockSet:
    return LockSet((), exclusive_dg=True)


HANDLERS: dict[str, Handler] = {
    "make": Handler(_volume_locks, _roll_back_make),
    "snap": Handler(_snap_locks, _roll_back_make),
    "rm": Handler(_volume_locks, _roll_forward_rm),
    "mount": Handler(_volume_locks, _finish_mount),
    "umount": Handler(_volume_locks, _roll_forward_umount),
    "grow": Handler(_volume_locks, _roll_forward_grow),
    "repair": Handler(_volume_locks, _abandon_repair),
}


def _handler(intent: IntentRec) -> Handler:
    if intent.key == DG_KEY:
        return Handler(_dg_locks, _finish_dg)  # storage.group: adddisk rolls back, anything else is dropped
    return HANDLERS.get(intent.op, Handler(_volume_locks, _drop_unknown))


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


def _finish_dg(dg: DiskGroup, intent: IntentRec) -> str:
    return finish_dg_intent(dg, intent) or f"dg {intent.op}: nothing left to do"
