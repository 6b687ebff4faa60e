"""``veritas plugin serve``: hold the socket, reconcile, then serve the VolumeDriver API under gunicorn.

The listening socket exists before reconciliation starts: bound here, or inherited from systemd socket
activation (``LISTEN_FDS``/``LISTEN_PID``, fd 3; packaging/veritas-plugin.socket). Docker's calls then
queue in its backlog, never refused, while the plugin rebuilds its view and while gunicorn replaces
workers; with activation also while the plugin itself restarts. A refused call costs far more: Docker
retries it for only 15 s (1+2+4+8 s) and resends it with an empty body. gunicorn gets the socket as
fd 3 the systemd way, so it neither binds nor unlinks the path itself, and runs as a child that dies
with this process.

A second plugin never takes over the socket of a live one: ``serve`` refuses to start while something
answers on the path, and at exit removes the path only if it is still the socket it bound.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import socket as socketlib
import stat
import subprocess
import sys
from pathlib import Path
from typing import IO

from plugin.docker_api import Engine
from plugin.driver import Driver
from plugin.events import EventFollower
from plugin.lease import LeaseKeeper
from plugin.reconcile import reconcile
from storage import diskgroup, snapcache
from storage.config import Config
from storage.errors import InUse, InvalidArgument, VeritasError

log = logging.getLogger("veritas.plugin")
_PR_SET_PDEATHSIG = 1
LISTEN_FD = 3  # SD_LISTEN_FDS_START
BACKLOG = 2048


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def answers(path: Path) -> bool:
    """Whether a process listens on the unix socket at ``path`` (a connect succeeds, or its backlog is full)."""
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.ETIMEDOUT) or isinstance(exc, TimeoutError)
    finally:
        s.close()


def inherited_socket() -> socketlib.socket | None:
    """The listening socket systemd (or any supervisor) passed as fd 3, or None without activation."""
    pid, fds = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or fds is None or pid != str(os.getpid()):
        return None
    if not fds.isdigit() or int(fds) < 1:
        raise InvalidArgument(f"LISTEN_FDS={fds!r}: socket activation must pass one listening socket (fd 3)")
    if int(fds) > 1:
        log.warning("LISTEN_FDS=%s: serving on fd %d only", fds, LISTEN_FD)
    sock = socketlib.socket(fileno=LISTEN_FD)
    if sock.family != socketlib.AF_UNIX or sock.type != socketlib.SOCK_STREAM:
        raise InvalidArgument(f"fd {LISTEN_FD} from socket activation is not a unix stream socket")
    return sock


class SocketClaim:
    """The plugin's socket path: taken only when nobody serves on it, released only while still ours."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socketlib.socket | None = None
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self._lock: IO[str] | None = None

    def _refuse_live(self) -> None:
        if answers(self.path):
            raise InUse(f"a plugin is already serving on {self.path}; stop it first"
                        " (two plugins on one socket would take each other's calls)")

    def _take_lock(self) -> None:
        # two plugins starting at once must not both find the path free and unlink each other's socket
        fh = open(self.path.with_name(self.path.name + ".lock"), "a+")  # held until release
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise InUse(f"another veritas plugin is starting or serving on {self.path}; stop it first") from None
        self._lock = fh

    def bind(self) -> socketlib.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._refuse_live()
        self._take_lock()
        try:
            self._refuse_live()  # again under the lock: one may have bound in between
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise InvalidArgument(f"{self.path} exists and is not a socket; remove it or configure"
                                          " another plugin socket")
                self.path.unlink()  # left by a killed predecessor: nobody listens on it
            sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(BACKLOG)
            st = os.stat(self.path)
        except BaseException:
            self.release()
            raise
        self.sock, self.identity = sock, (st.st_dev, st.st_ino)
        return sock

    def release(self) -> None:
        """Close, and remove the socket file only if it is the one we bound (a successor's stays)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.identity is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self.identity:
                    self.path.unlink()
                else:
                    log.info("%s is another process's socket now: left in place", self.path)
            except FileNotFoundError:
                pass
            self.identity = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def serve(config: Config, socket: Path | None = None, workers: int | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s veritas[%(process)d] %(levelname)s %(message)s")
    path = socket or config.plugin.socket
    claim = SocketClaim(path)
    try:
        listener = inherited_socket()
        if listener is None:
            listener = claim.bind()
            how = f"bound {path}"
        else:
            how = f"inherited fd {LISTEN_FD} ({listener.getsockname() or 'unnamed'}) from socket activation"
            listener.listen(BACKLOG)
    except (VeritasError, OSError) as exc:
        print(f"veritas plugin serve: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(config, listener, how, workers)
    finally:
        claim.release()


def _run(config: Config, listener: socketlib.socket, how: str, workers: int | None) -> int:
    # Docker's calls queue on the listener from here on; gunicorn answers them after reconciliation.
    # Reconciliation asks Docker only through its container list, which never waits on a Mount.
    # short: a dockerd that is restoring containers serves no API until their Mounts, queued behind
    # this reconciliation, are answered; without an answer every mounted volume is kept
    engine = Engine(config.plugin.docker_host, config.plugin.driver, timeout=2.0)
    keeper = LeaseKeeper(config)  # this node's lease, renewed from here on, and self-fencing
    keeper.start()  # first: a disk group imported on another node is shared by nodes holding a lease
    try:
        dg = diskgroup.default_dg(config)
    except VeritasError as exc:
        log.warning("cannot open the disk group yet, workers will retry: %s", exc)
    else:
        try:
            keeper.adopt(dg)  # volumes another node took while this one was away are left alone
            reconcile(dg, engine)
        except VeritasError as exc:
            log.warning("reconciliation incomplete: %s", exc)
        finally:
            dg.close()
    env = dict(os.environ)
    if config.source is not None:
        env["VERITAS_CONFIG"] = str(config.source)
    argv = [sys.executable, "-m", "plugin.gunicorn_main", "--workers", str(workers or config.plugin.workers),
            "--timeout", "130", "--graceful-timeout", "10", "--log-level", "warning", "plugin.wsgi:app"]
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    fd = listener.fileno()

    def child_setup() -> None:
        _die_with_parent()
        if fd != LISTEN_FD:
            os.dup2(fd, LISTEN_FD)
        os.set_inheritable(LISTEN_FD, True)

    # close_fds=False: Popen would close fd 3 after child_setup made it; Python opens its own fds
    # non-inheritable (PEP 446), so nothing else leaks into gunicorn
    child = subprocess.Popen(argv, env=env, preexec_fn=child_setup, close_fds=False)
    enforcer = EventFollower(Driver(config, engine), engine, on_lost=keeper.engine_lost)
    enforcer.start()
    watcher = snapcache.Watcher(lambda: diskgroup.open_dg(config, config.diskgroup))  # snapshot caches
    watcher.start()

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("serving %s: %s (pid %d, gunicorn pid %d)", config.plugin.driver, how, os.getpid(), child.pid)
    rc = child.wait()
    enforcer.stop()
    watcher.stop()
    keeper.stop()
    return rc
