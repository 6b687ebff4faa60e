"""The etcd catalog store: disk groups' catalogs and locks under one key prefix, for nodes on several hosts.

Keys under ``<prefix>`` (``/veritas`` by default)::

    published/<dg>        generation of the disk group's published catalog
    partial/<dg>          generation of one being created (publish moves it to published/ atomically)
    dg/<dg>/<gen>/...     a catalog (storage.catalog.etcd.EtcdCatalog)
    locks/<dg>/<lock>/x   an exclusive lock: its holder's token, bound to the holder's session lease
    locks/<dg>/<lock>/s/<token>   one shared holder of a lock, bound likewise
    locks/@store/...      the store's own locks (creating a disk group, claiming a mount point)
    epoch/<dg>            bumped by destroy: a lock handle of the destroyed group takes nothing more
    sessions/<lease>      a process's session key, bound to the lease its locks are bound to

Locks are etcd keys bound to the holding process's session lease (granted on first use, kept alive by
a thread every TTL/3): a holder that dies loses its locks when the lease expires, TTL seconds later,
on every host. Taking a set of locks is one transaction (all or nothing, so the one lock order of
storage.locks cannot deadlock here either); a waiter polls, 2 ms growing to 50 ms.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from storage.catalog.base import Catalog, CatalogStore, DiskGroupRec
from storage.catalog.etcd import (
    Etcd,
    EtcdCatalog,
    Fence,
    Op,
    absent,
    delete,
    exists,
    get_op,
    mod_is,
    put,
    value_is,
)
from storage.errors import AlreadyExists, CatalogError, LockTimeout, NoSuchDiskGroup
from storage.locks import Locks, not_held, wanted

STORE_LOCKS = "@store"  # not a valid disk group name: the store's own locks cannot clash with a group's


class Session:
    """This process's etcd lease for its locks, granted on first use and kept alive by a thread.

    Lost (expired while etcd could not be reached for longer than the TTL), it is replaced by a new
    one on the next hold; the threads that held locks under the lost one find their writes refused
    (``SessionFence``)."""

    def __init__(self, etcd: Etcd, prefix: str, ttl: float) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.ttl = max(1.0, ttl)
        self._lock = threading.Lock()
        self._lease: int | None = None
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._local = threading.local()

    def key(self, lease: int) -> str:
        return f"{self.prefix}/sessions/{lease:x}"

    def current(self) -> int:
        """The live session lease, granted now if there is none (or it was lost, or this is a fork)."""
        with self._lock:
            if os.getpid() != self._pid:  # the parent's lease and thread are the parent's
                self._pid, self._lease, self._stop = os.getpid(), None, threading.Event()
            if self._lease is None:
                lease = self.etcd.grant("grant this process's lock lease", self.ttl)
                self.etcd.txn("record this process's session", [],
                              [put(self.key(lease), f"{socket.gethostname()} pid {os.getpid()}", lease)])
                self._lease = lease
                threading.Thread(target=self._keepalive, args=(lease, self._stop), daemon=True,
                                 name=f"etcd-session-{lease:x}").start()
            return self._lease

    def lost(self, lease: int) -> None:
        with self._lock:
            if self._lease == lease:
                self._lease = None

    def _keepalive(self, lease: int, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                if self.etcd.keepalive("keep this process's lock lease alive", lease) <= 0:
                    self.lost(lease)
                    return
            except CatalogError:
                continue  # etcd away for now: the lease lives on the server until its TTL runs out
            with self._lock:
                if self._lease != lease or os.getpid() != self._pid:
                    return

    # the fences of the locks each thread holds: the session keys they were taken under
    def fences(self) -> list[str]:
        out: list[str] | None = getattr(self._local, "fences", None)
        if out is None:
            out = self._local.fences = []
        return out

    def close(self) -> None:
        """Revoke the lease (its locks go at once) and stop renewing it."""
        with self._lock:
            lease, self._lease = self._lease, None
            self._stop.set()
        if lease is not None and os.getpid() == self._pid:
            try:
                self.etcd.revoke("revoke this process's lock lease", lease)
            except CatalogError:
                pass  # it expires on its own


class SessionFence(Fence):
    def __init__(self, session: Session) -> None:
        self.session = session

    def compares(self) -> list[Op]:
        return [exists(k) for k in sorted(set(self.session.fences()))]

    def lost(self, etcd: Etcd) -> str | None:
        for k in sorted(set(self.session.fences())):
            if etcd.get("check this process's lock lease", k) is None:
                return ("this process's etcd lease expired while it held disk group locks (etcd was out of"
                        " reach longer than its TTL), so another node may hold them now; the operation was"
                        " stopped, retry it")
        return None


class EtcdLocks(Locks):
    """The locks of one disk group (or the store's own) as lease-bound etcd keys under ``root``."""

    def __init__(self, etcd: Etcd, session: Session, root: str, epoch_key: str, label: str) -> None:
        self.etcd = etcd
        self.session = session
        self.root = root
        self.epoch_key = epoch_key
        self.label = label
        kv = etcd.get(f"read the lock epoch of {label}", epoch_key)
        self.epoch = 0 if kv is None else int(kv["mod"])
        self._mine = threading.local()  # lock name -> mode this thread holds through this handle

    def _held(self) -> dict[str, int]:
        held: dict[str, int] | None = getattr(self._mine, "held", None)
        if held is None:
            held = self._mine.held = {}
        return held

    def _x(self, name: str) -> str:
        return f"{self.root}{name}/x"

    def _s(self, name: str) -> str:
        return f"{self.root}{name}/s/"

    def _try(self, want: list[tuple[str, int]]) -> tuple[str, int] | None:
        """Take every lock of ``want`` in one transaction: (token, lease), or None when one is taken.

        :raises NoSuchDiskGroup: when the disk group was destroyed since this handle was made."""
        what = f"take locks of {self.label}"
        for _ in range(3):
            lease = self.session.current()
            token = f"{uuid.uuid4().hex} {socket.gethostname()} {os.getpid()}"
            compare: list[Op] = [mod_is(self.epoch_key, self.epoch), exists(self.session.key(lease))]
            ops: list[Op] = []
            for name, mode in want:
                compare.append(absent(self._x(name)))
                if mode == fcntl.LOCK_EX:
                    compare.append(absent(self._s(name), prefix=True))
                    ops.append(put(self._x(name), token, lease))
                else:
                    ops.append(put(self._s(name) + token, token, lease))
            ok, answers = self.etcd.txn(what, compare, ops,
                                        [get_op(self.epoch_key), get_op(self.session.key(lease))])
            if ok:
                return token, lease
            epoch_kvs = answers[0].get("response_range", {}).get("kvs", []) if answers else []
            if epoch_kvs and int(epoch_kvs[0].get("mod_revision", 0)) != self.epoch:
                raise NoSuchDiskGroup(f"disk group {self.label} was destroyed while this operation waited"
                                      " for its locks")
            session_kvs = answers[1].get("response_range", {}).get("kvs", []) if len(answers) > 1 else []
            if session_kvs:
                return None  # taken by someone else
            self.session.lost(lease)  # our lease expired: take a new one and try again
        raise CatalogError(f"cannot {what}: this process's etcd lease keeps expiring")

    def _release(self, want: list[tuple[str, int]], token: str, lease: int) -> None:
        what = f"release locks of {self.label}"
        held = self._held()
        for name, _ in want:
            held.pop(name, None)
        fences = self.session.fences()
        if self.session.key(lease) in fences:
            fences.remove(self.session.key(lease))
        xs = [n for n, m in want if m == fcntl.LOCK_EX]
        shared = [delete(self._s(n) + token) for n, m in want if m != fcntl.LOCK_EX]
        try:
            ok, _ = self.etcd.txn(what, [value_is(self._x(n), token) for n in xs],
                                  [*(delete(self._x(n)) for n in xs), *shared])
            if not ok:  # one was lost (lease expired, disk group destroyed): drop only what is still ours
                for n in xs:
                    self.etcd.txn(what, [value_is(self._x(n), token)], [delete(self._x(n))])
                if shared:
                    self.etcd.txn(what, [], shared)
        except CatalogError:
            pass  # etcd out of reach: the keys go with this process's lease, at the latest

    def _take(self, want: list[tuple[str, int]], token: str, lease: int) -> None:
        held = self._held()
        for name, mode in want:
            held[name] = mode
        self.session.fences().append(self.session.key(lease))

    @contextmanager
    def hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False,
             timeout: float = 120.0) -> Iterator[None]:
        want = not_held(wanted(keys, shared_dg, exclusive_dg), self._held(), lambda n: f"{self.root}{n}")
        if not want:
            yield
            return
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            got = self._try(want)
            if got is not None:
                break
            if time.monotonic() > deadline:
                raise LockTimeout(f"timed out after {timeout:.0f} s waiting for locks {', '.join(n for n, _ in want)}"
                                  f" of {self.label} in etcd; {self._holders(want)}")
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 0.05)
        token, lease = got
        self._take(want, token, lease)
        try:
            yield
        finally:
            self._release(want, token, lease)

    def _holders(self, want: list[tuple[str, int]]) -> str:
        try:
            for name, _ in want:
                kv = self.etcd.get("read a lock holder", self._x(name))
                if kv is not None:
                    _, host, pid = (kv["value"].decode().split(" ") + ["?", "?"])[:3]
                    return f"another veritas operation still holds {name} (pid {pid} on host {host})"
        except CatalogError:
            pass
        return "another veritas operation is still running"

    @contextmanager
    def try_hold(self, *keys: str, shared_dg: bool = True, exclusive_dg: bool = False) -> Iterator[bool]:
        want = not_held(wanted(keys, shared_dg, exclusive_dg), self._held(), lambda n: f"{self.root}{n}")
        if not want:
            yield True
            return
        got = self._try(want)
        if got is None:
            yield False
            return
        token, lease = got
        self._take(want, token, lease)
        try:
            yield True
        finally:
            self._release(want, token, lease)

    @contextmanager
    def owner_gone(self, *keys: str, exclusive_dg: bool = False) -> Iterator[bool]:
        """The owner's locks are free: it released them, or its session lease expired, which etcd never
        renews again, and a write it still tries under them is refused by its fence. So a free lock
        here does mean an owner gone for good, on any host."""
        with self.try_hold(*keys, exclusive_dg=exclusive_dg) as free:
            yield free

    def gone(self) -> None:
        """Bump the epoch, so every handle made before fails, and drop the lock keys."""
        self.etcd.txn(f"retire the locks of {self.label}", [],
                      [put(self.epoch_key, str(time.time())), delete(self.root, prefix=True)])


