"""kill -9 at every named crash point of make, snap, grow, rm, mount, umount and adddisk; and a second
process opening the disk group while the operation is paused at each of them.

The crash points are discovered, not hard-coded: at collection time each operation runs once through the
real CLI with VERITAS_CRASH_TRACE in a private scratch disk group, and every point it passed becomes a
test id. Each test then builds a fresh disk group with a mounted bystander volume holding known data,
runs the operation with VERITAS_CRASH_AT=<point>, checks the CLI died by SIGKILL, runs the next start
(``veritas vol list``, which recovers abandoned intents), and checks that catalog, disks, loop devices and
mounts agree, that the operation was rolled back or forward as its kind demands, and that the bystander
is untouched.

The pause tests run the operation with VERITAS_PAUSE_AT=<point> instead: it blocks there holding its
locks while another process opens the disk group (which recovers what it judges abandoned); released,
the operation must finish as if nobody had looked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from storage import diskgroup, doctor, snapshots, volumes
from storage.config import Config, load_config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.kernel import fs, loop, mounts
from storage.units import MiB
from tests.integration.conftest import force_clean, leaks, record_loops

REPO = Path(__file__).resolve().parents[2]
DG = "testdg"
KEEP = "keep"  # the bystander volume
KEEP_DATA = hashlib.sha256(b"bystander").digest() * 8192  # 256 KiB of known bytes


# ------------------------------------------------------------------ helpers


def run_cli(config_path: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "VERITAS_CONFIG": str(config_path), **(env or {})}
    return subprocess.run(["python3", "-m", "storage.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}): {proc.stderr}"
    return proc


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def assert_writable(target: Path, timeout: float = 10) -> None:
    """Write and fsync a file on ``target`` in a child process; a frozen filesystem makes it hang."""
    probe = target / ".probe"
    proc = subprocess.Popen(["dd", "if=/dev/zero", f"of={probe}", "bs=4k", "count=1", "conv=fsync",
                             "status=none"])
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["fsfreeze", "--unfreeze", str(target)], capture_output=True, check=False)
        proc.kill()
        proc.wait(timeout=30)
        pytest.fail(f"{target} is not writable within {timeout} s: still frozen?")
    assert rc == 0, f"writing to {target} failed"
    probe.unlink()


def mounted(dg: DiskGroup, name: str) -> bool:
    return mounts.mounted_at(dg.mountpoint(name)) is not None


def vol_images(dg: DiskGroup, name: str) -> list[Path]:
    return [p for d in dg.catalog.disks() for p in (dg.disk_dir(d.name) / "vols").glob(f"{name}.*.img")]


def check_invariants(root: Path, dg: DiskGroup) -> None:
    """Catalog, image files, loop devices and mounts agree; nothing is frozen; nothing is over-committed."""
    assert dg.catalog.intents() == [], f"unfinished intents: {dg.catalog.intents()}"
    findings = doctor.check(dg)
    assert findings == [], "doctor: " + "; ".join(map(str, findings))
    disks = dg.catalog.disks()
    vols = {v.name: v for v in dg.catalog.volumes()}
    assert all(v.state == "ok" for v in vols.values()), vols
    sds = dg.catalog.subdisks()
    # (a) every subdisk row has its image, every image has its row
    wanted = {dg.image(sd.disk, sd.volume, sd.idx) for sd in sds}
    present = {p for d in disks for p in (dg.disk_dir(d.name) / "vols").iterdir()}
    assert wanted == present, f"rows without images: {wanted - present}; images without rows: {present - wanted}"
    for sd in sds:
        assert dg.image(sd.disk, sd.volume, sd.idx).stat().st_size == sd.size
    # (b) mounts: exactly the counted volumes and the disks; loop devices: disks and mounted volumes only
    counted = {m.volume for m in dg.catalog.mounts() if m.node == dg.node}
    is_up = {n for n in vols if mounted(dg, n)}
    assert counted == is_up, f"catalog counts mounts of {counted}, kernel has {is_up}"
    prefix = str(root) + "/"
    expected_targets = {str(dg.disk_dir(d.name)) for d in disks} | {str(dg.mountpoint(n)) for n in is_up}
    extra = [e.target for e in mounts.table() if e.target.startswith(prefix) and e.target not in expected_targets]
    assert not extra, f"unexpected mounts: {extra}"
    root_mounts = [e.target for e in mounts.table() if e.target.startswith(str(dg.config.mount_root) + "/")]
    assert sorted(root_mounts) == sorted(str(dg.mountpoint(n)) for n in is_up)
    mount_root = dg.config.mount_root
    left_dirs = sorted(str(p) for p in mount_root.iterdir()) if mount_root.is_dir() else []
    assert left_dirs == sorted(root_mounts), f"mount points left behind: {set(left_dirs) - set(root_mounts)}"
    scratch = dg.root / "tmp"
    assert not scratch.is_dir() or not list(scratch.iterdir()), f"scratch left: {list(scratch.iterdir())}"
    allowed = {d.source for d in disks if d.kind == "file"}
    allowed |= {str(dg.image(sd.disk, sd.volume, sd.idx)) for sd in sds if sd.volume in is_up}
    stray = {dev: back for dev, back in loop.attached().items() if back.startswith(prefix) and back not in allowed}
    assert not stray, f"loop devices on images of unmounted volumes or on unknown files: {stray}"
    for n in is_up:
        assert_writable(dg.mountpoint(n))
    # no over-commit
    cap, used = dg.capacity(), dg.catalog.reserved()
    for disk, n in used.items():
        assert n <= cap[disk], f"disk {disk}: {n} reserved > {cap[disk]} capacity"


def check_bystander(dg: DiskGroup) -> None:
    """(d) the bystander is mounted, counted, and its data intact, in cache and on disk."""
    assert mounted(dg, KEEP)
    assert [m.mount_id for m in dg.catalog.mounts(KEEP)] == ["admin"]
    assert (dg.mountpoint(KEEP) / "data.bin").read_bytes() == KEEP_DATA
    volumes.umount(dg, KEEP)
    assert not mounted(dg, KEEP)
    mp = volumes.mount(dg, KEEP)
    assert (mp / "data.bin").read_bytes() == KEEP_DATA


class Writer:
    """A process appending to a file on a mounted volume until told to stop (through a file elsewhere)."""

    CODE = (
        "import os, sys, time\n"
        "path, stop = sys.argv[1], sys.argv[2]\n"
        "n = 0\n"
        "with open(path, 'a') as fh:\n"
        "    while not os.path.exists(stop):\n"
        "        fh.write(f'{n:08d}\\n'); fh.flush(); n += 1\n"
        "        if n % 32 == 0: os.fsync(fh.fileno())\n"
        "        time.sleep(0.002)\n"
    )

    def __init__(self, target: Path, stop: Path) -> None:
        self.target, self.path, self.stop_file = target, target / "live.log", stop
        self.stop_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["python3", "-c", self.CODE, str(self.path), str(stop)])
        self.wait_progress()

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_progress(self, timeout: float = 10) -> None:
        start = self.size()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.size() > start + 64:
                return
            assert self.proc.poll() is None, "writer died"
            time.sleep(0.02)
        pytest.fail(f"writer on {self.target} made no progress in {timeout} s: filesystem still frozen?")

    def stop(self) -> None:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            subprocess.run(["fsfreeze", "--unfreeze", str(self.target)], capture_output=True, check=False)
            self.proc.kill()
            self.proc.wait(timeout=30)


# ------------------------------------------------------------------ the operations


@dataclass
class Ctx:
    """What one operation's scenario needs: where to run, and what its setup left behind."""

    root: Path
    config_path: Path
    dg: DiskGroup
    data: dict[str, Any] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config_path, *args, env=env)


