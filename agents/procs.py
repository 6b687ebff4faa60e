"""Processes as the kernel names them: liveness from /proc/PID/stat, identity of an executable by the
(device, inode) of /proc/PID/exe, trees by parent PID, container processes by their cgroup's procs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    f = _stat(pid)
    return f is not None and f[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    f = _stat(pid)
    return int(f[19]) if f else None


def age_seconds(pid: int) -> float | None:
    st = start_time(pid)
    if st is None:
        return None
    boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    return boot_uptime - st / os.sysconf("SC_CLK_TCK")


def ppid(pid: int) -> int | None:
    f = _stat(pid)
    return int(f[1]) if f else None


def cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return []


def runs_binary(pid: int, binary: str) -> bool:
    """Whether ``pid`` executes the file ``binary`` (same device and inode; a path string proves nothing)."""
    try:
        a, b = os.stat(f"/proc/{pid}/exe"), os.stat(binary)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants, by parent PID."""
    kids: dict[int, list[int]] = {}
    for p in all_pids():
        pp = ppid(p)
        if pp is not None:
            kids.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(kids.get(p, ()))
    return [p for p in out if alive(p)]


def cgroup_dirs(name: str, depth: int = 3) -> list[Path]:
    """Cgroup directories called ``name`` (a 64-hex container ID) in every hierarchy, at most ``depth``
    levels below a hierarchy's root."""
    out: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return out
    roots = [CGROUP_ROOT] if (CGROUP_ROOT / "cgroup.procs").exists() else \
        [h for h in CGROUP_ROOT.iterdir() if h.is_dir() and not h.is_symlink()]
    for root in roots:
        level = [root]
        for _ in range(depth):
            nxt = []
            for d in level:
                try:
                    subs = [s for s in d.iterdir() if s.is_dir()]
                except OSError:
                    continue
                for s in subs:
                    if s.name == name or s.name == f"docker-{name}.scope":
                        out.append(s)
                    else:
                        nxt.append(s)
            level = nxt
    return out


def cgroup_pids(d: Path) -> set[int]:
    try:
        return {int(x) for x in (d / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return set()


def signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_all(pids: list[int], timeout: float = 10) -> list[int]:
    """SIGSTOP then SIGKILL ``pids`` (stopped first so none forks or restarts another meanwhile)."""
    signal_all(pids, signal.SIGSTOP)
    signal_all(pids, signal.SIGKILL)
    return wait_gone(pids, timeout)
