"""``scripts/lab``: the command line of the lab (see lab.core for what it makes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from lab.core import Lab, LabError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/lab", description="Several Docker nodes with veritas on one machine. "
                                "The lab lives in $VERITAS_LAB_DIR (default /var/lib/veritas-lab).")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring nodes node1..nodeN up; prints {\"nodes\": [...]} as JSON")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--sites", type=int, default=1, help="split the nodes into sites with separate state roots")
    up.add_argument("--swarm", action="store_true", help="a swarm: node1 manager (drained), the others workers")
    up.add_argument("--catalog", choices=["sqlite", "etcd"], default="sqlite")
    up.add_argument("--pacemaker", action="store_true", help="corosync and Pacemaker on every node, fenced by "
                    "fence_lab; returns once every node is online with quorum")
    up.add_argument("--app", action="store_true", help="with --pacemaker: every node's dockerd adopted by a clone "
                    "of ocf:veritas:DockerDaemon and a group with ocf:veritas:DockerContainer web (volume "
                    "webdata:/data) on it; the agents' watcher on every node")
    up.add_argument("--no-plugin", action="store_true", help="bare engines, no veritas plugin")
    up.add_argument("--lease-ttl", type=float, help="[cluster] lease_ttl of every node (default: the config's 10 s)")
    up.add_argument("--lease-interval", type=float, help="[cluster] lease_interval (default: the config's 2 s)")
    up.add_argument("--repl-interval", type=float, help="with --sites 2 or more: [replication] interval of every "
                    "node's `veritas rlink serve` (started on every node, on ADDRESS:4145; default 2 s)")
    ex = sub.add_parser("exec", help="run CMD inside NODE with DOCKER_HOST and VERITAS_CONFIG set")
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    k = sub.add_parser("kill", help="SIGKILL the whole node (every process in it) or one daemon")
    k.add_argument("node")
    k.add_argument("--only", choices=["dockerd", "plugin", "rlink"])
    s = sub.add_parser("start", help="bring back whatever of NODE is not running (with Pacemaker: until it rejoined)")
    s.add_argument("node")
    c = sub.add_parser("cut", help="partition NODE from its peers and etcd")
    c.add_argument("node")
    h = sub.add_parser("heal", help="undo cut")
    h.add_argument("node")
    sub.add_parser("status", help="nodes, processes, swarm state as JSON")
    sub.add_parser("down", help="end every process of the lab, remove its namespaces, mounts, loops, directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    lab = Lab()
    try:
        if a.cmd == "up":
            print(json.dumps(lab.up(a.nodes, a.sites, a.swarm, a.catalog, not a.no_plugin, a.pacemaker,
                                    lease_ttl=a.lease_ttl, lease_interval=a.lease_interval, app=a.app,
                                    repl_interval=a.repl_interval)))
        elif a.cmd == "exec":
            cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
            args, env = lab.exec_argv(a.node, cmd)
            os.execvpe(args[0], args, env)
        elif a.cmd == "kill":
            lab.kill(a.node, a.only)
        elif a.cmd == "start":
            lab.start(a.node)
        elif a.cmd in ("cut", "heal"):
            lab.cut(a.node, a.cmd == "cut")
        elif a.cmd == "status":
            print(json.dumps(lab.status(), indent=1))
        elif a.cmd == "down":
            lab.down()
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    return 0