@dataclass(frozen=True)
class Op:
    name: str
    prefix: tuple[str, ...]  # every point the operation passes starts with one of these
    required: tuple[str, ...]  # points discovery must find at least (a sanity check of discovery itself)
    setup: Callable[[Ctx], None]
    argv: Callable[[Ctx], list[str]]
    verify: Callable[[Ctx, bool], None]  # (ctx, completed) after the crash and the next start


def _make_vol(c: Ctx, name: str, size: str = "300m", mount: bool = False, **opts: Any) -> None:
    volumes.make(c.dg, name, size, **opts)
    mp = volumes.mount(c.dg, name)
    write_file(mp / "data.bin", name.encode() * 4096)
    if not mount:
        volumes.umount(c.dg, name)


def _check_data(c: Ctx, name: str) -> None:
    assert (c.dg.mountpoint(name) / "data.bin").read_bytes() == name.encode() * 4096


def _with_mounted(c: Ctx, name: str, fn: Callable[[Path], None]) -> None:
    """Mount ``name`` through the CLI, run ``fn`` on its mount point, unmount it through the CLI."""
    ok(c.cli("vol", "mount", "-g", DG, name, "--id", "check"))
    try:
        fn(c.dg.mountpoint(name))
    finally:
        ok(c.cli("vol", "umount", "-g", DG, name, "--id", "check"))
    assert not mounted(c.dg, name)


