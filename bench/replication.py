#!/usr/bin/env python3
"""Replication benchmark: what a delta costs against the bytes it stands for, and what replication between
two sites costs the primary and how far the secondary lags, through the real ``veritas rlink serve``.

Prints one JSON object per figure on stdout (bench.common.emit's format; progress on stderr).

Figures:
  delta_bytes_ratio       after rewriting 1 % of a mounted 1 GiB XFS volume in 4 KiB random direct
                          writes (fio, each block once; os.pwrite with O_DIRECT without fio), the MiB of
                          the encoded delta between the checkpoints before and after (value) against the
                          MiB changed (baseline), same run; target ratio<=1.2. The delta carries the
                          filesystem's own metadata and log writes too.
  checkpoint_seconds      checkpoint.take of the mounted volume (freeze, reflink, thaw, records) against
                          the bare fsfreeze -f, FICLONE, fsfreeze -u of its image; no target
  delta_compute_seconds   deltaset.plan (both checkpoints' FIEMAP maps, compared, and the target's data
                          map) against a block-by-block compare of the same two checkpoint images (the
                          fallback without FIEMAP); no target

The figures below run between two sites on this machine, as tests/integration/twosites.py builds them:
two state roots under the bench's root, one disk group each, each site's ``veritas rlink serve`` a
subprocess on 127.0.0.1, the rvg commands run as the real CLI. The primary's RVG holds one mounted XFS
volume (1 GiB, 900 MiB of random data written; --quick: 320 MiB, 200 MiB), its link service at the
default interval ([replication] interval, 10 s; --quick: 1 s, which the lag lines' baseline states).

  initial_sync_throughput startrep of the RVG (its "seconds": checkpoint, every allocated extent shipped
                          over the link, applied and made durable on the secondary, acknowledged)
                          against a plain copy of the same image over the same loopback TCP
                          (bench/tcpcopy.py: one process reading the image file, its page cache dropped
                          first as startrep's new checkpoint clone starts with none, into a socket, one
                          writing what arrives to a file on the secondary's disk and fsyncing it). Both
                          MB/s are the image's size over the time that made it whole at the other end,
                          so the ratio is the copy's time over startrep's (startrep sends the image's
                          holes as zero records, the copy sends them as zeros; the log lines also give
                          startrep's MB/s of data alone, its FIEMAP data extents). Interleaved pairs
                          (stoprep between: each startrep is a full sync onto the replica the last one
                          left); target ratio>=0.8
  failback_bytes_ratio    a DR drill on two fresh sites per run: the RVG (one mounted XFS volume of the
                          size above, its data written) replicating, the primary's link service SIGKILLed
                          (the site is gone), 0.1 % of the volume rewritten on the old primary after the
                          split, `rvg takeover` on the secondary, 1 % of the volume rewritten there in 4 KiB
                          random direct writes, the old primary's service back and `rvg fbsync`: the MiB it
                          reports sent (value) against the MiB of distinct blocks rewritten on either side
                          (baseline, counted by the bench from the blocks it chose); target ratio<=1.2.
                          3 runs (--quick: 1). What is sent also carries each filesystem's own log and
                          metadata writes (mount, umount)
  lag_seconds_p50/_p99    a steady writer (20 random 4 KiB O_DIRECT writes a second into the volume's
                          data file, each fsynced, each block stamped with the write's number) for 2
                          minutes (--quick: 6 s); a write's lag is from its fsync returning to the bench
                          seeing the secondary's consistent.json name the first checkpoint that holds
                          it (the stamps are read from the replica's image at the blocks' FIEMAP
                          offsets: a point-in-time image of a sequential writer holds a prefix of its
                          writes, found by bisection; polled every 20 ms). Baseline: the interval; no
                          target (issue 12 asks for the figure; the RPO test bounds it)
  primary_write_overhead  fio 4 KiB random direct libaio writes (iodepth 32) on the volume's data file
                          while replication runs (the primary's link service up and caught up before
                          each run, checkpointing and shipping at the interval: each checkpoint shares
                          the volume's blocks, which copy on their next write) against the same file
                          with the primary's link service stopped (no checkpoint taken or shipped) and
                          the file rewritten once before the run (unrecorded), so that the checkpoint
                          the RVG keeps shares none of its blocks: the volume as it is unreplicated;
                          interleaved pairs of 15 s runs (--quick: 2 s); IOPS, target >=0.8

Runs as root, under a fresh /tmp root with its own disk groups, all removed at the end, the link
services stopped by PID (also on error or SIGTERM). ``--quick``: one round or pair of each (a smoke test).
"""

