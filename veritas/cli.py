"""``veritas``: storage commands (storage.cli) and ``plugin serve``, composed above both layers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from storage import cli as storage_cli
from storage import rvgcli
from storage.config import Config, load_config
from storage.errors import VeritasError
from veritas.version import version


def _serve(cfg: Config, a: argparse.Namespace) -> None:
    from plugin.serve import serve

    raise SystemExit(serve(cfg, Path(a.socket) if a.socket else None, a.workers))


def build_parser() -> argparse.ArgumentParser:
    p = storage_cli.build_parser()
    p.add_argument("--version", action="version", version=f"veritas {version()}",
                   help="print the installed version and exit")
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    plug = sub.add_parser("plugin", help="the Docker volume plugin").add_subparsers(dest="cmd", required=True)
    x = plug.add_parser("serve", help="serve the VolumeDriver API on a unix socket (foreground)")
    x.add_argument("--socket", help="socket path (default from the config file)")
    x.add_argument("--workers", type=int, help="gunicorn workers (default from the config file)")
    x.set_defaults(fn=_serve)
    mig = sub.add_parser("migrate", help="offline migration to another node of the disk group")
    msub = mig.add_subparsers(dest="cmd", required=True)
    x = msub.add_parser("container", help="stop a container here, release its veritas volumes, recreate and "
                        "start it on another node with the same configuration and data")
    x.add_argument("name")
    x.add_argument("--to", required=True, metavar="NODE", help="target node (holds a live lease in the disk group)")
    x.add_argument("--to-host", required=True, metavar="URL", help="the target node's engine (DOCKER_HOST form)")
    x.add_argument("--from-host", metavar="URL", help="this node's engine (default: [plugin] docker_host)")
    x.add_argument("--keep", action="store_true", help="keep the source container, stopped and renamed "
                   "NAME-migrated-TIME, instead of removing it once the target's runs")
    x.add_argument("--timeout", type=float, default=60, help="seconds the target's container may take to run")
    x.set_defaults(fn=_migrate_container)
    x = msub.add_parser("daemon", help="move dockerd whose data root is on a veritas volume to another node, "
                        "and start there the containers that were running")
    g = x.add_mutually_exclusive_group(required=True)
    g.add_argument("--to", metavar="NODE", help="target node (holds a live lease in the disk group)")
    g.add_argument("--arrive", metavar="VOLUME", help="the target's half: mount VOLUME, start its dockerd, containers")
    x.add_argument("--pidfile", default="/var/run/docker.pid", help="the running dockerd's pid file")
    x.add_argument("--logfile", default="/var/log/veritas-dockerd.log", help="dockerd's output on the target")
    x.add_argument("--via", metavar="CMD", help="command prefix that runs a command on the target (ssh NODE); "
                   "without it, the arriving half is left to run there")
    x.set_defaults(fn=_migrate_daemon)
    rvgcli.add_commands(sub)
    return p


def _migrate_daemon(cfg: Config, a: argparse.Namespace) -> None:
    from veritas.migrate_daemon import arrive_daemon, migrate_daemon

    if a.arrive:
        out = arrive_daemon(cfg, a.arrive)
    else:
        out = migrate_daemon(cfg, a.to, a.pidfile, a.logfile, a.via)
    storage_cli._emit(a, out)


def _migrate_container(cfg: Config, a: argparse.Namespace) -> None:
    from veritas.migrate import migrate_container

    out = migrate_container(cfg, a.name, a.to, a.to_host, a.from_host, keep=a.keep, timeout=a.timeout)
    storage_cli._emit(a, out, lambda r: f"container {r['container']} runs on node {r['to']} "
                      f"(down {r['down_seconds']} s); source container {r['source']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fn is not _serve:
        storage_cli.log_to_stderr()
    try:
        args.fn(load_config(args.config), args)
    except VeritasError as exc:
        print(f"veritas: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
