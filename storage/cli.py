"""The ``veritas`` command: disk groups, volumes, snapshots and doctor, over the storage library.

Errors are translated to a message and an exit code here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from storage import diskgroup, doctor, options, snapcache, snapshots, volumes
from storage.config import Config, load_config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.errors import InvalidArgument, VeritasError
from storage.units import format_size, parse_size


def _kv(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"expected key=value, got {item!r}")
        if key in out:
            raise InvalidArgument(f"option {key} given twice")
        out[key] = value
    return out


def _open(cfg: Config, name: str | None) -> DiskGroup:
    dg = diskgroup.default_dg(cfg) if name is None or name == cfg.diskgroup else diskgroup.open_dg(cfg, name)
    snapcache.check_quietly(dg)  # snapshots whose cache ran out are invalid before anything reads them
    return dg


def _emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str] | None = None) -> None:
    if args.json or text is None:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        out = text(data)
        if out:
            print(out)


def _table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# ------------------------------------------------------------- dg


def _warn_shared(dg: DiskGroup, new: Sequence[str]) -> None:
    """Say on stderr when disks just added share a failure domain (directories of one filesystem)."""
    accepted = dg.catalog.diskgroup().accept_shared_domain
    for where, names in dg.shared_domains():
        if set(names) & set(new):
            then = ("the group accepts mirrors across them (made with --force), each with a warning" if accepted
                    else "vol make refuses a mirror across them unless --force")
            print(f"veritas: warning: disks {', '.join(names)} of disk group {dg.name} are directories on"
                  f" {where}: one failure domain, lost together. {then}", file=sys.stderr)


def cmd_dg_init(cfg: Config, a: argparse.Namespace) -> None:
    size = parse_size(a.size, "disk size") if a.size else None
    dg = diskgroup.init(cfg, a.name, [DiskSpec.parse(d, size) for d in a.disks], force=a.force, shared=a.shared)
    _warn_shared(dg, [d.name for d in dg.catalog.disks()])
    _emit(a, dg.summary(), lambda s: f"disk group {s['name']} created with {len(s['disks'])} disk(s)")
    dg.close()


def cmd_dg_adddisk(cfg: Config, a: argparse.Namespace) -> None:
    size = parse_size(a.size, "disk size") if a.size else None
    dg = diskgroup.open_dg(cfg, a.name)
    try:
        names = dg.add_disks([DiskSpec.parse(d, size) for d in a.disks], force=a.force)
        _warn_shared(dg, names)
        _emit(a, names, lambda n: "added " + ", ".join(n))
    finally:
        dg.close()


def cmd_dg_list(cfg: Config, a: argparse.Namespace) -> None:
    rows = []
    for name in diskgroup.list_names(cfg):
        dg = DiskGroup(cfg, name)
        try:
            rows.append(dg.summary())
        finally:
            dg.close()

    def text(rs: list[dict[str, Any]]) -> str:
        return _table([["NAME", "IMPORTED-ON", "DISKS", "SIZE", "FREE", "VOLUMES"]] + [
            [r["name"], r["imported_on"] or "-", str(len(r["disks"])), format_size(r["size"]),
             format_size(r["free"]), str(r["volumes"])] for r in rs])
    _emit(a, rows, text)


def cmd_dg_info(cfg: Config, a: argparse.Namespace) -> None:
    dg = DiskGroup(cfg, a.name)
    try:
        _emit(a, dg.summary(), lambda s: _table([["DISK", "SOURCE", "SIZE", "FREE", "STATE"]] + [
            [d["name"], d["source"], format_size(d["size"]), format_size(d["free"]), d["state"]]
            for d in s["disks"]]))
    finally:
        dg.close()


def cmd_dg_destroy(cfg: Config, a: argparse.Namespace) -> None:
    dg = diskgroup.open_dg(cfg, a.name)
    diskgroup.destroy(dg, force=a.force)
    _emit(a, {"destroyed": a.name}, lambda _: f"disk group {a.name} destroyed")


def cmd_dg_import(cfg: Config, a: argparse.Namespace) -> None:
    dg = diskgroup.import_dg(cfg, a.name, force=a.force)
    _emit(a, dg.summary(), lambda s: f"disk group {s['name']} imported on {s['imported_on']}")
    dg.close()


def cmd_dg_deport(cfg: Config, a: argparse.Namespace) -> None:
    dg = diskgroup.DiskGroup(cfg, a.name)
    try:
        diskgroup.deport(dg)
    finally:
        dg.close()
    _emit(a, {"deported": a.name}, lambda _: f"disk group {a.name} deported")


# ------------------------------------------------------------- vol


def _vol_text(r: dict[str, Any]) -> str:
    lines = [f"{k}: {r[k]}" for k in ("name", "diskgroup", "size", "layout", "fstype", "nmirror", "ncol",
                                       "maxiops", "snapshot_of", "cachesize", "autogrow", "protect", "provisioning",
                                       "state", "health",
                                       "mountpoint", "mounted", "used", "devices", "snapshots")]
    if "cache_used" in r:
        lines.append(f"cache_used: {r['cache_used']}")
    if r.get("invalid"):
        lines.append(f"invalid: {r['invalid']}")
    if r.get("shared_domain"):
        lines.append(f"failure_domain: {r['shared_domain']}")
    for sd in r["subdisks"]:
        lines.append(f"subdisk {sd['idx']}: disk {sd['disk']} size {format_size(sd['size'])} {sd['image']}")
    return "\n".join(lines)


def cmd_vol_make(cfg: Config, a: argparse.Namespace) -> None:
    spec = options.parse_volume(a.size, _kv(a.options))  # all checked before the disk group is touched
    dg = _open(cfg, a.diskgroup)
    try:
        volumes.make(dg, a.name, spec=spec, force=a.force)
        _emit(a, volumes.info(dg, a.name), _vol_text)
    finally:
        dg.close()


def cmd_vol_list(cfg: Config, a: argparse.Namespace) -> None:
    dg = _open(cfg, a.diskgroup)
    try:
        rows = volumes.list_volumes(dg)
    finally:
        dg.close()
    # COPIES: a redundant volume's copies on distinct failure domains, or in one (shared-domain)
    _emit(a, rows, lambda rs: _table([["NAME", "SIZE", "LAYOUT", "FSTYPE", "PROV", "MAXIOPS", "SNAPSHOT-OF",
                                       "STATE", "MOUNTED", "COPIES", "ATTACHED"]] + [
        [r["name"], format_size(r["size"]), r["layout"], r["fstype"], r["provisioning"], str(r["maxiops"] or "-"),
         r["snapshot_of"] or "-", "invalid" if r["invalid"] else r["state"],
         r["mountpoint"] if r["mounted"] else "-",
         "shared-domain" if r["shared_domain"] else "distinct" if r["redundant"] else "-",
         _attached(r["attached_on"], r["lease_expires"])] for r in rs]))


def _attached(node: str | None, expires: float | None) -> str:
    """Where a volume is attached, and until when its holder's lease runs ("-": nowhere)."""
    if node is None:
        return "-"
    if expires is None or expires <= time.time():
        return f"{node} (lease expired)"
    return f"{node} (lease to {time.strftime('%H:%M:%S', time.localtime(expires))})"