from __future__ import annotations

import bisect
import io
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench import common
from bench.common import emit, log, run_pairs, sh
from storage import diskgroup, volumes
from storage.config import ReplicationSettings, load_config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.kernel import fs, mounts, reflink
from storage.replication import checkpoint, delta, deltaset, extents, link, rvg
from storage.replication.apply import Replica
from storage.rvgcli import status as repstatus
from tests.integration.twosites import Site, make_site

DG_NAME = "repldg"
RVG = "benchrvg"
MiB = 1024**2
GiB = 1024**3
B = 4096
VOL_SIZE = GiB
FILE_SIZE = 900 * MiB
SITE_RVG = "rvg1"  # twosites' RVG name
SITE_DG = "testdg"  # twosites' disk group name
LAG_RATE = 20  # writes a second
LAG_BLOCKS = 16384  # the writer's blocks: the data file's first 64 MiB
STAMP = struct.Struct("<8sQd")
MAGIC = b"VXLAGSTP"


class _Count(io.RawIOBase):
    """A sink that only counts what is written to it."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.n += len(b)
        return len(b)


class StampLog:
    """A sequential writer's stamped writes: ``blocks[k]`` is where write k went and ``done[k]`` when its
    fsync returned (both appended by the writer as it goes, ``blocks`` first); the block holds write
    k's number. A point-in-time image holds a prefix of such writes, so the writes an image holds are
    found by bisection: write k is held when its block holds k or a later write's number (that later
    write is held, and all before it)."""

    def __init__(self, blocks: list[int], done: list[float]) -> None:
        self.blocks, self.done = blocks, done
        self.covered = 0  # the writes before this one are held by an image already scanned

    def held(self, read: Callable[[int], bytes], k: int) -> bool:
        magic, j, _t = STAMP.unpack(read(self.blocks[k]))
        return bool(magic == MAGIC and int(j) >= k)

    def scan(self, read: Callable[[int], bytes], seen: float) -> list[float]:
        """The lags of the writes first held by the image ``read`` gives blocks of (seen at ``seen``)."""
        lo, hi = self.covered, len(self.done)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.held(read, mid):
                lo = mid + 1
            else:
                hi = mid
        out = [seen - self.done[k] for k in range(self.covered, lo)]
        self.covered = lo
        return out


def stamp(k: int) -> bytes:
    """The first bytes of write k's block."""
    return STAMP.pack(MAGIC, k, time.time())


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.rounds = 1 if quick else 5
        self.config_path = root / "veritas.conf"
        self.config_path.write_text(f"[storage]\ndiskgroup = {DG_NAME}\nstate_root = {root}/state\n"
                                    f"mount_root = {root}/mnt\n[node]\nname = benchnode\n")
        self.config = load_config(self.config_path)
        self.dg: DiskGroup | None = None
        self.quick = quick
        self.interval = 1.0 if quick else ReplicationSettings().interval
        self.vol_size = 320 * MiB if quick else VOL_SIZE
        self.data_size = 200 * MiB if quick else FILE_SIZE
        self.sites: tuple[Site, Site] | None = None
        self.site_dgs: list[DiskGroup] = []
        self.extra_dgs: list[DiskGroup] = []  # the failback runs' own sites
        self.made_sites: list[Site] = []
        self.mnt: Path | None = None

    def setup(self) -> None:
        (self.root / "disks").mkdir()
        log("creating a disk group on one sparse 8 GiB disk")
        self.dg = diskgroup.init(self.config, DG_NAME, [DiskSpec(self.root / "disks" / "d1.img", 8 * GiB)])

    def cleanup(self) -> None:
        log("cleaning up")
        for site in self.made_sites:  # the link services first, by PID: nothing checkpoints meanwhile
            for proc in site.procs:
                _stop(site, proc)
        prefix = str(self.root) + "/"
        for e in mounts.table():  # a frozen filesystem would hang every umount below
            if e.target.startswith(prefix) and "/disks/" not in e.target:
                subprocess.run(["fsfreeze", "-u", e.target], capture_output=True, check=False)
        if self.dg is not None:
            self.dg.close()
        for dg in [*self.site_dgs, *self.extra_dgs]:
            dg.close()
        if (self.config.dg_parent / DG_NAME).exists():
            common.destroy_dg(self.config, DG_NAME)
        for site in self.made_sites:
            cfg = load_config(site.config_path)
            if (cfg.dg_parent / SITE_DG).exists():
                common.destroy_dg(cfg, SITE_DG)
        shutil.rmtree(self.root, ignore_errors=True)

    def _rewrite(self, target: Path, nblocks: int, seed: int) -> str:
        """Rewrite ``nblocks`` distinct random 4 KiB blocks of ``target`` with direct I/O; the writer used."""
        if shutil.which("fio"):
            sh("fio", "--name=rw", f"--filename={target}", "--rw=randwrite", "--bs=4k", "--direct=1",
               "--ioengine=libaio", "--iodepth=16", f"--size={FILE_SIZE}", f"--io_size={nblocks * B}",
               f"--randseed={seed + 1}", "--randrepeat=0", "--output-format=terse")
            return "fio"
        buf = mmap.mmap(-1, B)  # page-aligned, as O_DIRECT wants
        buf.write(os.urandom(B))
        fd = os.open(target, os.O_WRONLY | os.O_DIRECT)
        try:
            for blk in random.Random(seed).sample(range(FILE_SIZE // B), nblocks):
                os.pwritev(fd, [buf], blk * B)
            os.fsync(fd)
        finally:
            os.close(fd)
        return "pwrite"

    def delta(self) -> None:
        dg = self.dg
        assert dg is not None
        volumes.make(dg, "v1", VOL_SIZE, fstype="xfs")
        mnt = volumes.mount(dg, "v1")
        data = mnt / "data"
        log(f"prefilling {FILE_SIZE // MiB} MiB")
        sh("dd", "if=/dev/urandom", f"of={data}", "bs=1M", f"count={FILE_SIZE // MiB}", "oflag=direct",
           "conv=fsync")
        nblocks = VOL_SIZE // 100 // B  # 1 % of the volume
        sizes: list[tuple[float, float]] = []
        take_s: list[float] = []
        bare_s: list[float] = []
        plan_s: list[float] = []
        cmp_s: list[float] = []
        writer = ""
        prev = checkpoint.take(dg, RVG, ["v1"]).seq
        img = dg.image(dg.catalog.subdisks("v1")[0].disk, "v1", 0)
        bare = img.with_name("bench-bare.img")
        for r in range(self.rounds):
            writer = self._rewrite(data, nblocks, r)
            t0 = time.perf_counter()
            cur = checkpoint.take(dg, RVG, ["v1"]).seq
            take_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fs.freeze(mnt)
            try:
                reflink.clone(img, bare)
            finally:
                fs.thaw(mnt)
            bare_s.append(time.perf_counter() - t0)
            bare.unlink()
            t0 = time.perf_counter()
            plans = deltaset.plan(dg, RVG, prev, cur)
            plan_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            old_ck, new_ck = checkpoint.get(dg, RVG, prev), checkpoint.get(dg, RVG, cur)
            by_block = extents.compare(old_ck.path(dg, old_ck.images[0]), new_ck.path(dg, new_ck.images[0]))
            cmp_s.append(time.perf_counter() - t0)
            covered = extents.merge([*plans[0].ranges, *by_block]) == plans[0].ranges
            if not covered:  # FIEMAP may send more than changed (a moved block), never less
                raise RuntimeError("a block changed that the extent maps did not show")
            sink = _Count()
            for p in plans:
                delta.encode(sink, p.header, p.source, p.pieces)  # type: ignore[arg-type]
            changed = nblocks * B
            sizes.append((sink.n / MiB, changed / MiB))
            log(f"round {r}: delta {sink.n} bytes for {changed} changed ({sink.n / changed:.4f}),"
                f" ranges {sum(len(p.ranges) for p in plans)}, take {take_s[-1]:.3f} s, plan {plan_s[-1]:.3f} s")
            checkpoint.delete(dg, RVG, prev)
            prev = cur
        log(f"writer {writer}")
        n = len(sizes)
        common.Pairs([a for a, _ in sizes], [b for _, b in sizes]).emit("delta_bytes_ratio", "MiB", "<=1.2",
                                                                        fields={"runs": n})
        emit("checkpoint_seconds", statistics.median(take_s), "s", statistics.median(bare_s), None,
             fields={"runs": n})
        emit("delta_compute_seconds", statistics.median(plan_s), "s", statistics.median(cmp_s), None,
             fields={"runs": n})
        checkpoint.delete(dg, RVG, prev)
        volumes.umount(dg, "v1")
        volumes.remove(dg, "v1")

    # ------------------------------------------------------------ two sites

    def _two_sites(self) -> tuple[Site, Site]:
        """The primary (A) and secondary (B) sites, made on first use: B's and A's link services
        running, the RVG of one mounted volume holding data created and its secondary added (not synced)."""
        if self.sites is not None:
            return self.sites
        log("making two sites (a disk group and a link service each)")
        for name in ("a", "b"):
            (self.root / name).mkdir()
            self.made_sites.append(make_site(self.root / name, disk_size="8g"))
        a, b = self.made_sites
        self.site_dgs = [a.dg(), b.dg()]
        dga = self.site_dgs[0]
        volumes.make(dga, "rv1", self.vol_size, fstype="xfs")
        self.mnt = volumes.mount(dga, "rv1")
        log(f"writing {self.data_size // MiB} MiB of random data into the primary's volume")
        sh("dd", "if=/dev/urandom", f"of={self.mnt / 'data'}", "bs=1M", f"count={self.data_size // MiB}",
           "oflag=direct", "conv=fsync")
        b.serve(interval=self.interval)
        a.serve(interval=self.interval)
        a.cli("rvg", "createpri", SITE_RVG, "rv1", "1g")
        a.cli("rvg", "addsec", SITE_RVG, a.addr, b.addr)
        self.sites = (a, b)
        return self.sites

    def _image(self) -> Path:
        dga = self.site_dgs[0]
        sd = dga.catalog.subdisks("rv1")[0]
        return dga.image(sd.disk, "rv1", sd.idx)

    def _state(self) -> str:
        return rvg.get(self.site_dgs[0], SITE_RVG).state

    def _replicating(self) -> None:
        """The RVG replicating (a full sync first when it is stopped)."""
        a, _b = self._two_sites()
        if self._state() == "stopped":
            a.cli("rvg", "startrep", SITE_RVG)

    def sync(self) -> None:
        a, _b = self._two_sites()
        dgb = self.site_dgs[1]
        img = self._image()
        size = os.stat(img).st_size
        data = sum(n for _o, n in extents.data_ranges(extents.fiemap(img), size))
        copy = rvg.replica_root(dgb, SITE_RVG).parent / "bench-copy.img"  # on the secondary's disk
        log(f"initial sync of an image of {size / MiB:.0f} MiB holding {data / MiB:.0f} MiB of data")

        def ours(i: int) -> float:
            if self._state() != "stopped":
                a.cli("rvg", "stoprep", SITE_RVG)
            out = json.loads(a.cli("rvg", "startrep", SITE_RVG).stdout)
            a.cli("rvg", "stoprep", SITE_RVG)  # no round of the link service during the copy
            secs = float(out["seconds"])
            log(f"  startrep {i}: {secs:.2f} s, {size / 1e6 / secs:.0f} MB/s of image, {data / 1e6 / secs:.0f} of data")
            return size / 1e6 / secs

        def base(i: int) -> float:
            fd = os.open(img, os.O_RDONLY)  # read cold, as startrep reads its new checkpoint's clone
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            recv = subprocess.Popen([sys.executable, "-m", "bench.tcpcopy", "recv", str(copy)], cwd=REPO,
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert recv.stdout is not None
                port = int(recv.stdout.readline())
                t0 = time.perf_counter()
                sh(sys.executable, "-m", "bench.tcpcopy", "send", f"127.0.0.1:{port}", img)
                secs = time.perf_counter() - t0
                got = int(recv.stdout.readline())
                recv.wait(timeout=60)
            finally:
                if recv.poll() is None:
                    os.kill(recv.pid, signal.SIGKILL)
                    recv.wait()
                copy.unlink(missing_ok=True)
            if got != size:
                raise RuntimeError(f"the plain copy received {got} bytes of {size}")
            mbs = size / 1e6 / secs
            log(f"  plain TCP copy {i}: {secs:.2f} s, {mbs:.0f} MB/s")
            return mbs

        n = 1 if self.quick else 3
        res = run_pairs(ours, base, ">=0.8", n, cap=1 if self.quick else 7)
        res.emit("initial_sync_throughput", "MB/s", ">=0.8", fields={"runs": len(res.ours)})

    def failback(self) -> None:
        runs = 1 if self.quick else 3
        nblocks = self.vol_size // 100 // B  # 1 % of the volume, on the new primary
        sizes: list[tuple[float, float]] = []
        for r in range(runs):
            a, b = (self._site(f"fb{r}a"), self._site(f"fb{r}b"))
            dga, dgb = a.dg(), b.dg()
            self.extra_dgs += [dga, dgb]
            volumes.make(dga, "fv1", self.vol_size, fstype="xfs")
            mnt = volumes.mount(dga, "fv1")
            sh("dd", "if=/dev/urandom", f"of={mnt / 'data'}", "bs=1M", f"count={self.data_size // MiB}",
               "oflag=direct", "conv=fsync")
            b.serve(interval=self.interval)
            a.serve(interval=self.interval)
            a.cli("rvg", "createpri", SITE_RVG, "fv1", "1g")
            a.cli("rvg", "addsec", SITE_RVG, a.addr, b.addr)
            a.cli("rvg", "startrep", SITE_RVG)
            self._synced(dga, dgb)
            a.kill(a.procs[-1], signal.SIGKILL)  # the primary site is gone
            rng = random.Random(r)
            file_blocks = self.data_size // B
            lost = rng.sample(range(file_blocks), nblocks // 10)  # the old primary's writes after the split
            _pwrite_blocks(mnt / "data", lost, rng)
            b.cli("rvg", "takeover", SITE_RVG)
            mntb = volumes.mount(dgb, "fv1")
            new = rng.sample(range(file_blocks), nblocks)
            _pwrite_blocks(mntb / "data", new, rng)
            volumes.umount(dgb, "fv1")
            volumes.umount(dga, "fv1")
            a.serve(interval=self.interval, port=int(a.addr.rsplit(":", 1)[1]))  # the old site returns
            out = json.loads(b.cli("rvg", "fbsync", SITE_RVG).stdout)
            changed = len(set(lost) | set(new)) * B
            sent = int(out["bytes_sent"])
            log(f"failback {r}: fbsync sent {sent} bytes for {changed} rewritten ({sent / changed:.4f}); it "
                f"counted {out['changed_bytes']} changed")
            sizes.append((sent / MiB, changed / MiB))
            for site in (a, b):
                for proc in list(site.procs):
                    if proc.poll() is None:
                        _stop(site, proc)
        common.Pairs([s for s, _ in sizes], [c for _, c in sizes]).emit("failback_bytes_ratio", "MiB", "<=1.2",
                                                                        fields={"runs": len(sizes)})

    def _site(self, name: str) -> Site:
        (self.root / name).mkdir()
        site = make_site(self.root / name, disk_size="8g")
        self.made_sites.append(site)
        return site

    def _synced(self, dga: DiskGroup, dgb: DiskGroup, timeout: float = 120) -> None:
        """Until the secondary's replica holds the primary's newest checkpoint (under the sender lock: no
        checkpoint is taken or pruned meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            with dga.locks.hold(link.sender_lock(SITE_RVG)):
                ck = checkpoint.last_consistent(dga, SITE_RVG)
                if ck is not None and Replica(rvg.replica_root(dgb, SITE_RVG), SITE_RVG).seq == ck.seq:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the secondary did not catch up with the primary")
            time.sleep(0.2)

    def lag(self) -> None:
        a, b = self._two_sites()
        self._replicating()
        dgb = self.site_dgs[1]
        assert self.mnt is not None
        target = self.mnt / "data"
        exts = [e for e in extents.fiemap(target) if not e.zero and not e.opaque]
        starts = [e.logical for e in exts]

        def phys(blk: int) -> int:
            off = blk * B
            e = exts[bisect.bisect_right(starts, off) - 1]
            if not e.logical <= off < e.logical + e.length:
                raise RuntimeError(f"block {blk} of {target} has no written extent")
            return e.physical + off - e.logical

        buf = mmap.mmap(-1, B)  # page-aligned, as O_DIRECT wants
        fd = os.open(target, os.O_WRONLY | os.O_DIRECT)
        stop = threading.Event()
        done: list[float] = []  # done[k]: when write k's fsync returned
        blocks: list[int] = []
        failed: list[BaseException] = []

        def write(k: int, blk: int) -> None:
            buf.seek(0)
            buf.write(stamp(k))
            os.pwritev(fd, [buf], blk * B)
            os.fsync(fd)

        # the volume's device maps its blocks one to one onto the image: check it on one write
        write(0, 0)
        with open(self._image(), "rb") as fh:
            fh.seek(phys(0))
            if fh.read(STAMP.size)[:8] != MAGIC:
                raise RuntimeError("the volume's FIEMAP offsets do not address its image")

        def writer() -> None:
            rng = random.Random(12)
            t0 = time.monotonic()
            try:
                k = 0
                while not stop.is_set():
                    blk = rng.randrange(LAG_BLOCKS)
                    blocks.append(blk)
                    write(k, blk)
                    done.append(time.time())
                    k += 1
                    pause = t0 + k / LAG_RATE - time.monotonic()
                    if pause > 0:
                        stop.wait(pause)
            except BaseException as exc:  # reported by the main thread
                failed.append(exc)

        rep = Replica(rvg.replica_root(dgb, SITE_RVG), SITE_RVG)
        stamps = StampLog(blocks, done)
        lags: list[float] = []

        def scan(seq: int, seen: float) -> None:
            try:
                img = os.open(rep.root / str(seq) / "rv1.0.img", os.O_RDONLY)
            except FileNotFoundError:
                return  # already replaced by the next one: its writes count against that one
            try:
                lags.extend(stamps.scan(lambda blk: os.pread(img, STAMP.size, phys(blk)), seen))
            finally:
                os.close(img)

        duration = 6.0 if self.quick else 120.0
        log(f"lag: {LAG_RATE} fsynced 4 KiB writes a second for {duration:.0f} s, interval {self.interval:g} s")
        thread = threading.Thread(target=writer, name="lag-writer", daemon=True)
        last = rep.seq
        thread.start()
        try:
            end = time.monotonic() + duration
            deadline = end + 3 * self.interval + 60
            while True:
                now = time.monotonic()
                if now >= end and not stop.is_set():
                    stop.set()
                    thread.join(timeout=30)
                if failed:
                    raise RuntimeError(f"the writer failed: {failed[0]!r}")
                if stop.is_set() and stamps.covered == len(done):
                    break
                if now > deadline:
                    raise RuntimeError(f"{len(done) - stamps.covered} writes never reached the secondary;"
                                       f" A: {a.log()[-1500:]} B: {b.log()[-1500:]}")
                seq = rep.seq
                if seq != last:
                    scan(seq, time.time())
                    last = seq
                time.sleep(0.02)
        finally:
            stop.set()
            thread.join(timeout=30)
            os.close(fd)
            buf.close()
        n = len(lags)
        log(f"lag over {n} writes: p50 {common.pct(lags, 0.5):.2f} s, p99 {common.pct(lags, 0.99):.2f} s,"
            f" max {max(lags):.2f} s")
        for q, metric in ((0.5, "lag_seconds_p50"), (0.99, "lag_seconds_p99")):
            emit(metric, common.pct(lags, q), "s", self.interval, None, fields={"runs": n})

    def overhead(self) -> None:
        a, _b = self._two_sites()
        self._replicating()
        dga = self.site_dgs[0]
        assert self.mnt is not None
        runtime = 2 if self.quick else 15
        aport = int(a.addr.rsplit(":", 1)[1])
        args = ["--thread", "--direct=1", "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                f"--size={self.data_size}", f"--runtime={runtime}", "--time_based", "--output-format=json"]

        def service() -> subprocess.Popen[str] | None:
            live = [p for p in a.procs if p.poll() is None]
            return live[-1] if live else None

        data = self.mnt / "data"

        def fio(i: int, what: str) -> float:
            out = sh("fio", f"--name=ovh{i}", f"--filename={data}", *args)
            iops = float(json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"])
            log(f"  fio {i} {what}: {iops:.0f} IOPS")
            return iops

        def ours(i: int) -> float:
            if service() is None:
                before = checkpoint.last_consistent(dga, SITE_RVG)
                a.serve(interval=self.interval, port=aport)
                self._caught_up(before.seq if before else 0)
            return fio(i, "replicating")

        def base(i: int) -> float:
            p = service()
            if p is not None:
                _stop(a, p)
            # rewritten once (unrecorded), so that no checkpoint the RVG keeps shares its blocks: the
            # volume as it is without replication (each first write to a shared block copies it)
            sh("dd", "if=/dev/zero", f"of={data}", "bs=1M", f"count={self.data_size // MiB}", "oflag=direct",
               "conv=notrunc,fsync")
            return fio(i, "link service stopped")

        n = 1 if self.quick else 5
        res = run_pairs(ours, base, ">=0.8", n, cap=1 if self.quick else 7)
        res.emit("primary_write_overhead", "IOPS", ">=0.8", fields={"runs": len(res.ours)})

    def _caught_up(self, after: int) -> None:
        """Wait until the primary has taken a checkpoint after ``after`` and the secondary holds it."""
        dga = self.site_dgs[0]
        deadline = time.monotonic() + 120
        while True:
            with dga.locks.hold(link.sender_lock(SITE_RVG)):  # Srl() recovers: not during a round
                st = repstatus(dga, SITE_RVG)
            if st["latest_seq"] > after and st["last_consistent_seq"] == st["latest_seq"] and not st["lag_bytes"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the secondary did not catch up: {st}")
            time.sleep(0.1)


REPO = Path(__file__).resolve().parents[1]


def _pwrite_blocks(target: Path, blocks: list[int], rng: random.Random) -> None:
    """Rewrite these 4 KiB blocks of ``target`` with random data, direct I/O, then fsync."""
    buf = mmap.mmap(-1, B)  # page-aligned, as O_DIRECT wants
    fd = os.open(target, os.O_WRONLY | os.O_DIRECT)
    try:
        for blk in blocks:
            buf.seek(0)
            buf.write(rng.randbytes(B))
            os.pwritev(fd, [buf], blk * B)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def _stop(site: Site, proc: subprocess.Popen[str]) -> None:
    """End one link service by its PID: SIGTERM (it ends its round), SIGKILL if it hangs."""
    try:
        site.kill(proc, signal.SIGTERM)
    except subprocess.TimeoutExpired:
        site.kill(proc)


GROUPS = ["delta", "sync", "failback", "lag", "overhead"]


def _run(bench: common.Bench, group: str) -> None:
    assert isinstance(bench, Bench)
    getattr(bench, group)()


def main(argv: list[str] | None = None) -> int:
    return common.main("bench-replication", __doc__, argv, tools=("mkfs.xfs", "losetup", "fsfreeze", "fio"),
                       groups=GROUPS, make=Bench, run_group=_run)


if __name__ == "__main__":
    sys.exit(main())
