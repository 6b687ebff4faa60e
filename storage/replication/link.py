"""The replication link: ``veritas rlink serve`` (one foreground process per site) and its client.

Both sides authenticate each other (storage.replication.protocol: PSK HMAC challenge-response, then
every frame keyed) before anything else is read; a refused peer is logged and changes nothing. On a
secondary the service answers ``addsec`` (record this site as the RVG's secondary), ``status`` (the
replica's last consistent checkpoint) and ``delta`` (apply one delta set with apply.Replica, atomically,
once its keyed seal matches, then ``ack``). On a primary its sender thread takes a checkpoint of each
replicating RVG every ``interval`` seconds, logs the delta to the SRL (or the DCM when it would
overflow), and ships what the secondary lacks in order, calling Srl.ack on each acknowledgement.
``startrep`` (the initial full sync) uses the same client, under the same per-RVG sender lock. For the
role changes (storage.replication.failover) it also answers ``role``, ``promote`` and ``demote`` (the
peer's half of migrate and its rollback) and ``fbprep`` (the old primary's half of fbsync), and on a
primary ``migrate`` (its secondary asks for the role: failover.request_migrate, the RVGPrimary agent's
online). After a takeover with --autofb its rounds retry the fbsync until the old primary answers.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from storage import crash
from storage.errors import InUse, InvalidArgument, VeritasError
from storage.group import DiskGroup
from storage.replication import checkpoint, delta, deltaset, extents, protocol, role, rvg, store, teardown
from storage.replication.apply import Replica
from storage.replication.deltaset import ImagePlan
from storage.replication.errors import (
    AuthFailed,
    LinkError,
    NoCommonCheckpoint,
    NoSuchCheckpoint,
    OutOfDate,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    SrlOverflow,
)
from storage.replication.srl import Srl
from storage.units import check_name

log = logging.getLogger("veritas")
CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 120.0  # one read or write; an ack may wait this long for the secondary's apply
DEAD_LINK = 15.0  # a path that carries nothing (a cut, a dead site) drops the connection after this


def _dead_path_detection(sock: socket.socket, after: float = DEAD_LINK) -> None:
    """Let the kernel drop the connection once the path is gone, within ``after`` seconds, whether data
    is in flight (TCP_USER_TIMEOUT: sent bytes unacknowledged that long) or the link is quiet (keepalive
    probes, as while an ack is awaited). Without this a cut link held a send, and the sender lock with
    it, for IO_TIMEOUT: no checkpoint taken, pauserep and stoprep waiting, repstatus saying connected."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(after / 3))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(after * 1000))
Progress = Callable[[int, int], None]


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"address {addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def sender_lock(name: str) -> str:
    """Held by whoever ships deltas of RVG ``name`` (the serve's sender, startrep): one at a time."""
    return f"@rlink.{name}"


# ------------------------------------------------------------------ client


