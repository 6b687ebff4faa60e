#!/usr/bin/env python3
"""Docker volume plugin benchmark: the veritas driver against bare storage commands and Docker's local driver.

Prints one JSON object per figure on stdout (progress goes to stderr)::

    {"metric", "value", "unit", "baseline", "ratio", "target", "met", "spread", "settled"[, "note"]}

Both sides are measured in interleaved pairs (ours then theirs, then theirs then ours, ...) so load from
other processes lands on both alike. ``value`` and ``baseline`` are each side's median; ``ratio`` is the
median of the per-pair ratios value/baseline, and ``spread`` their [min, max]. ``target`` is a condition
on ``ratio`` (">=0.85") or null (information); ``met`` is its verdict on ``ratio`` (null for information).
Where the pairs straddle the target, more pairs run, up to a cap (15 for the fio figures); ``settled`` is
false if they still do. A figure whose feature this build lacks has value null, met false and a ``note``.

Figures:
  plugin_create_1g_p50          VolumeDriver.Create of a 1 GiB volume (defaults: concat, xfs) timed at the
                                plugin's socket, Remove between runs; baseline: the bare commands it runs
                                (truncate, losetup --find --show --direct-io=on --sector-size=4096,
                                mkfs.xfs -q, losetup -d) on an image inside the disk group's disk
  docker_volume_create_p50/_p95 `docker volume create` end to end, veritas vs the local driver
  docker_run_true_p50           `docker run --rm -v VOL:/data localbusybox true`, veritas vs local volume
  fio_seqwrite_1m_qd8           direct sequential 1 MiB writes (fio, libaio, QD8) inside a container,
                                veritas vs local volume on the host's filesystem (MB/s); _qd1 the same
                                with psync (information)
  container_randwrite_4k_qd32_vs_host_fs
                                direct 4k random writes (fio, libaio, QD32) inside a container, veritas on
                                the embedded image-file disks vs a local volume on the host's filesystem
                                (information: it measures the image files as much as veritas);
                                fio_randwrite_4k_qd32_disk_fs_vs_local splits it: the same job on a bind
                                mount of the disk group's own filesystem against the local volume;
                                fio_randwrite_4k_qd1 the same with psync (information)
  container_randwrite_4k_qd32_same_disk_{image,block,dir}  (>= 0.85)
  container_seqwrite_1m_qd8_same_disk_{image,block,dir}    (>= 0.9)
                                the same disk with and without veritas: a veritas volume on a one-disk
                                disk group of that kind against a local-driver volume bound
                                (type=none, o=bind) to a directory on that disk's own filesystem, both
                                written by fio from a container (files written once before; median of 7
                                interleaved 5 s pairs, up to 15). The 4k random-write figures come a
                                second time with "prefill": false: a new volume and a new file for
                                each run, each block written once (first-write allocation included).
                                Disks: image = an image file on the host's filesystem, block = a zram
                                block device (made for the run and removed by its number),
                                dir = a directory on XFS (reflink=1) on zram.
                                Suffix _thick: the same with provisioning=thick (thin is the plain name).
                                Where dg init refuses a directory, or volumes refuse provisioning=thick,
                                those lines are null with a note.
                                Suffix _fstype_none (and "fstype": "none" in the line): a volume with no
                                filesystem of its own (fstype=none: a quota-limited directory tree, bind-
                                mounted). It needs a filesystem that enforces a directory's size, which
                                on this kernel is only btrfs with quotas: the dir line's disk is then a
                                directory on btrfs (quotas enabled) on zram ("host_fs": "btrfs"); where
                                veritas refuses fstype=none on that kind of disk, the line is null with
                                the refusal as its note.

Runs as root. It starts its own dockerd (own mount and network namespaces, so it never touches the
host's engine or its docker0) and ``veritas plugin serve`` under a fresh /tmp directory with the
helpers of tests/integration/dockerstack.py, and removes everything at the end (processes by PID,
containers, volumes, the disk group, mounts, loop devices), also on error or SIGTERM.
``--quick`` runs a few repetitions of each (smoke test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# this file is named plugin.py: keep its directory off the path so `plugin` is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import requests_unixsocket  # noqa: E402

from bench import common  # noqa: E402
from bench.common import Pairs, Zram, emit, emit_missing, log, pct, run_pairs, sh, timed  # noqa: E402
from storage import diskgroup, options, volumes  # noqa: E402
from storage.config import Config, load_config  # noqa: E402
from storage.diskgroup import DiskSpec  # noqa: E402
from storage.errors import VeritasError  # noqa: E402
from storage.kernel import loop, mounts  # noqa: E402
from tests.integration.dockerstack import (  # noqa: E402
    IMAGE,
    DockerNode,
    PluginProcess,
    share_mount_root,
    unshare_mount_root,
    write_plugin_config,
)

FIO_MOUNTS = ("-v", "/usr/bin/fio:/fio:ro", "-v", "/usr/lib:/usr/lib:ro", "-v", "/usr/lib:/lib:ro",
              "-v", "/usr/lib64:/lib64:ro")














class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.quick = quick
        self.node = DockerNode(root / "node1")
        self.plugin: PluginProcess | None = None
        self.config_path = root / "veritas.conf"
        self.config = None
        self.session = requests_unixsocket.Session()
        self.shared = False
        self.zram = Zram()
        self.extra_plugins: list[PluginProcess] = []

    # ------------------------------------------------------------ set-up / clean-up

    def setup(self) -> None:
        share_mount_root(self.root / "mnt")  # before dockerd's namespace exists, so it sees volume mounts
        self.shared = True
        log("starting dockerd")
        self.node.start()
        write_plugin_config(self.root, self.node)
        self.config = load_config(self.config_path)
        self.plugin = PluginProcess(self.config_path, self.node.plugins / "veritas.sock", self.root / "plugin.log")
        log("starting the plugin")
        self.plugin.start()

    def cleanup(self) -> None:
        log("cleaning up")
        try:
            self.node.stop()  # removes containers and volumes through Docker (and so through the plugin)
        except Exception as exc:  # go on with the rest
            log(f"stopping dockerd: {exc!r}")
        if self.plugin is not None:
            try:
                self.plugin.stop()
            except Exception as exc:  # go on with the rest
                log(f"stopping the plugin: {exc!r}")
        # the same-disk figures' plugins run to the end: dockerd asks every driver it knows for its
        # volumes, and waits 15 s on one whose socket is gone
        for extra in self.extra_plugins:
            try:
                extra.stop()
            except Exception as exc:  # go on with the rest
                log(f"stopping a plugin: {exc!r}")
        if self.config is not None:
            for name in diskgroup.list_names(self.config):  # every disk group under the state root
                common.destroy_dg(self.config, name)
        if self.shared:
            unshare_mount_root(self.root / "mnt")
        self._force_clean()
        self.zram.remove_all()  # after the mounts on them are gone
        shutil.rmtree(self.root, ignore_errors=True)

    def _force_clean(self) -> None:
        prefix = str(self.root) + "/"
        left = []
        for e in sorted(mounts.table(), key=lambda e: -len(e.target)):
            if e.target.startswith(prefix):
                left.append(f"mount {e.target}")
                subprocess.run(["umount", "-l", e.target], capture_output=True, check=False)
        for _ in range(2):  # loops inside the disks first show as backed by paths under the root too
            for dev, back in loop.attached().items():
                if back.startswith(prefix):
                    left.append(f"loop {dev}")
                    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        if left:
            log(f"forced clean-up of leftovers: {', '.join(left)}")

    # ------------------------------------------------------------ helpers

    def call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.plugin is not None
        url = "http+unix://" + str(self.plugin.socket).replace("/", "%2F") + "/" + endpoint
        resp = self.session.post(url, data=json.dumps(body),
                                 headers={"Content-Type": "application/vnd.docker.plugins.v1+json"}, timeout=150)
        out = resp.json()
        if out.get("Err"):
            raise RuntimeError(f"{endpoint}: {out['Err']}")
        return out

    def cap(self, n: int) -> int:
        """How many pairs a figure of ``n`` may grow to while its pairs straddle the target (--quick: none)."""
        return n if self.quick else n + 10

    def docker(self, *args: str, timeout: float = 300) -> str:
        return sh("docker", "-H", self.node.url, *args, timeout=timeout)

    def disk_dir(self) -> Path:
        assert self.config is not None
        disks = sorted((self.config.dg_parent / self.config.diskgroup / "disks").iterdir())
        return disks[0]

    # ------------------------------------------------------------ a. Create at the socket

    def create_at_socket(self) -> None:
        n = 5 if self.quick else 21
        log(f"a. VolumeDriver.Create of 1 GiB x{n} vs bare truncate + losetup + mkfs.xfs + losetup -d")
        bare_dir = self.disk_dir() / "bench-bare"
        bare_dir.mkdir(exist_ok=True)

        def ours(i: int) -> float:
            name = f"cb{i}"
            t = timed(lambda: self.call("VolumeDriver.Create", {"Name": name, "Opts": {}}))
            self.call("VolumeDriver.Remove", {"Name": name})
            return t

        def bare(i: int) -> float:
            img = bare_dir / f"b{i}.img"

            def run() -> None:
                sh("truncate", "-s", "1G", img)
                for attempt in range(5):  # --find races with other processes attaching loop devices
                    try:
                        dev = sh("losetup", "--find", "--show", "--direct-io=on", "--sector-size=4096",
                                 img).strip()
                        break
                    except RuntimeError:
                        if attempt == 4:
                            raise
                try:
                    sh("mkfs.xfs", "-q", dev)
                finally:
                    sh("losetup", "-d", dev)

            try:
                return timed(run)
            finally:
                img.unlink(missing_ok=True)

        ours(99)  # warm-up: the workers' first disk group open and imports
        res = run_pairs(lambda i: ours(i) * 1e3, lambda i: bare(i) * 1e3, "<=1.5", n, cap=self.cap(n))
        log(f"   plugin p50 {res.value:.1f} ms, bare p50 {res.baseline:.1f} ms")
        res.emit("plugin_create_1g_p50", "ms", "<=1.5")
        bare_dir.rmdir()

    # ------------------------------------------------------------ b. docker volume create

    def docker_volume_create(self) -> None:
        n = 6 if self.quick else 50
        log(f"b. docker volume create x{n}: veritas vs local")

        def with_driver(driver: str) -> Callable[[int], float]:
            def run(i: int) -> float:
                name = f"dv{driver[0]}{i}"
                t = timed(lambda: self.docker("volume", "create", "-d", driver, "--name", name))
                self.docker("volume", "rm", name)
                return t
            return run

        res = run_pairs(with_driver("veritas"), with_driver("local"), None, n)
        log(f"   p50: veritas {res.value * 1e3:.1f} ms, local {res.baseline * 1e3:.1f} ms")
        Pairs([x * 1e3 for x in res.ours], [x * 1e3 for x in res.base]).emit("docker_volume_create_p50", "ms", None)
        v, base = pct(res.ours, 0.95) * 1e3, pct(res.base, 0.95) * 1e3
        log(f"   p95: veritas {v:.1f} ms, local {base:.1f} ms")
        emit("docker_volume_create_p95", v, "ms", base, None)

    # ------------------------------------------------------------ c. docker run --rm true

    def docker_run(self) -> None:
        n = 3 if self.quick else 20
        log(f"c. docker run --rm -v VOL:/data {IMAGE} true x{n}: veritas vs local volume")
        self.docker("volume", "create", "-d", "veritas", "--name", "runvol")
        self.docker("volume", "create", "-d", "local", "--name", "runlocal")

        def run_with(vol: str) -> Callable[[int], float]:
            return lambda i: timed(lambda: self.docker("run", "--rm", "--network", "none", "-v", f"{vol}:/data",
                                                       IMAGE, "true"))

        run_with("runvol")(0)  # warm-up
        run_with("runlocal")(0)
        res = run_pairs(lambda i: run_with("runvol")(i) * 1e3, lambda i: run_with("runlocal")(i) * 1e3, "<=1.3",
                        n, cap=self.cap(n))
        log(f"   veritas p50 {res.value:.1f} ms, local p50 {res.baseline:.1f} ms")
        res.emit("docker_run_true_p50", "ms", "<=1.3")
        self.docker("volume", "rm", "runvol", "runlocal")

    # ------------------------------------------------------------ d. fio inside containers

    def fio_container(self, vol: str) -> str:
        """A long-running container with ``vol`` at /data and the host's fio at /fio."""
        return self.docker("run", "-d", "--network", "none", "-v", f"{vol}:/data", *FIO_MOUNTS,
                           IMAGE, "sleep", "3600").strip()

    def fstype_in(self, ctr: str) -> str | None:
        table = self.docker("exec", ctr, "cat", "/proc/mounts").splitlines()
        return next((f.split()[2] for f in table if f.split()[1:2] == ["/data"]), None)

    def fio_job(self, ctr: str, rw: str, bs: str, size: str, depth: int, runtime: float) -> dict[str, float]:
        """One direct-I/O fio job on /data/fio-<rw>.dat inside ``ctr``: its write MB/s and IOPS."""
        engine = ["--ioengine=psync"] if depth == 1 else ["--ioengine=libaio", f"--iodepth={depth}"]
        out = self.docker("exec", ctr, "/fio", "--name=b", f"--filename=/data/fio-{rw}.dat",
                          f"--rw={rw}", f"--bs={bs}", "--direct=1", *engine, f"--size={size}",
                          f"--runtime={round(runtime * 1000)}ms", "--time_based", "--output-format=json",
                          timeout=runtime + 120)
        w = json.loads(out[out.index("{"):])["jobs"][0]["write"]
        return {"MB/s": w["bw_bytes"] / 1e6, "IOPS": w["iops"]}

    def fio_fill(self, ctr: str, files: tuple[tuple[str, str], ...]) -> None:
        """Write every file once first (steady state), so that no side counts first-write block allocation
        (in the volume's filesystem, and for veritas in the disk holding its image too)."""
        for rw, size in files:
            self.docker("exec", ctr, "/fio", "--name=fill", f"--filename=/data/fio-{rw}.dat",
                        "--rw=write", "--bs=1m", "--direct=1", "--ioengine=psync", f"--size={size}",
                        "--output-format=json", timeout=300)

    def fio(self) -> None:
        runtime = 0.5 if self.quick else 3
        reps = 1 if self.quick else 5
        seq, rnd = ("128m", "32m") if self.quick else ("512m", "64m")
        log(f"d. fio in containers ({reps} x {runtime} s each): veritas vs local volume on the host's filesystem")
        self.docker("volume", "create", "-d", "veritas", "--name", "fiovol")
        self.docker("volume", "create", "-d", "local", "--name", "fiolocal")
        src, diskfs = self._disk_fs_dir("fiovol")
        ctrs = {}
        try:
            for vol in ("fiovol", "fiolocal", str(diskfs)):
                ctrs[vol] = self.fio_container(vol)
            # the bind mount must reach the disk's XFS, not the empty directory under it
            if (fstype := self.fstype_in(ctrs[str(diskfs)])) != "xfs":
                raise RuntimeError(f"the disk group's filesystem is not visible in the container ({fstype})")
            for ctr in ctrs.values():
                self.fio_fill(ctr, (("write", seq), ("randwrite", rnd)))

            # the same jobs as bench/storage.py (libaio, QD8 sequential, QD32 random); the QD1 figures
            # (psync) show the per-I/O latency of the two loop layers. The QD32 random figure against the
            # host's own filesystem is information (the same-disk figures of group "same" carry the
            # target); it is split by the same job on the disk group's own filesystem (one loop layer,
            # over an image on the host's filesystem): what the embedded disk group's image costs.
            for metric, rw, bs, size, depth, unit, target in (
                    ("fio_seqwrite_1m_qd8", "write", "1m", seq, 8, "MB/s", ">=0.9"),
                    ("container_randwrite_4k_qd32_vs_host_fs", "randwrite", "4k", rnd, 32, "IOPS", None),
                    ("fio_seqwrite_1m_qd1", "write", "1m", seq, 1, "MB/s", None),
                    ("fio_randwrite_4k_qd1", "randwrite", "4k", rnd, 1, "IOPS", None)):
                def side(vol: str, a: tuple[str, str, str, int, str] = (rw, bs, size, depth, unit)) -> \
                        Callable[[int], float]:
                    return lambda i: self.fio_job(ctrs[vol], *a[:4], runtime)[a[4]]

                res = run_pairs(side("fiovol"), side("fiolocal"), target, reps, cap=self.cap(reps))
                log(f"   {metric}: veritas {res.ours}, local {res.base}")
                res.emit(metric, unit, target)
                if metric == "container_randwrite_4k_qd32_vs_host_fs":
                    disk = run_pairs(side(str(diskfs)), side("fiolocal"), None, reps)
                    log(f"   disk fs {disk.ours}, local {disk.base}")
                    disk.emit("fio_randwrite_4k_qd32_disk_fs_vs_local", unit, None)
        finally:
            for c in ctrs.values():
                subprocess.run(["docker", "-H", self.node.url, "rm", "-f", c], capture_output=True, check=False)
            subprocess.run(["docker", "-H", self.node.url, "volume", "rm", "fiovol", "fiolocal"],
                           capture_output=True, check=False)
            subprocess.run(["umount", str(diskfs)], capture_output=True, check=False)
            shutil.rmtree(src, ignore_errors=True)  # the fio files on the disk, outside any volume

    def _disk_fs_dir(self, volume: str, dg_name: str = "dockerdg", config: Config | None = None,
                     label: str = "diskfs") -> tuple[Path, Path]:
        """A directory on the filesystem of the disk that holds ``volume``'s image, bind-mounted under the
        (shared) mount root so that dockerd's namespace sees it."""
        config = config or self.config
        assert config is not None
        dg = diskgroup.open_dg(config, dg_name)
        try:
            rec = dg.catalog.volume(volume)
            assert rec is not None, volume
            # <disk>/vols/<image>: the disk's filesystem holds it (an fstype=none volume: its tree)
            img = Path(volumes.info(dg, volume)["tree"]) if rec.fstype == "none" else volumes.images(dg, rec)[0]
        finally:
            dg.close()
        src = img.parent.parent / f"bench-{label}"
        src.mkdir(exist_ok=True)
        if mounts.btrfs_fsid(src) is not None:  # btrfs: every subvolume has a device number of its own
            same = mounts.btrfs_fsid(src) == mounts.btrfs_fsid(img)
        else:
            same = os.stat(src).st_dev == os.stat(img).st_dev
        if not same:  # the kernel's word, not the path's
            raise RuntimeError(f"{src} is not on the filesystem holding {img}")
        dst = config.mount_root / f"bench-fio-{label}"
        dst.mkdir(exist_ok=True)
        sh("mount", "--bind", src, dst)
        return src, dst

    # ------------------------------------------------------------ e. the same disk, with and without veritas

    def same_disk(self) -> None:
        """For each kind of disk: a veritas volume on a one-disk disk group of that kind against a local-driver
        volume bound to a directory on that same disk's filesystem, both written by fio from a container."""
        thick = _thick_accepted()
        for kind in DISK_KINDS:
            provs = ["thin", "thick"] if thick is None else ["thin"]
            metrics = [(f"container_{job}_same_disk_{kind}{'' if prov == 'thin' else '_' + prov}", prov, job)
                       for prov in ("thin", "thick") for job in SAME_DISK_JOBS]
            try:
                note = self._same_disk_kind(kind, provs, metrics)
            except Exception:
                log(f"e. {kind} disks failed")
                raise
            for metric, prov, job in metrics + _first_write_metrics(kind):
                extra = FIRST_WRITE if (metric, prov, job) in _first_write_metrics(kind) else None
                if prov not in provs:
                    emit_missing(metric, SAME_DISK_JOBS[job][5], SAME_DISK_JOBS[job][6],
                                 f"thick provisioning not available ({thick})", fields=extra)
                elif note is not None:
                    emit_missing(metric, SAME_DISK_JOBS[job][5], SAME_DISK_JOBS[job][6], note, fields=extra)
            # the same disk once more, with a volume that has no filesystem of its own
            metrics = [(f"container_{job}_same_disk_{kind}_fstype_none", "none", job) for job in SAME_DISK_JOBS]
            note = self._same_disk_kind(kind, ["none"], metrics)
            for metric, _prov, job in metrics if note is not None else []:
                emit_missing(metric, SAME_DISK_JOBS[job][5], SAME_DISK_JOBS[job][6], note,
                             fields={"fstype": "none"})

    def _same_disk_kind(self, kind: str, provs: list[str], metrics: list[tuple[str, str, str]]) -> str | None:
        """Measure one kind of disk; emits its figures, or returns why it could not (a missing feature).
        ``provs`` ["none"]: one fstype=none volume, on a dir disk on btrfs with quotas for kind dir."""
        tree = provs == ["none"]
        pairs = 1 if self.quick else 7
        cap = 2 if self.quick else 15
        runtime = 0.5 if self.quick else 5
        sizes = {"randwrite": "32m" if self.quick else "256m", "write": "128m" if self.quick else "512m"}
        base = self.root / f"same-{kind}{'-tree' if tree else ''}"
        base.mkdir()
        dg_name = f"bench{kind}{'tree' if tree else ''}"
        log(f"e. same disk, {kind} disks: {pairs} pairs (up to {cap}) of {runtime} s, provisioning {provs}")
        zdevs: list[Path] = []
        dirfs: Path | None = None
        cfg = None
        ctrs: list[str] = []
        vols: list[str] = []
        binds: list[Path] = []
        try:
            if kind == "image":
                spec = f"{base}/d1.img=4g"
            elif kind == "block":
                zdevs.append(self.zram.add("4G"))
                spec = str(zdevs[-1])
            elif tree:  # fstype=none needs a filesystem that enforces a directory's size: btrfs with quotas
                zdevs.append(self.zram.add("8G"))
                sh("mkfs.btrfs", "-q", "-f", zdevs[-1])
                dirfs = base / "btrfs"
                dirfs.mkdir()
                sh("mount", zdevs[-1], dirfs)
                sh("btrfs", "quota", "enable", dirfs)
                (dirfs / "d1").mkdir()
                spec = f"{dirfs}/d1=4g"
            else:  # a directory on XFS (reflink=1) on zram: how a host's reflink-capable root stands in here
                zdevs.append(self.zram.add("8G"))
                sh("mkfs.xfs", "-q", "-m", "reflink=1", zdevs[-1])
                dirfs = base / "xfs"
                dirfs.mkdir()
                sh("mount", zdevs[-1], dirfs)
                (dirfs / "d1").mkdir()
                spec = f"{dirfs}/d1=4g"
            cfg_path = base / "veritas.conf"
            driver = f"veritas{kind}{'tree' if tree else ''}"
            write_kind_config(cfg_path, self.root, self.node, dg_name, driver)
            cfg = load_config(cfg_path)
            try:
                diskgroup.init(cfg, dg_name, [DiskSpec.parse(spec)]).close()
            except VeritasError as exc:
                if kind == "dir":
                    log(f"   dg init refused a directory disk: {exc}")
                    return f"directory disks not available: {exc}"
                raise
            plugin = PluginProcess(cfg_path, self.node.plugins / f"{driver}.sock", base / "plugin.log")
            self.extra_plugins.append(plugin)
            plugin.start()

            local = f"sdlocal{kind}"
            ours: dict[str, str] = {}
            for prov in provs:
                vol = f"sd{kind}{prov}"
                opts = ["-o", f"provisioning={prov}"] if "thick" in provs else []
                if tree:
                    opts = ["-o", "fstype=none", "-o", "size=2g"]
                try:
                    self.docker("volume", "create", "-d", driver, "--name", vol, *opts)
                except RuntimeError as exc:
                    if tree:  # refused on this kind of disk: the refusal is the line's note
                        log(f"   fstype=none refused on {kind} disks: {exc}")
                        why = str(exc).split(f"create {vol}: ", 1)[-1].strip()  # the plugin's own words
                        return f"fstype=none refused on {kind} disks: {why}"
                    raise
                vols.append(vol)
                ours[prov] = vol
            # the local volume's directory lies on the filesystem of the disk holding the (first) veritas
            # volume's image; the other volumes' images lie on the same disk (a one-disk group)
            src, dst = self._disk_fs_dir(ours[provs[0]], dg_name, cfg, label=f"local-{kind}")
            binds.append(dst)
            self.docker("volume", "create", "-d", "local", "-o", "type=none", "-o", "o=bind",
                        "-o", f"device={dst}", "--name", local)
            vols.append(local)
            cl = self.fio_container(local)
            ctrs.append(cl)
            if (fstype := self.fstype_in(cl)) != ("btrfs" if tree and kind == "dir" else "xfs"):
                raise RuntimeError(f"the local volume does not reach the disk's filesystem ({fstype})")
            co = {}
            for prov, vol in ours.items():
                co[prov] = self.fio_container(vol)
                ctrs.append(co[prov])
            for c in ctrs:
                self.fio_fill(c, tuple(sizes.items()))
            for metric, prov, job in metrics:
                if prov not in provs:
                    continue
                rw, bs, depth, field, _, unit, target = SAME_DISK_JOBS[job]
                ctr_ours = co[prov]

                def side(ctr: str, rw: str = rw, bs: str = bs, depth: int = depth, unit: str = unit) -> \
                        Callable[[int], float]:
                    return lambda i: self.fio_job(ctr, rw, bs, sizes[rw], depth, runtime)[unit]

                res = run_pairs(side(ctr_ours), side(cl), target, pairs, cap=cap)
                log(f"   {metric}: veritas {[round(x) for x in res.ours]}, local {[round(x) for x in res.base]}")
                res.emit(metric, unit, target,
                         fields={"fstype": "none", **({"host_fs": "btrfs"} if kind == "dir" else {})} if tree else None)
            for metric, prov, _job in _first_write_metrics(kind):
                if prov in provs:
                    self._first_write(driver, kind, prov, cl, sizes["randwrite"], metric, pairs, cap, vols)
            return None
        finally:
            for c in ctrs:
                subprocess.run(["docker", "-H", self.node.url, "rm", "-f", c], capture_output=True, check=False)
            for v in vols:
                subprocess.run(["docker", "-H", self.node.url, "volume", "rm", v], capture_output=True, check=False)
            for b in binds:
                subprocess.run(["umount", str(b)], capture_output=True, check=False)
            if cfg is not None and dg_name in diskgroup.list_names(cfg):
                common.destroy_dg(cfg, dg_name)
            if dirfs is not None and mounts.mounted_at(dirfs):
                sh("umount", dirfs)
            for z in zdevs:
                self.zram.remove(z)
            shutil.rmtree(base, ignore_errors=True)


    def _first_write(self, driver: str, kind: str, prov: str, local_ctr: str, size: str, metric: str,
                     pairs: int, cap: int, vols: list[str]) -> None:
        """The 4k random-write figure with nothing prefilled ("prefill": false): each veritas run writes a
        file in a volume made for that run (so every write also lands on a hole of a thin image), each
        local run a new file beside the local volume's others; each 4k block of the file is written once
        (no time_based), so every write is a first write. fio lays the file out with its default
        fallocate=native on both sides (unwritten extents in the filesystem the container sees)."""
        rw, bs, depth, _, _, unit, target = SAME_DISK_JOBS["randwrite_4k_qd32"]

        def ours(i: int) -> float:
            vol = f"sdfw{kind}{prov}{i}"
            self.docker("volume", "create", "-d", driver, "--name", vol, "-o", f"provisioning={prov}")
            vols.append(vol)
            ctr = self.fio_container(vol)
            try:
                return self.fio_once(ctr, "fw.dat", size, depth)[unit]
            finally:
                subprocess.run(["docker", "-H", self.node.url, "rm", "-f", ctr], capture_output=True, check=False)
                self.docker("volume", "rm", vol)
                vols.remove(vol)

        def base(i: int) -> float:
            name = f"fw-{prov}-{i}.dat"
            try:
                return self.fio_once(local_ctr, name, size, depth)[unit]
            finally:
                self.docker("exec", local_ctr, "rm", "-f", f"/data/{name}")

        res = run_pairs(ours, base, target, pairs, cap=cap)
        log(f"   {metric} (first write): veritas {[round(x) for x in res.ours]}, local {[round(x) for x in res.base]}")
        res.emit(metric, unit, target, fields=FIRST_WRITE)

    def fio_once(self, ctr: str, name: str, size: str, depth: int) -> dict[str, float]:
        """Direct 4k random writes (libaio, ``depth``) over a new file /data/``name`` of ``size``, each block
        once: first writes only."""
        out = self.docker("exec", ctr, "/fio", "--name=fw", f"--filename=/data/{name}", "--rw=randwrite",
                          "--bs=4k", "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", f"--size={size}",
                          "--output-format=json", timeout=300)
        w = json.loads(out[out.index("{"):])["jobs"][0]["write"]
        return {"MB/s": w["bw_bytes"] / 1e6, "IOPS": w["iops"]}