def cmd_dg_leases(cfg: Config, a: argparse.Namespace) -> None:
    """Each node's lease in the disk group, and how many volumes are attached on it."""
    dg = DiskGroup(cfg, a.name or cfg.diskgroup)
    try:
        now = time.time()
        count: dict[str, int] = {}
        for att in dg.catalog.attachments():
            count[att.node] = count.get(att.node, 0) + 1
        rows = [{"node": rec.node, "expires": rec.expires, "ttl": rec.ttl, "live": rec.expires > now,
                 "attached": count.get(rec.node, 0)} for rec in dg.catalog.leases()]
    finally:
        dg.close()
    _emit(a, rows, lambda rs: _table([["NODE", "LEASE-EXPIRES", "TTL", "STATE", "ATTACHED"]] + [
        [r["node"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["expires"])), f"{r['ttl']:g}s",
         "live" if r["live"] else "expired", str(r["attached"])] for r in rs]))


def _with_vol(fn: Callable[[DiskGroup, argparse.Namespace], Any]) -> Callable[[Config, argparse.Namespace], None]:
    def run(cfg: Config, a: argparse.Namespace) -> None:
        dg = _open(cfg, a.diskgroup)
        try:
            result = fn(dg, a)
            if result is not None:
                _emit(a, result, _vol_text if isinstance(result, dict) and "subdisks" in result else None)
        finally:
            dg.close()
    return run


def _set(dg: DiskGroup, a: argparse.Namespace) -> dict[str, Any]:
    opts = _kv(a.options)
    unknown = set(opts) - {"maxiops"}
    if unknown or not opts:
        raise InvalidArgument("vol set takes maxiops=N")
    volumes.set_maxiops(dg, a.name, opts["maxiops"])
    return volumes.info(dg, a.name)