# make ------------------------------------------------------------


def _verify_make(c: Ctx, completed: bool) -> None:
    v = c.dg.catalog.volume("mk")
    if completed:
        assert v is not None and v.state == "ok"
    else:
        assert v is None, f"make not rolled back: {v}"
        assert vol_images(c.dg, "mk") == []
        ok(c.cli("vol", "make", "-g", DG, "mk", "300m"))
    assert not mounted(c.dg, "mk")

    def use(mp: Path) -> None:
        write_file(mp / "f", b"new volume works")
        assert (mp / "f").read_bytes() == b"new volume works"
    _with_mounted(c, "mk", use)


MAKE = Op("make", ("make.",), ("make.recorded", "make.mkfs"),
          lambda c: None, lambda c: ["vol", "make", "-g", DG, "mk", "300m"], _verify_make)


# snap ------------------------------------------------------------


def _setup_snap(c: Ctx) -> None:
    _make_vol(c, "src", mount=True)
    w = Writer(c.dg.mountpoint("src"), c.root / "writer.stop")
    c.data["writer"] = w
    c.cleanups.append(w.stop)


def _verify_snap(c: Ctx, completed: bool) -> None:
    w: Writer = c.data["writer"]
    w.wait_progress()  # the source is thawed and its writer runs again
    assert mounted(c.dg, "src")
    _check_data(c, "src")
    v = c.dg.catalog.volume("snp")
    if completed:
        assert v is not None and v.state == "ok" and v.snapshot_of == "src"
    else:
        assert v is None, f"snapshot not rolled back: {v}"
        assert vol_images(c.dg, "snp") == []
        ok(c.cli("snap", "make", "-g", DG, "src", "snp"))
        w.wait_progress()
    assert not mounted(c.dg, "snp")

    def consistent(mp: Path) -> None:
        assert (mp / "data.bin").read_bytes() == b"src" * 4096
        frozen = (mp / "live.log").read_bytes()  # the source's log as of the freeze: a prefix of it now
        assert frozen and (c.dg.mountpoint("src") / "live.log").read_bytes().startswith(frozen)
    _with_mounted(c, "snp", consistent)
    w.wait_progress()


SNAP = Op("snap", ("snap.",), ("snap.recorded", "snap.frozen"),
          _setup_snap, lambda c: ["snap", "make", "-g", DG, "src", "snp"], _verify_snap)


# grow ------------------------------------------------------------


def _setup_grow(name: str, size: str, mount: bool, **opts: Any) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        _make_vol(c, name, size, mount=True, **opts)
        c.data["total"] = fs.statvfs_size(c.dg.mountpoint(name))[0]
        if not mount:
            volumes.umount(c.dg, name)
    return setup


def _verify_grow(name: str, old: int, new: int, mount: bool) -> Callable[[Ctx, bool], None]:
    def verify(c: Ctx, completed: bool) -> None:
        info = json.loads(ok(c.cli("--json", "vol", "info", "-g", DG, name)).stdout)  # rolled forward, always
        assert info["size"] == new, f"size {info['size']}, expected {new}"
        assert [sd["size"] for sd in info["subdisks"]] == [new]
        assert Path(info["subdisks"][0]["image"]).stat().st_size == new
        assert info["mounted"] == mount

        def grown(mp: Path) -> None:
            total = fs.statvfs_size(mp)[0]
            assert total >= c.data["total"] + (new - old) * 8 // 10, \
                f"filesystem not grown: {total} bytes, was {c.data['total']}"
            assert (mp / "data.bin").read_bytes() == name.encode() * 4096
        if mount:
            grown(c.dg.mountpoint(name))
            assert_writable(c.dg.mountpoint(name))
        else:
            _with_mounted(c, name, grown)
    return verify


GROW_POINTS = ("grow.recorded", "grow.fs")
GROW_MOUNTED = Op("grow_mounted", ("grow.",), GROW_POINTS, _setup_grow("gm", "300m", True),
                  lambda c: ["vol", "grow", "-g", DG, "gm", "400m"], _verify_grow("gm", 300 * MiB, 400 * MiB, True))
