"""A fake kernel for fast unit tests of the upper layers: loop devices, mounts and filesystems in memory.

Installed with pytest's monkeypatch over the storage.kernel wrappers that read the kernel (sysfs,
/proc/self/mountinfo, ioctls), and used as the disk group's command runner for the commands that change
it (losetup, mkfs.*, mount, umount, fsfreeze, blkid...). It keeps the rules the real code relies on:
a loop device is known by its backing file's (device, inode), a mount by its device number, a
filesystem lives on the backing file (so it survives detach and a reflink clone carries it), and
unmounting something not mounted, or mounting a device without the filesystem asked for, fails as the
commands do. Image files, mount point directories and disk identity files stay real, under tmp_path.

A test "kills" an operation with ``kill_at``: the operation runs in a thread that stops for good at the
crash point, and its locks are freed as a dead process's flocks are; what it did so far stays.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from storage import crash, qos
from storage.errors import VeritasError
from storage.kernel import btrfs_super, fs, loop, mounts, reflink

LOOP_MAJOR = 7
FIRST_MINOR = 900  # far from the host's own loop devices, so a leaked name is obviously fake


@dataclass
class FakeFs:
    fstype: str
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class FakeMount:
    entry: mounts.MountEntry
    devices: set[tuple[int, int]]
    size: int


class FakeKernel:
    def __init__(self) -> None:
        self.loops: dict[str, tuple[Path, loop.FileId]] = {}  # /dev/loopN -> backing path, identity
        self.filesystems: dict[loop.FileId, FakeFs] = {}  # by the backing file's identity
        self.mounted: list[FakeMount] = []
        self.frozen: set[str] = set()
        self.busy: set[str] = set()  # mount points whose umount fails as busy
        self.fail: dict[str, str] = {}  # command name -> stderr of a failure it returns
        self.commands: list[list[str]] = []
        self._minor = FIRST_MINOR
        self._anon = 100
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ what the wrappers read
    def attached(self) -> dict[str, str]:
        return {dev: str(p) for dev, (p, _i) in self.loops.items()}

    def backing_id(self, dev: str) -> loop.FileId | None:
        found = self.loops.get(dev)
        return found[1] if found else None

    def backing_id_of(self, major: int, minor: int) -> loop.FileId | None:
        return self.backing_id(f"/dev/loop{minor}") if major == LOOP_MAJOR else None

    def backing(self, name: str) -> str | None:
        found = self.loops.get(f"/dev/{name}")
        return f"{found[0]}\n" if found else None

    def devnum(self, dev: str) -> tuple[int, int]:
        if dev not in self.loops:
            raise FileNotFoundError(dev)
        return LOOP_MAJOR, int(dev.removeprefix("/dev/loop"))

    def table(self) -> list[mounts.MountEntry]:
        return [m.entry for m in self.mounted]

    def btrfs_members(self, target: Path) -> set[tuple[int, int]]:
        for m in reversed(self.mounted):
            if m.entry.target == str(target) and m.entry.fstype == "btrfs":
                return set(m.devices)
        return set()

    def targets_of(self, devices: set[str]) -> list[str]:
        nums = {f"{LOOP_MAJOR}:{self.devnum(d)[1]}" for d in devices if d in self.loops}
        return [m.entry.target for m in self.mounted
                if m.entry.source in devices or m.entry.major_minor in nums
                or any(f"{a}:{b}" in nums for a, b in m.devices)]

    def statvfs_size(self, path: Path) -> tuple[int, int]:
        for m in reversed(self.mounted):
            if m.entry.target == str(path):
                return m.size, m.size
        raise FileNotFoundError(f"fake kernel: nothing mounted at {path}")

    # ------------------------------------------------------------------ files
    def clone(self, src: Path, dst: Path) -> None:
        with open(dst, "xb") as fh:
            fh.truncate(src.stat().st_size)
        found = self.filesystems.get(_ident(src))
        if found is not None:  # a reflink copy carries the filesystem, identity and all
            self.filesystems[_ident(dst)] = FakeFs(found.fstype, found.fsid)

    def new_fsid(self, images: Sequence[Path], new: uuid.UUID | None = None) -> uuid.UUID:
        fsid = new or uuid.uuid4()
        for img in images:
            self.filesystems[_ident(img)].fsid = str(fsid)
        return fsid

    # ------------------------------------------------------------------ the runner
    def __call__(self, argv: Sequence[str], *, check: bool = True,
                 timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        args = [str(a) for a in argv]
        with self._lock:
            self.commands.append(args)
            if args[0] in self.fail:
                rc, out, err = 1, "", self.fail[args[0]]
            else:
                handler = _COMMANDS.get(args[0])
                if handler is None:
                    raise AssertionError(f"fake kernel: unexpected command {args}")
                rc, out, err = handler(self, args[1:])
        if check and rc != 0:
            from storage.errors import CommandFailed
            raise CommandFailed(args, rc, err or out)
        return subprocess.CompletedProcess(args, rc, out, err)

    def _losetup(self, a: list[str]) -> tuple[int, str, str]:
        if a[0] == "-d":
            if self.loops.pop(a[1], None) is None:
                return 1, "", f"losetup: {a[1]}: No such device or address"
            return 0, "", ""
        if a[0] == "-c":
            return (0, "", "") if a[1] in self.loops else (1, "", f"losetup: {a[1]}: no such device")
        image = Path(a[-1])  # --find --show [--sector-size=..] [--direct-io=on] IMAGE
        dev = f"/dev/loop{self._minor}"
        self._minor += 1
        self.loops[dev] = (image, _ident(image))
        return 0, dev + "\n", ""

    def _backing_of(self, dev: str) -> loop.FileId | None:
        if dev in self.loops:
            return self.loops[dev][1]
        p = Path(dev)
        return _ident(p) if p.is_file() else None

    def _mkfs(self, fstype: str, a: list[str]) -> tuple[int, str, str]:
        devs = [x for x in a if x.startswith("/dev/loop")]
        if not devs or any(d not in self.loops for d in devs):
            return 1, "", f"mkfs.{fstype}: cannot open {devs}"
        made = FakeFs(fstype)
        for d in devs:
            self.filesystems[self.loops[d][1]] = FakeFs(fstype, made.fsid)
        return 0, "", ""

    def _mount(self, a: list[str]) -> tuple[int, str, str]:
        fstype = a[a.index("-t") + 1]
        opts = a[a.index("-o") + 1] if "-o" in a else "rw"
        dev, target = a[-2], a[-1]
        found = self.filesystems.get(self.loops[dev][1]) if dev in self.loops else None
        if found is None or found.fstype != fstype:
            return 32, "", f"mount: {target}: wrong fs type, bad option, bad superblock on {dev}"
        if not Path(target).is_dir():
            return 32, "", f"mount: {target}: mount point does not exist."
        if fstype == "xfs" and "nouuid" not in opts and any(
                self.filesystems.get(self.loops[m.entry.source][1], FakeFs("")).fsid == found.fsid
                for m in self.mounted if m.entry.source in self.loops):
            return 32, "", f"mount: {target}: duplicate UUID {found.fsid}"  # as XFS refuses a clone
        if fstype == "btrfs":
            members = {self.devnum(d) for d, (_p, i) in self.loops.items()
                       if (f := self.filesystems.get(i)) is not None and f.fsid == found.fsid}
            self._anon += 1
            num = f"0:{self._anon}"
        else:
            members = {self.devnum(dev)}
            num = f"{LOOP_MAJOR}:{self.devnum(dev)[1]}"
        size = sum(self.loops[d][0].stat().st_size for d, (_p, i) in self.loops.items()
                   if self.filesystems.get(i) is not None and self.filesystems[i].fsid == found.fsid)
        entry = mounts.MountEntry(source=dev, target=target, fstype=fstype, options=opts, major_minor=num)
        self.mounted.append(FakeMount(entry, members, size if fstype == "btrfs" else
                                      self.loops[dev][0].stat().st_size))
        return 0, "", ""

    def _umount(self, a: list[str]) -> tuple[int, str, str]:
        target = a[-1]
        if target in self.busy:
            return 32, "", f"umount: {target}: target is busy."
        for m in reversed(self.mounted):
            if m.entry.target == target:
                self.mounted.remove(m)
                self.frozen.discard(target)
                return 0, "", ""
        return 32, "", f"umount: {target}: not mounted."

    def _fsfreeze(self, a: list[str]) -> tuple[int, str, str]:
        target = a[-1]
        if a[0] == "--freeze":
            self.frozen.add(target)
            return 0, "", ""
        if target not in self.frozen:
            return 1, "", f"fsfreeze: {target}: thaw failed: Invalid argument"
        self.frozen.discard(target)
        return 0, "", ""

    def _btrfs(self, a: list[str]) -> tuple[int, str, str]:
        """btrfs device scan, filesystem resize/df, balance: nothing to simulate; replace: the new
        device joins the filesystem mounted at the target."""
        if a[:2] == ["replace", "start"]:
            new_dev, target = a[-2], a[-1]
            for m in reversed(self.mounted):
                if m.entry.target == target and m.entry.source in self.loops:
                    fsid = self.filesystems[self.loops[m.entry.source][1]].fsid
                    self.filesystems[self.loops[new_dev][1]] = FakeFs("btrfs", fsid)
                    m.devices.add(self.devnum(new_dev))
                    return 0, "", ""
            return 1, "", f"ERROR: {target} is not a mounted btrfs"
        return 0, "", ""

    def _new_uuid(self, dev: str) -> tuple[int, str, str]:
        found = self.filesystems.get(self.loops[dev][1]) if dev in self.loops else None
        if found is None:
            return 1, "", f"{dev}: no filesystem"
        self.filesystems[self.loops[dev][1]] = FakeFs(found.fstype)
        return 0, "", ""

    def _blkid(self, a: list[str]) -> tuple[int, str, str]:
        ident = self._backing_of(a[-1])
        found = self.filesystems.get(ident) if ident is not None else None
        return (0, f"TYPE={found.fstype}\n", "") if found else (2, "", "")


def _ident(p: Path) -> loop.FileId:
    found = loop.identity(p)
    if found is None:
        raise FileNotFoundError(p)
    return found


def _ok(_k: FakeKernel, _a: list[str]) -> tuple[int, str, str]:
    return 0, "", ""


_COMMANDS: dict[str, Callable[[FakeKernel, list[str]], tuple[int, str, str]]] = {
    "losetup": FakeKernel._losetup,
    "mkfs.xfs": lambda k, a: k._mkfs("xfs", a),
    "mkfs.ext4": lambda k, a: k._mkfs("ext4", a),
    "mkfs.btrfs": lambda k, a: k._mkfs("btrfs", a),
    "mount": FakeKernel._mount,
    "umount": FakeKernel._umount,
    "fsfreeze": FakeKernel._fsfreeze,
    "blkid": FakeKernel._blkid,
    "xfs_admin": lambda k, a: k._new_uuid(a[-1]),  # xfs_admin -U generate DEV
    "tune2fs": lambda k, a: k._new_uuid(a[-1]),  # tune2fs -f -U random DEV
    "btrfs": FakeKernel._btrfs, "xfs_growfs": _ok, "resize2fs": _ok, "e2fsck": _ok,
}


def install(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    """Replace the kernel-reading wrappers by a fresh FakeKernel's, for this test only."""
    k = FakeKernel()
    monkeypatch.setattr(loop, "attached", k.attached)
    monkeypatch.setattr(loop, "backing_id", k.backing_id)
    monkeypatch.setattr(loop, "backing_id_of", k.backing_id_of)
    monkeypatch.setattr(loop, "_backing", k.backing)
    monkeypatch.setattr(loop, "devnum", k.devnum)
    monkeypatch.setattr(mounts, "table", k.table)
    monkeypatch.setattr(mounts, "_btrfs_members", k.btrfs_members)
    monkeypatch.setattr(mounts, "targets_of", k.targets_of)
    monkeypatch.setattr(fs, "statvfs_size", k.statvfs_size)
    monkeypatch.setattr(reflink, "clone", k.clone)
    monkeypatch.setattr(reflink, "set_cowextsize", lambda _p, _n: True)
    monkeypatch.setattr(reflink, "unshared_bytes", lambda _p: 0)
    monkeypatch.setattr(reflink, "allocated_bytes", lambda p: p.stat().st_blocks * 512)
    monkeypatch.setattr(reflink, "punch", lambda _p: None)
    monkeypatch.setattr(reflink, "shutdown", lambda _m: True)
    monkeypatch.setattr(btrfs_super, "new_fsid", k.new_fsid)

    def no_io_controller() -> qos.Hierarchy:
        raise VeritasError("fake kernel: no cgroup IO controller")

    monkeypatch.setattr(qos.Hierarchy, "detect", staticmethod(no_io_controller))

    def no_real_commands(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"fake kernel: a real command was run: {args}")

    monkeypatch.setattr(subprocess, "run", no_real_commands)  # a forgotten runner must not reach the host
    return k


