"""A TCP relay the tests own, so one node's way to etcd can be cut while the others' stays.

A node's config names the relay's port instead of etcd's; ``Relay.cut`` SIGKILLs the relay process (by
its PID), which closes every connection through it and refuses new ones, as a partition would for that
node only; ``Relay.heal`` starts it again on the same port. Run as ``python3 -m tests.tcp_relay
LISTEN_PORT TARGET_HOST TARGET_PORT``; it prints ``ready`` once it listens.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen_port: int, target: tuple[str, int]) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(64)
    print("ready", flush=True)
    while True:
        client, _ = srv.accept()
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


class Relay:
    """127.0.0.1:``port`` relayed to 127.0.0.1:``target_port``, in a process of its own."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self.proc: subprocess.Popen[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        """Start relaying (again, on the same port)."""
        assert self.proc is None
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.tcp_relay", str(self.port), "127.0.0.1",
                                      str(self.target_port)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.cut()
            raise RuntimeError(f"the TCP relay did not start: {line!r}")

    def cut(self) -> None:
        """SIGKILL the relay by its PID: every connection through it ends, new ones are refused."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


if __name__ == "__main__":
    serve(int(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))
