"""The lab's one wire format between its processes (the lab, each node's first process, the fencing
helper): one JSON object per line over a unix socket, one request and one reply per connection."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def recv_line(conn: socket.socket) -> bytes:
    """Bytes up to and including the newline that ends a message (or whatever came before EOF)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def ask(path: Path, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One JSON line to the unix socket at ``path``, one JSON line back."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(json.dumps(req).encode() + b"\n")
        data = recv_line(s)
    finally:
        s.close()
    return dict(json.loads(data))