class EtcdStore(CatalogStore):
    """Disk groups' catalogs and locks in etcd at ``endpoints``, under ``prefix``."""

    def __init__(self, endpoints: Sequence[str], prefix: str = "/veritas", lock_ttl: float = 10.0,
                 timeout: float = 5.0) -> None:
        self.etcd = Etcd(endpoints, timeout)
        self.prefix = "/" + prefix.strip("/")
        self.session = Session(self.etcd, self.prefix, lock_ttl)
        self.fence = SessionFence(self.session)

    def _p(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def _gen(self, which: str, name: str) -> tuple[str | None, int]:
        kv = self.etcd.get(f"look up disk group {name}", self._p(f"{which}/{name}"))
        return (None, 0) if kv is None else (kv["value"].decode(), int(kv["mod"]))

    def _catalog(self, name: str, gen: str) -> EtcdCatalog:
        return EtcdCatalog(self.etcd, self._p(f"dg/{name}/{gen}/"), label=name, fence=self.fence)

    def exists(self, name: str) -> bool:
        return self._gen("published", name)[0] is not None

    def names(self) -> list[str]:
        root = self._p("published/")
        kvs = self.etcd.range("list disk groups", root, prefix=True, keys_only=True)[1]
        return sorted(kv["key"][len(root):] for kv in kvs)

    def create(self, rec: DiskGroupRec) -> Catalog:
        name = rec.name
        for _ in range(20):
            old, mod = self._gen("partial", name)
            gen = uuid.uuid4().hex
            cat = self._catalog(name, gen)
            ok, _ = self.etcd.txn(
                f"create disk group {name}",
                [absent(self._p(f"published/{name}")), mod_is(self._p(f"partial/{name}"), mod)],
                [delete(self._p(f"dg/{name}/"), prefix=True),  # what a creation killed before publishing left
                 put(self._p(f"partial/{name}"), gen)])
            if ok:
                cat.init(rec)
                return cat
            if self.exists(name):
                raise AlreadyExists(f"disk group {name} already exists")
        raise CatalogError(f"cannot create disk group {name}: it keeps changing under this creation; retry")

    def publish(self, name: str) -> None:
        gen, mod = self._gen("partial", name)
        if gen is None:
            raise NoSuchDiskGroup(f"disk group {name} has no unpublished catalog to publish")
        ok, _ = self.etcd.txn(f"publish disk group {name}",
                              [mod_is(self._p(f"partial/{name}"), mod), absent(self._p(f"published/{name}"))],
                              [put(self._p(f"published/{name}"), gen), delete(self._p(f"partial/{name}"))])
        if not ok:
            if self.exists(name):
                raise AlreadyExists(f"disk group {name} already exists")
            raise NoSuchDiskGroup(f"disk group {name}: its unpublished catalog changed while publishing it")

    def is_partial(self, name: str) -> bool:
        return self._gen("partial", name)[0] is not None

    def discard(self, name: str) -> None:
        gen, mod = self._gen("partial", name)
        if gen is None:
            return
        self.etcd.txn(f"discard the unpublished disk group {name}", [mod_is(self._p(f"partial/{name}"), mod)],
                      [delete(self._p(f"partial/{name}")), delete(self._p(f"dg/{name}/{gen}/"), prefix=True)])

    def open(self, name: str, partial: bool = False) -> Catalog:
        gen = self._gen("partial" if partial else "published", name)[0]
        if gen is None:
            raise NoSuchDiskGroup(f"no such disk group: {name} (create it with veritas dg init {name} DISK...)")
        return self._catalog(name, gen)

    def destroy(self, name: str) -> None:
        self.locks(name).gone()
        self.etcd.txn(f"destroy disk group {name}", [],
                      [delete(self._p(f"published/{name}")), delete(self._p(f"partial/{name}")),
                       delete(self._p(f"dg/{name}/"), prefix=True)])

    def locks(self, name: str | None = None) -> Locks:
        which = STORE_LOCKS if name is None else name
        return EtcdLocks(self.etcd, self.session, self._p(f"locks/{which}/"), self._p(f"epoch/{which}"),
                         name or "the catalog store")

    def close(self) -> None:
        """End this process's session: its locks are released at once rather than at lease expiry."""
        self.session.close()


_SHARED: dict[tuple[str, ...], EtcdStore] = {}
_SHARED_LOCK = threading.Lock()


def shared_store(endpoints: Sequence[str], lock_ttl: float = 10.0) -> EtcdStore:
    """The one store of this process for ``endpoints``: one session lease and keepalive thread per
    process, however many disk group objects it opens. ``lock_ttl`` is the config's [cluster] lease_ttl:
    a process cut off from etcd loses its locks when its node loses its volumes, not later."""
    key = (*endpoints, f"ttl={lock_ttl:g}")
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = EtcdStore(tuple(endpoints), lock_ttl=lock_ttl)
        return _SHARED[key]
