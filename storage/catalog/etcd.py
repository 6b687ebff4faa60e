"""etcd catalog backend: one disk group's catalog under a key prefix of an etcd v3 cluster.

Reached through etcd's JSON gateway (``/v3/`` on 3.4+, ``/v3beta/`` on 3.3) with etcd3gw: pure HTTP,
no gRPC C extension to build on every node. Every write is one etcd transaction that compares the
catalog's revision key (``<root>rev``) with what the caller read and bumps it: writers of one catalog
are serialised as SQLite's BEGIN IMMEDIATE serialises them, and a refused compare is retried on a
fresh read. Node leases are etcd leases; a node's ``alive/`` key and its attachments are bound to its
lease, so they vanish when the server lets the lease expire. Errors reach callers as storage.errors
types naming the endpoint, never as etcd3gw or requests exceptions.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

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
    InvalidArgument,
    NoSuchDiskGroup,
    NoSuchVolume,
)

T = TypeVar("T")
KV = dict[str, Any]  # one key-value of a range answer: key (str), value (bytes), mod/create revision, lease
Op = dict[str, Any]  # one request or compare of a transaction, in the gateway's JSON

_VOL_FIELDS = {f for f in VolumeRec.__dataclass_fields__ if f != "name"}
_SD_FIELDS = {"disk", "size", "reserved"}
RETRIES = 200  # compare-and-set rounds before a write gives up (each one lost to another writer)


def check_endpoints(endpoints: Sequence[str]) -> tuple[str, ...]:
    """``http://HOST:PORT`` (or https) each, at least one. :raises InvalidArgument: naming the bad one."""
    out = []
    for ep in endpoints:
        ep = ep.strip().rstrip("/")
        u = urlsplit(ep)
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path or u.query:
            raise InvalidArgument(f"etcd endpoint {ep!r} is not of the form http://HOST:PORT")
        out.append(ep)
    if not out:
        raise InvalidArgument("no etcd endpoint given: set [cluster] etcd_endpoints = http://HOST:PORT[,...]")
    return tuple(out)


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _range_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


