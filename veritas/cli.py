"""``veritas``: storage commands (storage.cli) and ``plugin serve``, composed above both layers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from storage import cli as storage_cli
from storage.config import Config, load_config
from storage.errors import VeritasError


def _serve(cfg: Config, a: argparse.Namespace) -> None:
    from plugin.serve import serve

    raise SystemExit(serve(cfg, Path(a.socket) if a.socket else None, a.workers))


def build_parser() -> argparse.ArgumentParser:
    p = storage_cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    plug = sub.add_parser("plugin", help="the Docker volume plugin").add_subparsers(dest="cmd", required=True)
    x = plug.add_parser("serve", help="serve the VolumeDriver API on a unix socket (foreground)")
    x.add_argument("--socket", help="socket path (default from the config file)")
    x.add_argument("--workers", type=int, help="gunicorn workers (default from the config file)")
    x.set_defaults(fn=_serve)
    return p


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
