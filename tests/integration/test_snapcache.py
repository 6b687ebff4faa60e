"""Snapshot cache overflow: a source rewritten far past its snapshot's cache must not take the disk from
the other volumes on it. The snapshot is invalidated (or, with autogrow, grown) in time.

A single small disk (1200 MiB image, about 1 GiB of capacity) holds a 400 MiB source, written full, its
snapshot with a 40 MiB cache, and a bystander volume that takes the rest of the disk's capacity. fio then
rewrites the source with direct 4 KiB writes at random offsets as fast as it can (it would unshare
300 MiB), while the bystander writes 8 MiB chunks with fsync and reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage import snapcache, snapshots, volumes
from storage.diskgroup import DiskGroup
from storage.errors import SnapshotInvalid
from storage.kernel import reflink
from storage.units import MiB

FILL_MIB = 300  # of the source's ~330 MiB of usable space
CHUNK_MIB = 8


def dd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dd", *args, "status=none"], capture_output=True, text=True, check=False)


@dataclass
class Bystander:
    """Writes ``chunks`` chunks of ``CHUNK_MIB`` into ``path`` with direct I/O and fsync, each checked."""

    path: Path
    pattern: Path
    chunks: int
    pace: float = 0.0  # seconds between chunk starts: keeps allocating while the source is rewritten
    errors: list[str] = field(default_factory=list)
    written: int = 0

    def run(self) -> None:
        start = time.monotonic()
        for i in range(self.chunks):
            time.sleep(max(0.0, start + i * self.pace - time.monotonic()))
            p = dd(f"if={self.pattern}", f"of={self.path}", "bs=1M", f"count={CHUNK_MIB}", f"seek={i * CHUNK_MIB}",
                   "conv=fsync,notrunc", "oflag=direct")
            if p.returncode != 0 or p.stderr.strip():
                self.errors.append(f"chunk {i}: exit {p.returncode}: {p.stderr.strip()}")
                return
            self.written += 1

    def verify(self) -> None:
        want = hashlib.sha256(self.pattern.read_bytes()).hexdigest()
        for i in range(self.written):
            p = subprocess.run(["dd", f"if={self.path}", "bs=1M", f"count={CHUNK_MIB}", f"skip={i * CHUNK_MIB}",
                                "iflag=direct", "status=none"], capture_output=True, check=False)
            assert p.returncode == 0, p.stderr
            assert hashlib.sha256(p.stdout).hexdigest() == want, f"bystander chunk {i} reads back wrong"


def fio_rewrite(target: Path, seconds: int) -> subprocess.Popen[bytes]:
    """Rewrite ``target`` with direct 4 KiB writes at random offsets as fast as fio can, for ``seconds``."""
    return subprocess.Popen(["fio", "--name=rewrite", f"--filename={target}", "--rw=randwrite", "--bs=4k",
                             "--direct=1", "--ioengine=libaio", "--iodepth=32", f"--size={FILL_MIB}m",
                             "--time_based", f"--runtime={seconds}", "--output=/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def setup_disk(env, bystander: str, cachesize: str = "40m", autogrow: bool = False,
               disk: str = "1200m") -> tuple[DiskGroup, Path, Path]:
    """One small disk: the source written full, its snapshot, a bystander volume; returns the mounts."""
    dg = env.make_dg(ndisks=1, size=disk)
    volumes.make(dg, "src", "400m")
    volumes.make(dg, "by", bystander)
    src = volumes.mount(dg, "src")
    by = volumes.mount(dg, "by")
    p = dd("if=/dev/urandom", f"of={src / 'fill'}", "bs=1M", f"count={FILL_MIB}", "oflag=direct")
    assert p.returncode == 0, p.stderr
    snapshots.make(dg, "src", "snap", cachesize, autogrow=autogrow)
    return dg, src, by


def run_overflow(env, dg: DiskGroup, src: Path, by: Path, chunks: int, watch: bool,
                 seconds: int = 8) -> tuple[Bystander, subprocess.Popen[bytes], snapcache.Watcher | None]:
    pattern = env.root / "pattern"
    pattern.write_bytes(os.urandom(CHUNK_MIB * MiB))
    watcher = None
    if watch:
        watcher = snapcache.Watcher(lambda: env.open("testdg"))
        watcher.start()
        deadline = time.monotonic() + 30
        while watcher.passes == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    bystander = Bystander(by / "data", pattern, chunks, pace=seconds / chunks)
    writer = fio_rewrite(src / "fill", seconds)
    t = threading.Thread(target=bystander.run)
    t.start()
    try:
        writer.wait(timeout=seconds + 120)
        t.join(timeout=300)
    finally:
        if writer.poll() is None:  # a failed wait: end our fio (by its PID) before the mounts go
            writer.kill()
            writer.wait()
        if watcher is not None:
            watcher.stop()
            watcher.join(timeout=30)
    return bystander, writer, watcher


def test_overflowing_snapshot_is_invalidated_and_the_bystander_never_sees_enospc(env):
    # the bystander takes the rest of the disk's capacity and writes 440 MiB of it
    dg = None
    try:
        dg, src, by = setup_disk(env, bystander="575m")
        assert sum(dg.free().values()) < 32 * MiB, dg.free()  # the disk is fully reserved
        bystander, writer, _ = run_overflow(env, dg, src, by, chunks=55, watch=True)
        assert bystander.errors == [], f"the bystander volume failed to write: {bystander.errors}"
        assert bystander.written == 55
        bystander.verify()
        assert writer.returncode == 0, f"the source's writer failed: {writer.stderr.read() if writer.stderr else ''}"

        snap = dg.catalog.volume("snap")
        assert snap is not None and "ran out" in snap.invalid, snap
        # its space is back: images punched, reservation returned
        sd = dg.catalog.subdisks("snap")[0]
        assert reflink.allocated_bytes(dg.image(sd.disk, "snap", 0)) == 0
        assert sd.reserved == 0
        # it says so, and refuses to mount with the reason
        info = env.cli("vol", "info", "snap").stdout
        assert "invalid: its cache of 40M" in info, info
        with pytest.raises(SnapshotInvalid, match="snapshot snap is invalid and cannot be mounted: its cache"):
            volumes.mount(dg, "snap")
        proc = env.cli("vol", "mount", "snap", check=False)
        assert proc.returncode == SnapshotInvalid.exit_code and "is invalid" in proc.stderr
        assert not volumes.is_mounted(dg, "snap")
        # the source kept running: still mounted, readable and writable
        assert volumes.is_mounted(dg, "src")
        (src / "after").write_bytes(b"still here")
        assert (src / "after").read_bytes() == b"still here"
        volumes.remove(dg, "snap")
    finally:
        if dg is not None:
            for name in ("src", "by"):
                volumes.umount(dg, name, force=True)
            dg.close()


def test_autogrow_grows_the_cache_from_free_space_and_the_bystander_never_sees_enospc(env):
    # a larger disk leaves room for the snapshot to diverge by its whole source (data, log, metadata)
    dg = None
    try:
        dg, src, by = setup_disk(env, bystander="300m", autogrow=True, disk="1400m")
        assert dg.catalog.volume("snap").autogrow  # type: ignore[union-attr]
        bystander, writer, _ = run_overflow(env, dg, src, by, chunks=25, watch=True)
        assert bystander.errors == [], f"the bystander volume failed to write: {bystander.errors}"
        assert bystander.written == 25
        bystander.verify()
        assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""

        snap = dg.catalog.volume("snap")
        assert snap is not None and snap.invalid == "", snap.invalid
        used = volumes.info(dg, "snap")["cache_used"]
        assert used > 120 * MiB, f"the writer unshared only {used} bytes, not far past the 40 MiB cache"
        assert snap.cachesize >= used, (snap.cachesize, used)
        assert dg.catalog.subdisks("snap")[0].reserved == snap.cachesize
        info = env.cli("--json", "vol", "info", "snap").stdout
        assert '"autogrow": true' in info and '"invalid": ""' in info
        # still a good snapshot: it mounts and holds the source's data as it was
        smp = volumes.mount(dg, "snap")
        assert (smp / "fill").stat().st_size == FILL_MIB * MiB
        volumes.umount(dg, "snap")
    finally:
        if dg is not None:
            for name in ("src", "by"):
                volumes.umount(dg, name, force=True)
            dg.close()


def test_a_mounted_snapshot_that_runs_out_is_shut_down_and_released(env):
    """Its filesystem cannot be unmounted from under its user: it is shut down (I/O fails with EIO, so
    nothing reads the released blocks), its blocks released, and it unmounts normally afterwards."""
    dg = None
    try:
        # the first mount gives the snapshot its own XFS identity, which rewrites its 64 MiB log
        dg, src, by = setup_disk(env, bystander="500m", cachesize="100m")
        smp = volumes.mount(dg, "snap")
        assert (smp / "fill").stat().st_size == FILL_MIB * MiB
        bystander, writer, _ = run_overflow(env, dg, src, by, chunks=40, watch=True)
        assert bystander.errors == [], f"the bystander volume failed to write: {bystander.errors}"
        bystander.verify()
        assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""

        snap = dg.catalog.volume("snap")
        assert snap is not None and "ran out" in snap.invalid
        assert volumes.is_mounted(dg, "snap")
        with pytest.raises(OSError) as exc:
            with open(smp / "fill", "rb") as fh:
                fh.read(4096)
        assert exc.value.errno == 5  # EIO
        assert reflink.allocated_bytes(dg.image(dg.catalog.subdisks("snap")[0].disk, "snap", 0)) == 0
        with pytest.raises(SnapshotInvalid):
            volumes.mount(dg, "snap", "another-id")
        volumes.umount(dg, "snap")
        assert not volumes.is_mounted(dg, "snap") and volumes.devices(dg, snap) == []
        volumes.remove(dg, "snap")
    finally:
        if dg is not None:
            for name in ("snap", "src", "by"):
                if dg.catalog.volume(name) is not None:
                    volumes.umount(dg, name, force=True)
            dg.close()


def test_the_plugin_process_watches_snapshot_caches_on_its_own():
    """The long-lived watcher runs in ``veritas plugin serve`` itself: with no CLI call in between (each
    CLI call runs a pass of its own), a snapshot created through the plugin and overrun is invalid in
    its Get Status, refuses Mount with the reason, and the bystander never fails. No dockerd is needed:
    the plugin serves the protocol on its socket while the engine it names is absent."""
    import tempfile

    from storage.config import load_config
    from tests.integration.conftest import finish
    from tests.integration.dockerstack import PluginProcess

    root = Path(tempfile.mkdtemp(prefix="vsnapplug-", dir="/tmp"))
    sock = root / "plugins" / "veritas.sock"
    path = root / "veritas.conf"
    path.write_text("[storage]\ndiskgroup = plugdg\n"
                    f"state_root = {root}/state\nmount_root = {root}/mnt\n"
                    "default_disk_size = 1200m\ndefault_disk_count = 1\n"
                    "[node]\nname = node1\n"
                    f"[plugin]\nsocket = {sock}\ndocker_host = unix://{root}/no-docker.sock\nworkers = 1\n")
    config = load_config(path)
    plugin = PluginProcess(path, sock, root / "plugin.log")
    try:
        plugin.start()

        def call(endpoint: str, **body: object) -> dict:
            reply = plugin.call(f"VolumeDriver.{endpoint}", body)
            assert reply.get("Err", "") == "" or endpoint == "Mount", f"{endpoint} {body}: {reply}"
            return reply

        call("Create", Name="src", Opts={"size": "400m"})
        call("Create", Name="by", Opts={"size": "575m"})
        src = Path(call("Mount", Name="src", ID="m-src")["Mountpoint"])
        by = Path(call("Mount", Name="by", ID="m-by")["Mountpoint"])
        p = dd("if=/dev/urandom", f"of={src / 'fill'}", "bs=1M", f"count={FILL_MIB}", "oflag=direct")
        assert p.returncode == 0, p.stderr
        call("Create", Name="snap", Opts={"sourcevol": "src", "cachesize": "40m"})
        assert call("Get", Name="snap")["Volume"]["Status"]["state"] == "valid"

        pattern = root / "pattern"
        pattern.write_bytes(os.urandom(CHUNK_MIB * MiB))
        bystander = Bystander(by / "data", pattern, 55, pace=8 / 55)
        writer = fio_rewrite(src / "fill", 8)
        try:
            bystander.run()
            writer.wait(timeout=120)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert bystander.errors == [], f"the bystander volume failed to write: {bystander.errors}"
        bystander.verify()
        assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""

        status = call("Get", Name="snap")["Volume"]["Status"]
        assert status["state"] == "invalid" and "ran out" in status["invalid"], status
        assert status["autogrow"] is False
        refused = call("Mount", Name="snap", ID="m-snap")
        assert "snapshot snap is invalid and cannot be mounted" in refused["Err"], refused
        assert "snapshot snap invalidated" in (root / "plugin.log").read_text()

        # autogrow is a snapshot option of Create, and Get reports it
        call("Remove", Name="snap")
        call("Create", Name="snap2", Opts={"sourcevol": "src", "cachesize": "40m", "autogrow": "on"})
        status = call("Get", Name="snap2")["Volume"]["Status"]
        assert status["autogrow"] is True and status["state"] == "valid", status
        call("Create", Name="snap2", Opts={"sourcevol": "src", "cachesize": "40m", "autogrow": "on"})  # same
        conflict = plugin.call("VolumeDriver.Create",
                               {"Name": "snap2", "Opts": {"sourcevol": "src", "autogrow": "off"}})
        assert "autogrow=True (asked off)" in conflict["Err"], conflict
        bad = plugin.call("VolumeDriver.Create", {"Name": "snap3", "Opts": {"sourcevol": "src", "autogrow": "maybe"}})
        assert "autogrow must be on or off" in bad["Err"], bad
        call("Remove", Name="snap2")
        for name, mid in (("src", "m-src"), ("by", "m-by")):
            call("Unmount", Name=name, ID=mid)
    finally:
        plugin.stop()
        finish(config, root)


def test_each_cli_call_checks_snapshot_caches(env):
    """With no plugin running, the next CLI call finds the overrun snapshot and invalidates it before it
    answers: ``vol list`` shows it invalid, ``vol info`` says why, and its reservation is back."""
    dg = env.make_dg(ndisks=1, size="1200m")
    try:
        volumes.make(dg, "src", "400m")
        src = volumes.mount(dg, "src")
        p = dd("if=/dev/urandom", f"of={src / 'fill'}", "bs=1M", "count=100", "oflag=direct")
        assert p.returncode == 0, p.stderr
        env.cli("snap", "make", "src", "snap", "cachesize=20m")
        free = sum(dg.free().values())
        # rewrite 60 MiB in place: three times the cache, well within the disk
        p = dd("if=/dev/urandom", f"of={src / 'fill'}", "bs=1M", "count=60", "oflag=direct", "conv=notrunc")
        assert p.returncode == 0, p.stderr
        assert dg.catalog.volume("snap").invalid == ""  # type: ignore[union-attr]  # nobody looked yet
        header, *lines = env.cli("vol", "list").stdout.splitlines()
        rows = {line.split()[0]: dict(zip(header.split(), line.split(), strict=True)) for line in lines}
        assert rows["snap"]["STATE"] == "invalid", rows
        assert "ran out" in dg.catalog.volume("snap").invalid  # type: ignore[union-attr]
        assert sum(dg.free().values()) == free + 20 * MiB
        info = json.loads(env.cli("--json", "vol", "info", "snap").stdout)
        assert "its cache of 20M on disk" in info["invalid"] and info["cache_used"] == 0
        before = (dg.catalog.volume("snap"), dg.catalog.subdisks("snap"), dg.catalog.intents())
        proc = env.cli("vol", "grow", "snap", "500m", check=False)
        assert proc.returncode == SnapshotInvalid.exit_code and "cannot grow" in proc.stderr, proc.stderr
        assert (dg.catalog.volume("snap"), dg.catalog.subdisks("snap"), dg.catalog.intents()) == before
        env.cli("vol", "rm", "snap")
        volumes.umount(dg, "src")
    finally:
        dg.close()


def test_cli_snap_make_takes_autogrow_and_refuses_a_bad_value(env):
    dg = env.make_dg(ndisks=1, size="1200m")
    try:
        volumes.make(dg, "src", "400m")
        free = sum(dg.free().values())
        proc = env.cli("snap", "make", "src", "s1", "autogrow=maybe", check=False)
        assert proc.returncode == 2 and "autogrow must be on or off" in proc.stderr
        proc = env.cli("snap", "make", "src", "s1", "autogrw=on", check=False)
        assert proc.returncode == 2 and "valid options: cachesize, autogrow" in proc.stderr
        assert [v.name for v in dg.catalog.volumes()] == ["src"] and sum(dg.free().values()) == free
        out = json.loads(env.cli("--json", "snap", "make", "src", "s1", "autogrow=on").stdout)
        assert out["autogrow"] is True and out["invalid"] == ""
        assert "autogrow: True" in env.cli("vol", "info", "s1").stdout
        env.cli("vol", "rm", "s1")
    finally:
        dg.close()
