"""SQLite catalog backend: one WAL database in the disk group root, shared by every process."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from storage.catalog.base import (
    AttachRec,
    Catalog,
    DiskGroupRec,
    DiskRec,
    IntentRec,
    LeaseRec,
    MountRec,
    SubdiskRec,
    VolumeRec,
    check_owner,
    check_space,
    refuse_attach,
)
from storage.errors import (
    AlreadyExists,
    CatalogError,
    IntentPending,
    InUse,
    NoSuchDiskGroup,
    NoSuchVolume,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS diskgroup (
  name TEXT PRIMARY KEY, uuid TEXT NOT NULL, imported_on TEXT, created REAL NOT NULL,
  accept_shared_domain INTEGER NOT NULL DEFAULT 0, shared INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS disk (
  name TEXT PRIMARY KEY, source TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, size INTEGER NOT NULL,
  state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volume (
  name TEXT PRIMARY KEY, size INTEGER NOT NULL, layout TEXT NOT NULL, fstype TEXT NOT NULL,
  nmirror INTEGER NOT NULL, ncol INTEGER NOT NULL, maxiops INTEGER NOT NULL, snapshot_of TEXT,
  cachesize INTEGER NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, protect INTEGER NOT NULL,
  identity_pending INTEGER NOT NULL DEFAULT 0, autogrow INTEGER NOT NULL DEFAULT 0,
  invalid TEXT NOT NULL DEFAULT '', provisioning TEXT NOT NULL DEFAULT 'thin');
CREATE TABLE IF NOT EXISTS subdisk (
  volume TEXT NOT NULL REFERENCES volume(name), idx INTEGER NOT NULL,
  disk TEXT NOT NULL REFERENCES disk(name), size INTEGER NOT NULL, reserved INTEGER NOT NULL,
  PRIMARY KEY (volume, idx));
CREATE INDEX IF NOT EXISTS subdisk_disk ON subdisk(disk);
CREATE TABLE IF NOT EXISTS mount (
  volume TEXT NOT NULL, node TEXT NOT NULL, mount_id TEXT NOT NULL, created REAL NOT NULL,
  PRIMARY KEY (volume, node, mount_id));
CREATE TABLE IF NOT EXISTS intent (
  key TEXT PRIMARY KEY, op TEXT NOT NULL, data TEXT NOT NULL, created REAL NOT NULL);
"""

_LEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS lease (node TEXT PRIMARY KEY, expires REAL NOT NULL, ttl REAL NOT NULL);
CREATE TABLE IF NOT EXISTS attachment (
  volume TEXT PRIMARY KEY, node TEXT NOT NULL, since REAL NOT NULL, wanted_by TEXT);
