#!/usr/bin/env python3
"""Replication benchmark: what a delta between two checkpoints costs, against the bytes it stands for.

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

Runs as root, under a fresh /tmp root with its own disk group, all removed at the end (also on error or
SIGTERM). ``--quick``: one round instead of five (a smoke test).
"""

from __future__ import annotations

import io
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.common import emit, log, sh
from storage import diskgroup, volumes
from storage.config import load_config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.kernel import fs, mounts, reflink
from storage.replication import checkpoint, delta, deltaset, extents

DG_NAME = "repldg"
RVG = "benchrvg"
MiB = 1024**2
GiB = 1024**3
B = 4096
VOL_SIZE = GiB
FILE_SIZE = 900 * MiB


class _Count(io.RawIOBase):
    """A sink that only counts what is written to it."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.n += len(b)
        return len(b)


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.rounds = 1 if quick else 5
        self.config_path = root / "veritas.conf"
        self.config_path.write_text(f"[storage]\ndiskgroup = {DG_NAME}\nstate_root = {root}/state\n"
                                    f"mount_root = {root}/mnt\n[node]\nname = benchnode\n")
        self.config = load_config(self.config_path)
        self.dg: DiskGroup | None = None

    def setup(self) -> None:
        (self.root / "disks").mkdir()
        log("creating a disk group on one sparse 8 GiB disk")
        self.dg = diskgroup.init(self.config, DG_NAME, [DiskSpec(self.root / "disks" / "d1.img", 8 * GiB)])

    def cleanup(self) -> None:
        log("cleaning up")
        prefix = str(self.root) + "/"
        for e in mounts.table():  # a frozen filesystem would hang every umount below
            if e.target.startswith(prefix) and "/disks/" not in e.target:
                subprocess.run(["fsfreeze", "-u", e.target], capture_output=True, check=False)
        if self.dg is not None:
            self.dg.close()
        if (self.config.dg_parent / DG_NAME).exists():
            common.destroy_dg(self.config, DG_NAME)
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


def _run(bench: common.Bench, _group: str) -> None:
    assert isinstance(bench, Bench)
    bench.delta()


def main(argv: list[str] | None = None) -> int:
    return common.main("bench-replication", __doc__, argv, tools=("mkfs.xfs", "losetup", "fsfreeze"),
                       groups=["delta"], make=Bench, run_group=_run)


if __name__ == "__main__":
    sys.exit(main())
