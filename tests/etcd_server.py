"""A real etcd (Debian's etcd-server) for tests: on 127.0.0.1 with free ports and a temporary data dir,
ended by its PID. Its election timing is short so that leases of 1 s work (etcd's shortest lease is
1.5 election timeouts), which keeps lease-expiry tests quick.

The data dir is on tmpfs (/dev/shm) where there is one: fsync costs nothing there, so this etcd never
stalls behind other tests' disk I/O. A stalled apply held a lease keepalive sent just before a plugin's
kill -9 and renewed the dead node's lease seconds later, so the next node's Mount outwaited its
mount_wait (seen twice in full runs, never alone). What these tests check is veritas on etcd, not
etcd's own durability."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, data_dir: Path | None = None) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="vetcd-", dir=base))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        exe = shutil.which("etcd")
        if exe is None:
            raise RuntimeError("etcd is missing: run scripts/test, which installs etcd-server")
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [exe, "--name", "vtest", "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"vtest={peer}", "--heartbeat-interval", "50",
                "--election-timeout", "500", "--logger", "zap", "--log-level", "error"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                    if b"true" in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """End etcd by its PID (SIGTERM, then SIGKILL); its data stays for a restart."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
