"""A fresh Debian 12 root filesystem for the package tests: bootstrapped once with mmdebstrap and cached
as a tarball (keyed like packaging/build-managed-plugin.sh keys its own), unpacked per test module,
entered with chroot (/dev bound, /proc and /sys mounted), and torn down to nothing.

The rootfs holds apt, systemd and man-db, as an installed Debian does, and not veritas's dependencies:
apt resolves those when the test installs the .deb. Downloaded .debs are kept in the cache between runs.
Commands run in the chroot share the host's kernel: their mounts are host mounts under the rootfs and
their loop devices host loop devices, so teardown unmounts whatever lies under the rootfs and detaches
each loop device whose backing file (device and inode, never its path string) is in it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from storage.kernel import loop, mounts

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
SOURCES = [f"deb {MIRROR} {SUITE} main", f"deb {MIRROR} {SUITE}-updates main", f"deb {SECURITY} {SUITE}-security main"]
INCLUDE = ["systemd", "man-db"]
MMOPTS = ["--variant=apt", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr", f"--include={','.join(INCLUDE)}",
          "--aptopt=APT::Install-Recommends \"false\""]
EPOCH = os.environ.get("SOURCE_DATE_EPOCH", "1686355200")  # bookworm's release, as the plugin build's
CACHE = Path(os.environ.get("VERITAS_PACKAGES_CACHE", "/var/cache/veritas-packages"))
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}


class RootfsError(Exception):
    """The rootfs could not be made or torn down."""


def base_tarball() -> tuple[Path, float]:
    """The cached bootstrap tarball (made if missing) and the seconds it took to get it."""
    t0 = time.monotonic()
    version = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([SUITE, *SOURCES, *MMOPTS, EPOCH, version]).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"rootfs-{SUITE}-{key}.tar"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one bootstrap at a time; a concurrent run then finds the tarball
        if not tarball.is_file() or tarball.stat().st_size == 0:
            tmp = CACHE / f".rootfs-{key}.{os.getpid()}.tar"
            proc = subprocess.run(["mmdebstrap", "--quiet", "--format=tar", *MMOPTS, SUITE, str(tmp), *SOURCES],
                                  capture_output=True, text=True, env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH},
                                  timeout=600, check=False)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise RootfsError(f"mmdebstrap failed ({proc.returncode}): {proc.stderr[-3000:]}")
            tmp.rename(tarball)
    return tarball, time.monotonic() - t0


def unpack(tarball: Path, into: Path) -> None:
    into.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(into), "--numeric-owner", "-xpf", str(tarball)], check=True)


class Rootfs:
    """An unpacked rootfs entered with chroot; ``close`` leaves nothing of it behind."""

    def __init__(self, tarball: Path) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="vpkgroot-", dir="/tmp"))
        self.root = self.work / "root"
        self.binds: list[Path] = []
        unpack(tarball, self.root)
        shutil.copyfile("/etc/resolv.conf", self.root / "etc" / "resolv.conf")
        archives = CACHE / "apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        for src, dst, how in (("/dev", "dev", ["--bind"]), ("proc", "proc", ["-t", "proc"]),
                              ("sysfs", "sys", ["-t", "sysfs"]), (str(archives), "var/cache/apt/archives", ["--bind"])):
            target = self.root / dst
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *how, src, str(target)], check=True)
            self.binds.append(target)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *argv: str, check: bool = True, user: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``argv`` in the chroot, with a clean environment; fails with its output unless ``check`` is off."""
        pre = ["chroot", *([f"--userspec={user}"] if user else []), str(self.root)]
        proc = subprocess.run([*pre, *argv], capture_output=True, text=True, env={**ENV, **(env or {})},
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the rootfs, {' '.join(argv)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """``argv`` in the chroot in the background (chroot execs it: the pid is the command's)."""
        return subprocess.Popen(["chroot", str(self.root), *argv], env={**ENV, **(env or {})}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def processes(self) -> list[int]:
        """Pids of processes whose root directory is this rootfs."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/root") == str(self.root):
                    out.append(int(pid))
            except OSError:
                continue
        return out

    # ------------------------------------------------------------------ teardown

    def _mounts_under(self) -> list[str]:
        prefix = str(self.root) + "/"
        return [e.target for e in mounts.table() if e.target.startswith(prefix) or e.target == str(self.root)]

    def _file_ids(self) -> set[loop.FileId]:
        """(device, inode) of every regular file in the rootfs, beyond the kernel's and the apt cache's."""
        skip = {str(b) for b in self.binds}
        ids: set[loop.FileId] = set()
        for top, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
            for f in files:
                fid = loop.identity(Path(top) / f)
                if fid is not None:
                    ids.add(fid)
        return ids

    def _our_loops(self, ids: set[loop.FileId]) -> list[str]:
        return [dev for dev in loop.attached() if loop.backing_id(dev) in ids]

    def close(self) -> list[str]:
        """Unmount everything under the rootfs, detach its loop devices, remove it; what was left, if any."""
        problems: list[str] = []
        ids = self._file_ids()  # before the disks' filesystems are unmounted: volume images live in them
        binds = {str(b) for b in self.binds}
        for _ in range(6):  # volumes first, then the disks under them: each pass frees the next layer
            inner = [t for t in self._mounts_under() if t not in binds]
            for dev in self._our_loops(ids):
                subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
            if not inner:
                break
            for t in sorted(inner, key=lambda t: -t.count("/")):
                subprocess.run(["umount", t], capture_output=True, check=False)
        deadline = time.monotonic() + 10
        while self._our_loops(ids) and time.monotonic() < deadline:  # autoclear lands once the last user closes
            time.sleep(0.2)
        problems += [f"loop device {d} still backed by a file of the rootfs" for d in self._our_loops(ids)]
        for t in sorted(self._mounts_under(), key=lambda t: -t.count("/")):
            if subprocess.run(["umount", t], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", t], capture_output=True, check=False)
                problems.append(f"mount {t} needed a lazy unmount")
        problems += [f"mount {t} left" for t in self._mounts_under()]
        if not problems:
            shutil.rmtree(self.work, ignore_errors=True)
        return problems


def deb_files(listing: str) -> set[str]:
    """Paths of files and symlinks (not directories) in `dpkg-deb -c` output."""
    out: set[str] = set()
    for line in listing.splitlines():
        if line and not line.startswith("d"):  # mode owner size date time ./path [-> target]
            out.add("/" + line.split(" ./", 1)[1].split(" -> ")[0])
    return out


def rpm_files(rpm: Path) -> set[str]:
    """Paths of files and symlinks (not directories) of an .rpm, as `rpm -qpl` lists them."""
    names = subprocess.run(["rpm", "-qpl", str(rpm)], capture_output=True, text=True, check=True).stdout.split()
    modes = subprocess.run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms}\\n]", str(rpm)], capture_output=True,
                           text=True, check=True).stdout.split()
    assert len(names) == len(modes), f"rpm -qpl and FILEMODES disagree for {rpm}"
    return {n for n, m in zip(names, modes, strict=True) if not m.startswith("d")}
