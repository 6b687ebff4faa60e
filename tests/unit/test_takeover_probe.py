"""takeover takes the primary for gone only when its link service cannot be reached (refused, reset,
closed, timed out). A peer that answers without the key, in another protocol version, with an error
or as primary is a typed refusal that changes nothing (--force passes the first three, never the last).
The peers here are small TCP servers on 127.0.0.1 speaking (or breaking) the real protocol."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, cast

import pytest

from storage.errors import InUse
from storage.replication import failover, protocol, rvg
from storage.replication.errors import AuthFailed, LinkError, PeerError, ProtocolError
from tests.unit.conftest import World

KEY = b"0123456789abcdef0123456789abcdef"
OTHER = b"fedcba9876543210fedcba9876543210"
Behaviour = Callable[[socket.socket, BinaryIO], None]


class Peer:
    """A listening socket on an ephemeral port; each connection gets ``behaviour`` in a thread."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.behaviour = behaviour
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepted = threading.Thread(target=self._loop, daemon=True)
        self.accepted.start()

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                s, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._one, args=(s,), daemon=True)
            t.start()
            self.threads.append(t)

    def _one(self, s: socket.socket) -> None:
        fh = cast(BinaryIO, s.makefile("rwb"))
        try:
            self.behaviour(s, fh)
        except (OSError, LinkError):
            pass
        finally:
            fh.close()
            s.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.accepted.join(5)
        for t in self.threads:
            t.join(5)


def answering(key: bytes, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> Behaviour:
    def run(_s: socket.socket, fh: BinaryIO) -> None:
        session = protocol.handshake_server(fh, key)
        while True:
            session.send(fh, answer(session.recv(fh)))
    return run


def reset(s: socket.socket, _fh: BinaryIO) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST


def closed(_s: socket.socket, _fh: BinaryIO) -> None:
    pass


def silent(_s: socket.socket, fh: BinaryIO) -> None:
    fh.read(1 << 16)  # reads, never answers (until the client hangs up)


def other_version(_s: socket.socket, fh: BinaryIO) -> None:
    hello = protocol.decode_frame(fh)
    protocol.send(fh, {"type": "challenge", "version": protocol.VERSION + 1, "nonce": "0" * 64, "mac": "x",
                       "echo": hello.get("nonce")})
    fh.read(1)


def refuses_hello(_s: socket.socket, fh: BinaryIO) -> None:
    protocol.decode_frame(fh)  # an older build: it refuses our version's hello
    protocol.send(fh, {"type": "error", "message": "authentication refused"})


PEERS: dict[str, Behaviour] = {
    "primary": answering(KEY, lambda m: {"type": "role", "role": "primary"}),
    "secondary": answering(KEY, lambda m: {"type": "role", "role": "secondary"}),
    "error": answering(KEY, lambda m: {"type": "error", "message": f"no such RVG: {m.get('rvg')}"}),
    "badrole": answering(KEY, lambda m: {"type": "role", "role": "both"}),
    "wrongkey": answering(OTHER, lambda m: {"type": "role", "role": "primary"}),
    "version": other_version,
    "refuses": refuses_hello,
    "reset": reset,
    "closed": closed,
    "silent": silent,
}


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[Peer]:
    p = Peer(PEERS[request.param])
    yield p
    p.close()


def gone_addr() -> str:
    s = socket.create_server(("127.0.0.1", 0))
    addr = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now: connection refused
    return addr


def secondary(world: World, peer_addr: str) -> rvg.Rvg:
    with rvg.locked(world.dg):
        return rvg.create(world.dg, rvg.Rvg("rvg1", ("v1",), 1 << 20, "secondary", "stopped", "127.0.0.1:1",
                                            peer_addr), need_volumes=False)


class Promoted(Exception):
    pass


@pytest.fixture
def promote(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """role.promote replaced by a recorder that stops there: the test is about the decision before it."""
    calls: list[str] = []

    def fake(dg: object, name: str, peer_addr: str, **kw: object) -> int:
        calls.append(name)
        raise Promoted(name)
    monkeypatch.setattr(failover.role, "promote", fake)
    return calls


@pytest.mark.parametrize("peer", ["reset", "closed", "silent"], indirect=True)
def test_an_unreachable_primary_is_gone(peer: Peer) -> None:
    r = rvg.Rvg("rvg1", ("v1",), 1, "secondary", peer_addr=peer.addr)
    assert failover.probe_peer(r, KEY, timeout=0.5, answer_timeout=0.5) is None
    assert failover.probe_peer(rvg.Rvg("rvg1", ("v1",), 1, "secondary", peer_addr=gone_addr()), KEY) is None


@pytest.mark.parametrize(("peer", "err", "words"),
                         [("wrongkey", AuthFailed, "pre-shared key"), ("refuses", AuthFailed, "refused the handshake"),
                          ("version", ProtocolError, "protocol version"), ("error", PeerError, "no such RVG"),
                          ("badrole", ProtocolError, "role 'both'")], indirect=["peer"])
def test_an_answering_peer_is_no_gone_primary(world: World, promote: list[str], peer: Peer,
                                              err: type[Exception], words: str) -> None:
    r = secondary(world, peer.addr)
    with pytest.raises(err, match=words):
        failover.probe_peer(r, KEY)
    with pytest.raises(err, match="takeover refused") as exc:
        failover.takeover(world.dg, "rvg1", KEY)
    assert "--force" in str(exc.value) and words in str(exc.value)
    assert promote == [] and rvg.get(world.dg, "rvg1") == r, "a refusal changes nothing"
    with pytest.raises(Promoted):  # the administrator vouches that it is no live primary
        failover.takeover(world.dg, "rvg1", KEY, force=True)
    assert promote == ["rvg1"]


@pytest.mark.parametrize("peer", ["primary"], indirect=True)
def test_a_primary_that_answers_is_never_taken_over(world: World, promote: list[str], peer: Peer) -> None:
    r = secondary(world, peer.addr)
    assert failover.probe_peer(r, KEY) == "primary"
    for force in (False, True):
        with pytest.raises(InUse, match="answers: use migrate rvg1"):
            failover.takeover(world.dg, "rvg1", KEY, force=force)
    assert promote == [] and rvg.get(world.dg, "rvg1") == r


@pytest.mark.parametrize("peer", ["secondary", "reset", "closed"], indirect=True)
def test_takeover_goes_on_when_the_peer_is_gone_or_secondary(world: World, promote: list[str], peer: Peer) -> None:
    secondary(world, peer.addr)
    with pytest.raises(Promoted):
        failover.takeover(world.dg, "rvg1", KEY)
    assert promote == ["rvg1"]


def test_takeover_of_a_refusing_address_goes_on(world: World, promote: list[str]) -> None:
    secondary(world, gone_addr())
    with pytest.raises(Promoted):
        failover.takeover(world.dg, "rvg1", KEY)
