"""The lab's fencing helper: the host side of the ``fence_lab`` STONITH agent.

Pacemaker's fencer runs ``fence_lab`` inside a lab node, whose mount namespace no longer holds the lab's
network namespace files (lab.nodeinit prunes them), so the agent cannot pull a node's cable itself. This
helper runs in the namespaces of the ``scripts/lab up`` that started it and does the fencing through the
lab's own paths: ``off`` is ``Lab.kill(node)`` (every process of the node, by PID, then its port down),
``on`` is ``Lab.start(node)`` without waiting for the cluster. One JSON line in, one JSON line out, on
``LAB/fencer.sock``. Every request is logged to ``LAB/fencer.log`` (what the tests read to see that
fencing went through it).

Usage: python3 -m lab.fencer LAB_DIR
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lab import wire
from lab.core import Lab, LabError

LOCK_TIMEOUT = 45.0  # the agent waits 55 s; a lab command holding the lock longer fails the fencing
_LOG_LOCK = threading.Lock()


def log(msg: str) -> None:
    with _LOG_LOCK:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", flush=True)


def handle(dir: Path, req: dict[str, Any]) -> dict[str, Any]:
    """One request: ping, list, status, off, on, reboot."""
    op = req.get("op")
    lab = Lab(dir)
    if op == "ping":
        return {"ok": True}
    if op == "list":
        return {"nodes": {n.name: "off" if n.proc("init") is None else "on" for n in lab.nodes()}}
    name = str(req.get("node", ""))
    lab.node(name)  # LabError if there is no such node
    if op == "status":
        return {"state": "off" if lab.node(name).proc("init") is None else "on"}
    if op in ("off", "reboot"):
        lab.kill(name, lock_timeout=LOCK_TIMEOUT)
    if op in ("on", "reboot"):
        lab.start(name, wait=False, lock_timeout=LOCK_TIMEOUT)
    if op not in ("off", "on", "reboot"):
        raise LabError(f"unknown op {op!r}")
    return {"ok": True}


def serve_one(dir: Path, conn: socket.socket) -> None:
    with conn:
        t0 = time.monotonic()
        req: dict[str, Any] = {}
        try:
            req = dict(json.loads(wire.recv_line(conn)))
            reply = handle(dir, req)
        except Exception as exc:  # a bad request or a failed fencing must not end the helper
            reply = {"error": str(exc)}
        if req.get("op") not in ("ping", "list", "status"):
            outcome = "ok" if "error" not in reply else f"failed: {reply['error']}"
            log(f"{req.get('op')} {req.get('node')}: {outcome} ({time.monotonic() - t0:.2f} s)")
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


def main() -> None:
    dir = Path(sys.argv[1]).resolve()
    path = dir / "fencer.sock"
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(16)
    log("listening")
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve_one, args=(dir, conn), daemon=True).start()


if __name__ == "__main__":
    main()