class Etcd:
    """A small client over etcd3gw: one HTTP session per thread and process, the endpoints tried in
    turn when one cannot be reached, every failure turned into CatalogError saying what to check."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0) -> None:
        self.endpoints = check_endpoints(endpoints)
        self.timeout = timeout
        self._local = threading.local()
        self._pid = os.getpid()
        self._good = 0  # the endpoint that answered last

    def _client(self, i: int) -> Etcd3Client:
        if os.getpid() != self._pid:  # a forked child must not share its parent's connections
            self._local = threading.local()
            self._pid = os.getpid()
        clients: dict[int, Etcd3Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if i not in clients:
            u = urlsplit(self.endpoints[i])
            assert u.hostname is not None and u.port is not None  # checked at construction
            clients[i] = Etcd3Client(host=u.hostname, port=u.port, protocol=u.scheme, timeout=self.timeout)
        return clients[i]

    def post(self, what: str, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to the gateway's ``path``; ``what`` says in the error what was being done."""
        n = len(self.endpoints)
        reasons: list[str] = []
        for k in range(n):
            i = (self._good + k) % n
            ep = self.endpoints[i]
            client = self._client(i)
            try:
                out = client.post(client.get_url(path), json=dict(payload))
            except (ConnectionFailedError, ConnectionTimeoutError) as exc:
                reasons.append(f"{ep}: {_reason(exc)}")
                continue
            except Etcd3Exception as exc:
                raise CatalogError(f"etcd at {ep} refused to {what}: {_reason(exc)}") from None
            except (requests.RequestException, ValueError) as exc:
                reasons.append(f"{ep}: {type(exc).__name__}: {exc}")
                continue
            self._good = i
            if not isinstance(out, dict):
                raise CatalogError(f"etcd at {ep} gave a malformed answer to {what}: {out!r:.200}")
            return out
        raise CatalogError(f"cannot reach etcd to {what} ({'; '.join(reasons)}); check that etcd runs there"
                           " and that [cluster] etcd_endpoints in the veritas config names it")

    # --- key-value
    def range(self, what: str, key: str, prefix: bool = False, keys_only: bool = False) -> tuple[int, list[KV]]:
        """The revision of the answer, and the keys (``key``, or every key under prefix ``key``)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _range_end(key)
        if keys_only:
            body["keys_only"] = True
        out = self.post(what, "/kv/range", body)
        return int(out.get("header", {}).get("revision", 0)), [_kv(kv) for kv in out.get("kvs", [])]

    def get(self, what: str, key: str) -> KV | None:
        kvs = self.range(what, key)[1]
        return kvs[0] if kvs else None

    def txn(self, what: str, compare: list[Op], success: list[Op], failure: list[Op] | None = None
            ) -> tuple[bool, list[dict[str, Any]]]:
        """One transaction: whether its compares held, and the answers of the branch that ran."""
        out = self.post(what, "/kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(out.get("succeeded", False)), list(out.get("responses", []))

    # --- leases
    def grant(self, what: str, ttl: float) -> int:
        out = self.post(what, "/lease/grant", {"TTL": max(1, math.ceil(ttl)), "ID": 0})
        if out.get("error"):
            raise CatalogError(f"etcd refused to {what}: {out['error']}")
        return int(out["ID"])

    def keepalive(self, what: str, lease: int) -> int:
        """The lease's TTL again from now; -1 when it has expired (it cannot be brought back)."""
        out = self.post(what, "/lease/keepalive", {"ID": lease})
        return int(out.get("result", {}).get("TTL", -1))

    def time_to_live(self, what: str, lease: int) -> int:
        """Seconds the lease has left as the server judges; -1 when expired or unknown."""
        return int(self.post(what, "/kv/lease/timetolive", {"ID": lease}).get("TTL", 0))  # 0 is left out

    def revoke(self, what: str, lease: int) -> None:
        try:
            self.post(what, "/kv/lease/revoke", {"ID": lease})
        except CatalogError as exc:
            if "not found" not in str(exc):  # revoked or expired already: what was asked for
                raise


def _reason(exc: Etcd3Exception) -> str:
    text = exc.detail_text or " ".join(str(a) for a in exc.args) or type(exc).__name__
    try:
        parsed = json.loads(text)
        text = parsed.get("error") or parsed.get("message") or text
    except (ValueError, AttributeError):
        pass
    return str(text)[:300]


def _kv(raw: Mapping[str, Any]) -> KV:
    return {"key": _unb64(raw["key"]).decode(), "value": _unb64(raw.get("value", "")),
            "mod": int(raw.get("mod_revision", 0)), "create": int(raw.get("create_revision", 0)),
            "lease": int(raw.get("lease", 0))}


# --- transaction builders
def put(key: str, value: str | bytes, lease: int = 0) -> Op:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def delete(key: str, prefix: bool = False) -> Op:
    req = {"key": _b64(key)}
    if prefix:
        req["range_end"] = _range_end(key)
    return {"request_delete_range": req}


def get_op(key: str) -> Op:
    return {"request_range": {"key": _b64(key)}}