# the first-write variant of a same-disk figure: the same metric name, told apart by this field
FIRST_WRITE = {"prefill": False}


def _first_write_metrics(kind: str) -> list[tuple[str, str, str]]:
    """(metric, provisioning, job) of the first-write figures of one kind of disk: 4k random writes."""
    return [(f"container_randwrite_4k_qd32_same_disk_{kind}{'' if prov == 'thin' else '_thick'}", prov,
             "randwrite_4k_qd32") for prov in ("thin", "thick")]


# job: (rw, bs, iodepth, -, -, unit, target)
SAME_DISK_JOBS: dict[str, tuple[str, str, int, str, str, str, str]] = {
    "randwrite_4k_qd32": ("randwrite", "4k", 32, "iops", "", "IOPS", ">=0.85"),
    "seqwrite_1m_qd8": ("write", "1m", 8, "bw_bytes", "", "MB/s", ">=0.9"),
}
DISK_KINDS = ("image", "block", "dir")  # image files on the host's filesystem; zram devices; a directory


def _thick_accepted() -> str | None:
    """None when volumes take ``provisioning=thick``, else why not (this build has no such option)."""
    try:
        options.parse_create({"provisioning": "thick"})
    except VeritasError as exc:
        return str(exc)
    return None


def write_kind_config(path: Path, root: Path, node: DockerNode, dg_name: str, driver: str) -> None:
    """A plugin config serving disk group ``dg_name`` as driver ``driver`` (a socket of its own), sharing
    the bench's state and mount roots and engine."""
    path.write_text(
        "[storage]\n"
        f"diskgroup = {dg_name}\n"
        f"state_root = {root}/state\n"
        f"mount_root = {root}/mnt\n"
        "[node]\nname = node1\n"
        "[plugin]\n"
        f"socket = {node.plugins}/{driver}.sock\n"
        f"docker_host = {node.url}\n"
        "workers = 2\n"
    )


def main(argv: list[str] | None = None) -> int:
    methods = {"create": "create_at_socket", "volume": "docker_volume_create", "run": "docker_run", "fio": "fio",
               "same": "same_disk"}
    return common.main("bench-plugin", __doc__, argv,
                       tools=("dockerd", "docker", "fio", "mkfs.xfs", "losetup", "truncate", "umount"),
                       groups=list(methods), make=Bench,
                       run_group=lambda bench, group: getattr(bench, methods[group])())


if __name__ == "__main__":
    sys.exit(main())
