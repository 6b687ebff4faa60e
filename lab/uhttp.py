"""HTTP over a unix socket (Docker's API, the plugin's), with the standard library only: the lab
starts quickly and needs no client library to ask an engine whether it is up."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def request(sock: str, method: str, url: str, body: bytes | None = None, timeout: float = 10.0,
            content_type: str = "application/json") -> tuple[int, bytes]:
    conn = _Conn(sock, timeout)
    try:
        conn.request(method, url, body=body, headers={"Content-Type": content_type} if body is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get_json(sock: str, url: str, timeout: float = 10.0) -> Any:
    status, data = request(sock, "GET", url, timeout=timeout)
    if status != 200:
        raise OSError(f"GET {url} on {sock}: HTTP {status}: {data[:200]!r}")
    return json.loads(data)


def alive(sock: str, url: str = "/_ping", timeout: float = 2.0) -> bool:
    try:
        return request(sock, "GET", url, timeout=timeout)[0] == 200
    except OSError:
        return False