class Killed:
    """An operation stopped for good at a crash point: its thread never runs again."""

    def __init__(self, thread: threading.Thread, error: list[BaseException]) -> None:
        self.thread = thread
        self.error = error


def kill_at(monkeypatch: pytest.MonkeyPatch, point: str, op: Callable[[], Any],
            abandon: Callable[[int], None]) -> Killed:
    """Run ``op`` until it reaches crash point ``point``, then kill it: it stops there forever and
    ``abandon(thread id)`` frees its locks, as the kernel frees a killed process's flocks.

    :raises AssertionError: if ``op`` ends or fails without reaching ``point``.
    """
    reached = threading.Event()
    never = threading.Event()
    real = crash.point

    def point_hook(name: str) -> None:
        real(name)
        if name == point and threading.current_thread() is runner:
            reached.set()
            never.wait()  # a killed process does nothing more

    error: list[BaseException] = []

    def body() -> None:
        try:
            op()
        except BaseException as exc:
            error.append(exc)
        finally:
            reached.set()

    monkeypatch.setattr(crash, "point", point_hook)
    runner = threading.Thread(target=body, daemon=True, name=f"killed-at-{point}")
    runner.start()
    assert reached.wait(30), f"operation never reached {point}"
    assert runner.is_alive(), f"operation ended without reaching {point}: {error}"
    assert runner.ident is not None
    abandon(runner.ident)
    monkeypatch.setattr(crash, "point", real)
    return Killed(runner, error)