GROW_UNMOUNTED = Op("grow_unmounted", ("grow.",), GROW_POINTS, _setup_grow("gu", "300m", False),
                    lambda c: ["vol", "grow", "-g", DG, "gu", "400m"],
                    _verify_grow("gu", 300 * MiB, 400 * MiB, False))
GROW_EXT4 = Op("grow_ext4", ("grow.",), GROW_POINTS, _setup_grow("ge", "200m", False, fstype="ext4"),
               lambda c: ["vol", "grow", "-g", DG, "ge", "260m"], _verify_grow("ge", 200 * MiB, 260 * MiB, False))


# rm --------------------------------------------------------------


def _verify_rm(name: str) -> Callable[[Ctx, bool], None]:
    def verify(c: Ctx, completed: bool) -> None:
        assert c.dg.catalog.volume(name) is None, "rm not rolled forward"
        assert vol_images(c.dg, name) == []
        assert not mounted(c.dg, name)
        assert not c.dg.mountpoint(name).exists()
        assert c.dg.catalog.mounts(name) == []
        ok(c.cli("vol", "make", "-g", DG, name, "300m"))  # the name and the space are free again
    return verify


RM_POINTS = ("rm.recorded", "rm.images")
RM = Op("rm", ("rm.",), RM_POINTS, lambda c: _make_vol(c, "rmu"), lambda c: ["vol", "rm", "-g", DG, "rmu"],
        _verify_rm("rmu"))
RM_MOUNTED = Op("rm_mounted", ("rm.",), RM_POINTS, lambda c: _make_vol(c, "rmm", mount=True),
                lambda c: ["vol", "rm", "-g", DG, "rmm", "--force"], _verify_rm("rmm"))


# mount / umount --------------------------------------------------


def _verify_mount(c: Ctx, completed: bool) -> None:
    ids = [m.mount_id for m in c.dg.catalog.mounts("mnt")]
    if completed:
        assert ids == ["c1"] and mounted(c.dg, "mnt")
    else:
        assert ids == [] and not mounted(c.dg, "mnt"), "mount not rolled back"
        assert not c.dg.mountpoint("mnt").exists()
        ok(c.cli("vol", "mount", "-g", DG, "mnt", "--id", "c1"))
    _check_data(c, "mnt")
    assert_writable(c.dg.mountpoint("mnt"))
    ok(c.cli("vol", "umount", "-g", DG, "mnt", "--id", "c1"))
    assert not mounted(c.dg, "mnt")


MOUNT = Op("mount", ("mount.",), ("mount.recorded", "mount.mounted"),
           lambda c: _make_vol(c, "mnt"), lambda c: ["vol", "mount", "-g", DG, "mnt", "--id", "c1"], _verify_mount)


def _setup_mount_snap(c: Ctx) -> None:
    _make_vol(c, "msrc", mount=True)
    snapshots.make(c.dg, "msrc", "msnap")  # through the library; its first mount goes through the CLI


def _verify_mount_snap(c: Ctx, completed: bool) -> None:
    """The first mount of a snapshot (which gives it its own filesystem identity) rolls back like any mount."""
    ids = [m.mount_id for m in c.dg.catalog.mounts("msnap")]
    if completed:
        assert ids == ["c1"] and mounted(c.dg, "msnap")
    else:
        assert ids == [] and not mounted(c.dg, "msnap"), "mount not rolled back"
        ok(c.cli("vol", "mount", "-g", DG, "msnap", "--id", "c1"))
    # beside its mounted source, with the source's data, and its own from now on
    assert mounted(c.dg, "msrc")
    assert (c.dg.mountpoint("msnap") / "data.bin").read_bytes() == b"msrc" * 4096
    write_file(c.dg.mountpoint("msnap") / "data.bin", b"snap")
    _check_data(c, "msrc")
    ok(c.cli("vol", "umount", "-g", DG, "msnap", "--id", "c1"))

    def kept(mp: Path) -> None:
        assert (mp / "data.bin").read_bytes() == b"snap"
    _with_mounted(c, "msnap", kept)


MOUNT_SNAP = Op("mount_snapshot", ("mount.", "identity."), ("mount.recorded", "mount.mounted"),
                _setup_mount_snap, lambda c: ["vol", "mount", "-g", DG, "msnap", "--id", "c1"], _verify_mount_snap)


