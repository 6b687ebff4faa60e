"""``veritas plugin serve``: reconcile, then serve the VolumeDriver API under gunicorn, in the foreground.

The socket appears only after reconciliation, so Docker's Mount and Unmount wait (Docker retries for
30 s) until the plugin's view is rebuilt. gunicorn runs as a child that dies with this process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from plugin.docker_api import Engine
from plugin.driver import Driver
from plugin.events import EventFollower
from plugin.reconcile import reconcile
from storage import diskgroup, snapcache
from storage.config import Config

log = logging.getLogger("veritas.plugin")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def serve(config: Config, socket: Path | None = None, workers: int | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s veritas[%(process)d] %(levelname)s %(message)s")
    sock = socket or config.plugin.socket
    engine = Engine(config.plugin.docker_host, config.plugin.driver, timeout=5.0)
    dg = diskgroup.default_dg(config)
    try:
        reconcile(dg, engine)
    finally:
        dg.close()
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.exists() or sock.is_symlink():
        sock.unlink()  # left by a killed predecessor: nobody listens on it
    env = dict(os.environ)
    if config.source is not None:
        env["VERITAS_CONFIG"] = str(config.source)
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"unix:{sock}", "--workers",
            str(workers or config.plugin.workers), "--umask", "0o177", "--timeout", "130",
            "--graceful-timeout", "10", "--log-level", "warning", "plugin.wsgi:app"]
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    child = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)
    enforcer = EventFollower(Driver(config, engine), engine)
    enforcer.start()
    watcher = snapcache.Watcher(lambda: diskgroup.open_dg(config, config.diskgroup))  # snapshot caches
    watcher.start()

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("serving %s on %s (pid %d, gunicorn pid %d)", config.plugin.driver, sock, os.getpid(), child.pid)
    rc = child.wait()
    enforcer.stop()
    watcher.stop()
    try:
        sock.unlink()
    except OSError:
        pass
    return rc
