"""The two engine API calls on the agents' hot path, over the engine's unix socket with the standard library.

Why not the docker SDK here: Pacemaker and VCS start a new process for every monitor of every resource,
every interval. Importing the SDK (requests, urllib3, its models) costs ~150 ms of each such process, 30
times the monitor's own work, and the issue's bound for one monitor on a busy node is 50 ms. Monitor
needs two read-only calls, inspect and ping, so they are made here as plain HTTP/1.0 requests (one
request per connection, the engine closes it after the answer: no chunked bodies, no keep-alive). Every
call that changes the engine (create, start, stop, exec) still goes through the SDK.
"""

from __future__ import annotations

import json
import socket
import time

from agents.errors import AgentError
from agents.params import API_VERSION, NAME_RE

TYPE_CHECKING = False  # typing is ~9 ms of a monitor process (agents.record); mypy reads the block
if TYPE_CHECKING:
    from typing import Any

MAX_BODY = 64 << 20  # an inspect document is a few KiB; a reply this large is not the engine's


class EngineDown(AgentError):
    """The engine did not answer: its socket is missing, refuses connections or stays silent."""


class EngineError(AgentError):
    """The engine answered with an error status (its message is kept)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"engine answered {status}: {message}")
        self.status = status


def socket_path(url: str) -> str:
    if not url.startswith("unix://"):
        raise AgentError(f"docker host {url!r} is not a unix socket URL")
    return url[len("unix://"):]


def _request(url: str, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    """One request; the engine's status and body. EngineDown when it cannot be asked or does not answer."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(socket_path(url))
            s.sendall(f"{method} {path} HTTP/1.0\r\nHost: docker\r\nUser-Agent: veritas-agent\r\n\r\n".encode())
            chunks: list[bytes] = []
            size = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                s.settimeout(left)
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                size += len(b)
                if size > MAX_BODY:
                    raise EngineDown(f"engine at {url} sent more than {MAX_BODY} bytes for {path}")
        except (OSError, TimeoutError) as exc:  # FileNotFoundError, ConnectionRefusedError, timeout...
            raise EngineDown(f"engine at {url} does not answer: {str(exc) or type(exc).__name__}") from None
    finally:
        s.close()
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/") or not status_line[1].isdigit():
        raise EngineDown(f"engine at {url} sent no HTTP answer for {path}")
    return int(status_line[1]), body


def _message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:200]
    return str(doc.get("message", doc)) if isinstance(doc, dict) else str(doc)[:200]


def inspect_container(url: str, name: str, timeout: float = 10) -> dict[str, Any] | None:
    """The container's inspect document (GET /containers/NAME/json), or None when it does not exist."""
    if not NAME_RE.fullmatch(name):  # checked names need no URL quoting; anything else is not ours to ask
        raise AgentError(f"container name {name!r} is not a valid name")
    status, body = _request(url, "GET", f"/v{API_VERSION}/containers/{name}/json", timeout)
    if status == 404:
        return None
    if status != 200:
        raise EngineError(status, _message(body))
    try:
        doc = json.loads(body)
    except ValueError:
        raise EngineDown(f"engine at {url} sent an inspect document that is not JSON") from None
    if not isinstance(doc, dict):
        raise EngineDown(f"engine at {url} sent an inspect document that is not an object")
    return doc


def ping(url: str, timeout: float = 5) -> bool:
    """Whether the engine answers its ping (GET /_ping: 200 OK)."""
    try:
        status, body = _request(url, "GET", "/_ping", timeout)
    except EngineDown:
        return False
    return status == 200 and body.strip() == b"OK"