def _verify_umount(c: Ctx, completed: bool) -> None:
    assert c.dg.catalog.mounts("umt") == [], "umount not rolled forward"
    assert not mounted(c.dg, "umt")
    assert not c.dg.mountpoint("umt").exists()
    _with_mounted(c, "umt", lambda mp: _check_data(c, "umt"))


UMOUNT = Op("umount", ("umount.",), ("umount.recorded",),
            lambda c: _make_vol(c, "umt", mount=True), lambda c: ["vol", "umount", "-g", DG, "umt"], _verify_umount)


# adddisk ---------------------------------------------------------


def _extra_disk(c: Ctx) -> Path:
    return c.root / "extra-disk.img"


def _verify_adddisk(c: Ctx, completed: bool) -> None:
    img = _extra_disk(c)
    names = [d.name for d in c.dg.catalog.disks()]
    if completed:
        assert len(names) == 4
    else:
        assert len(names) == 3, f"adddisk not rolled back: {names}"
        assert not loop.find(img)
        assert mounts.mounted_at(c.dg.disk_dir(f"{DG}04")) is None
        # the image veritas created may now carry the half-made XFS: adding it again needs --force
        ok(c.cli("dg", "adddisk", DG, f"{img}=2g", "--force"))
    disks = c.dg.catalog.disks()
    assert [d.state for d in disks] == ["online"] * 4
    assert disks[-1].source == str(img)
    assert mounts.mounted_at(c.dg.disk_dir(disks[-1].name)) is not None
    assert c.dg.free()[disks[-1].name] > 1024 * MiB


ADDDISK = Op("adddisk", ("adddisk.",), ("adddisk.recorded",), lambda c: None,
             lambda c: ["dg", "adddisk", DG, f"{_extra_disk(c)}=2g"], _verify_adddisk)


OPS = {op.name: op for op in (MAKE, SNAP, GROW_MOUNTED, GROW_UNMOUNTED, GROW_EXT4, RM, RM_MOUNTED, MOUNT,
                              MOUNT_SNAP, UMOUNT, ADDDISK)}


# ------------------------------------------------------------------ discovery


def _write_config(root: Path) -> Path:
    path = root / "veritas.conf"
    path.write_text(f"[storage]\ndiskgroup = {DG}\nstate_root = {root}/state\nmount_root = {root}/mnt\n"
                    "default_disk_size = 4g\ndefault_disk_count = 3\n[node]\nname = node1\n")
    return path


def _new_dg(root: Path, config: Config) -> DiskGroup:
    (root / "disks").mkdir(exist_ok=True)
    specs = [DiskSpec.parse(f"{root}/disks/{DG}-d{i}.img=4g") for i in (1, 2, 3)]
    dg = diskgroup.init(config, DG, specs)
    mp = volumes.mount(dg, volumes.make(dg, KEEP, "200m", fstype="ext4").name)
    write_file(mp / "data.bin", KEEP_DATA)
    return dg


_DISCOVERED: dict[str, list[str]] | None = None
_DISCOVERY_ERROR = ""


def discover() -> dict[str, list[str]]:
    """Run each operation once, uninterrupted, with VERITAS_CRASH_TRACE; the points each one passed."""
    global _DISCOVERED, _DISCOVERY_ERROR
    if _DISCOVERED is not None:
        return _DISCOVERED
    _DISCOVERED = {name: [] for name in OPS}
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        _DISCOVERY_ERROR = "discovery needs root and losetup"
        return _DISCOVERED
    record_loops()  # at collection no test recorded them: a loop stranded before discovery is not its leak
    root = Path(tempfile.mkdtemp(prefix="vcrash-discover-", dir="/tmp"))
    config_path = _write_config(root)
    dg = None
    try:
        dg = _new_dg(root, load_config(config_path))
        for name, op in OPS.items():
            c = Ctx(root, config_path, dg)
            trace = root / f"trace-{name}"
            try:
                op.setup(c)
                ok(c.cli(*op.argv(c), env={"VERITAS_CRASH_TRACE": str(trace)}))
            finally:
                for fn in reversed(c.cleanups):
                    fn()
            _DISCOVERED[name] = trace.read_text().split() if trace.exists() else []
    except Exception as exc:  # reported by test_discovery, never a collection error
        _DISCOVERY_ERROR = f"discovery failed: {exc!r}"
    finally:
        try:
            if dg is not None:
                for m in dg.catalog.mounts():
                    dg.catalog.remove_mount(m.volume, m.node, m.mount_id)
                diskgroup.destroy(dg, force=True)
        except Exception as exc:
            _DISCOVERY_ERROR += f" cleanup failed: {exc!r}"
        left = leaks(root)
        force_clean(root)
        if left:
            _DISCOVERY_ERROR += f" discovery leaked {left}"
        shutil.rmtree(root, ignore_errors=True)
    return _DISCOVERED



