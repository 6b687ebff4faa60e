"""The replication link's wire protocol (version 1): control frames and the mutual PSK handshake.

A control frame is ``u32 big-endian length | that many bytes of UTF-8 JSON`` (an object with a
``type``); at most MAX_FRAME bytes. A ``delta`` frame names the delta streams that follow it raw on the
connection (storage.replication.delta, checksummed end to end), each of its stated length.

The handshake proves to each side that the other holds the pre-shared key; the key never travels::

    client -> {"type": "hello", "version": 1, "nonce": Nc}
    server -> {"type": "challenge", "version": 1, "nonce": Ns, "mac": HMAC(K, "server" Nc Ns)}
    client -> {"type": "auth", "mac": HMAC(K, "client" Nc Ns)}        (only once the server's mac verified)
    server -> {"type": "welcome"}                                      (or an error frame, and it hangs up)

Both nonces are 32 fresh random bytes (hex), so a response recorded from another session is useless,
and the two directions use different labels, so a mac cannot be reflected back to its sender.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from storage.errors import InvalidArgument
from storage.replication.errors import AuthFailed, PeerError, PeerUnreachable, ProtocolError

VERSION = 1
MAX_FRAME = 1 << 20
NONCE = 32
_LEN = struct.Struct(">I")


def encode_frame(msg: dict[str, Any]) -> bytes:
    if not isinstance(msg.get("type"), str):
        raise ProtocolError(f"a frame needs a string type: {msg!r}")
    body = json.dumps(msg, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes is over the limit of {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    b = fh.read(n)
    if b is None or len(b) != n:
        raise PeerUnreachable(f"the peer closed the link ({0 if not b else len(b)} of {n} bytes of a frame)")
    return b


def decode_frame(fh: BinaryIO) -> dict[str, Any]:
    """Read one frame from ``fh``. :raises ProtocolError: damaged or too big; :raises PeerUnreachable: closed."""
    (n,) = _LEN.unpack(_read_exact(fh, _LEN.size))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame length {n} is over the limit of {MAX_FRAME}: not a veritas peer, or damaged")
    body = _read_exact(fh, n)
    try:
        msg = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON ({exc})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("frame is not an object with a type")
    return msg


def send(fh: BinaryIO, msg: dict[str, Any]) -> None:
    fh.write(encode_frame(msg))
    fh.flush()


def expect(fh: BinaryIO, kind: str) -> dict[str, Any]:
    """The next frame, which must be of type ``kind``; an ``error`` frame raises its message."""
    msg = decode_frame(fh)
    if msg["type"] == "error":
        raise PeerError(f"the peer says: {msg.get('message', 'error')}")
    if msg["type"] != kind:
        raise ProtocolError(f"expected a {kind} frame, got {msg['type']}")
    return msg


def load_key(path: Path) -> bytes:
    """The pre-shared key from ``path`` (its bytes, surrounding whitespace stripped): at least 16 bytes."""
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the replication key file {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise InvalidArgument(f"replication key file {path} holds {len(key)} bytes: use at least 16 random bytes"
                              " (e.g. openssl rand -hex 32)")
    return key


def _mac(key: bytes, label: bytes, cn: str, sn: str) -> str:
    return hmac.new(key, label + b"\0" + cn.encode() + b"\0" + sn.encode(), hashlib.sha256).hexdigest()


def _nonce(msg: dict[str, Any], what: str) -> str:
    n = msg.get("nonce")
    if not isinstance(n, str) or len(n) != 2 * NONCE or any(c not in "0123456789abcdef" for c in n):
        raise AuthFailed(f"{what} carries no valid nonce")
    return n


def _version(msg: dict[str, Any]) -> None:
    if msg.get("version") != VERSION:
        raise ProtocolError(f"peer speaks link protocol version {msg.get('version')!r}; this build speaks"
                            f" {VERSION}: upgrade the older site")


@dataclass(frozen=True)
class ClientHello:
    nonce: str

    @property
    def frame(self) -> dict[str, Any]:
        return {"type": "hello", "version": VERSION, "nonce": self.nonce}


def client_hello() -> ClientHello:
    return ClientHello(secrets.token_hex(NONCE))


@dataclass(frozen=True)
class ServerChallenge:
    client_nonce: str
    nonce: str


def server_challenge(key: bytes, hello: dict[str, Any]) -> tuple[ServerChallenge, dict[str, Any]]:
    """The server's answer to a hello: its state and the challenge frame (which proves the key)."""
    if hello.get("type") != "hello":
        raise ProtocolError(f"expected hello, got {hello.get('type')}")
    _version(hello)
    cn = _nonce(hello, "hello")
    st = ServerChallenge(cn, secrets.token_hex(NONCE))
    return st, {"type": "challenge", "version": VERSION, "nonce": st.nonce, "mac": _mac(key, b"server", cn, st.nonce)}


def client_auth(key: bytes, hello: ClientHello, challenge: dict[str, Any]) -> dict[str, Any]:
    """Check the server's proof; the client's own proof frame. :raises AuthFailed: wrong key or replay."""
    if challenge.get("type") != "challenge":
        raise ProtocolError(f"expected challenge, got {challenge.get('type')}")
    _version(challenge)
    sn = _nonce(challenge, "challenge")
    mac = challenge.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, b"server", hello.nonce, sn)):
        raise AuthFailed("the peer did not prove the pre-shared key: wrong key on one site, or not our peer")
    return {"type": "auth", "mac": _mac(key, b"client", hello.nonce, sn)}


def server_verify(key: bytes, st: ServerChallenge, auth: dict[str, Any]) -> None:
    """Check the client's proof. :raises AuthFailed: wrong key, tampered or replayed."""
    mac = auth.get("mac") if auth.get("type") == "auth" else None
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, b"client", st.client_nonce, st.nonce)):
        raise AuthFailed("the peer did not prove the pre-shared key: wrong key on one site, or not our peer")


def handshake_client(fh: BinaryIO, key: bytes) -> None:
    hello = client_hello()
    send(fh, hello.frame)
    send(fh, client_auth(key, hello, expect(fh, "challenge")))
    expect(fh, "welcome")


def handshake_server(fh: BinaryIO, key: bytes) -> None:
    """Authenticate a connecting peer; on failure tell it (without saying why beyond 'refused') and raise."""
    try:
        st, challenge = server_challenge(key, decode_frame(fh))
        send(fh, challenge)
        server_verify(key, st, decode_frame(fh))
    except (AuthFailed, ProtocolError) as exc:
        try:
            send(fh, {"type": "error", "message": "authentication refused"})
        except OSError:
            pass
        raise exc
    send(fh, {"type": "welcome"})
