"""The link protocol: frames round-trip and refuse damage; the PSK handshake admits only a peer with
the key, and refuses a tampered or replayed response (hypothesis)."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.replication import protocol
from storage.replication.errors import AuthFailed, LinkError, ProtocolError

KEY = b"k" * 32
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
frames = st.builds(lambda t, rest: {**rest, "type": t}, st.text(min_size=1, max_size=12),
                   st.dictionaries(st.text(max_size=8), json_values, max_size=5))


@settings(max_examples=150, deadline=None)
@given(st.lists(frames, min_size=1, max_size=4))
def test_frames_round_trip_in_sequence(msgs: list[dict[str, object]]) -> None:
    buf = io.BytesIO(b"".join(protocol.encode_frame(m) for m in msgs))
    assert [protocol.decode_frame(buf) for _ in msgs] == msgs
    with pytest.raises(LinkError):
        protocol.decode_frame(buf)  # the end of the link is not a frame


@settings(max_examples=150, deadline=None)
@given(frames, st.data())
def test_a_cut_frame_is_refused(msg: dict[str, object], data: st.DataObject) -> None:
    raw = protocol.encode_frame(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(LinkError):
        protocol.decode_frame(io.BytesIO(raw[:cut]))


def test_an_oversized_or_untyped_frame_is_refused() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_frame(io.BytesIO(struct.pack(">I", protocol.MAX_FRAME + 1)))
    for body in (b"[1]", b"{\"a\":1}", b"{\"type\":3}", b"\xff\xfe"):
        with pytest.raises(ProtocolError):
            protocol.decode_frame(io.BytesIO(struct.pack(">I", len(body)) + body))
    with pytest.raises(ProtocolError):
        protocol.encode_frame({"no": "type"})


def run_handshake(client_key: bytes, server_key: bytes) -> None:
    hello = protocol.client_hello()
    st_, challenge = protocol.server_challenge(server_key, hello.frame)
    auth = protocol.client_auth(client_key, hello, challenge)
    protocol.server_verify(server_key, st_, auth)


keys = st.binary(min_size=16, max_size=64)


@settings(max_examples=60, deadline=None)
@given(keys, keys)
def test_handshake_admits_exactly_the_same_key(a: bytes, b: bytes) -> None:
    run_handshake(a, a)
    if a != b:
        with pytest.raises(AuthFailed):
            run_handshake(a, b)  # the client refuses the server's proof first


@settings(max_examples=100, deadline=None)
@given(keys, st.data())
def test_a_tampered_response_is_refused(key: bytes, data: st.DataObject) -> None:
    hello = protocol.client_hello()
    state, challenge = protocol.server_challenge(key, hello.frame)
    auth = protocol.client_auth(key, hello, challenge)
    i = data.draw(st.integers(0, 63))
    d = data.draw(st.integers(1, 15))

    def flip(mac: str) -> str:  # one hex digit changed to another
        return mac[:i] + format((int(mac[i], 16) + d) % 16, "x") + mac[i + 1:]
    with pytest.raises(AuthFailed):
        protocol.server_verify(key, state, {**auth, "mac": flip(auth["mac"])})
    with pytest.raises(AuthFailed):  # and the server's proof, tampered, is refused by the client
        protocol.client_auth(key, hello, {**challenge, "mac": flip(challenge["mac"])})


@settings(max_examples=30, deadline=None)
@given(keys)
def test_a_replayed_response_is_refused(key: bytes) -> None:
    """An eavesdropper's copy of one session's auth frame is useless in the next: fresh server nonce."""
    hello = protocol.client_hello()
    st1, ch1 = protocol.server_challenge(key, hello.frame)
    recorded = protocol.client_auth(key, hello, ch1)
    protocol.server_verify(key, st1, recorded)
    st2, _ch2 = protocol.server_challenge(key, hello.frame)  # the attacker replays the same hello
    with pytest.raises(AuthFailed):
        protocol.server_verify(key, st2, recorded)
    # nor can the server's own proof be reflected as a client's (different labels)
    with pytest.raises(AuthFailed):
        protocol.server_verify(key, st1, {"type": "auth", "mac": ch1["mac"]})


def test_other_versions_and_bad_nonces_are_refused() -> None:
    hello = protocol.client_hello()
    with pytest.raises(ProtocolError):
        protocol.server_challenge(KEY, {**hello.frame, "version": protocol.VERSION - 1})
    for bad in ("", "zz" * 32, "ab", None):
        with pytest.raises(AuthFailed):
            protocol.server_challenge(KEY, {**hello.frame, "nonce": bad})


def test_handshake_over_a_stream_both_ways() -> None:
    """handshake_server on a wrong key answers an error frame, which the client raises."""
    hello = protocol.client_hello()
    srv_in = io.BytesIO(protocol.encode_frame(hello.frame) + protocol.encode_frame({"type": "auth", "mac": "00"}))
    srv_out = io.BytesIO()

    class Duplex(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            return srv_in.read(n)

        def write(self, b: object) -> int:
            return srv_out.write(b)  # type: ignore[arg-type]

    with pytest.raises(AuthFailed):
        protocol.handshake_server(Duplex(), KEY)
    out = io.BytesIO(srv_out.getvalue())
    assert protocol.decode_frame(out)["type"] == "challenge"
    assert protocol.decode_frame(out) == {"type": "error", "message": "authentication refused"}


def _pair(key: bytes = KEY) -> tuple[protocol.Session, protocol.Session]:
    hello = protocol.client_hello()
    st_, challenge = protocol.server_challenge(key, hello.frame)
    protocol.server_verify(key, st_, protocol.client_auth(key, hello, challenge))
    return (protocol.Session(key, hello.nonce, st_.nonce, client=True),
            protocol.Session(key, hello.nonce, st_.nonce, client=False))


@settings(max_examples=60, deadline=None)
@given(st.lists(frames.filter(lambda m: "mac" not in m), min_size=1, max_size=4))
def test_keyed_frames_pass_in_order_and_each_one_is_bound_to_its_place(msgs: list[dict[str, object]]) -> None:
    """After the handshake a frame altered, replayed, reordered, reflected to its sender, or from
    another session fails its MAC; in order and untouched they arrive as sent."""
    client, server = _pair()
    sealed = [client.seal(m) for m in msgs]
    other_client, _ = _pair()
    with pytest.raises(AuthFailed):
        server.open(other_client.seal(msgs[0]))  # another session's frame (its own nonces)
    with pytest.raises(AuthFailed):
        server.open({k: v for k, v in sealed[0].items() if k != "mac"})  # unkeyed: injected
    if len(sealed) > 1:
        with pytest.raises(AuthFailed):
            server.open(sealed[1])  # frame 1 where frame 0 is due: reordered, or frame 0 dropped
    with pytest.raises(AuthFailed):
        client.open(sealed[0])  # reflected back to its sender: the directions' keys differ
    with pytest.raises(AuthFailed):
        server.open({**sealed[0], "type": sealed[0]["type"] + "x"})  # altered
    assert [server.open(m) for m in sealed] == msgs
    with pytest.raises(AuthFailed):
        server.open(sealed[-1])  # replayed


def test_a_session_never_takes_a_frame_with_a_mac_of_its_own() -> None:
    client, _ = _pair()
    with pytest.raises(ProtocolError):
        client.seal({"type": "x", "mac": "00"})


def test_handshakes_over_sockets_give_sessions_that_talk() -> None:
    import socket
    import threading

    a, b = socket.socketpair()
    fa, fb = a.makefile("rwb"), b.makefile("rwb")
    got: list[object] = []

    def serve() -> None:
        s = protocol.handshake_server(fb, KEY)  # type: ignore[arg-type]
        got.append(s.recv(fb))  # type: ignore[arg-type]
        s.send(fb, {"type": "pong"})  # type: ignore[arg-type]

    t = threading.Thread(target=serve)
    t.start()
    c = protocol.handshake_client(fa, KEY)  # type: ignore[arg-type]
    c.send(fa, {"type": "ping", "n": 1})  # type: ignore[arg-type]
    assert c.expect(fa, "pong") == {"type": "pong"}  # type: ignore[arg-type]
    t.join(5)
    assert got == [{"type": "ping", "n": 1}]
    for x in (fa, fb, a, b):
        x.close()