def _mount(dg: DiskGroup, a: argparse.Namespace) -> dict[str, Any]:
    volumes.mount(dg, a.name, a.id, degraded=a.degraded)
    return volumes.info(dg, a.name)


def _umount(dg: DiskGroup, a: argparse.Namespace) -> dict[str, Any]:
    volumes.umount(dg, a.name, a.id, force=a.force)
    return volumes.info(dg, a.name)


def _rm(dg: DiskGroup, a: argparse.Namespace) -> dict[str, str]:
    volumes.remove(dg, a.name, force=a.force)
    return {"removed": a.name}


def _grow(dg: DiskGroup, a: argparse.Namespace) -> dict[str, Any]:
    volumes.grow(dg, a.name, a.size)
    return volumes.info(dg, a.name)


def _repair(dg: DiskGroup, a: argparse.Namespace) -> dict[str, Any]:
    volumes.repair(dg, a.name)
    return volumes.info(dg, a.name)


def _iops(dg: DiskGroup, a: argparse.Namespace) -> dict[str, Any]:
    nums = volumes.apply_maxiops(dg, a.name, a.cgroup)
    return {"volume": a.name, "cgroup": a.cgroup, "devices": [f"{x}:{y}" for x, y in nums]}


def cmd_snap_make(cfg: Config, a: argparse.Namespace) -> None:
    spec = options.parse_snapshot(a.source, _kv(a.options))  # all checked before the disk group is touched
    dg = _open(cfg, a.diskgroup)
    try:
        snapshots.make(dg, spec.source, a.name, spec.cachesize, autogrow=spec.autogrow, maxiops=spec.maxiops)
        _emit(a, volumes.info(dg, a.name), _vol_text)
    finally:
        dg.close()


def cmd_doctor(cfg: Config, a: argparse.Namespace) -> None:
    names = [a.diskgroup] if a.diskgroup else diskgroup.list_names(cfg)
    findings: list[str] = []
    for name in names:
        dg = diskgroup.open_dg(cfg, name, recover=False)
        try:
            findings += [f"{name}: {f}" for f in doctor.check(dg, repair=a.repair)]
        finally:
            dg.close()
    _emit(a, findings, lambda fs: "\n".join(fs) if fs else "no problems found")
    if findings and not a.repair:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="veritas", description="InfoScale-style storage for Docker containers")
    p.add_argument("--config", help="configuration file (default $VERITAS_CONFIG or "
                   "/etc/vx/docker/vxinfoscale-default.conf)")
    p.add_argument("--json", action="store_true", help="print JSON")
    top = p.add_subparsers(dest="group", required=True)
    _add_dg_commands(top)
    _add_vol_commands(top)
    _add_snap_and_doctor_commands(top)
    return p