class Conn:
    """An authenticated connection to a peer's link service."""

    def __init__(self, addr: str, key: bytes, timeout: float = CONNECT_TIMEOUT, io_timeout: float = IO_TIMEOUT) -> None:
        """:raises PeerUnreachable: refused, timed out, reset or closed (the peer may be gone);
        :raises AuthFailed: the peer answers but the keys differ (or it refused our handshake);
        :raises ProtocolError: the peer answers in another protocol or version."""
        self.addr = addr
        self.peer_digests: list[str] | None = None  # the delta digests the peer reads (its status says)
        host, port = parse_addr(addr)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise PeerUnreachable(f"cannot reach the link service at {addr}: {exc.strerror or exc}; is"
                                  f" `veritas rlink serve` running there, and the address right?") from None
        self.sock.settimeout(io_timeout)
        _dead_path_detection(self.sock)
        self.fh = cast(BinaryIO, self.sock.makefile("rwb"))
        try:
            self.session = protocol.handshake_client(self.fh, key)
        except (OSError, VeritasError) as exc:
            self.close()
            if isinstance(exc, AuthFailed):  # the peer answers: not to be taken for one that is gone
                raise AuthFailed(f"link to {addr}: {exc}") from None
            if isinstance(exc, PeerError):  # it refused our hello or our proof
                raise AuthFailed(f"link to {addr}: the peer refused the handshake ({exc}): the pre-shared key"
                                 f" differs between the sites, or the peer speaks another protocol version") from None
            if isinstance(exc, ProtocolError):
                raise ProtocolError(f"link to {addr}: {exc}") from None
            if isinstance(exc, VeritasError) and not isinstance(exc, PeerUnreachable):
                raise LinkError(f"link to {addr}: {exc}") from None
            raise PeerUnreachable(f"link to {addr} broke during authentication: {exc}") from None

    def close(self) -> None:
        for c in (self.fh, self.sock):
            try:
                c.close()
            except (OSError, AttributeError):
                pass

    def call(self, msg: dict[str, Any], reply: str) -> dict[str, Any]:
        try:
            self.session.send(self.fh, msg)
            return self.session.expect(self.fh, reply)
        except OSError as exc:
            raise PeerUnreachable(f"link to {self.addr} broke: {exc}") from None

    def status(self, name: str) -> dict[str, Any]:
        """The secondary's seq and the delta digests it reads (remembered: ``digest``)."""
        st = self.call({"type": "status", "rvg": name}, "status")
        self.peer_digests = delta.announced(st.get("digests"))
        return st

    @property
    def digest(self) -> str:
        """The digest for deltas encoded for this peer (SHA-256 until its status said more)."""
        return delta.preferred(self.peer_digests)

    def send_plans(self, name: str, from_seq: int, to_seq: int, created: float, plans: Sequence[ImagePlan],
                   progress: Progress | None = None) -> int:
        """Encode ``plans`` straight onto the link (no spool), checksummed with a digest the peer reads,
        and wait for the ack; the secondary's seq."""
        plans = [dataclasses.replace(p, header=dataclasses.replace(p.header, digest=self.digest)) for p in plans]
        sizes = [p.encoded_size for p in plans]
        return self._ship(name, from_seq, to_seq, created, sizes,
                          lambda out: [delta.encode(out, p.header, p.source, p.pieces) for p in plans], progress)

    def send_files(self, name: str, from_seq: int, to_seq: int, created: float, files: Sequence[Path]) -> int:
        """Ship an SRL entry's delta files and wait for the ack."""
        sizes = [os.stat(f).st_size for f in files]

        def write(out: BinaryIO) -> None:
            for f in files:
                with open(f, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
        return self._ship(name, from_seq, to_seq, created, sizes, write, None)

    def _ship(self, name: str, from_seq: int, to_seq: int, created: float, sizes: list[int],
              write: Callable[[BinaryIO], object], progress: Progress | None) -> int:
        try:
            self.session.send(self.fh, {"type": "delta", "rvg": name, "from_seq": from_seq, "to_seq": to_seq,
                                        "created": created, "lengths": sizes})
            out = _Counting(self.fh, sizes, progress)
            write(cast(BinaryIO, out))
            # the streams' chain digests, keyed: the secondary commits only if they are what it decoded
            self.session.send(self.fh, {"type": "seal", "chains": [t.hex() for t in out.tails()]})
            ack = self.session.expect(self.fh, "ack")
        except OSError as exc:
            raise PeerUnreachable(f"link to {self.addr} broke while sending delta {to_seq}: {exc}") from None
        if ack.get("seq") != to_seq:
            raise ProtocolError(f"secondary acknowledged {ack.get('seq')} for delta {to_seq}")
        return to_seq


class _Counting(io.RawIOBase):
    """A writer that counts bytes through to ``fh``, reports progress, and keeps the last DIGEST bytes
    of each of the streams of ``sizes`` written through it back to back: their chain digests."""

    def __init__(self, fh: BinaryIO, sizes: Sequence[int], progress: Progress | None) -> None:
        self.fh, self.total, self.done, self.progress = fh, sum(sizes), 0, progress
        self._ends = list(itertools.accumulate(sizes))  # where each stream ends in the bytes written
        self._tails = [bytearray(min(n, delta.DIGEST)) for n in sizes]

    def tails(self) -> list[bytes]:
        if self.done != self.total:
            raise ProtocolError(f"{self.done} bytes of deltas written where {self.total} were announced")
        return [bytes(t) for t in self._tails]

    def _keep_tails(self, start: int, data: bytes) -> None:
        end = start + len(data)
        for i, e in enumerate(self._ends):
            lo = e - len(self._tails[i])
            a, b = max(lo, start), min(e, end)
            if a < b:
                self._tails[i][a - lo:b - lo] = data[a - start:b - start]

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if not self.done and len(data) > 1:  # the first write goes out in two halves:
            self.fh.write(data[:len(data) // 2])
            self.fh.flush()
            crash.point("rlink.send.partial")  # part of a delta on the wire, the rest not
            self.fh.write(data[len(data) // 2:])
        else:
            self.fh.write(data)
        n = len(data)
        self._keep_tails(self.done, data)
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)
        return n


class _Bounded(io.RawIOBase):
    """The next ``n`` bytes of ``fh`` as a stream of their own (one delta on the link)."""

    def __init__(self, fh: BinaryIO, n: int) -> None:
        self.fh, self.left = fh, n

    def readable(self) -> bool:
        return True

    def read(self, k: int | None = -1) -> bytes:
        k = self.left if k is None or k < 0 else min(k, self.left)
        b = self.fh.read(k) if k else b""
        self.left -= len(b)
        return b

    def drain(self) -> None:
        while self.left and self.read(1 << 20):
            pass


# ------------------------------------------------------------------ primary: checkpoint, log, ship


def _srl_last(srl: Srl) -> int:
    d = srl.dcm()
    return max([srl.acked, *srl.pending(), d.upto if d else 0])


def prune(dg: DiskGroup, name: str, keep: int) -> None:
    """Delete the checkpoints before ``keep`` except those the secondary may hold: the last acknowledged
    one and the first after it (its ack may have been lost with the link) or the DCM's end. After a
    takeover they are the checkpoint both sites have in common, fast-failback's base."""
    srl = Srl(rvg.srl_root(dg, name), rvg.get(dg, name).srl_size)
    d = srl.dcm()
    held = {srl.acked, *srl.pending()[:1], *([d.upto] if d else [])}
    for c in checkpoint.list_checkpoints(dg, name):
        if c.seq < keep and c.seq not in held:
            checkpoint.delete(dg, name, c.seq)


def tick(dg: DiskGroup, r: rvg.Rvg) -> int:
    """Take the RVG's next checkpoint and log its delta in the SRL, or in the DCM when it would overflow
    (or when the base checkpoint is gone: a killed tick). Only the newest checkpoint is kept. Its seq."""
    srl = Srl(rvg.srl_root(dg, r.name), r.srl_size)
    base = _srl_last(srl)
    have = {c.seq for c in checkpoint.list_checkpoints(dg, r.name)}
    # what the secondary's last status said it reads
    digest = delta.preferred(delta.announced(rvg.link_state(dg, r.name).get("peer_digests")))
    ck = checkpoint.take(dg, r.name, r.volumes)
    if srl.dcm_active:
        plans = deltaset.plan(dg, r.name, base, ck.seq, digest) if base in have else None
        changed = {p.ref.key: p.ranges for p in plans} if plans is not None else deltaset.whole_ranges(dg, ck)
        srl.dcm_add(ck.seq, changed)
    elif base not in have:
        log.warning("RVG %s: checkpoint %d the SRL ends at is gone: tracking all extents (DCM) to resync",
                    r.name, base)
        srl.to_dcm(ck.seq, deltaset.whole_ranges(dg, ck))
    else:
        plans = deltaset.plan(dg, r.name, base, ck.seq, digest)
        try:
            srl.append(ck.seq, plans)
        except SrlOverflow as exc:
            log.warning("RVG %s: %s", r.name, exc)
            srl.to_dcm(ck.seq, {p.ref.key: p.ranges for p in plans})
    prune(dg, r.name, ck.seq)
    return ck.seq


def _created(dg: DiskGroup, name: str, seq: int) -> float:
    try:
        return checkpoint.get(dg, name, seq).created
    except VeritasError:
        return time.time()


def catch_up(dg: DiskGroup, r: rvg.Rvg, conn: Conn) -> int:
    """Ship what the secondary lacks: the SRL's entries in order, or one DCM resync delta; the
    secondary's seq after."""
    srl = Srl(rvg.srl_root(dg, r.name), r.srl_size)
    sec = int(conn.status(r.name)["seq"])
    if rvg.link_state(dg, r.name).get("peer_digests") != conn.peer_digests:
        rvg.set_link_state(dg, r.name, peer_digests=conn.peer_digests)  # the next ticks' SRL entries
    if sec > srl.acked and sec <= _srl_last(srl):
        srl.ack(sec)  # an ack lost with the link (the secondary applied it)
    latest = checkpoint.last_consistent(dg, r.name)
    if sec < srl.acked and latest is not None:
        # the secondary went back (its replica restored or recreated): the SRL's deltas start after
        # what it holds, so send every allocated extent of the newest checkpoint instead
        log.warning("RVG %s: the secondary holds checkpoint %d, before the acknowledged %d: full resync",
                    r.name, sec, srl.acked)
        plans = deltaset.plan_whole(dg, r.name, sec, latest.seq)
        sec = conn.send_plans(r.name, sec, latest.seq, latest.created, plans)
        srl.ack(sec)
        record_acked(dg, r.name, sec)
        return sec
    d = srl.dcm()
    if d is not None:
        plans = deltaset.plan_ranges(dg, r.name, sec, d.upto, d.ranges)
        sec = conn.send_plans(r.name, sec, d.upto, _created(dg, r.name, d.upto), plans)
        srl.ack(sec)
        record_acked(dg, r.name, sec)
        return sec
    for s in srl.pending():
        if s <= sec:
            continue
        sec = conn.send_files(r.name, sec, s, _created(dg, r.name, s), srl.entry(s))
        srl.ack(sec)
        record_acked(dg, r.name, sec)
    return sec


def record_acked(dg: DiskGroup, name: str, seq: int) -> None:
    rvg.set_link_state(dg, name, acked_seq=seq, acked_created=_created(dg, name, seq), acked_at=time.time(),
                       link="connected", error="")


def full_sync(dg: DiskGroup, r: rvg.Rvg, key: bytes, progress: Progress | None = None) -> int:
    """The initial full sync (startrep): a new checkpoint, every allocated extent of it shipped from
    whatever the secondary holds, applied there atomically. The SRL and DCM start afresh from it."""
    conn = Conn(r.peer_addr, key)
    try:
        with dg.locks.hold(sender_lock(r.name)):
            sec = int(conn.status(r.name)["seq"])
            ck = checkpoint.take(dg, r.name, r.volumes)
            plans = deltaset.plan_whole(dg, r.name, sec, ck.seq)
            conn.send_plans(r.name, sec, ck.seq, ck.created, plans, progress)
            srl = Srl(rvg.srl_root(dg, r.name), r.srl_size)
            if ck.seq >= srl.acked:
                srl.ack(ck.seq)
            record_acked(dg, r.name, ck.seq)
            prune(dg, r.name, ck.seq)
            return ck.seq
    finally:
        conn.close()


# ------------------------------------------------------------------ the service


@dataclass
class Service:
    dg: DiskGroup
    key: bytes
    listen: str
    interval: float
    stop: threading.Event
    # after a takeover with --autofb: fbsync the old primary (failover.fbsync); LinkError while it is away
    failback: Callable[[rvg.Rvg], object] | None = None
    # a secondary's request to become primary (failover.migrate run here, the primary; its result)
    migrate: Callable[[str, str], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self._apply_lock = threading.Lock()
        self._conns: dict[str, Conn] = {}
        self._last_tick: dict[str, float] = {}
        host, port = parse_addr(self.listen)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise InvalidArgument(f"cannot listen on {self.listen}: {exc.strerror}") from None
        self.sock.listen(16)
        self.sock.settimeout(0.5)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def run(self) -> None:
        threading.Thread(target=self._accept_loop, name="rlink-accept", daemon=True).start()
        try:
            while not self.stop.is_set():
                self._send_round()
                self.stop.wait(min(0.5, self.interval))
        finally:
            self.sock.close()
            for c in self._conns.values():
                c.close()

    # ---- primary side

    def _send_round(self) -> None:
        try:
            rvgs = rvg.all_rvgs(self.dg)
        except VeritasError as exc:
            log.error("reading RVG records: %s", exc)
            return
        for r in rvgs:
            now = time.monotonic()
            due = now - self._last_tick.get(r.name, 0.0) >= self.interval
            if r.role == "primary" and r.common_seq:  # taken over: the peer is the old primary
                self._drop(r.name)
                if r.autofb and self.failback is not None and due:
                    self._last_tick[r.name] = now
                    try:
                        self.failback(r)
                        log.warning("RVG %s: the old primary %s is now secondary (automatic fast-failback)",
                                 r.name, r.peer_addr)
                    except LinkError as exc:
                        log.debug("RVG %s: old primary not back yet: %s", r.name, exc)
                    except (VeritasError, OSError) as exc:
                        log.error("RVG %s: automatic fast-failback: %s", r.name, exc)
                continue
            if r.role != "primary" or not r.synced or r.state == "stopped":
                self._drop(r.name)
                continue
            try:
                with self.dg.locks.hold(sender_lock(r.name), timeout=self.interval):
                    r = rvg.get(self.dg, r.name)  # as it is now: a pauserep waits on this lock
                    if r.role != "primary" or not r.synced or r.state == "stopped":
                        continue
                    if due:
                        self._last_tick[r.name] = now
                        tick(self.dg, r)
                    # behind with the link up: go on at once; the link down: retry at the next round due
                    if r.state == "replicating" and (due or (r.name in self._conns and self._behind(r))):
                        catch_up(self.dg, r, self._conn(r))
            except LinkError as exc:
                self._drop(r.name)
                rvg.set_link_state(self.dg, r.name, link="disconnected", error=str(exc))
                log.warning("RVG %s: %s", r.name, exc)
            except (VeritasError, OSError) as exc:
                self._drop(r.name)
                log.error("RVG %s: %s", r.name, exc)

    def _behind(self, r: rvg.Rvg) -> bool:
        srl = Srl(rvg.srl_root(self.dg, r.name), r.srl_size)
        return bool(srl.pending()) or srl.dcm_active

    def _conn(self, r: rvg.Rvg) -> Conn:
        c = self._conns.get(r.name)
        if c is None:
            c = self._conns[r.name] = Conn(r.peer_addr, self.key)
        return c

    def _drop(self, name: str) -> None:
        c = self._conns.pop(name, None)
        if c is not None:
            c.close()

    # ---- secondary side

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                s, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(s, f"{peer[0]}:{peer[1]}"), daemon=True).start()

    def _handle(self, s: socket.socket, peer: str) -> None:
        s.settimeout(IO_TIMEOUT)
        _dead_path_detection(s)
        fh = cast(BinaryIO, s.makefile("rwb"))
        try:
            try:
                session = protocol.handshake_server(fh, self.key)
            except (VeritasError, OSError) as exc:
                log.warning("refused link from %s: %s", peer, exc)
                return
            while not self.stop.is_set():
                try:
                    msg = session.recv(fh)
                except AuthFailed as exc:
                    log.warning("link from %s: %s", peer, exc)
                    return
                except LinkError:
                    return
                try:
                    session.send(fh, self._answer(msg, fh, session))
                except (VeritasError, OSError) as exc:
                    log.error("link from %s: %s: %s", peer, msg.get("type"), exc)
                    try:
                        session.send(fh, {"type": "error", "message": str(exc)})
                    except OSError:
                        pass
                    return  # the stream position is unknown after a failed request: hang up
        finally:
            fh.close()
            s.close()

    def _answer(self, msg: dict[str, Any], fh: BinaryIO, session: protocol.Session) -> dict[str, Any]:
        kind = msg["type"]
        name = str(msg.get("rvg", ""))
        if kind == "addsec":
            return self._addsec(msg)
        if kind == "status":
            r = self._secondary(name)
            rep = Replica(rvg.replica_root(self.dg, r.name), r.name)
            st = rvg.link_state(self.dg, r.name)
            return {"type": "status", "seq": rep.seq, "created": st.get("applied_created"),
                    "digests": delta.available()}
        if kind == "delta":
            return self._delta(name, msg, fh, session)
        if kind == "role":
            r = rvg.get(self.dg, name)
            return {"type": "role", "role": r.role}
        if kind in ("promote", "demote", "fbprep"):
            return self._role_change(kind, name, msg)
        if kind == "migrate":
            return self._migrate(name, str(msg.get("new_primary", "")))
        if kind in ("delvol", "delsec"):
            return self._teardown(kind, name, str(msg.get("volume", "")))
        raise ProtocolError(f"unknown request {kind!r}")

    def _secondary(self, name: str) -> rvg.Rvg:
        r = rvg.get(self.dg, name)
        if r.role != "secondary":
            raise InvalidArgument(f"RVG {name} is {r.role} on this site, not secondary: refusing its deltas")
        return r

    def _role_change(self, kind: str, name: str, msg: dict[str, Any]) -> dict[str, Any]:
        """The peer's half of migrate (promote; demote to roll it back) and of fbsync (fbprep, on the
        old primary: its changes since the common checkpoint, then it becomes secondary at it)."""
        seq = int(msg.get("seq", 0))
        peer = str(msg.get("primary_addr", ""))
        # the order migrate takes them in on its site: the RVG records, the sender, then the volumes
        with self._apply_lock, rvg.locked(self.dg), self.dg.locks.hold(sender_lock(name)):
            if kind == "promote":
                self._secondary(name)
                have = Replica(rvg.replica_root(self.dg, name), name).seq
                if have != seq:
                    raise OutOfDate(f"RVG {name}: this secondary holds checkpoint {have}, not {seq}: not up to date")
                shapes = msg.get("shapes")
                role.promote(self.dg, name, peer, state="replicating", common=False,
                             shapes_in=shapes if isinstance(shapes, dict) else None)
                return {"type": "ok", "seq": seq}
            if kind == "demote":
                role.demote(self.dg, name, seq, peer)
                return {"type": "ok", "seq": seq}
            r = rvg.get(self.dg, name)
            if r.role == "secondary":  # an fbsync that broke off after this step: the replica is the base
                have = Replica(rvg.replica_root(self.dg, name), name).seq
                if have != seq:
                    raise NoCommonCheckpoint(f"RVG {name}: this site is a secondary at checkpoint {have}, not {seq}")
                return {"type": "fbprep", "ranges": {}}
            try:
                ck = checkpoint.get(self.dg, name, seq)
            except NoSuchCheckpoint:
                raise NoCommonCheckpoint(f"RVG {name}: this site no longer has checkpoint {seq}, the last one in"
                                         f" common with the new primary: resync {name} there (a full sync)") from None
            role.refuse_in_use(self.dg, name, r.volumes)
            ranges = {i.key: extents.diff(ck.path(self.dg, i), self.dg.image(i.disk, i.volume, i.idx)).ranges
                      for i in ck.images}
            role.demote(self.dg, name, seq, peer)
            log.info("RVG %s: fast-failback: discarding this site's writes since checkpoint %d (%d bytes)",
                     name, seq, sum(n for rs in ranges.values() for _o, n in rs))
            return {"type": "fbprep", "ranges": ranges}

    def _teardown(self, kind: str, name: str, volume: str) -> dict[str, Any]:
        """The secondary's half of delvol and delsec (storage.replication.membership): idempotent, so a
        primary that lost the answer asks again; an RVG this site has no record of is already gone."""
        with self._apply_lock, rvg.locked(self.dg), self.dg.locks.hold(sender_lock(name)):
            if name not in rvg.names(self.dg):
                check_name(name, "RVG name")
                return {"type": "ok", "had": False}
            self._secondary(name)
            if kind == "delsec":
                teardown.drop_secondary(self.dg, name)
                return {"type": "ok", "had": True}
            check_name(volume, "volume name")
            return {"type": "ok", "had": teardown.drop_secondary_volume(self.dg, name, volume)}

    def _migrate(self, name: str, new_primary: str) -> dict[str, Any]:
        """The secondary asks for the primary role (the RVGPrimary agent's online): migrate to it, or
        answer why not with the error's class (OutOfDate and InUse may pass; the secondary retries)."""
        if self.migrate is None:
            raise ProtocolError("this link service does not take migrate requests")
        try:
            out = self.migrate(name, new_primary)
        except (InvalidArgument, OutOfDate, InUse) as exc:
            return {"type": "migrated", "ok": False, "kind": _refusal(exc), "message": str(exc)}
        return {"type": "migrated", "ok": True, "result": out}

    def _addsec(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = str(msg.get("rvg", ""))
        vols = msg.get("volumes")
        if not isinstance(vols, list) or not all(isinstance(v, str) for v in vols):
            raise ProtocolError("addsec without a list of volumes")
        with rvg.locked(self.dg):
            rec = rvg.Rvg(name, tuple(vols), int(msg.get("srl_size", 0)), "secondary", "stopped",
                          str(msg.get("secondary_addr", "")), str(msg.get("primary_addr", "")))
            rvg.check_new(self.dg, name, rec.volumes, rec.srl_size, need_volumes=False)
            shapes = msg.get("shapes")
            if isinstance(shapes, dict):
                with self.dg.locks.hold(*rec.volumes):
                    role.check_adoptable(self.dg, name, {v: shapes.get(v) for v in rec.volumes})
            root = rvg.replica_root(self.dg, name)
            if root.exists():
                shutil.rmtree(root)  # a replica no record names: left by a killed addsec
            root.mkdir(parents=True)
            Replica.create(root, name)
            if isinstance(shapes, dict):  # how to make the volumes live here at a takeover
                rvg.shapes_path(self.dg, name).parent.mkdir(parents=True, exist_ok=True)
                store.write_json(rvg.shapes_path(self.dg, name), shapes)
            rvg.create(self.dg, rec, need_volumes=False)
        log.info("RVG %s: this site is now the secondary of %s", name, rec.peer_addr)
        return {"type": "ok"}

    def _delta(self, name: str, msg: dict[str, Any], fh: BinaryIO, session: protocol.Session) -> dict[str, Any]:
        lengths = msg.get("lengths")
        if not isinstance(lengths, list) or not all(isinstance(n, int) and n > 0 for n in lengths):
            raise ProtocolError("delta frame without stream lengths")
        streams = [_Bounded(fh, n) for n in lengths]
        r = self._secondary(name)
        # the sender lock too: a delsec --force run on this site meanwhile waits for the apply to end
        with self._apply_lock, self.dg.locks.hold(sender_lock(name)):
            r = self._secondary(name)
            rep = Replica(rvg.replica_root(self.dg, r.name), r.name)

            def sealed(chains: Sequence[bytes]) -> None:
                """The primary's keyed seal names exactly the streams decoded: else nothing is applied."""
                for b in streams:
                    b.drain()
                said = session.expect(fh, "seal").get("chains")
                if said != [c.hex() for c in chains]:
                    raise AuthFailed(f"RVG {name}: delta {msg.get('to_seq')}'s streams are not the ones the primary"
                                     f" sealed: altered on the path; nothing applied")
            seq = rep.apply(cast(Sequence[BinaryIO], streams), sealed)
        rvg.set_link_state(self.dg, name, applied_seq=seq, applied_created=msg.get("created"),
                           applied_at=time.time(), link="connected")
        return {"type": "ack", "seq": seq}


def _refusal(exc: Exception) -> str:
    return "OutOfDate" if isinstance(exc, OutOfDate) else "InUse" if isinstance(exc, InUse) else "InvalidArgument"
