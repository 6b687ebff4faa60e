"""Two replication sites on one machine, for the replication tests: two disk groups under two state
roots, each site's ``veritas rlink serve`` a subprocess on 127.0.0.1 (ephemeral port), the rvg commands
run as the real CLI; and the checks those tests share (replica equal to the primary's checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage import diskgroup, volumes
from storage.config import load_config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.replication import checkpoint, link, rvg
from storage.replication.apply import Replica
from tests.integration.conftest import REPO, finish, write_config

RVG = "rvg1"
KEY = "0123456789abcdef0123456789abcdef\n"


@dataclass
class Site:
    root: Path
    config_path: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    addr: str = ""

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "VERITAS_CONFIG": str(self.config_path), **extra}

    def cli(self, *args: str, check: bool = True, key: Path | None = None, text: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        pre = ["rvg", "--key-file", str(key)] if key and args[0] == "rvg" else [args[0]]
        js = [] if text else ["--json"]
        p = subprocess.run([sys.executable, "-m", "veritas.cli", *js, *pre, *args[1:]], cwd=REPO,
                           env=self.env(**(env or {})), capture_output=True, text=True, timeout=120, check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"veritas {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def serve(self, interval: float = 1.0, port: int = 0, **extra: str) -> subprocess.Popen[str]:
        log = open(self.root / "serve.log", "a")
        p = subprocess.Popen([sys.executable, "-m", "veritas.cli", "rlink", "serve", "--listen",
                              f"127.0.0.1:{port}", "--interval", str(interval)], cwd=REPO, env=self.env(**extra),
                             stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        self.procs.append(p)
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 30)
        line = p.stdout.readline() if ready else ""
        assert line.startswith("listening on "), f"rlink serve did not start: {line!r} {self.log()}"
        self.addr = line.split()[-1]
        return p

    def kill(self, p: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
        if p.poll() is None:
            os.kill(p.pid, sig)
        p.wait(timeout=30)

    def log(self) -> str:
        f = self.root / "serve.log"
        return f.read_text() if f.exists() else ""

    def dg(self) -> DiskGroup:
        return diskgroup.open_dg(load_config(self.config_path), "testdg")


def make_site(root: Path, disk_size: str = "2g") -> Site:
    """A site under ``root``: its config and key, one disk group of one disk of ``disk_size``."""
    path = write_config(root)
    (root / "rlink.key").write_text(KEY)
    os.chmod(root / "rlink.key", 0o600)
    with open(path, "a") as fh:
        fh.write(f"[replication]\nkey_file = {root}/rlink.key\ninterval = 1\n")
    (root / "disks").mkdir()
    diskgroup.init(load_config(path), "testdg", [DiskSpec.parse(f"{root}/disks/d1.img={disk_size}")]).close()
    return Site(root, path)


@pytest.fixture
def sites() -> Iterator[tuple[Site, Site]]:
    """Two sites, each a state root of its own with one disk group; torn down like ``env`` (services
    killed by PID first, then every disk group destroyed and leaks checked)."""
    made: list[Site] = []
    roots = [Path(tempfile.mkdtemp(prefix="vtest-", dir="/tmp")) for _ in range(2)]
    try:
        for r in roots:
            made.append(make_site(r))
        yield made[0], made[1]
    finally:
        for s in made:
            for p in s.procs:  # SIGTERM: the service ends its round (a SIGKILL could leave a freeze)
                try:
                    s.kill(p, signal.SIGTERM)
                except subprocess.TimeoutExpired:
                    s.kill(p)
        for r in roots:
            cfg = r / "veritas.conf"
            finish(load_config(cfg) if cfg.exists() else load_config(write_config(r)), r)


def digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def poll(what: str, fn: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def synced_pair(a: Site, b: Site, dga: DiskGroup, dgb: DiskGroup) -> tuple[int, dict[str, str]]:
    """Hold A's sender lock, so no checkpoint is taken or pruned, until B's replica is at A's newest
    checkpoint; then the seq and the replica's image digests, which must equal the checkpoint's."""
    end = time.monotonic() + 30
    while True:
        with dga.locks.hold(link.sender_lock(RVG)):
            ck = checkpoint.last_consistent(dga, RVG)
            rep = Replica(rvg.replica_root(dgb, RVG), RVG)
            if ck is not None and rep.seq == ck.seq:
                got = {k: digest(rep.image(k)) for k in rep.keys()}
                assert got == {i.key: digest(ck.path(dga, i)) for i in ck.images}, \
                    "the secondary's replica differs from the primary's checkpoint"
                return ck.seq, got
        if time.monotonic() > end:
            pytest.fail(f"secondary never caught up; A: {a.log()[-2000:]} B: {b.log()[-2000:]}")
        time.sleep(0.3)


def write_marker(mnt: Path, name: str) -> bytes:
    data = os.urandom(64 * 1024)
    fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return data


def status(site: Site) -> dict[str, object]:
    return dict(json.loads(site.cli("rvg", "repstatus", RVG).stdout))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def live(dg: DiskGroup, name: str = "v1") -> Path:
    """The image behind volume ``name`` (its first subdisk) on a site."""
    sd = dg.catalog.subdisks(name)[0]
    return dg.image(sd.disk, name, sd.idx)


def replicating_pair(a: Site, b: Site, dga: DiskGroup, srl: str = "64m", interval: float = 1.0) -> None:
    """RVG ``rvg1`` of one new 320 MiB XFS volume v1 on A, both link services up, B its secondary,
    the initial sync done (startrep)."""
    volumes.make(dga, "v1", "320m", fstype="xfs")
    b.serve()
    a.serve(interval=interval)
    a.cli("rvg", "createpri", RVG, "v1", srl)
    a.cli("rvg", "addsec", RVG, a.addr, b.addr)
    a.cli("rvg", "startrep", RVG)
