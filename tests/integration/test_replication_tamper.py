"""Whoever sits on the path between two sites cannot change what the secondary applies or does.

A relay the test owns stands between the primary's commands and the secondary's real ``rlink serve``.
It lets the PSK handshake through and then (1) rewrites a delta stream and recomputes every SHA-256
digest in it, as anybody can, or (2) injects a forged request frame. Each is refused, logged, and
changes nothing on the secondary; the same pair replicates once the relay passes bytes untouched."""

from __future__ import annotations

import io
import json
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import volumes
from storage.replication import delta, link, protocol, rvg
from storage.replication.apply import Replica
from tests.integration.twosites import RVG, Site, poll, synced_pair, write_marker
from tests.integration.twosites import sites as sites_fixture

sites = sites_fixture


def _read(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            raise EOFError
        buf += b
    return bytes(buf)


def rewrite(stream: bytes) -> bytes:
    """The same delta with one data byte flipped and all its digests made to match again."""
    r = delta.Reader(io.BytesIO(stream))
    recs = list(r.records())
    first = next(x for x in recs if x.data is not None)
    with tempfile.NamedTemporaryFile(dir="/tmp") as img:
        img.truncate(r.header.size)
        for x in recs:
            if x.data is not None:
                img.seek(x.offset)
                img.write(x.data)
        img.seek(first.offset)
        img.write(bytes([first.data[0] ^ 0xFF]))  # type: ignore[index]
        img.flush()
        out = io.BytesIO()
        delta.encode(out, r.header, Path(img.name), [(x.offset, x.length, x.data is not None) for x in recs])
    assert len(out.getvalue()) == len(stream) and out.getvalue() != stream
    delta.Reader(io.BytesIO(out.getvalue())).records().__next__()  # its digests verify: a perfect forgery
    return out.getvalue()


def _hang_up(*socks: socket.socket) -> None:
    """Both ends see the end at once (a close alone leaves a recv blocked in the other thread, and no FIN)."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


class OnPath:
    """127.0.0.1:port relayed to ``target``; ``mode``: "pass", "alter" (rewrite delta streams) or
    "inject" (a forged delsec before the first request after the handshake)."""

    def __init__(self, target: str) -> None:
        self.target = link.parse_addr(target)
        self.mode = "pass"
        self.altered = 0
        self.injected = 0
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            u = socket.create_connection(self.target, timeout=30)
            self._spawn(self._up, c, u)
            self._spawn(self._down, u, c)

    def _down(self, u: socket.socket, c: socket.socket) -> None:
        try:
            while b := u.recv(65536):
                c.sendall(b)
        except OSError:
            pass
        finally:
            _hang_up(u, c)

    def _up(self, c: socket.socket, u: socket.socket) -> None:
        try:
            while True:
                head = _read(c, 4)
                body = _read(c, struct.unpack(">I", head)[0])
                msg = json.loads(body)
                if self.mode == "inject" and msg["type"] not in ("hello", "auth") and not self.injected:
                    u.sendall(protocol.encode_frame({"type": "delsec", "rvg": RVG}))
                    self.injected += 1
                u.sendall(head + body)
                if msg["type"] == "delta":
                    for n in msg["lengths"]:
                        stream = _read(c, n)
                        if self.mode == "alter":
                            stream = rewrite(stream)
                            self.altered += 1
                        u.sendall(stream)
        except (OSError, EOFError):
            pass
        finally:
            _hang_up(u, c)

    def close(self) -> None:
        self.srv.close()
        for t in self.threads:
            t.join(10)


@pytest.fixture
def onpath(sites: tuple[Site, Site]) -> Iterator[tuple[Site, Site, OnPath]]:
    a, b = sites
    b.serve()
    relay = OnPath(b.addr)
    try:
        yield a, b, relay
    finally:
        relay.close()


def test_a_rewritten_delta_and_a_forged_request_are_refused_and_change_nothing(
        onpath: tuple[Site, Site, OnPath]) -> None:
    a, b, relay = onpath
    dga, dgb = a.dg(), b.dg()
    try:
        volumes.make(dga, "v1", "320m", fstype="xfs")
        write_marker(volumes.mount(dga, "v1"), "before")
        a.cli("rvg", "createpri", RVG, "v1", "64m")
        a.cli("rvg", "addsec", RVG, "127.0.0.1:1", relay.addr)
        rep = Replica(rvg.replica_root(dgb, RVG), RVG)
        assert rep.seq == 0

        # (1) the initial sync's streams rewritten on the path, digests and all: nothing applied
        relay.mode = "alter"
        p = a.cli("rvg", "startrep", RVG, check=False)
        assert p.returncode != 0 and relay.altered >= 1, p.stderr
        assert "not the ones the primary sealed" in p.stderr, p.stderr
        assert "altered on the path" in b.log()
        rep.recover()
        assert rep.seq == 0 and not any((rep.root / d).exists() for d in ("1", "staging.1")), \
            "a rewritten delta left something on the secondary"

        # (2) a forged request slipped in after the handshake: refused, logged, the RVG still there
        relay.mode = "inject"
        p = a.cli("rvg", "startrep", RVG, check=False)
        assert p.returncode != 0 and relay.injected == 1, p.stderr
        poll("the forged frame in the secondary's log", lambda: "fails its MAC" in b.log(), 10)
        assert RVG in rvg.names(dgb) and rvg.get(dgb, RVG).role == "secondary"

        # and with the path honest again the same pair replicates
        relay.mode = "pass"
        a.cli("rvg", "startrep", RVG)
        synced_pair(a, b, dga, dgb)
    finally:
        dga.close()
        dgb.close()
