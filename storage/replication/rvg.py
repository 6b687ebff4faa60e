"""RVG records: which volumes replicate together, this site's role, its peers and the replication state.

One JSON record per RVG, ``repl/<rvg>/rvg.json`` in the disk group's root beside its checkpoints
(storage.replication.store: written atomically). The record is the administrator's intent (written by
the rvg commands under the ``@rvgs`` lock); what the link service learns as it runs (connected or not,
last acknowledged checkpoint) goes to ``repl/<rvg>/link.json`` so the two writers never race. A
volume belongs to one RVG at most. ``role`` is primary or secondary: takeover and migrate
(storage.replication.failover) swap it. After a takeover the new primary records the last checkpoint
it has in common with the old primary (``common_seq``) until fbsync brings that one back as secondary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from storage import rvgrole
from storage.errors import AlreadyExists, InUse, InvalidArgument, NoSuchVolume
from storage.group import DiskGroup
from storage.replication import store
from storage.replication.errors import NoSuchRvg
from storage.units import check_name

ROLES = ("primary", "secondary")
STATES = ("stopped", "replicating", "paused")
_LOCK = "@rvgs"


@dataclass(frozen=True)
class Rvg:
    name: str
    volumes: tuple[str, ...]
    srl_size: int
    role: str  # primary | secondary
    state: str = "stopped"  # stopped | replicating | paused
    local_addr: str = ""  # this site's link address (HOST:PORT)
    peer_addr: str = ""  # the other site's
    synced: bool = False  # the initial full sync completed (startrep)
    common_seq: int = 0  # after a takeover: the checkpoint both sites hold, fbsync's base (0: none pending)
    autofb: bool = False  # after a takeover: fbsync the old primary as soon as its service answers

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["volumes"] = list(self.volumes)
        return d

    @classmethod
    def from_json(cls, raw: Any) -> Rvg:
        return cls(str(raw["name"]), tuple(raw["volumes"]), int(raw["srl_size"]), str(raw["role"]),
                   str(raw.get("state", "stopped")), str(raw.get("local_addr", "")),
                   str(raw.get("peer_addr", "")), bool(raw.get("synced", False)),
                   int(raw.get("common_seq", 0)), bool(raw.get("autofb", False)))


def _dir(dg: DiskGroup) -> Path:
    return dg.root / "repl"


def _path(dg: DiskGroup, name: str) -> Path:
    return rvgrole.record_path(dg, name)  # where storage.rvgrole finds it too


@contextmanager
def locked(dg: DiskGroup) -> Iterator[None]:
    """Hold the lock every change of an RVG record takes (so two creates cannot share a volume)."""
    with dg.locks.hold(_LOCK):
        yield


def names(dg: DiskGroup) -> list[str]:
    d = _dir(dg)
    return sorted(p.parent.name for p in d.glob("*/rvg.json")) if d.is_dir() else []


def get(dg: DiskGroup, name: str) -> Rvg:
    check_name(name, "RVG name")
    raw = store.read_json(_path(dg, name))
    if raw is None:
        raise NoSuchRvg(f"no such RVG: {name} in disk group {dg.name} (veritas rvg createpri makes one)")
    return Rvg.from_json(raw)


def all_rvgs(dg: DiskGroup) -> list[Rvg]:
    return [get(dg, n) for n in names(dg)]


def owner_of(dg: DiskGroup, volume: str) -> str | None:
    """The RVG ``volume`` belongs to, if any."""
    return next((r.name for r in all_rvgs(dg) if volume in r.volumes), None)


def check_new(dg: DiskGroup, name: str, volumes: Sequence[str], srl_size: int, *, need_volumes: bool) -> None:
    """Refuse a new RVG that would clash: bad names, an existing RVG, a volume named twice, unknown
    (when ``need_volumes``) or already in another RVG."""
    check_name(name, "RVG name")
    if not volumes:
        raise InvalidArgument("an RVG needs at least one volume: VOL[,VOL...]")
    if srl_size <= 0:
        raise InvalidArgument(f"SRL size must be positive, not {srl_size}")
    if store.read_json(_path(dg, name)) is not None:
        raise AlreadyExists(f"RVG {name} already exists in disk group {dg.name}")
    if len(set(volumes)) != len(volumes):
        raise InvalidArgument(f"a volume is named twice in {','.join(volumes)}: name each volume once")
    for v in volumes:
        check_name(v, "volume name")
        if need_volumes and dg.catalog.volume(v) is None:
            raise NoSuchVolume(f"no such volume: {v} in disk group {dg.name}")
        other = owner_of(dg, v)
        if other is not None:
            raise InUse(f"volume {v} is already in RVG {other}: a volume replicates in one RVG only")


def create(dg: DiskGroup, rec: Rvg, *, need_volumes: bool = True) -> Rvg:
    """Record a new RVG (under the caller's ``locked``); see check_new for what is refused."""
    if rec.role not in ROLES or rec.state not in STATES:
        raise InvalidArgument(f"RVG role {rec.role!r} / state {rec.state!r} is not one of {ROLES} / {STATES}")
    check_new(dg, rec.name, rec.volumes, rec.srl_size, need_volumes=need_volumes)
    _path(dg, rec.name).parent.mkdir(parents=True, exist_ok=True)
    store.write_json(_path(dg, rec.name), rec.to_json())
    return rec


def update(dg: DiskGroup, name: str, **changes: Any) -> Rvg:
    """Change fields of RVG ``name``'s record (under the caller's ``locked``)."""
    new = replace(get(dg, name), **changes)
    if new.role not in ROLES or new.state not in STATES:
        raise InvalidArgument(f"RVG role {new.role!r} / state {new.state!r} is not one of {ROLES} / {STATES}")
    store.write_json(_path(dg, name), new.to_json())
    return new


def srl_root(dg: DiskGroup, name: str) -> Path:
    """The SRL's directory: on the first disk (the disks hold the bulk, the root the records)."""
    return dg.disk_dir(dg.catalog.disks()[0].name) / "rlink" / name / "srl"


def replica_root(dg: DiskGroup, name: str) -> Path:
    """A secondary's replica (apply.Replica): on the first disk, which reflinks like the images."""
    return dg.disk_dir(dg.catalog.disks()[0].name) / "rlink" / name / "replica"


def link_state(dg: DiskGroup, name: str) -> dict[str, Any]:
    """What the link service last recorded for RVG ``name`` (empty when it never ran)."""
    raw = store.read_json(_dir(dg) / name / "link.json")
    return dict(raw) if raw else {}


def shapes_path(dg: DiskGroup, name: str) -> Path:
    """On a secondary: the primary's volume shapes (layout, fstype, size...), for making them live here."""
    return _dir(dg) / name / "shapes.json"


def set_link_state(dg: DiskGroup, name: str, **fields: Any) -> None:
    cur = link_state(dg, name)
    cur.update(fields)
    store.write_json(_dir(dg) / name / "link.json", cur)
