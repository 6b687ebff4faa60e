"""bench/agents.py's figures on a Pacemaker lab: failover_{standby,container_kill,dockerd_kill,node_kill}
beside the stock ocf:heartbeat:docker agent, and migrate_container beside a bare stop, rm and run.

How they are taken is written in bench/agents.py's docstring (the figures' one description); the
scenarios are bench/pcmk_failover.py's, the ones tests/cluster/test_pacemaker_failover.py asserts on.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common
from bench import pcmk_failover as pf
from bench.common import Pairs, log, pct, strata_phases
from bench.pcmk_failover import GROUP, STOCK_RSC, WEB_RSC, Cluster, Move, Rsc

MONITOR_INTERVAL = 10.0  # web's and stockweb's monitor interval (lab.pacemaker, pcmk_failover.stock_xml)
TTL, INTERVAL = 5.0, 0.5  # the lab's leases: tests/cluster/test_pacemaker_failover.py's
MIG, MIG_VOL = "mig", "migdata"  # ours: a container on a veritas volume, moved by veritas migrate
BARE, BARE_VOL = "migl", "migl"  # the baseline: the same container on a local-driver volume
MIG_NODES = ("node2", "node3")
# the container's command: it ends at once on SIGTERM, as web's does (lab.pacemaker.APP_COMMAND)
MIG_CMD = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]


def failover_runs(quick: bool) -> int:
    return 1 if quick else 10


def emit_failover(metric: str, pairs: Pairs, overlaps: int, fields: dict[str, Any] | None = None) -> None:
    """p50 of ours against p50 of the stock agent's (ratio: the median per-run ratio, spread its range);
    then their p95. No target: the issue names none (met null)."""
    extra = {"overlaps": overlaps, "runs": len(pairs.ours), **(fields or {})}
    pairs.emit(metric, "s", None, fields=extra)
    common.emit(f"{metric}_p95", pct(pairs.ours, 0.95), "s", pct(pairs.base, 0.95), None, fields=extra)


def emit_migrate(pairs: Pairs) -> None:
    pairs.emit("migrate_container", "s", None, fields={"runs": len(pairs.ours)})


class LabFigures:
    """One three-node Pacemaker lab (``up --pacemaker --app``) with the stock resource added beside web."""

    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.quick = quick
        self.lab: Any = None
        self.c: Cluster | None = None
        self.sampler: Any = None
        self.hosts: dict[str, str] = {}
        self.mig_at = MIG_NODES[0]  # where mig (and migl) run now

    # ------------------------------------------------------------ lab up / down

    def start(self) -> Cluster:
        if self.c is not None:
            return self.c
        import json

        from tests.cluster.test_failover import MountSampler
        from tests.cluster.test_lab import Lab

        self.lab = Lab(self.root / "lab")
        t0 = time.monotonic()
        out = self.lab.run("up", "--nodes", "3", "--pacemaker", "--app", "--lease-ttl", f"{TTL:g}",
                           "--lease-interval", f"{INTERVAL:g}", timeout=300)
        self.hosts = {n["name"]: n["docker_host"] for n in json.loads(out.stdout)["nodes"]}
        c = Cluster(self.lab)
        log(f"lab up --pacemaker --app in {time.monotonic() - t0:.1f} s (lease_ttl {TTL:g} s)")
        prim, cons = pf.stock_xml()
        c.in_node("node1", "cibadmin", "--create", "-o", "resources", "--xml-text", prim)
        for x in cons:
            c.in_node("node1", "cibadmin", "--create", "-o", "constraints", "--xml-text", x)
        c.settle("node1")
        web = c.where(WEB_RSC.id)
        pf.wait_for(lambda: c.started("node1", STOCK_RSC.id) == [web], 60, f"{STOCK_RSC.id} running beside web")
        log(f"web and {STOCK_RSC.id} (ocf:heartbeat:docker) run on {web}")
        self.sampler = MountSampler(self.lab).start()
        self.c = c
        return c

    def cleanup(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
        if self.lab is not None and Path(self.lab.dir).exists():
            r = self.lab.run("down", check=False, timeout=240)
            if r.returncode != 0:
                log(f"scripts/lab down failed: {r.stderr[-1500:]}")
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ between runs

    def idle(self, both_on_one: bool) -> None:
        """Before a run: nothing pending, every node's dockerd adopted, web (and stockweb, when they are
        to move together) started, on one node."""
        assert self.c is not None
        c = self.c
        c.settle("node1")
        c.daemons_everywhere("node1", 90)
        rscs = [WEB_RSC, STOCK_RSC] if both_on_one else []
        if rscs:
            pf.wait_for(lambda: len({n for r in rscs for n in c.started("node1", r.id)}) == 1
                        and all(len(c.started("node1", r.id)) == 1 for r in rscs), 60, "web and stockweb on one node")

    def only(self, rsc: Rsc) -> None:
        """Only ``rsc`` runs: the other one's target-role Stopped (separate events per run)."""
        assert self.c is not None
        other = GROUP if rsc == STOCK_RSC else STOCK_RSC.id
        self.c.target_role("node1", other, "Stopped")
        self.c.target_role("node1", GROUP if rsc == WEB_RSC else STOCK_RSC.id, "Started")
        self.c.settle("node1")
        self.c.where(rsc.id)

    def both(self) -> None:
        assert self.c is not None
        self.c.target_role("node1", GROUP, "Started")
        self.c.target_role("node1", STOCK_RSC.id, "Started")

    # ------------------------------------------------------------ failover figures

    def figure(self, group: str) -> None:
        c = self.start()
        runs = failover_runs(self.quick)
        before = len(self.sampler.overlaps)
        pairs = Pairs()
        self.fenced = {WEB_RSC.id: 0, STOCK_RSC.id: 0}
        # container_kill: where in the 10 s monitor interval the crossing kill falls, one per stratum
        phases = strata_phases(runs, MONITOR_INTERVAL, random.Random(7))
        t_fig = time.monotonic()
        for i in range(runs):
            if group in ("standby", "node_kill"):
                self.both()
                self.idle(True)
                if group == "standby":
                    m = pf.standby(c, [WEB_RSC, STOCK_RSC])
                    pf.unstandby(c, m.src)
                else:
                    m = pf.node_kill(c, [WEB_RSC, STOCK_RSC])
                    log(f"   {m.src} back in {pf.restore_node(c, m.src):.1f} s")
                o, b = m.secs(WEB_RSC), m.secs(STOCK_RSC)
                log(f"{group} run {i}: {m.src} -> web {m.dst(WEB_RSC)} {o:.2f} s, stock {m.dst(STOCK_RSC)} {b:.2f} s")
            else:
                one: Callable[[Rsc, float], float] = (self.kill_container if group == "container_kill"
                                                      else self.kill_dockerd)
                if i % 2 == 0:
                    o, b = one(WEB_RSC, phases[i]), one(STOCK_RSC, phases[i])
                else:
                    b, o = one(STOCK_RSC, phases[i]), one(WEB_RSC, phases[i])
                log(f"{group} run {i}: web {o:.2f} s, stock {b:.2f} s")
            pairs.ours.append(o)
            pairs.base.append(b)
        self.both()
        overlaps = len(self.sampler.overlaps) - before
        for line in self.sampler.overlaps[before:before + 5]:
            log(f"OVERLAP: {line}")
        log(f"failover_{group}: web {[round(x, 2) for x in pairs.ours]}, stock {[round(x, 2) for x in pairs.base]}; "
            f"{runs} runs in {time.monotonic() - t_fig:.0f} s"
            + "".join(f"; {r}'s node was fenced (a stop failed) in {n} of them" for r, n in self.fenced.items() if n))
        emit_failover(f"failover_{group}", pairs, overlaps)
        if overlaps:
            raise RuntimeError(f"failover_{group}: {VOLS} mounted on two nodes at once in {overlaps} samples")

    fenced: dict[str, int] = {}  # dockerd_kill: per resource, the runs in which its node was fenced

    def kill_container(self, rsc: Rsc, phase: float) -> float:
        assert self.c is not None
        self.only(rsc)
        self.idle(False)
        m = pf.container_kill(self.c, rsc, phase=phase)
        pf.clear_failures(self.c, rsc, m.src)
        log(f"   {rsc.id}: {m.kills} kills, restarts in place {[round(x, 2) for x in m.restarts]} s, "
            f"then on {m.dst(rsc)} {m.secs(rsc):.2f} s after the last (phase {phase:.2f} s)")
        return m.secs(rsc)

    def kill_dockerd(self, rsc: Rsc, _phase: float) -> float:
        assert self.c is not None
        self.only(rsc)
        self.idle(False)
        m: Move = pf.dockerd_kill(self.c, [rsc])
        if not self.c.alive(m.src):
            self.fenced[rsc.id] += 1
        pf.restore_dockerd(self.c, m.src, [rsc], via=pf._other(m.src))
        return m.secs(rsc)

    # ------------------------------------------------------------ migrate_container

    def node_env(self, node: str) -> list[str]:
        assert self.lab is not None
        base = Path(self.lab.dir) / "nodes" / node
        return ["env", f"VERITAS_CONFIG={base / 'veritas.conf'}", f"PYTHONPATH={common_repo()}",
                f"DOCKER_HOST={self.hosts[node]}"]

    def migrate(self) -> None:
        c = self.start()
        from lab.image import IMAGE

        src = self.mig_at
        errors = []
        for n in (src, *pf.NODES):  # made on any node that sees the disk group (the first that can)
            r = c.docker(n, "volume", "create", "-d", "veritas", "-o", "size=100m", MIG_VOL, check=False, timeout=120)
            if r.returncode == 0:
                break
            errors.append(f"{n}: {r.stderr.strip()}")
        else:
            raise RuntimeError(f"no node could make volume {MIG_VOL}: {'; '.join(errors)}")
        for name, vol in ((MIG, f"{MIG_VOL}:/data"), (BARE, f"{BARE_VOL}:/data")):
            drv = ["--volume-driver", "veritas"] if name == MIG else []
            c.docker(src, "run", "-d", "--name", name, "--stop-timeout", "5", "-v", vol, *drv, IMAGE, *MIG_CMD,
                     timeout=120)
        before = len(self.sampler.overlaps)

        def ours(i: int) -> float:
            src = self.mig_at
            dst = MIG_NODES[1] if src == MIG_NODES[0] else MIG_NODES[0]
            token = uuid.uuid4().hex
            c.docker(src, "exec", MIG, "sh", "-c", f"echo {token} >> /data/log && sync")
            pid = c.init_pid(src)
            argv = ["nsenter", "-t", str(pid), "-m", "-u", "-n", "--wd=/", *self.node_env(src), sys.executable, "-m",
                    "veritas.cli", "--json", "migrate", "container", MIG, "--to", dst, "--to-host", self.hosts[dst]]
            t0 = time.monotonic()
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"veritas migrate container {MIG} {src} -> {dst}: {r.stderr.strip()}")
            pf.wait_for(lambda: c.reads(dst, token, pf.Rsc(MIG, MIG, True)), 30, f"{MIG} reading its data on {dst}")
            took = time.monotonic() - t0
            log(f"migrate run {i}: veritas migrate {src} -> {dst} {took:.2f} s ({r.stdout.strip()})")
            return took

        def bare(i: int) -> float:
            src = self.mig_at
            dst = MIG_NODES[1] if src == MIG_NODES[0] else MIG_NODES[0]
            t0 = time.monotonic()
            c.docker(src, "stop", BARE)
            c.docker(src, "rm", BARE)
            c.docker(dst, "run", "-d", "--name", BARE, "--stop-timeout", "5", "-v", f"{BARE_VOL}:/data", IMAGE,
                     *MIG_CMD)
            c.docker(dst, "exec", BARE, "ls", "/data")  # its (local, empty on first use) volume is there
            took = time.monotonic() - t0
            log(f"migrate run {i}: bare stop, rm, run {src} -> {dst} {took:.2f} s")
            return took

        pairs = Pairs()
        for i in range(-1, failover_runs(self.quick)):  # run -1: one warm-up of each, not recorded
            sides = (ours, bare) if i % 2 == 0 else (bare, ours)
            res = {f: f(i) for f in sides}
            self.mig_at = MIG_NODES[1] if self.mig_at == MIG_NODES[0] else MIG_NODES[0]
            if i >= 0:
                pairs.ours.append(res[ours])
                pairs.base.append(res[bare])
        overlaps = len(self.sampler.overlaps) - before
        log(f"migrate_container: veritas {[round(x, 2) for x in pairs.ours]}, bare {[round(x, 2) for x in pairs.base]}"
            f" (p50 {statistics.median(pairs.ours):.2f} / {statistics.median(pairs.base):.2f} s)")
        emit_migrate(pairs)
        for name in (MIG, BARE):
            c.docker(self.mig_at, "rm", "-f", name, check=False)
        if overlaps:
            raise RuntimeError(f"migrate_container: a volume mounted on two nodes at once in {overlaps} samples")


VOLS = f"{pf.VOL} or {MIG_VOL}"


def common_repo() -> str:
    return str(Path(__file__).resolve().parents[1]) + (os.pathsep + os.environ["PYTHONPATH"]
                                                      if "PYTHONPATH" in os.environ else "")
