#!/usr/bin/env python3
"""Failover benchmark: how long a swarm service's veritas volume takes to follow its task to another node.

Prints one JSON object per figure on stdout (progress on stderr), in the format of bench/common.py.
Every figure runs in one three-node swarm lab (``scripts/lab up --nodes 3 --swarm``: node1 the drained
manager, tasks on node2 and node3; dispatcher heartbeat 1 s; the lab's default lease settings). Two
one-replica services run side by side, their tasks always on the same worker: ``fvol`` with a veritas
volume and ``flocal`` with a local-driver volume (the baseline). Both are ``--init
--stop-grace-period 0s`` with swarm's default restart policy (delay 5 s). Each run moves both tasks at
once, by one drain or one kill, and times each service from the same instant: the pairs share the
run's load and Docker's work. ``value``/``baseline`` are the medians (p50) of the veritas and the local
service, ``ratio`` the median per-run ratio, ``spread`` its [min, max].

  drain_to_running_with_volume      from `docker node update --availability drain NODE` to the task running
                                    on the other worker with its veritas volume mounted in that node's
                                    mount namespace; baseline: the local service's task running there.
                                    Target: the storage adds under 1 s, i.e. value < baseline + 1 s; the
                                    line's target is that threshold written out ("value<B+1" with this
                                    run's baseline B) and met is its verdict on value. 5 runs (1 with --quick).
  dockerd_kill_to_running_with_data from `scripts/lab kill NODE --only dockerd` to the task running on the
                                    other worker, reading there what the old task wrote. Target value < 10 s.
  node_kill_to_running_with_data    the same after `scripts/lab kill NODE` (every process of the node).
                                    Target value < lease_ttl + 3 s, lease_ttl read from the config the lab
                                    wrote for the node.
                                    Both kill figures: p50 of 10 runs (1 with --quick); the killed node is
                                    started again (`scripts/lab start`) before the next run.
  lab_up_3_nodes_swarm              bench/lab.py's figure (its own labs, before this one), group "up".

Throughout the kill and drain runs a thread samples every node's mount table (``/proc/PID/mountinfo``
of the node's first process: the node's own mount namespace) every 20 ms for the veritas volume's
filesystem, by what its device is (each node's own loop device, followed to the image's inode), and
every mount namespace of the machine (containers' too) for filesystems of the volume on distinct
devices. Two nodes with it mounted, or two of its filesystems alive, in one sample is an overlap: the
line carries ``"overlaps": N`` (samples in which it happened) and ``met`` is false whatever the time.

Runs as root. The lab lives under a fresh /tmp root and is taken down by ``scripts/lab down``
(processes by PID, namespaces, loop devices, mounts), also on error or SIGTERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench import lab as benchlab
from lab import uhttp
from storage.kernel import loop

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "scripts" / "lab"
IMAGE = "localbusybox:latest"
VOL, SVC, LSVC = "fvol", "fvol", "flocal"
WORKERS = ("node2", "node3")
LOOP_MAJOR = 7  # the volume's own device is a loop device on every node


FsId = tuple[tuple[int, int], tuple[int, ...]]


def fs_identity(majmin: str) -> FsId:
    """What a mount's device is, the same on every node: each node attaches a loop device of its own
    to the volume's image (and to the disk holding that image), so the device numbers differ between
    nodes. Followed through the loop devices' backing files (the kernel's device and inode of each,
    loop.backing_id_of) down to a device that is no loop: that device and the chain of inodes."""
    major, minor = (int(x) for x in majmin.split(":"))
    cur, chain = (major, minor), []
    while len(chain) < 8:
        b = loop.backing_id_of(*cur)
        if b is None:
            break
        chain.append(b[2])
        cur = (b[0], b[1])
    return cur, tuple(reversed(chain))


class MountWatch(threading.Thread):
    """Samples every node's mount table for one device ("MAJ:MIN") until stopped; counts the samples in
    which two or more nodes had it mounted."""

    def __init__(self, bench: Bench, dev: FsId, period: float = 0.02) -> None:
        super().__init__(name="mount-watch", daemon=True)
        self.bench, self.dev, self.period = bench, dev, period
        self.stopping = threading.Event()
        self.samples = 0
        self.held = 0  # samples in which some node had it mounted: a sampler that never sees it is broken
        self.live = 0  # samples in which some mount namespace of the machine had a filesystem of it
        self.overlaps = 0
        self.seen: list[tuple[float, list[str]]] = []  # overlapping samples: when, which nodes

    def run(self) -> None:
        while not self.stopping.wait(self.period):
            holders = [n for n in self.bench.nodes if self.dev in self.bench.devices_in(n)]
            live = self.live_filesystems()
            self.samples += 1
            self.held += bool(holders)
            self.live += bool(live)
            if len(holders) > 1 or len(live) > 1:
                self.overlaps += 1
                self.seen.append((time.monotonic(), holders + [f"filesystems on {sorted(live)}"]))

    def live_filesystems(self) -> set[str]:
        """The devices ("MAJ:MIN") carrying a filesystem of the volume in any mount namespace of the
        machine (the nodes' own and their containers'). Each node mounts the volume from a loop device of
        its own, so two of them alive at once are two nodes' filesystems on one image, even where a
        node's own mount table no longer shows it (a container that outlived the unmount there)."""
        seen: set[str] = set()
        out: set[str] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                ns = os.readlink(f"/proc/{entry}/ns/mnt")
                if ns in seen:
                    continue
                seen.add(ns)
                text = Path(f"/proc/{entry}/mountinfo").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                f = line.split()
                if len(f) > 2 and f[2].startswith(f"{LOOP_MAJOR}:") and fs_identity(f[2]) == self.dev:
                    out.add(f[2])
        return out

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.quick = quick
        self.dir = root / "lab"
        self.up_ok = False
        self.nodes = ["node1", *WORKERS]
        self.init_pids: dict[str, int] = {}
        self.sock: dict[str, str] = {}
        self.node_ids: dict[str, str] = {}
        self.dev: FsId | None = None
        self.lease_ttl = 0.0
        self.where = ""  # the worker both tasks run on
        self.upbench: benchlab.Bench | None = None

    # ---------------------------------------------------------------- the lab

    def lab(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([str(LAB), *args], env={**os.environ, "VERITAS_LAB_DIR": str(self.dir)},
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/lab {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc.stdout

    def docker(self, node: str, *args: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(["docker", "-H", f"unix://{self.sock[node]}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} on {node} failed: {proc.stderr.strip()}")
        return proc.stdout

    def refresh_pids(self) -> None:
        for n in json.loads(self.lab("status"))["nodes"]:
            if n["pids"]["init"]:
                self.init_pids[n["name"]] = int(n["pids"]["init"])
            else:
                self.init_pids.pop(n["name"], None)

    def devices_in(self, node: str) -> set[FsId]:
        """What is mounted in ``node``'s mount namespace (empty when the node is dead), by fs_identity."""
        pid = self.init_pids.get(node)
        if pid is None:
            return set()
        try:
            text = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            return set()
        return {fs_identity(line.split()[2]) for line in text.splitlines() if line}

    def mount_dev(self, node: str, target: str) -> FsId | None:
        pid = self.init_pids[node]
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            f = line.split()
            if f[4] == target:
                return fs_identity(f[2])
        return None

    def setup(self) -> None:
        pass

    def start_lab(self) -> None:
        t0 = time.perf_counter()
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.up_ok = True  # from here on, down at clean-up
        desc = json.loads(self.lab("up", "--nodes", "3", "--swarm"))
        self.sock = {n["name"]: n["docker_host"].removeprefix("unix://") for n in desc["nodes"]}
        self.refresh_pids()
        for sn in uhttp.get_json(self.sock["node1"], "/nodes"):
            self.node_ids[sn["Description"]["Hostname"]] = sn["ID"]
        from storage.config import load_config
        self.lease_ttl = load_config(self.dir / "nodes" / WORKERS[0] / "veritas.conf").cluster.lease_ttl
        common.log(f"lab up in {time.perf_counter() - t0:.1f} s; lease_ttl {self.lease_ttl:g} s")
        # both tasks on one worker: create the services while the other is drained
        first, other = WORKERS
        self.availability(other, "drain")
        # made on the node that imported the disk group (the first plugin up); any node mounts it then
        errors = []
        for n in (first, other, "node1"):
            try:
                self.docker(n, "volume", "create", "-d", "veritas", "-o", "size=100m", VOL)
                break
            except RuntimeError as exc:
                errors.append(str(exc))
        else:
            raise RuntimeError("no node could make the volume: " + "; ".join(errors))
        for name, mount in ((SVC, f"type=volume,source={VOL},target=/data,volume-driver=veritas"),
                            (LSVC, "type=volume,source=flocal,target=/data")):
            self.docker("node1", "service", "create", "-d", "--name", name, "--no-resolve-image", "--init",
                        "--stop-grace-period", "0s", "--mount", mount, IMAGE, "sleep", "1000000")
        self.wait(lambda: self.running_on(SVC, first) and self.running_on(LSVC, first), 120, "both tasks on " + first)
        self.availability(other, "active")
        self.where = first
        mp = self.docker(first, "volume", "inspect", "-f", "{{.Mountpoint}}", VOL).strip()
        dev = self.mount_dev(first, mp)
        if dev is None:
            raise RuntimeError(f"{VOL} is not mounted at {mp} on {first}")
        self.dev = dev
        common.log(f"{VOL}: device {dev}, mounted on {first}")

    def availability(self, node: str, what: str) -> None:
        self.docker("node1", "node", "update", "--availability", what, node)

    def task(self, service: str) -> dict[str, Any] | None:
        """The service's task that swarm wants running, as the manager sees it now."""
        q = json.dumps({"service": [service], "desired-state": ["running"]})
        tasks = uhttp.get_json(self.sock["node1"], "/tasks?filters=" + uhttp_quote(q), timeout=10)
        return max(tasks, key=lambda t: t["Meta"]["Version"]["Index"] if "Meta" in t else t["Version"]["Index"],
                   default=None)

    def running_on(self, service: str, node: str) -> str | None:
        """The container ID of ``service``'s task when it runs on ``node``, else None."""
        t = self.task(service)
        if t is None or t.get("NodeID") != self.node_ids[node] or t["Status"]["State"] != "running":
            return None
        return str(t["Status"].get("ContainerStatus", {}).get("ContainerID") or "") or None

    @staticmethod
    def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.02)

    def node_ready(self, node: str) -> bool:
        for sn in uhttp.get_json(self.sock["node1"], "/nodes"):
            if sn["ID"] == self.node_ids[node]:
                return bool(sn["Status"]["State"] == "ready" and sn["Spec"]["Availability"] == "active")
        return False

    # ---------------------------------------------------------------- one move

    def move(self, how: str, i: int) -> tuple[float, float]:
        """Move both tasks off the worker they run on (drain, kill of dockerd, kill of the node); the
        seconds until the veritas task runs on the other worker (volume mounted there; with a kill, the
        old task's data read back there) and until the local task runs there."""
        src = self.where
        dst = WORKERS[1] if src == WORKERS[0] else WORKERS[0]
        token = uuid.uuid4().hex
        if how != "drain":
            cid = self.running_on(SVC, src)
            if cid is None:
                raise RuntimeError(f"{SVC} does not run on {src}")
            self.docker(src, "exec", cid, "sh", "-c", f"echo {token} > /data/token && sync")
        times: dict[str, float] = {}
        t0 = time.monotonic()
        if how == "drain":
            self.availability(src, "drain")
        elif how == "dockerd":
            self.lab("kill", src, "--only", "dockerd")
        else:
            self.lab("kill", src)
            self.init_pids.pop(src, None)
        deadline = t0 + 120
        while len(times) < 2:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"{how} of {src}, run {i}: after 120 s only {sorted(times)} run on {dst}"
                                   f"; {SVC} task: {json.dumps(self.task(SVC))[:1500]}")
            if LSVC not in times and self.running_on(LSVC, dst):
                times[LSVC] = now - t0
            if SVC not in times:
                cid = self.running_on(SVC, dst)
                if cid and self.dev in self.devices_in(dst) and (
                        how == "drain" or self.docker(dst, "exec", cid, "cat", "/data/token",
                                                      check=False).strip() == token):
                    times[SVC] = time.monotonic() - t0
            time.sleep(0.02)
        common.log(f"{how} {src} -> {dst} run {i}: veritas {times[SVC]:.2f} s, local {times[LSVC]:.2f} s")
        # back to where the next run can move both tasks again
        if how == "drain":
            self.availability(src, "active")
        else:
            self.lab("start", src)
            self.refresh_pids()
        self.wait(lambda: self.node_ready(src), 120, f"{src} ready and active again")
        self.where = dst
        return times[SVC], times[LSVC]

    def figure(self, metric: str, how: str, runs: int, target: Callable[[float], str]) -> None:
        assert self.dev is not None
        watch = MountWatch(self, self.dev)
        watch.start()
        pairs = common.Pairs()
        try:
            for i in range(runs):
                o, b = self.move(how, i)
                pairs.ours.append(o)
                pairs.base.append(b)
        finally:
            watch.stop()
        if not watch.held or not watch.live:
            raise RuntimeError(f"the mount sampler never saw {VOL} mounted on any node: it is broken")
        for when, holders in watch.seen[:5]:
            common.log(f"{metric}: OVERLAP at {when:.2f}: {VOL} mounted on {', '.join(holders)}")
        tgt = target(pairs.baseline)
        common.emit(metric, pairs.value, "s", pairs.baseline, tgt, ratio=pairs.ratio, spread=pairs.spread(),
                    settled=pairs.settled(tgt), fields={"overlaps": watch.overlaps, "runs": runs},
                    failed=watch.overlaps > 0)
        common.log(f"{metric}: veritas {[round(x, 2) for x in pairs.ours]}, local {[round(x, 2) for x in pairs.base]}"
                   f", {watch.samples} mount samples, {watch.overlaps} overlapping, {watch.held} with it mounted"
                   f", {watch.live} with a filesystem of it found machine-wide")

    def run_group(self, group: str) -> None:
        if group == "up":
            self.upbench = benchlab.Bench(self.root / "up", self.quick)
            self.upbench.up()
            return
        if not self.dev:
            self.start_lab()
        kills = 1 if self.quick else 10
        if group == "drain":
            self.figure("drain_to_running_with_volume", "drain", 1 if self.quick else 5,
                        lambda base: f"value<{round(round(base, 3) + 1.0, 3)}")
        elif group == "dockerd":
            self.figure("dockerd_kill_to_running_with_data", "dockerd", kills, lambda base: "value<10")
        elif group == "node":
            self.figure("node_kill_to_running_with_data", "node", kills,
                        lambda base: f"value<{self.lease_ttl + 3:g}")

    def cleanup(self) -> None:
        if self.up_ok and self.dir.exists():
            try:
                self.lab("down")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                common.log(f"forced clean-up: scripts/lab down failed: {exc}")
        if self.upbench is not None:
            self.upbench.cleanup()
        try:
            self.root.rmdir()
        except OSError as exc:
            common.log(f"left behind: {exc}")


def uhttp_quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def main(argv: list[str] | None = None) -> int:
    return common.main("bench-failover", __doc__, argv, tools=("dockerd", "docker", "nsenter", "unshare", "ip"),
                       groups=["up", "drain", "dockerd", "node"], make=Bench,
                       run_group=lambda bench, group: bench.run_group(group))  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