def _add_dg_commands(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dg = top.add_parser("dg", help="disk groups").add_subparsers(dest="cmd", required=True)
    x = dg.add_parser("init", help="create a disk group on disks (block devices, image files, directories)")
    x.add_argument("name")
    x.add_argument("disks", nargs="+", metavar="DISK",
                   help="block device, image file path[=SIZE], or directory=SIZE on XFS (reflink=1) or btrfs")
    x.add_argument("--size", help="size of image files that do not exist yet, and of directory disks")
    x.add_argument("--force", action="store_true", help="overwrite disks that hold a filesystem (a directory:"
                   " a gone disk group's identity and images); and accept, for the group, mirrors whose"
                   " copies share a failure domain (directory disks of one filesystem), made with a warning")
    x.add_argument("-s", "--shared", action="store_true",
                   help="a shared disk group: in use on every node that sees its root (as vxdg -s init)")
    x.set_defaults(fn=cmd_dg_init)
    x = dg.add_parser("adddisk", help="add disks to a disk group")
    x.add_argument("name")
    x.add_argument("disks", nargs="+", metavar="DISK")
    x.add_argument("--size")
    x.add_argument("--force", action="store_true")
    x.set_defaults(fn=cmd_dg_adddisk)
    dg.add_parser("list", help="list disk groups").set_defaults(fn=cmd_dg_list)
    x = dg.add_parser("info", help="show a disk group's disks")
    x.add_argument("name")
    x.set_defaults(fn=cmd_dg_info)
    x = dg.add_parser("destroy", help="destroy a disk group (refused while it holds volumes)")
    x.add_argument("name")
    x.add_argument("--force", action="store_true", help="remove its volumes too")
    x.set_defaults(fn=cmd_dg_destroy)
    x = dg.add_parser("import", help="make a disk group's disks usable on this node")
    x.add_argument("name")
    x.add_argument("--force", action="store_true", help="take it from a node that is dead")
    x.set_defaults(fn=cmd_dg_import)
    x = dg.add_parser("leases", help="each node's lease in a disk group several nodes share")
    x.add_argument("name", nargs="?", help="disk group (default from the config file)")
    x.set_defaults(fn=cmd_dg_leases)
    x = dg.add_parser("deport", help="release a disk group's disks on this node")
    x.add_argument("name")
    x.set_defaults(fn=cmd_dg_deport)


def _add_vol_commands(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vol = top.add_parser("vol", help="volumes").add_subparsers(dest="cmd", required=True)

    def vcmd(name: str, help: str, fn: Callable[[Config, argparse.Namespace], None]) -> argparse.ArgumentParser:
        x = vol.add_parser(name, help=help)
        x.add_argument("-g", "--diskgroup", help="disk group (default from the config file)")
        x.set_defaults(fn=fn)
        return x

    x = vcmd("make", "create a volume", cmd_vol_make)
    x.add_argument("name")
    x.add_argument("size")
    x.add_argument("options", nargs="*", metavar="KEY=VALUE",
                   help="layout=concat|stripe|mirror|mirror-stripe|auto nmirror=N ncol=N fstype=xfs|ext4|btrfs"
                   " maxiops=N protect=true provisioning=thin|thick")
    x.add_argument("--force", action="store_true",
                   help="accept mirrors in one failure domain (directory disks of one filesystem)")
    vcmd("list", "list volumes", cmd_vol_list)
    for name, help, fn in (("info", "show a volume", lambda dg, a: volumes.info(dg, a.name)),
                           ("repair", "restore a degraded volume's redundancy onto another disk", _repair)):
        x = vcmd(name, help, _with_vol(fn))
        x.add_argument("name")
    x = vcmd("grow", "grow a volume (online for xfs and btrfs)", _with_vol(_grow))
    x.add_argument("name")
    x.add_argument("size", help="new total size")
    x = vcmd("rm", "remove a volume", _with_vol(_rm))
    x.add_argument("name")
    x.add_argument("--force", action="store_true", help="unmount it, and remove it even if protected")
    x = vcmd("mount", "mount a volume at <mount_root>/<volume>_<diskgroup>", _with_vol(_mount))
    x.add_argument("name")
    x.add_argument("--id", default=volumes.ADMIN_MOUNT_ID, help="mount ID to count (default admin)")
    x.add_argument("--degraded", action="store_true", help="mount a redundant volume that lost a disk")
    x = vcmd("umount", "release a mount ID; unmount when it was the last", _with_vol(_umount))
    x.add_argument("name")
    x.add_argument("--id", default=volumes.ADMIN_MOUNT_ID)
    x.add_argument("--force", action="store_true", help="unmount whatever mount IDs remain")
    x = vcmd("set", "change a volume's attributes live (maxiops=N)", _with_vol(_set))
    x.add_argument("name")
    x.add_argument("options", nargs="+", metavar="KEY=VALUE")
    x = vcmd("iops", "apply a volume's IOPS limit to a cgroup", _with_vol(_iops))
    x.add_argument("name")
    x.add_argument("--cgroup", required=True, help="cgroup path, absolute or relative to the blkio root")


def _add_snap_and_doctor_commands(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snap = top.add_parser("snap", help="space-optimised snapshots").add_subparsers(dest="cmd", required=True)
    x = snap.add_parser("make", help="snapshot a volume (consistent while mounted)")
    x.add_argument("-g", "--diskgroup")
    x.add_argument("source")
    x.add_argument("name")
    x.add_argument("options", nargs="*", metavar="KEY=VALUE", help="cachesize=SIZE autogrow=on|off maxiops=N")
    x.set_defaults(fn=cmd_snap_make)

    x = top.add_parser("doctor", help="check catalog, images, loop devices and mounts agree")
    x.add_argument("-g", "--diskgroup")
    x.add_argument("--repair", action="store_true", help="fix what it finds")
    x.set_defaults(fn=cmd_doctor)


def log_to_stderr() -> None:
    """Warnings the library logs (a mirror made in one failure domain) reach the admin's terminal, in
    the CLI's own words; the plugin configures its own log instead."""
    log = logging.getLogger("veritas")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_CliFormatter())
        log.addHandler(handler)
        log.propagate = False


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"veritas: {record.levelname.lower()}: {record.getMessage()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_to_stderr()
    try:
        cfg = load_config(args.config)
        args.fn(cfg, args)
    except VeritasError as exc:
        print(f"veritas: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