def mod_is(key: str, rev: int) -> Op:
    """The key was not changed since it was read at ``rev`` (0: it is still absent)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": rev}


def exists(key: str) -> Op:
    return {"key": _b64(key), "result": "GREATER", "target": "CREATE", "create_revision": 0}


def absent(key: str, prefix: bool = False) -> Op:
    """No such key (with ``prefix``: no key under it)."""
    cmp: Op = {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}
    if prefix:
        cmp["range_end"] = _range_end(key)
    return cmp


def value_is(key: str, value: str | bytes) -> Op:
    return {"key": _b64(key), "result": "EQUAL", "target": "VALUE", "value": _b64(value)}


def q(part: str) -> str:
    """A key component: names never hold '/', mount IDs and nodes might; quoted, they cannot split."""
    return quote(part, safe="")


def _js(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


class _State:
    """Everything under a catalog's root at one revision, as read for one write."""

    def __init__(self, root: str, kvs: list[KV]) -> None:
        self.by_key = {kv["key"][len(root):]: kv for kv in kvs}

    def mod(self, rel: str) -> int:
        kv = self.by_key.get(rel)
        return int(kv["mod"]) if kv else 0

    def obj(self, rel: str) -> Any:
        kv = self.by_key.get(rel)
        return None if kv is None else json.loads(kv["value"])

    def under(self, rel: str) -> list[tuple[str, Any]]:
        return sorted((k[len(rel):], json.loads(kv["value"])) for k, kv in self.by_key.items()
                      if k.startswith(rel))

    def kvs_under(self, rel: str) -> list[tuple[str, KV]]:
        return sorted((k[len(rel):], kv) for k, kv in self.by_key.items() if k.startswith(rel))

    def subdisks(self) -> list[SubdiskRec]:
        return sorted((SubdiskRec(**d) for _, d in self.under("sd/")), key=lambda s: (s.volume, s.idx))

    def reserved(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.subdisks():
            out[s.disk] = out.get(s.disk, 0) + s.reserved
        return out


class Fence:
    """What a catalog write must still find true: the etcd session keys under which the writing
    thread took its locks. A process whose lease expired while it held them (cut off from etcd longer
    than the TTL) may have lost them to another node: its writes are then refused, not applied."""

    def compares(self) -> list[Op]:
        return []

    def lost(self, etcd: Etcd) -> str | None:
        """Why the fence no longer holds, or None."""
        return None


class EtcdCatalog(Catalog):
    """The catalog under ``root`` (ending in '/'), with the fence of the store's locks."""

    def __init__(self, etcd: Etcd, root: str, label: str = "", fence: Fence | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.etcd = etcd
        self.root = root
        self.label = label or root
        self._fence = fence or Fence()
        self._clock = clock

    # --- plumbing
    def _k(self, rel: str) -> str:
        return self.root + rel

    def _load(self, what: str, rel: str = "") -> _State:
        return _State(self.root, self.etcd.range(what, self._k(rel), prefix=True)[1])

    def _read(self, rel: str) -> list[tuple[str, Any]]:
        return _State(self.root, self.etcd.range(f"read the catalog of {self.label}", self._k(rel),
                                                  prefix=True)[1]).under(rel)

    def _write(self, what: str, build: Callable[[_State], tuple[list[Op], list[Op], T]]) -> T:
        """Read the catalog, let ``build`` decide (raising a typed error to refuse) and name its own
        extra compares and the requests to apply, then apply them in one transaction that also
        compares the revision key; retried from a fresh read while another writer got in first."""
        what_ = f"{what} in the catalog of {self.label}"
        for attempt in range(RETRIES):
            st = self._load(what_)
            if "dg" not in st.by_key:
                raise NoSuchDiskGroup(f"disk group {self.label} is not in etcd (destroyed meanwhile?)")
            compares, ops, result = build(st)
            guard = [mod_is(self._k("rev"), st.mod("rev")), exists(self._k("dg")), *self._fence.compares()]
            ok, _ = self.etcd.txn(what_, guard + compares, [*ops, put(self._k("rev"), str(time.time()))])
            if ok:
                return result
            why = self._fence.lost(self.etcd)
            if why is not None:
                raise CatalogError(f"cannot {what_}: {why}")
            time.sleep(random.uniform(0, min(0.05, 0.001 * (attempt + 1))))
        raise CatalogError(f"cannot {what_}: {RETRIES} attempts lost to concurrent writers; retry")

    # --- disk group
    def init(self, dg: DiskGroupRec) -> None:
        ok, _ = self.etcd.txn(f"create the catalog of {self.label}", [absent(self._k("dg"))],
                              [put(self._k("dg"), _js(dataclasses.asdict(dg))), put(self._k("rev"), "0")])
        if not ok:
            raise AlreadyExists(f"disk group catalog {self.label} already exists")

    def diskgroup(self) -> DiskGroupRec:
        kv = self.etcd.get(f"read the catalog of {self.label}", self._k("dg"))
        if kv is None:
            raise NoSuchDiskGroup(f"catalog {self.label} holds no disk group")
        return DiskGroupRec(**json.loads(kv["value"]))

    def set_imported(self, node: str | None, expect: Collection[str | None] | None = None) -> None:
        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            rec = DiskGroupRec(**st.obj("dg"))
            check_owner(rec.name, rec.imported_on, expect)
            new = dataclasses.replace(rec, imported_on=node)
            return [], [put(self._k("dg"), _js(dataclasses.asdict(new)))], None
        self._write("record the importing node", build)

    # --- disks
    def add_disk(self, disk: DiskRec) -> None:
        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            for _, d in st.under("disk/"):
                if d["name"] == disk.name or d["source"] == disk.source:
                    raise AlreadyExists(f"disk {disk.name} ({disk.source}) is already in the disk group")
            return [], [put(self._k(f"disk/{q(disk.name)}"), _js(dataclasses.asdict(disk)))], None
        self._write(f"add disk {disk.name}", build)

    def disks(self) -> list[DiskRec]:
        return sorted((DiskRec(**d) for _, d in self._read("disk/")), key=lambda d: d.name)

    def set_disk_state(self, name: str, state: str) -> None:
        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            d = st.obj(f"disk/{q(name)}")
            if d is None:
                return [], [], None
            d["state"] = state
            return [], [put(self._k(f"disk/{q(name)}"), _js(d))], None
        self._write(f"set the state of disk {name}", build)

    def remove_disk(self, name: str) -> None:
        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            for s in st.subdisks():
                if s.disk == name:
                    raise InUse(f"disk {name} still holds volume {s.volume}; remove or repair it first")
            return [], [delete(self._k(f"disk/{q(name)}"))], None
        self._write(f"remove disk {name}", build)

    # --- volumes
    def create_volume(self, vol: VolumeRec, subdisks: list[SubdiskRec], intent: IntentRec,
                      capacity: Mapping[str, int]) -> None:
        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            if st.obj(f"vol/{q(vol.name)}") is not None:
                raise AlreadyExists(f"volume {vol.name} already exists")
            check_space(st.reserved(), subdisks, capacity)
            _refuse_pending(st, intent.key)
            rec = dataclasses.replace(vol, created=vol.created or time.time())
            ops = [put(self._k(f"vol/{q(vol.name)}"), _js(dataclasses.asdict(rec)))]
            ops += [put(self._k(f"sd/{q(s.volume)}/{s.idx:06d}"), _js(dataclasses.asdict(s))) for s in subdisks]
            ops.append(put(self._k(f"intent/{q(intent.key)}"), _intent_js(intent)))
            return [], ops, None
        self._write(f"create volume {vol.name}", build)

    def volume(self, name: str) -> VolumeRec | None:
        kv = self.etcd.get(f"read the catalog of {self.label}", self._k(f"vol/{q(name)}"))
        return None if kv is None else _vol(json.loads(kv["value"]))

    def volumes(self) -> list[VolumeRec]:
        return sorted((_vol(d) for _, d in self._read("vol/")), key=lambda v: v.name)

    def subdisks(self, volume: str | None = None) -> list[SubdiskRec]:
        rel = "sd/" if volume is None else f"sd/{q(volume)}/"
        return sorted((SubdiskRec(**d) for _, d in self._read(rel)), key=lambda s: (s.volume, s.idx))

    def update_volume(self, name: str, **fields: Any) -> None:
        _check_vol_fields(fields)
        if not fields:
            return

        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            return [], _update_volume_ops(self, st, name, fields), None
        self._write(f"update volume {name}", build)

    def update_subdisk(self, volume: str, idx: int, capacity: Mapping[str, int] | None = None,
                       **fields: Any) -> None:
        bad = set(fields) - _SD_FIELDS
        if bad:
            raise ValueError(f"unknown subdisk fields {sorted(bad)}")
        rel = f"sd/{q(volume)}/{idx:06d}"

        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            d = st.obj(rel)
            if d is None:
                raise NoSuchVolume(f"volume {volume} has no subdisk {idx}")
            old = SubdiskRec(**d)
            new = dataclasses.replace(old, **fields)
            if capacity is not None:
                used = st.reserved()
                used[old.disk] = used.get(old.disk, 0) - old.reserved
                check_space(used, [new], capacity)
            return [], [put(self._k(rel), _js(dataclasses.asdict(new)))], None
        self._write(f"update subdisk {idx} of volume {volume}", build)

    def delete_volume(self, name: str) -> None:
        n = q(name)

        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            return [], [delete(self._k(f"sd/{n}/"), prefix=True), delete(self._k(f"mount/{n}/"), prefix=True),
                        delete(self._k(f"intent/{n}")), delete(self._k(f"attach/{n}")),
                        delete(self._k(f"vol/{n}"))], None
        self._write(f"delete volume {name}", build)

    # --- mounts
    def add_mount(self, mount: MountRec) -> bool:
        rel = f"mount/{q(mount.volume)}/{q(mount.node)}/{q(mount.mount_id)}"

        def build(st: _State) -> tuple[list[Op], list[Op], bool]:
            if rel in st.by_key:
                return [], [], False
            return [], [put(self._k(rel), _js(dataclasses.asdict(mount)))], True
        return self._write(f"record mount {mount.mount_id} of volume {mount.volume}", build)

    def remove_mount(self, volume: str, node: str, mount_id: str) -> bool:
        rel = f"mount/{q(volume)}/{q(node)}/{q(mount_id)}"

        def build(st: _State) -> tuple[list[Op], list[Op], bool]:
            if rel not in st.by_key:
                return [], [], False
            return [], [delete(self._k(rel))], True
        return self._write(f"forget mount {mount_id} of volume {volume}", build)

    def mounts(self, volume: str | None = None) -> list[MountRec]:
        rel = "mount/" if volume is None else f"mount/{q(volume)}/"
        return sorted((MountRec(**d) for _, d in self._read(rel)), key=lambda m: (m.volume, m.created))

    # --- intents
    def put_intent(self, intent: IntentRec) -> None:
        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            _refuse_pending(st, intent.key)
            return [], [put(self._k(f"intent/{q(intent.key)}"), _intent_js(intent))], None
        self._write(f"record the intent of {intent.op} on {intent.key}", build)

    def finish_intent(self, key: str, update: Mapping[str, Any] | None = None) -> None:
        fields = dict(update or {})
        _check_vol_fields(fields)

        def build(st: _State) -> tuple[list[Op], list[Op], None]:
            ops = _update_volume_ops(self, st, key, fields) if fields else []
            return [], [*ops, delete(self._k(f"intent/{q(key)}"))], None
        self._write(f"finish the intent on {key}", build)

    def intents(self) -> list[IntentRec]:
        out = [IntentRec(d["key"], d["op"], d["data"], d["created"]) for _, d in self._read("intent/")]
        return sorted(out, key=lambda i: i.created)

    def reserved(self) -> dict[str, int]:
        return self._load(f"read the catalog of {self.label}", "sd/").reserved()

    # --- several nodes: leases are etcd leases; alive/<node> and attach/<volume> are bound to them
    def renew_lease(self, node: str, ttl: float, sent: float | None = None) -> LeaseRec:
        rel = f"lease/{q(node)}"
        what = f"renew the lease of node {node}"
        for _ in range(RETRIES):
            st = self._load(what, "lease/")
            rec = st.obj(rel)
            if rec is not None and float(rec["ttl"]) == float(ttl):
                left = self.etcd.keepalive(what, int(rec["id"]))
                if left > 0:
                    now = self._clock()  # noted for leases() to say since when an expired one is out
                    self.etcd.txn(what, [mod_is(self._k(rel), st.mod(rel))],
                                  [put(self._k(rel), _js({**rec, "renewed": now}))])
                    return LeaseRec(node, now + left, ttl)
            # none yet, expired (its attachments went with it), or another TTL: a new lease
            new = self.etcd.grant(what, ttl)
            now = self._clock()
            moved: list[Op] = []
            unmoved: list[Op] = []  # ...each as it was read, or the renewal starts over
            if rec is not None:  # a live lease of another TTL: its attachments move to the new one
                for _, kv in self._load(what, "attach/").kvs_under("attach/"):
                    if kv["lease"] == int(rec["id"]):
                        moved.append(put(kv["key"], kv["value"], new))
                        unmoved.append(mod_is(kv["key"], kv["mod"]))
            try:
                ok, _ = self.etcd.txn(what, [mod_is(self._k(rel), st.mod(rel)), *unmoved],
                                      [put(self._k(rel), _js({"id": new, "ttl": ttl, "renewed": now})),
                                       put(self._k(f"alive/{q(node)}"), node, new), *moved])
            except CatalogError:
                self.etcd.revoke(what, new)
                raise
            if ok:
                if rec is not None:
                    self.etcd.revoke(what, int(rec["id"]))
                return LeaseRec(node, now + max(1, math.ceil(ttl)), ttl)
            self.etcd.revoke(what, new)  # another process of this node renewed first: use its lease
        raise CatalogError(f"cannot {what}: too many concurrent renewals")

    def drop_lease(self, node: str) -> None:
        what = f"drop the lease of node {node}"
        rec = self.etcd.get(what, self._k(f"lease/{q(node)}"))
        if rec is None:
            return
        self.etcd.revoke(what, int(json.loads(rec["value"])["id"]))  # its alive key and attachments go
        self.etcd.txn(what, [mod_is(rec["key"], rec["mod"])], [delete(rec["key"])])

    def leases(self) -> list[LeaseRec]:
        what = f"read the leases of {self.label}"
        out = []
        for key, kv in self._load(what, "lease/").kvs_under("lease/"):
            rec = json.loads(kv["value"])
            left = self.etcd.time_to_live(what, int(rec["id"]))
            now = self._clock()
            last = float(rec["renewed"]) + float(rec["ttl"])  # the expiry the last renewal here set
            # the server counts whole seconds left (0 in the last one); -1 once it has expired
            expires = max(now + left, last) if left >= 0 else min(now, last)
            out.append(LeaseRec(unquote(key), expires, float(rec["ttl"])))
        return sorted(out, key=lambda r: r.node)

    def _ttl_left(self, lease: int) -> int:
        return self.etcd.time_to_live(f"read a lease of {self.label}", lease)

    def attach(self, volume: str, node: str) -> AttachRec:
        what = f"attach volume {volume} on node {node}"
        rel, alive_rel = f"attach/{q(volume)}", f"alive/{q(node)}"
        for attempt in range(RETRIES):
            st = self._load(what)
            if st.obj(f"vol/{q(volume)}") is None:
                raise NoSuchVolume(f"no such volume: {volume}")
            # the shared decision, on what etcd keeps: a node's alive key and its attachments live
            # exactly as long as its lease, so a key that is there stands for a live lease
            now = self._clock()
            alive, cur = st.by_key.get(alive_rel), st.by_key.get(rel)
            held = None
            live: dict[str, LeaseRec] = {}
            if alive is not None:
                live[node] = LeaseRec(node, math.inf, 0.0)
            if cur is not None:
                held = _attach(json.loads(cur["value"]))
                if held.node != node:  # its lease's end, as the server counts it (whole seconds)
                    left = self._ttl_left(cur["lease"])
                    # -1: the server has expired that lease (it can never be renewed again), and its keys
                    # go once the revocation is committed, which under load takes a while: the holder is
                    # dead now, as the other backend judges it at its lease's end
                    if left >= 0:
                        live[held.node] = LeaseRec(held.node, now + left + 1, 0.0)
            new = refuse_attach(volume, node, held, live, now)
            if new is held:
                return new
            if alive is None:  # refused above: no live lease here
                raise CatalogError(f"cannot {what}: the attachment changed while it was decided; retry")
            body = _js({"volume": volume, "node": node, "since": new.since, "wanted_by": None})
            # no attachment, or the expired holder's, unchanged since it was read: replaced with this node's
            ok, _ = self.etcd.txn(what, [mod_is(self._k(rel), cur["mod"] if cur is not None else 0),
                                         mod_is(self._k(alive_rel), alive["mod"]),
                                         exists(self._k(f"vol/{q(volume)}")), *self._fence.compares()],
                                  [put(self._k(rel), body, alive["lease"])])
            if ok:
                return new
            why = self._fence.lost(self.etcd)
            if why is not None:
                raise CatalogError(f"cannot {what}: {why}")
            time.sleep(random.uniform(0, min(0.05, 0.001 * (attempt + 1))))
        raise CatalogError(f"cannot {what}: too many concurrent attempts")

    def want(self, volume: str, node: str) -> None:
        what = f"record that node {node} wants volume {volume}"
        for _ in range(RETRIES):
            cur = self.etcd.get(what, self._k(f"attach/{q(volume)}"))
            if cur is None:
                return
            rec = json.loads(cur["value"])
            if rec["node"] == node or rec.get("wanted_by") == node:
                return
            ok, _ = self.etcd.txn(what, [mod_is(cur["key"], cur["mod"])],
                                  [put(cur["key"], _js({**rec, "wanted_by": node}), cur["lease"])])
            if ok:
                return
        raise CatalogError(f"cannot {what}: too many concurrent changes")

    def detach(self, volume: str, node: str) -> bool:
        what = f"detach volume {volume} from node {node}"
        for _ in range(RETRIES):
            cur = self.etcd.get(what, self._k(f"attach/{q(volume)}"))
            if cur is None or json.loads(cur["value"])["node"] != node:
                return False
            ok, _ = self.etcd.txn(what, [mod_is(cur["key"], cur["mod"])], [delete(cur["key"])])
            if ok:
                return True
        raise CatalogError(f"cannot {what}: too many concurrent changes")

    def attachments(self) -> list[AttachRec]:
        return sorted((_attach(d) for _, d in self._read("attach/")), key=lambda a: a.volume)


def _attach(d: Mapping[str, Any]) -> AttachRec:
    return AttachRec(d["volume"], d["node"], float(d["since"]), d.get("wanted_by"))


def _vol(d: Mapping[str, Any]) -> VolumeRec:
    return VolumeRec(**{k: v for k, v in d.items() if k in VolumeRec.__dataclass_fields__})


def _intent_js(i: IntentRec) -> str:
    return _js({"key": i.key, "op": i.op, "data": dict(i.data), "created": i.created or time.time()})


def _refuse_pending(st: _State, key: str) -> None:
    cur = st.obj(f"intent/{q(key)}")
    if cur is not None:
        raise IntentPending(f"an unfinished {cur['op']} on {key} is recorded; it must be recovered first")


def _check_vol_fields(fields: Mapping[str, Any]) -> None:
    bad = set(fields) - _VOL_FIELDS
    if bad:
        raise ValueError(f"unknown volume fields {sorted(bad)}")


def _update_volume_ops(cat: EtcdCatalog, st: _State, name: str, fields: Mapping[str, Any]) -> list[Op]:
    rel = f"vol/{q(name)}"
    d = st.obj(rel)
    if d is None:
        raise NoSuchVolume(f"no such volume: {name}")
    new = dataclasses.replace(_vol(d), **fields)
    return [put(cat._k(rel), _js(dataclasses.asdict(new)))]
