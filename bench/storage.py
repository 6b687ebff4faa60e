#!/usr/bin/env python3
"""Storage benchmark: the veritas storage API against the bare kernel steps it wraps, in the same run.

Prints one JSON object per figure on stdout (progress goes to stderr)::

    {"metric", "value", "unit", "baseline", "ratio", "target", "met", "spread", "settled"}

``target`` is a condition on ``ratio`` ("<=1.5", ">=0.8"), a condition on ``value`` when it starts with
"value" ("value<100": the value itself, in ``unit``), or null for figures reported without a target;
``met`` is its verdict (null without a target). Both sides run in interleaved pairs (ours, then bare,
then bare, then ours, ...), so load from other processes lands on both alike: ``value`` and ``baseline``
are each side's median (p50), ``ratio`` the median of the per-pair ratios and ``spread`` their
[min, max]. Where the pairs straddle the target more pairs run, up to a cap; ``settled`` is false if they
still do (null without a target). make_cost has no pairs: its ratio is value / baseline, spread null.

Figures:
  make_mount_1g / umount_rm_1g   volumes.make + mount of a 1 GiB concat volume vs truncate, losetup,
                                 mkfs.xfs, mount of an image in the same disk group disk (and the reverse)
  snapshot_1g_500m               snapshots.make of a mounted 1 GiB volume holding 500 MB vs
                                 fsfreeze -f, cp --reflink=always, fsfreeze -u of its image
  vol_list_1000                  volumes.list_volumes with 1,000 volumes (baseline: the bare catalog
                                 query plus one read of the mount table)
  make_cost_1000th_vs_1st        p50 make time of the last 20 volumes vs the first 20
  cli_vol_list_1000              `python -m storage.cli vol list` (baseline: interpreter start-up and
                                 import of storage.cli)
  fio_randwrite_4k_qd32 / fio_seqwrite_1m_qd8
                                 fio direct I/O on a mounted concat volume vs on the disk group disk's own
                                 filesystem (median of 7 interleaved 5 s pairs, up to 15)

Runs as root. It makes its own config, state root, mount root and disk group (3 sparse disks) under a
fresh /tmp directory and removes all of it at the end, also on error or SIGTERM. ``--quick`` (fewer
repetitions, 200 volumes, shorter fio runs) is for smoke tests.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# this file is named storage.py: keep its directory off the path so `storage` is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.common import Pairs, emit, log, run_pairs, sh, timed  # noqa: E402
from storage import diskgroup, snapshots, volumes  # noqa: E402
from storage.config import load_config  # noqa: E402
from storage.diskgroup import DiskGroup, DiskSpec  # noqa: E402
from storage.kernel import loop, mounts  # noqa: E402

DG_NAME = "benchdg"
GiB = 1024**3










def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def ms(x: float) -> float:
    return x * 1000.0


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.quick = quick
        self.config_path = root / "veritas.conf"
        self.config_path.write_text(
            "[storage]\n"
            f"diskgroup = {DG_NAME}\n"
            f"state_root = {root}/state\n"
            f"mount_root = {root}/mnt\n"
            "default_disk_size = 40g\n"
            "default_disk_count = 3\n"
            "[node]\nname = benchnode\n"
        )
        self.config = load_config(self.config_path)
        self.dg: DiskGroup | None = None
        self.bare_mp = root / "bare-mnt"

    # ------------------------------------------------------------ set-up / clean-up

    def setup(self) -> DiskGroup:
        disks = self.root / "disks"
        disks.mkdir()
        log("creating disk group on 3 sparse 40 GiB disks")
        specs = [DiskSpec(disks / f"d{i}.img", 40 * GiB) for i in (1, 2, 3)]
        self.dg = diskgroup.init(self.config, DG_NAME, specs)
        self.bare_mp.mkdir()
        return self.dg

    def cap(self, n: int) -> int:
        """How many pairs a figure of ``n`` may grow to while its pairs straddle the target (--quick: none)."""
        return n if self.quick else n + 10

    def bare_dir(self, disk: str) -> Path:
        assert self.dg is not None
        d = self.dg.disk_dir(disk) / "bench-bare"
        d.mkdir(exist_ok=True)
        return d

    def next_disk(self) -> str:
        """The disk volumes.make places the next single-image volume on (emptiest first)."""
        assert self.dg is not None
        free = self.dg.free()
        return sorted(free, key=lambda d: (-free[d], d))[0]

    def cleanup(self) -> None:
        log("cleaning up")
        prefix = str(self.root) + "/"
        for e in mounts.table():  # a frozen filesystem would hang every umount below
            if e.target.startswith(prefix) and "/disks/" not in e.target:
                subprocess.run(["fsfreeze", "-u", e.target], capture_output=True, check=False)
        if mounts.mounted_at(self.bare_mp):
            subprocess.run(["umount", str(self.bare_mp)], capture_output=True, check=False)
        for dev, back in loop.attached().items():
            if back.startswith(prefix) and "/bench-bare/" in back:
                subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        for attempt in range(3):  # a process killed a moment ago may still hold a file open briefly
            try:
                dg = self.dg
                if dg is None:
                    if not (self.config.dg_parent / DG_NAME / "catalog.db").exists():
                        break
                    dg = self.dg = diskgroup.DiskGroup(self.config, DG_NAME)
                for v in dg.catalog.volumes():
                    for m in dg.catalog.mounts(v.name):
                        dg.catalog.remove_mount(v.name, m.node, m.mount_id)
                diskgroup.destroy(dg, force=True)
                break
            except Exception as exc:  # go on: the forced clean-up below still runs
                log(f"destroy failed (attempt {attempt + 1}): {exc!r}")
                time.sleep(1)
        self._force_clean(prefix)
        shutil.rmtree(self.root, ignore_errors=True)

    def _force_clean(self, prefix: str) -> None:
        """Whatever destroy left: volume mounts, volume loops, then disk mounts, then disk loops (a lazily
        unmounted disk would hide the paths of the loop devices still backed by files inside it)."""
        disks = str(self.config.dg_parent) + "/"
        left: list[str] = []

        def is_disk(target: str) -> bool:  # <dg_parent>/<dg>/disks/<disk>
            return target.startswith(disks) and Path(target).parent.name == "disks"

        def umount(inner: bool) -> None:
            for e in sorted(mounts.table(), key=lambda e: -len(e.target)):
                if e.target.startswith(prefix) and is_disk(e.target) != inner:
                    left.append(f"mount {e.target}")
                    if subprocess.run(["umount", e.target], capture_output=True, check=False).returncode:
                        subprocess.run(["umount", "-l", e.target], capture_output=True, check=False)

        def detach(inner: bool) -> None:
            for dev, back in loop.attached().items():
                if back.startswith(prefix) and (back.startswith(disks) == inner):
                    left.append(f"loop {dev}")
                    subprocess.run(["btrfs", "device", "scan", "--forget", dev], capture_output=True, check=False)
                    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)

        umount(inner=True)  # volume and scratch mounts (outside the disk mounts)
        detach(inner=True)  # loop devices on images inside the disks
        umount(inner=False)  # the disks
        detach(inner=False)  # the disks' own loop devices
        if left:
            log(f"forced clean-up of leftovers: {', '.join(left)}")

    # ------------------------------------------------------------ a. make + mount

    def make_mount(self) -> None:
        dg = self.dg
        assert dg is not None
        runs = 5 if self.quick else 15
        disk = self.next_disk()
        bdir = self.bare_dir(disk)
        log(f"make+mount of a 1 GiB concat volume, {runs} runs (+1 warm-up) each, bare image on {disk}")
        ours_down: list[float] = []
        bare_down: list[float] = []

        def ours(i: int) -> float:
            name = f"mm{i}"
            up = timed(lambda: (volumes.make(dg, name, "1g", layout="concat"), volumes.mount(dg, name)))
            sd = dg.catalog.subdisks(name)
            assert sd[0].disk == disk, f"volume placed on {sd[0].disk}, bare image on {disk}"
            down = timed(lambda: (volumes.umount(dg, name), volumes.remove(dg, name)))
            if i >= 0:
                ours_down.append(ms(down))
            return ms(up)

        def bare(i: int) -> float:
            img = bdir / f"mm{i}.img"
            dev = ""

            def up() -> None:
                nonlocal dev
                sh("truncate", "-s", "1G", img)
                dev = sh("losetup", "--find", "--show", "--direct-io=on", "--sector-size=4096", img).strip()
                sh("mkfs.xfs", "-q", dev)
                sh("mount", dev, self.bare_mp)

            def down() -> None:
                sh("umount", self.bare_mp)
                sh("losetup", "-d", dev)
                img.unlink()

            tu = timed(up)
            td = timed(down)
            if i >= 0:
                bare_down.append(ms(td))
            return ms(tu)

        res = run_pairs(ours, bare, "<=1.5", runs, cap=self.cap(runs), warmup=True)
        log(f"  make+mount p50 {res.value:.1f} ms, bare {res.baseline:.1f} ms")
        res.emit("make_mount_1g_p50", "ms", "<=1.5")
        down = Pairs(ours_down, bare_down)  # the same pairs' other half
        log(f"  umount+rm p50 {down.value:.1f} ms, bare {down.baseline:.1f} ms")
        down.emit("umount_rm_1g_p50", "ms", None)

    # ------------------------------------------------------------ b. snapshot

    def snapshot(self) -> None:
        dg = self.dg
        assert dg is not None
        runs = 3 if self.quick else 7
        written = 500 * 1000 * 1000
        volumes.make(dg, "snapsrc", "1g", layout="concat")
        mp = volumes.mount(dg, "snapsrc")
        log(f"snapshot of a mounted 1 GiB volume: writing {written // 10**6} MB")
        block = os.urandom(1024 * 1024)
        with open(mp / "data", "wb") as fh:
            left = written
            while left > 0:
                n = min(left, len(block))
                fh.write(block[:n])
                left -= n
            fh.flush()
            os.fsync(fh.fileno())
        src_img = volumes.images(dg, dg.catalog.volume("snapsrc"))[0]  # type: ignore[arg-type]
        bdir = src_img.parent.parent / "bench-bare"
        bdir.mkdir(exist_ok=True)

        def ours(i: int) -> float:
            name = f"snap{i + 1}"
            t = timed(lambda: snapshots.make(dg, "snapsrc", name))
            volumes.remove(dg, name)
            return ms(t)

        def bare(i: int) -> float:
            dst = bdir / f"clone{i + 1}.img"

            def run() -> None:
                sh("fsfreeze", "-f", mp)
                try:
                    sh("cp", "--reflink=always", src_img, dst)
                finally:
                    sh("fsfreeze", "-u", mp)

            t = timed(run)
            dst.unlink()
            return ms(t)

        log(f"  {runs} snapshots (+1 warm-up) each way")
        res = run_pairs(ours, bare, "<=1.5", runs, cap=self.cap(runs), warmup=True)
        log(f"  snapshot p50 {res.value:.1f} ms, bare {res.baseline:.1f} ms")
        res.emit("snapshot_1g_500m_p50", "ms", "<=1.5")

        # where the deferred cost lands: a snapshot's first mount gives it its own filesystem UUID
        # (for XFS a rewrite of the 64 MiB log); compared with mounting an ordinary volume
        first_t: list[float] = []
        plain_t: list[float] = []
        for i in range(max(2, runs // 2)):
            name = f"fm{i}"
            snapshots.make(dg, "snapsrc", name)
            first_t.append(timed(lambda name=name: volumes.mount(dg, name)))  # type: ignore[misc]
            volumes.umount(dg, name)
            plain_t.append(timed(lambda name=name: volumes.mount(dg, name)))  # type: ignore[misc]
            volumes.umount(dg, name)
            volumes.remove(dg, name)
        first = Pairs([ms(x) for x in first_t], [ms(x) for x in plain_t])
        log(f"  snapshot first mount p50 {first.value:.1f} ms, later mounts {first.baseline:.1f} ms")
        first.emit("snapshot_first_mount_p50", "ms", None)
        volumes.umount(dg, "snapsrc")
        volumes.remove(dg, "snapsrc")

    # ------------------------------------------------------------ c. listing

    def listing(self) -> None:
        dg = self.dg
        assert dg is not None
        n = 200 if self.quick else 1000
        edge = 20
        for i in range(3):  # warm-up, so the first timed makes do not pay for cold caches
            volumes.make(dg, f"warm{i}", "32m", layout="concat", fstype="ext4")
            volumes.remove(dg, f"warm{i}")
        log(f"making {n} ext4 concat volumes of 32 MiB")
        t_start = time.perf_counter()
        cost: list[float] = []
        for i in range(n):
            cost.append(timed(lambda i=i: volumes.make(dg, f"l{i:04d}", "32m", layout="concat", fstype="ext4")))
            if (i + 1) % 100 == 0:
                log(f"  {i + 1} volumes, {time.perf_counter() - t_start:.1f} s")
        assert len(dg.catalog.volumes()) == n
        first, last = p50(cost[:edge]), p50(cost[-edge:])
        log(f"  make p50 first {edge}: {ms(first):.1f} ms, last {edge}: {ms(last):.1f} ms")
        emit(f"make_cost_{n}th_vs_1st_p50", ms(last), "ms", ms(first), "<=1.2")  # no pairs: no spread

        reps = 10 if self.quick else 30
        ours_t: list[float] = []
        bare_t: list[float] = []
        db = sqlite3.connect(f"file:{dg.catalog.path}?mode=ro", uri=True)  # the bare baseline reads the SQLite file

        def bare() -> None:
            db.execute("SELECT * FROM volume ORDER BY name").fetchall()
            with open("/proc/self/mountinfo") as fh:
                fh.read()

        rows = volumes.list_volumes(dg)
        assert len(rows) == n, len(rows)
        bare()
        for _ in range(reps):
            ours_t.append(timed(lambda: volumes.list_volumes(dg)))
            bare_t.append(timed(bare))
        db.close()
        lst = Pairs([ms(x) for x in ours_t], [ms(x) for x in bare_t])
        log(f"  list_volumes p50 {lst.value:.2f} ms, bare query {lst.baseline:.2f} ms")
        lst.emit(f"vol_list_{n}_p50", "ms", "value<100")

        env = {**os.environ, "VERITAS_CONFIG": str(self.config_path)}
        cli = [sys.executable, "-m", "storage.cli", "vol", "list"]
        imp = [sys.executable, "-c", "import storage.cli"]

        def run(argv: list[str], check_lines: int | None = None) -> None:
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, check=False,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
            if check_lines is not None and len(proc.stdout.splitlines()) != check_lines:
                raise RuntimeError(f"vol list printed {len(proc.stdout.splitlines())} lines, not {check_lines}")

        run(cli, n + 1)
        run(imp)
        cli_t: list[float] = []
        imp_t: list[float] = []
        for _ in range(3 if self.quick else 7):
            cli_t.append(timed(lambda: run(cli, n + 1)))
            imp_t.append(timed(lambda: run(imp)))
        cli_p = Pairs([ms(x) for x in cli_t], [ms(x) for x in imp_t])
        log(f"  CLI vol list p50 {cli_p.value:.1f} ms, python + import storage.cli {cli_p.baseline:.1f} ms")
        cli_p.emit(f"cli_vol_list_{n}_p50", "ms", None)

    # ------------------------------------------------------------ d. fio

    def fio(self) -> None:
        dg = self.dg
        assert dg is not None
        reps = 1 if self.quick else 7  # this VM's host varies by 15 % run to run: a median of 3 swung 0.75-0.93
        cap = 2 if self.quick else 15  # more pairs while they straddle the target
        runtime = 2 if self.quick else 5
        size = "256m" if self.quick else "1g"
        volumes.make(dg, "fiovol", "2g", layout="concat")
        mp = volumes.mount(dg, "fiovol")
        disk = dg.catalog.subdisks("fiovol")[0].disk
        targets = {"volume": mp / "fio.dat", "disk": self.bare_dir(disk) / "fio.dat"}
        common = ["--thread", "--direct=1", "--ioengine=libaio", f"--size={size}", "--output-format=json"]
        log(f"fio on volume fiovol vs disk {disk}'s filesystem: laying out {size} files")
        for path in targets.values():
            sh("fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1m", "--iodepth=8", *common)
        jobs = {
            "fio_randwrite_4k_qd32": (["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops", "IOPS", ">=0.8"),
            "fio_seqwrite_1m_qd8": (["--rw=write", "--bs=1m", "--iodepth=8"], "bw_bytes", "MB/s", ">=0.9"),
        }
        for metric, (args, field, unit, target) in jobs.items():
            def run(where: str, metric: str = metric, args: list[str] = args, field: str = field) -> float:
                out = sh("fio", f"--name={metric}", f"--filename={targets[where]}", *args, *common,
                         f"--runtime={runtime}", "--time_based")
                val = float(json.loads(out[out.index("{"):])["jobs"][0]["write"][field])
                return val / 1e6 if field == "bw_bytes" else val

            res = run_pairs(lambda i: run("volume"), lambda i: run("disk"), target, reps, cap=cap)
            log(f"  {metric}: volume {res.value:.0f} {unit}, disk {res.baseline:.0f} {unit}"
                f" (runs {res.ours} / {res.base})")
            res.emit(metric, unit, target)
        (mp / "fio.dat").unlink()
        targets["disk"].unlink()
        volumes.umount(dg, "fiovol")
        volumes.remove(dg, "fiovol")


def main(argv: list[str] | None = None) -> int:
    methods = {"make": "make_mount", "snapshot": "snapshot", "fio": "fio", "list": "listing"}
    return common.main("bench-storage", __doc__, argv,
                       tools=("fio", "mkfs.xfs", "mkfs.ext4", "losetup", "fsfreeze", "xfs_admin"),
                       groups=["make", "snapshot", "fio", "list"], make=Bench,
                       run_group=lambda bench, group: getattr(bench, methods[group])())


if __name__ == "__main__":
    sys.exit(main())
