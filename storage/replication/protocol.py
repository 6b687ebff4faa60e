"""The replication link's wire protocol (version 2): control frames, the mutual PSK handshake, and
keyed frames after it.

A control frame is ``u32 big-endian length | that many bytes of UTF-8 JSON`` (an object with a
``type``); at most MAX_FRAME bytes. A ``delta`` frame names the delta streams that follow it raw on the
connection (storage.replication.delta, checksummed end to end), each of its stated length.

The handshake proves to each side that the other holds the pre-shared key; the key never travels::

    client -> {"type": "hello", "version": 1, "nonce": Nc}
    server -> {"type": "challenge", "version": 1, "nonce": Ns, "mac": HMAC(K, "server" Nc Ns)}
    client -> {"type": "auth", "mac": HMAC(K, "client" Nc Ns)}        (only once the server's mac verified)
    server -> {"type": "welcome", "mac": ...}                  (keyed, as every frame after it; or an
                                                                 unkeyed error frame, and it hangs up)

Both nonces are 32 fresh random bytes (hex), so a response recorded from another session is useless,
and the two directions use different labels, so a mac cannot be reflected back to its sender.

Why every later frame is keyed (version 1 authenticated only the handshake): whoever sits on the path
could otherwise let the handshake through and then inject, alter, replay or drop requests (a demote, a
delsec) and rewrite a delta along with its SHA-256 digests, which anybody can recompute. So each side
derives one key per direction from the PSK and both nonces (a Session), and each frame carries
``mac = HMAC(direction key, frame number | canonical JSON of the frame without its mac)``: a frame
altered, replayed from another session, reordered or dropped fails the next check. A delta's raw
streams are not MACed byte by byte (that would hash every byte a second time); a keyed ``seal`` frame
after them carries each stream's chain digest (storage.replication.delta), which covers every one of
its bytes, and the secondary commits the apply only once the seal matches what it decoded.
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

VERSION = 2  # 1: only the handshake was keyed
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
    return _of_kind(decode_frame(fh), kind)


def _of_kind(msg: dict[str, Any], kind: str) -> dict[str, Any]:
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


_SEQ = struct.Struct(">Q")


class Session:
    """The keyed half of a connection after the handshake: one key per direction, a frame counter each.

    Not thread-safe; a connection is used by one thread at a time."""

    def __init__(self, key: bytes, client_nonce: str, server_nonce: str, *, client: bool) -> None:
        def direction(label: bytes) -> bytes:
            return hmac.new(key, label + b"\0" + client_nonce.encode() + b"\0" + server_nonce.encode(),
                            hashlib.sha256).digest()
        c2s, s2c = direction(b"c2s"), direction(b"s2c")
        self._send_key, self._recv_key = (c2s, s2c) if client else (s2c, c2s)
        self._sent = 0
        self._received = 0

    @staticmethod
    def _frame_mac(key: bytes, n: int, msg: dict[str, Any]) -> str:
        body = json.dumps(msg, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(key, _SEQ.pack(n) + body, hashlib.sha256).hexdigest()

    def seal(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``msg`` with its mac, as the next frame this side sends."""
        if "mac" in msg:
            raise ProtocolError("a frame's mac is the session's to add")
        out = {**msg, "mac": self._frame_mac(self._send_key, self._sent, msg)}
        self._sent += 1
        return out

    def open(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Check the next received frame's mac; the frame without it.

        :raises AuthFailed: altered, injected, replayed, reordered or after a dropped frame."""
        mac = msg.get("mac")
        bare = {k: v for k, v in msg.items() if k != "mac"}
        want = self._frame_mac(self._recv_key, self._received, bare)
        if not isinstance(mac, str) or not hmac.compare_digest(mac, want):
            raise AuthFailed(f"frame {self._received} from the peer ({msg.get('type')!r}) fails its MAC: altered,"
                             f" injected or replayed on the path, or not our peer; the connection is dropped")
        self._received += 1
        return bare

    def send(self, fh: BinaryIO, msg: dict[str, Any]) -> None:
        send(fh, self.seal(msg))

    def recv(self, fh: BinaryIO) -> dict[str, Any]:
        """The next frame, checked. :raises AuthFailed: see ``open``; :raises ProtocolError, PeerUnreachable."""
        return self.open(decode_frame(fh))

    def expect(self, fh: BinaryIO, kind: str) -> dict[str, Any]:
        """The next frame, checked, which must be of type ``kind``; an ``error`` frame raises its message."""
        return _of_kind(self.recv(fh), kind)


def handshake_client(fh: BinaryIO, key: bytes) -> Session:
    hello = client_hello()
    send(fh, hello.frame)
    challenge = expect(fh, "challenge")
    send(fh, client_auth(key, hello, challenge))
    session = Session(key, hello.nonce, str(challenge["nonce"]), client=True)
    welcome = decode_frame(fh)
    if welcome["type"] == "error" and "mac" not in welcome:  # refused before any key was shared
        raise PeerError(f"the peer says: {welcome.get('message', 'error')}")
    if session.open(welcome)["type"] != "welcome":
        raise ProtocolError(f"expected a welcome frame, got {welcome['type']}")
    return session


def handshake_server(fh: BinaryIO, key: bytes) -> Session:
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
    session = Session(key, st.client_nonce, st.nonce, client=False)
    session.send(fh, {"type": "welcome"})
    return session