"""
_SCHEMA += _LEASE_SCHEMA

SCHEMA_VERSION = 4  # 1: release 0.1.0; 2: snapshot cache columns (autogrow, invalid); 3: provisioning;
# 4: node leases and volume attachments (several nodes on one disk group); the disk group's acceptance
# of copies in one failure domain (accept_shared_domain); shared groups


def _to_2(db: sqlite3.Connection) -> None:
    have = {r[1] for r in db.execute("PRAGMA table_info(volume)")}
    for col, decl in (("autogrow", "INTEGER NOT NULL DEFAULT 0"), ("invalid", "TEXT NOT NULL DEFAULT ''")):
        if col not in have:
            db.execute(f"ALTER TABLE volume ADD COLUMN {col} {decl}")
    if "autogrow" not in have:
        # snapshots made before caches were enforced may already be past theirs: they grow while the
        # disk group has room, rather than lose their data at the first check
        db.execute("UPDATE volume SET autogrow=1 WHERE snapshot_of IS NOT NULL")


def _to_3(db: sqlite3.Connection) -> None:
    """Volumes made before provisioning was a choice are thin: their images were made sparse."""
    if "provisioning" not in {r[1] for r in db.execute("PRAGMA table_info(volume)")}:
        db.execute("ALTER TABLE volume ADD COLUMN provisioning TEXT NOT NULL DEFAULT 'thin'")


def _to_4(db: sqlite3.Connection) -> None:
    """Leases and attachments start empty: a catalog from before them was used by one node only.
    Disk groups made before these were recorded refuse shared failure domains, as they did, and are
    imported on one node at a time (not shared), as they were."""
    for stmt in _LEASE_SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
    have = {r[1] for r in db.execute("PRAGMA table_info(diskgroup)")}
    for col in ("accept_shared_domain", "shared"):
        if have and col not in have:
            db.execute(f"ALTER TABLE diskgroup ADD COLUMN {col} INTEGER NOT NULL DEFAULT 0")


# version N -> N + 1, each run inside the one transaction that also records the new version
_UPGRADES: dict[int, Callable[[sqlite3.Connection], None]] = {1: _to_2, 2: _to_3, 3: _to_4}
_VOL_FIELDS = {f for f in VolumeRec.__dataclass_fields__ if f != "name"}
_SD_FIELDS = {"disk", "size", "reserved"}


class SqliteCatalog(Catalog):
    """Catalog in ``path`` (WAL). Writers take the database lock up front (BEGIN IMMEDIATE)."""

    def __init__(self, path: Path, timeout: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock  # wall clock of lease expiry; tests pass a fake one
        # one connection shared by this object's threads: serialise its transactions and reads
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: in WAL mode NORMAL may lose the last commits on power failure, and a lost commit
            # of an intent or a finished operation is exactly what recovery cannot tell from the truth
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open catalog {path}: {exc}") from None
        self._prepare()

    def _prepare(self) -> None:
        """Create the schema in a new catalog, or upgrade an older one step by step to SCHEMA_VERSION.

        The version lives in SQLite's ``user_version``; release 0.1.0 never set it (0 with tables).
        A catalog from a newer veritas is refused rather than misread.
        """
        version = self._q("PRAGMA user_version")[0][0]
        if version == SCHEMA_VERSION:
            return  # the usual case: no write lock taken
        if version > SCHEMA_VERSION:
            raise CatalogError(f"catalog {self.path} has schema version {version}, newer than this veritas"
                               f" knows ({SCHEMA_VERSION}); upgrade veritas on this node")
        with self._tx() as db:  # re-read under the lock: another process may be upgrading too
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='volume'").fetchone():
                for stmt in _SCHEMA.split(";"):  # executescript would commit: one statement at a time
                    if stmt.strip():
                        db.execute(stmt)
                version = SCHEMA_VERSION
            version = max(version, 1)
            while version < SCHEMA_VERSION:
                _UPGRADES[version](db)
                version += 1
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise CatalogError(f"catalog {self.path}: cannot begin a transaction: {exc}") from None
            try:
                yield db
            except sqlite3.Error as exc:
                if db.in_transaction:  # some errors (a full disk) have rolled it back already
                    db.execute("ROLLBACK")
                raise CatalogError(f"catalog {self.path}: {exc}") from None
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            else:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise CatalogError(f"catalog {self.path}: commit failed: {exc}") from None

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise CatalogError(f"catalog {self.path}: {exc}") from None

    # disk group
    def init(self, dg: DiskGroupRec) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM diskgroup").fetchone():
                raise AlreadyExists(f"disk group catalog {self.path} already exists")
            db.execute("INSERT INTO diskgroup (name, uuid, imported_on, created, accept_shared_domain, shared)"
                       " VALUES (?,?,?,?,?,?)",
                       (dg.name, dg.uuid, dg.imported_on, dg.created, int(dg.accept_shared_domain),
                        int(dg.shared)))

    def diskgroup(self) -> DiskGroupRec:
        rows = self._q("SELECT name, uuid, imported_on, created, accept_shared_domain, shared FROM diskgroup")
        if not rows:
            raise NoSuchDiskGroup(f"catalog {self.path} holds no disk group")
        name, uuid, imported_on, created, accept, shared = rows[0]
        return DiskGroupRec(name, uuid, imported_on, created, bool(accept), bool(shared))

    def set_imported(self, node: str | None, expect: Collection[str | None] | None = None) -> None:
        with self._tx() as db:
            row = db.execute("SELECT name, imported_on FROM diskgroup").fetchone()
            if row is None:
                raise NoSuchDiskGroup(f"catalog {self.path} holds no disk group")
            check_owner(row[0], row[1], expect)
            db.execute("UPDATE diskgroup SET imported_on=?", (node,))

    # disks
    def add_disk(self, disk: DiskRec) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM disk WHERE name=? OR source=?", (disk.name, disk.source)).fetchone():
                raise AlreadyExists(f"disk {disk.name} ({disk.source}) is already in the disk group")
            db.execute("INSERT INTO disk VALUES (?,?,?,?,?)",
                       (disk.name, disk.source, disk.kind, disk.size, disk.state))

    def disks(self) -> list[DiskRec]:
        return [DiskRec(*r) for r in self._q("SELECT name, source, kind, size, state FROM disk ORDER BY name")]

    def set_disk_state(self, name: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE disk SET state=? WHERE name=?", (state, name))

    def remove_disk(self, name: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT volume FROM subdisk WHERE disk=? LIMIT 1", (name,)).fetchone()
            if row:
                raise InUse(f"disk {name} still holds volume {row[0]}; remove or repair it first")
            db.execute("DELETE FROM disk WHERE name=?", (name,))

    # volumes
    def create_volume(self, vol: VolumeRec, subdisks: list[SubdiskRec], intent: IntentRec,
                      capacity: Mapping[str, int]) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM volume WHERE name=?", (vol.name,)).fetchone():
                raise AlreadyExists(f"volume {vol.name} already exists")
            used = dict(db.execute("SELECT disk, SUM(reserved) FROM subdisk GROUP BY disk").fetchall())
            check_space(used, subdisks, capacity)
            _refuse_pending(db, intent.key)
            db.execute("INSERT INTO volume VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", _vol_row(vol))
            db.executemany("INSERT INTO subdisk VALUES (?,?,?,?,?)",
                           [(s.volume, s.idx, s.disk, s.size, s.reserved) for s in subdisks])
            db.execute("INSERT INTO intent VALUES (?,?,?,?)", _intent_row(intent))

    def volume(self, name: str) -> VolumeRec | None:
        rows = self._q("SELECT * FROM volume WHERE name=?", (name,))
        return _vol(rows[0]) if rows else None

    def volumes(self) -> list[VolumeRec]:
        return [_vol(r) for r in self._q("SELECT * FROM volume ORDER BY name")]

    def subdisks(self, volume: str | None = None) -> list[SubdiskRec]:
        if volume is None:
            rows = self._q("SELECT * FROM subdisk ORDER BY volume, idx")
        else:
            rows = self._q("SELECT * FROM subdisk WHERE volume=? ORDER BY idx", (volume,))
        return [SubdiskRec(*r) for r in rows]

    def update_volume(self, name: str, **fields: Any) -> None:
        with self._tx() as db:
            _update_volume(db, name, fields)

    def update_subdisk(self, volume: str, idx: int, capacity: Mapping[str, int] | None = None,
                       **fields: Any) -> None:
        bad = set(fields) - _SD_FIELDS
        if bad:
            raise ValueError(f"unknown subdisk fields {sorted(bad)}")
        with self._tx() as db:
            row = db.execute("SELECT * FROM subdisk WHERE volume=? AND idx=?", (volume, idx)).fetchone()
            if row is None:
                raise NoSuchVolume(f"volume {volume} has no subdisk {idx}")
            old = SubdiskRec(*row)
            new = SubdiskRec(volume, idx, fields.get("disk", old.disk), fields.get("size", old.size),
                             fields.get("reserved", old.reserved))
            if capacity is not None:
                used = dict(db.execute("SELECT disk, SUM(reserved) FROM subdisk GROUP BY disk").fetchall())
                used[old.disk] = used.get(old.disk, 0) - old.reserved
                check_space(used, [new], capacity)
            db.execute("UPDATE subdisk SET disk=?, size=?, reserved=? WHERE volume=? AND idx=?",
                       (new.disk, new.size, new.reserved, volume, idx))

    def delete_volume(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM subdisk WHERE volume=?", (name,))
            db.execute("DELETE FROM mount WHERE volume=?", (name,))
            db.execute("DELETE FROM intent WHERE key=?", (name,))
            db.execute("DELETE FROM attachment WHERE volume=?", (name,))
            db.execute("DELETE FROM volume WHERE name=?", (name,))

    # mounts
    def add_mount(self, mount: MountRec) -> bool:
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO mount VALUES (?,?,?,?)",
                             (mount.volume, mount.node, mount.mount_id, mount.created))
            return cur.rowcount == 1

    def remove_mount(self, volume: str, node: str, mount_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM mount WHERE volume=? AND node=? AND mount_id=?",
                             (volume, node, mount_id))
            return cur.rowcount == 1

    def mounts(self, volume: str | None = None) -> list[MountRec]:
        if volume is None:
            rows = self._q("SELECT * FROM mount ORDER BY volume, created")
        else:
            rows = self._q("SELECT * FROM mount WHERE volume=? ORDER BY created", (volume,))
        return [MountRec(*r) for r in rows]

    # intents
    def put_intent(self, intent: IntentRec) -> None:
        with self._tx() as db:
            _refuse_pending(db, intent.key)
            db.execute("INSERT INTO intent VALUES (?,?,?,?)", _intent_row(intent))

    def finish_intent(self, key: str, update: Mapping[str, Any] | None = None) -> None:
        with self._tx() as db:
            if update:
                _update_volume(db, key, dict(update))
            db.execute("DELETE FROM intent WHERE key=?", (key,))

    def intents(self) -> list[IntentRec]:
        return [IntentRec(k, op, json.loads(d), c)
                for k, op, d, c in self._q("SELECT key, op, data, created FROM intent ORDER BY created")]

    # leases and attachments
    def renew_lease(self, node: str, ttl: float, sent: float | None = None) -> LeaseRec:
        with self._tx() as db:
            now = self._clock()
            row = db.execute("SELECT expires FROM lease WHERE node=?", (node,)).fetchone()
            if row is not None and row[0] <= now:
                # the lease ran out: its attachments were lost then, and a renewal never brings them back
                db.execute("DELETE FROM attachment WHERE node=?", (node,))
            expires = min(now, now if sent is None else sent) + ttl
            db.execute("INSERT OR REPLACE INTO lease VALUES (?,?,?)", (node, expires, ttl))
            return LeaseRec(node, expires, ttl)

    def drop_lease(self, node: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM attachment WHERE node=?", (node,))
            db.execute("DELETE FROM lease WHERE node=?", (node,))

    def leases(self) -> list[LeaseRec]:
        return [LeaseRec(*r) for r in self._q("SELECT node, expires, ttl FROM lease ORDER BY node")]

    def attach(self, volume: str, node: str) -> AttachRec:
        with self._tx() as db:
            now = self._clock()
            if not db.execute("SELECT 1 FROM volume WHERE name=?", (volume,)).fetchone():
                raise NoSuchVolume(f"no such volume: {volume}")
            leases = {n: LeaseRec(n, e, t) for n, e, t in db.execute("SELECT node, expires, ttl FROM lease")}
            row = db.execute("SELECT volume, node, since, wanted_by FROM attachment WHERE volume=?",
                             (volume,)).fetchone()
            cur = AttachRec(*row) if row else None
            new = refuse_attach(volume, node, cur, leases, now)
            db.execute("INSERT OR REPLACE INTO attachment VALUES (?,?,?,?)",
                       (new.volume, new.node, new.since, new.wanted_by))
            return new

    def want(self, volume: str, node: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE attachment SET wanted_by=? WHERE volume=? AND node<>?", (node, volume, node))

    def detach(self, volume: str, node: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM attachment WHERE volume=? AND node=?", (volume, node)).rowcount == 1

    def attachments(self) -> list[AttachRec]:
        return [AttachRec(*r) for r in
                self._q("SELECT volume, node, since, wanted_by FROM attachment ORDER BY volume")]

    def reserved(self) -> dict[str, int]:
        return {d: int(n) for d, n in self._q("SELECT disk, SUM(reserved) FROM subdisk GROUP BY disk")}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _refuse_pending(db: sqlite3.Connection, key: str) -> None:
    row = db.execute("SELECT op FROM intent WHERE key=?", (key,)).fetchone()
    if row is not None:
        raise IntentPending(f"an unfinished {row[0]} on {key} is recorded; it must be recovered first")


def _update_volume(db: sqlite3.Connection, name: str, fields: dict[str, Any]) -> None:
    bad = set(fields) - _VOL_FIELDS
    if bad:
        raise ValueError(f"unknown volume fields {sorted(bad)}")
    if not fields:
        return
    cols = ", ".join(f"{k}=?" for k in fields)
    vals = [int(v) if isinstance(v, bool) else v for v in fields.values()]
    cur = db.execute(f"UPDATE volume SET {cols} WHERE name=?", (*vals, name))
    if cur.rowcount == 0:
        raise NoSuchVolume(f"no such volume: {name}")


def _vol_row(v: VolumeRec) -> tuple[Any, ...]:
    return (v.name, v.size, v.layout, v.fstype, v.nmirror, v.ncol, v.maxiops, v.snapshot_of,
            v.cachesize, v.state, v.created or time.time(), int(v.protect), int(v.identity_pending),
            int(v.autogrow), v.invalid, v.provisioning)


def _vol(r: sqlite3.Row | tuple[Any, ...]) -> VolumeRec:
    (name, size, layout, fstype, nmirror, ncol, maxiops, snap, cache, state, created, protect, pending,
     autogrow, invalid, provisioning) = r
    return VolumeRec(name, size, layout, fstype, nmirror, ncol, maxiops, snap, cache, state, created,
                     bool(protect), bool(pending), bool(autogrow), invalid, provisioning)


def _intent_row(i: IntentRec) -> tuple[Any, ...]:
    return (i.key, i.op, json.dumps(dict(i.data)), i.created or time.time())
