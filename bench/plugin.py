#!/usr/bin/env python3
"""Docker volume plugin benchmark: the veritas driver against bare storage commands and Docker's local driver.

Prints one JSON object per figure on stdout (progress goes to stderr)::

    {"metric": ..., "value": ..., "unit": ..., "baseline": ..., "ratio": ..., "target": ...}

``ratio`` is always value / baseline; ``target`` is a condition on ``ratio`` ("<=1.5", ">=0.9") or "info".
Runs of the two sides are interleaved (ours, bare, bare, ours, ...) so load from other processes lands on
both alike.

Figures:
  plugin_create_1g_p50          VolumeDriver.Create of a 1 GiB volume (defaults: concat, xfs) timed at the
                                plugin's socket, Remove between runs; baseline: the bare commands it runs
                                (truncate, losetup --find --show --direct-io=on --sector-size=4096,
                                mkfs.xfs -q, losetup -d) on an image inside the disk group's disk
  docker_volume_create_p50/_p95 `docker volume create` end to end, veritas vs the local driver
  docker_run_true_p50           `docker run --rm -v VOL:/data localbusybox true`, veritas vs local volume
  fio_seqwrite_1m_qd8           direct sequential 1 MiB writes (fio, libaio, QD8) inside a container,
                                veritas vs local volume (MB/s); _qd1 the same with psync (information)
  fio_randwrite_4k_qd32         direct 4k random writes (fio, libaio, QD32) inside a container (IOPS);
                                _qd1 the same with psync (information: two loop layers' latency);
                                _disk_fs_vs_local and _volume_vs_disk_fs (information) split the
                                figure: the same job on a bind mount of the disk group's own
                                filesystem (one loop layer, over the disk's image on the host) against
                                the local volume, and the veritas volume against that filesystem
                                (fio: the host's binary bind-mounted; files written once before; medians
                                of 5 interleaved 3 s runs)

Runs as root. It starts its own dockerd (own mount and network namespaces, so it never touches the
host's engine or its docker0) and ``veritas plugin serve`` under a fresh /tmp directory with the
helpers of tests/integration/dockerstack.py, and removes everything at the end (processes by PID,
containers, volumes, the disk group, mounts, loop devices), also on error or SIGTERM.
``--quick`` runs a few repetitions of each (smoke test).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# this file is named plugin.py: keep its directory off the path so `plugin` is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import requests_unixsocket  # noqa: E402

from bench import common  # noqa: E402
from bench.common import emit, log, pct, rotated, sh, timed  # noqa: E402
from storage import diskgroup  # noqa: E402
from storage.config import load_config  # noqa: E402
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
        if self.config is not None:
            for name in diskgroup.list_names(self.config):
                for attempt in range(3):
                    try:
                        dg = diskgroup.open_dg(self.config, name)
                        for v in dg.catalog.volumes():
                            for m in dg.catalog.mounts(v.name):
                                dg.catalog.remove_mount(v.name, m.node, m.mount_id)
                        diskgroup.destroy(dg, force=True)
                        break
                    except Exception as exc:  # the forced clean-up below still runs
                        log(f"destroying disk group {name} (attempt {attempt + 1}): {exc!r}")
                        time.sleep(1)
        if self.shared:
            unshare_mount_root(self.root / "mnt")
        self._force_clean()
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
        a, b = rotated(n, ours, bare)
        log(f"   plugin p50 {statistics.median(a) * 1e3:.1f} ms, bare p50 {statistics.median(b) * 1e3:.1f} ms")
        emit("plugin_create_1g_p50", statistics.median(a) * 1e3, "ms", statistics.median(b) * 1e3, "<=1.5")
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

        a, b = rotated(n, with_driver("veritas"), with_driver("local"))
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            v, base = pct(a, q) * 1e3, pct(b, q) * 1e3
            log(f"   {label}: veritas {v:.1f} ms, local {base:.1f} ms")
            emit(f"docker_volume_create_{label}", v, "ms", base, "info")

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
        a, b = rotated(n, run_with("runvol"), run_with("runlocal"))
        log(f"   veritas p50 {statistics.median(a) * 1e3:.1f} ms, local p50 {statistics.median(b) * 1e3:.1f} ms")
        emit("docker_run_true_p50", statistics.median(a) * 1e3, "ms", statistics.median(b) * 1e3, "<=1.3")
        self.docker("volume", "rm", "runvol", "runlocal")

    # ------------------------------------------------------------ d. fio inside containers

    def fio(self) -> None:
        runtime = 1 if self.quick else 3
        reps = 1 if self.quick else 5
        log(f"d. fio in containers ({reps} x {runtime} s each): veritas vs local volume")
        self.docker("volume", "create", "-d", "veritas", "--name", "fiovol")
        self.docker("volume", "create", "-d", "local", "--name", "fiolocal")
        src, diskfs = self._disk_fs_dir("fiovol")
        ctrs = {}
        try:
            for vol in ("fiovol", "fiolocal", str(diskfs)):
                ctrs[vol] = self.docker("run", "-d", "--network", "none", "-v", f"{vol}:/data", *FIO_MOUNTS,
                                        IMAGE, "sleep", "3600").strip()
            # the bind mount must reach the disk's XFS, not the empty directory under it
            table = self.docker("exec", ctrs[str(diskfs)], "cat", "/proc/mounts").splitlines()
            fstype = next((f.split()[2] for f in table if f.split()[1:2] == ["/data"]), None)
            if fstype != "xfs":
                raise RuntimeError(f"the disk group's filesystem is not visible in the container ({fstype})")

            def job(vol: str, rw: str, bs: str, size: str, depth: int) -> dict[str, Any]:
                engine = ["--ioengine=psync"] if depth == 1 else ["--ioengine=libaio", f"--iodepth={depth}"]
                out = self.docker("exec", ctrs[vol], "/fio", "--name=b", f"--filename=/data/fio-{rw}.dat",
                                  f"--rw={rw}", f"--bs={bs}", "--direct=1", *engine, f"--size={size}",
                                  f"--runtime={runtime}", "--time_based", "--output-format=json",
                                  timeout=runtime + 120)
                data = json.loads(out[out.index("{"):])
                w = data["jobs"][0]["write"]
                return {"MB/s": w["bw_bytes"] / 1e6, "IOPS": w["iops"]}

            # steady state: write every file once first, so that neither side counts first-write block
            # allocation (in the volume's filesystem, and for veritas in the disk holding its image too)
            for vol in ctrs:
                for rw, size in (("write", "512m"), ("randwrite", "64m")):
                    self.docker("exec", ctrs[vol], "/fio", "--name=fill", f"--filename=/data/fio-{rw}.dat",
                                "--rw=write", "--bs=1m", "--direct=1", "--ioengine=psync", f"--size={size}",
                                "--output-format=json", timeout=300)

            # the targets use the same jobs as bench/storage.py (libaio, QD8 sequential, QD32 random); the
            # QD1 figures (psync) show the per-I/O latency of the two loop layers and are reported too.
            # The random QD32 runs also run on the disk group's own filesystem (one loop layer, over an
            # image on the host's filesystem): what the embedded disk group's image costs, apart from
            # what the volume adds on top of it.
            for metric, rw, bs, size, depth, unit, target in (
                    ("fio_seqwrite_1m_qd8", "write", "1m", "512m", 8, "MB/s", ">=0.9"),
                    ("fio_randwrite_4k_qd32", "randwrite", "4k", "64m", 32, "IOPS", ">=0.7"),
                    ("fio_seqwrite_1m_qd1", "write", "1m", "512m", 1, "MB/s", "info"),
                    ("fio_randwrite_4k_qd1", "randwrite", "4k", "64m", 1, "IOPS", "info")):
                sides = ["fiovol", "fiolocal"] + ([str(diskfs)] if metric == "fio_randwrite_4k_qd32" else [])
                res = rotated(reps, *[lambda i, v=v, a=(rw, bs, size, depth, unit): job(v, *a[:4])[a[4]]
                                      for v in sides])
                log(f"   {metric}: veritas {res[0]}, local {res[1]}" + (f", disk fs {res[2]}" if len(res) > 2 else ""))
                ours, local = statistics.median(res[0]), statistics.median(res[1])
                emit(metric, ours, unit, local, target)
                if len(res) > 2:
                    disk = statistics.median(res[2])
                    emit(metric + "_disk_fs_vs_local", disk, unit, local, "info")
                    emit(metric + "_volume_vs_disk_fs", ours, unit, disk, "info")
        finally:
            for c in ctrs.values():
                subprocess.run(["docker", "-H", self.node.url, "rm", "-f", c], capture_output=True, check=False)
            subprocess.run(["docker", "-H", self.node.url, "volume", "rm", "fiovol", "fiolocal"],
                           capture_output=True, check=False)
            subprocess.run(["umount", str(diskfs)], capture_output=True, check=False)
            shutil.rmtree(src, ignore_errors=True)  # the fio files on the disk, outside any volume

    def _disk_fs_dir(self, volume: str) -> tuple[Path, Path]:
        """A directory on the filesystem of the disk that holds ``volume``'s image, bind-mounted under the
        (shared) mount root so that dockerd's namespace sees it."""
        assert self.config is not None
        dg = diskgroup.open_dg(self.config, "dockerdg")
        try:
            disk = dg.catalog.subdisks(volume)[0].disk
            src = dg.disk_dir(disk) / "bench-fio"
        finally:
            dg.close()
        src.mkdir(exist_ok=True)
        dst = self.config.mount_root / "bench-fio-diskfs"
        dst.mkdir(exist_ok=True)
        sh("mount", "--bind", src, dst)
        return src, dst


def main(argv: list[str] | None = None) -> int:
    methods = {"create": "create_at_socket", "volume": "docker_volume_create", "run": "docker_run", "fio": "fio"}
    return common.main("bench-plugin", __doc__, argv,
                       tools=("dockerd", "docker", "fio", "mkfs.xfs", "losetup", "truncate"),
                       groups=["create", "volume", "run", "fio"], make=Bench,
                       run_group=lambda bench, group: getattr(bench, methods[group])())


if __name__ == "__main__":
    sys.exit(main())