def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture in ("crash_case", "pause_case"):
        if fixture in metafunc.fixturenames:
            found = discover()
            cases = [(name, point) for name in OPS for point in (found[name] or ["<none-discovered>"])]
            metafunc.parametrize(fixture, cases, ids=[f"{n}-{p}" for n, p in cases])


# ------------------------------------------------------------------ tests


def test_discovery() -> None:
    found = discover()
    assert not _DISCOVERY_ERROR, _DISCOVERY_ERROR
    for name, op in OPS.items():
        points = found[name]
        assert points, f"{name}: no crash points traced"
        assert all(p.startswith(op.prefix) for p in points), f"{name}: {points}"
        assert len(set(points)) == len(points), f"{name} passes a point twice: {points}"
        missing = set(op.required) - set(points)
        assert not missing, f"{name}: expected points {sorted(missing)} not traced (got {points})"


def test_crash_point(env: Any, crash_case: tuple[str, str]) -> None:
    name, point = crash_case
    assert not _DISCOVERY_ERROR and point != "<none-discovered>", _DISCOVERY_ERROR or "no crash points"
    op = OPS[name]
    dg = _new_dg(env.root, env.config)
    c = Ctx(env.root, env.config_path, dg)
    try:
        op.setup(c)
        proc = c.cli(*op.argv(c), env={"VERITAS_CRASH_AT": point})
        assert proc.returncode == -signal.SIGKILL, \
            f"expected SIGKILL at {point}, got {proc.returncode}: {proc.stderr}"
        # the next start recovers what the killed process left
        rec = ok(c.cli("vol", "list", "-g", DG))
        assert "recovery" not in rec.stderr, rec.stderr
        check_invariants(env.root, dg)
        op.verify(c, point == f"{op.prefix[0]}done")  # killed after the operation completed
        for fn in reversed(c.cleanups):
            fn()
        c.cleanups.clear()
        check_invariants(env.root, dg)
        check_bystander(dg)
        again = diskgroup.open_dg(env.config, DG)  # another start: nothing left to recover
        try:
            check_invariants(env.root, again)
        finally:
            again.close()
    finally:
        for fn in reversed(c.cleanups):
            fn()
        dg.close()


def _wait_reached(proc: subprocess.Popen[str], reached: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not reached.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"operation ended ({proc.returncode}) before its pause point: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"operation did not reach its pause point within {timeout} s")
        time.sleep(0.02)


def test_open_while_paused(env: Any, pause_case: tuple[str, str]) -> None:
    """A live operation is never recovered by someone else: another process opens the disk group while
    the operation waits at ``point`` with its locks held, and the operation then completes intact."""
    name, point = pause_case
    assert not _DISCOVERY_ERROR and point != "<none-discovered>", _DISCOVERY_ERROR or "no crash points"
    op = OPS[name]
    dg = _new_dg(env.root, env.config)
    c = Ctx(env.root, env.config_path, dg)
    release = env.root / "release"
    proc: subprocess.Popen[str] | None = None
    try:
        op.setup(c)
        full_env = {**os.environ, "VERITAS_CONFIG": str(env.config_path), "VERITAS_PAUSE_AT": point,
                    "VERITAS_PAUSE_FILE": str(release)}
        proc = subprocess.Popen(["python3", "-m", "storage.cli", *op.argv(c)], cwd=REPO, env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_reached(proc, Path(f"{release}.reached"))
        opener = c.cli("vol", "list", "-g", DG)  # opens the disk group: recovers abandoned intents
        assert opener.returncode == 0, opener.stderr
        assert "recovery" not in opener.stderr, opener.stderr
        assert proc.poll() is None, "the paused operation ended while paused"
        release.touch()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{op.argv(c)} failed after the opener ran ({proc.returncode}): {err}"
        check_invariants(env.root, dg)
        op.verify(c, True)
        for fn in reversed(c.cleanups):
            fn()
        c.cleanups.clear()
        check_invariants(env.root, dg)
        check_bystander(dg)
    finally:
        release.touch()
        if proc is not None and proc.poll() is None:
            try:
                proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        for fn in reversed(c.cleanups):
            fn()
        dg.close()
