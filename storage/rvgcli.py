"""``veritas rvg`` (vradmin's commands, in its argument order) and ``veritas rlink serve``.

    veritas rvg [-g DG] createpri RVG VOL[,VOL...] SRL
    veritas rvg [-g DG] addsec RVG PRIMARY_ADDR SECONDARY_ADDR
    veritas rvg [-g DG] startrep RVG          (initial full sync; progress on stderr)
    veritas rvg [-g DG] stoprep|pauserep|resumerep|repstatus RVG
    veritas rvg [-g DG] migrate RVG NEWPRIMARY_ADDR     (planned role transfer; on the primary)
    veritas rvg [-g DG] takeover RVG [--autofb] [--force]   (the primary is gone; on the secondary)
    veritas rvg [-g DG] fbsync RVG                      (fast-failback of the old primary; on the new one)
    veritas rvg [-g DG] resync RVG [--full]             (DCM or full resync now; on the primary)
    veritas rvg [-g DG] delvol RVG VOL                  (VOL leaves the RVG on both sites; stopped)
    veritas rvg [-g DG] delsec RVG [SECONDARY_ADDR] [--force]   (the secondary leaves; stopped)
    veritas rvg [-g DG] delpri RVG                      (the RVG goes, its volumes stay; no secondary)
    veritas rlink serve [-g DG] [--listen HOST:PORT] [--key-file FILE] [--interval SECONDS]

Every command checks its input before it changes anything; the veritas command (veritas/cli.py)
registers them beside storage.cli's and translates errors to messages and exit codes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import diskgroup
from storage.config import Config
from storage.diskgroup import DiskGroup
from storage.errors import AlreadyExists, InvalidArgument
from storage.replication import checkpoint, failover, link, membership, protocol, role, rvg, store
from storage.replication.errors import NoSuchCheckpoint
from storage.replication.srl import peek
from storage.units import check_name, format_size, parse_size


def _open(cfg: Config, name: str | None) -> DiskGroup:
    return diskgroup.default_dg(cfg) if name is None or name == cfg.diskgroup else diskgroup.open_dg(cfg, name)


def _emit(a: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if a.json else text)


def _key(cfg: Config, a: argparse.Namespace) -> bytes:
    return protocol.load_key(Path(a.key_file) if getattr(a, "key_file", None) else cfg.replication.key_file)


def _primary(dg: DiskGroup, name: str) -> rvg.Rvg:
    r = rvg.get(dg, name)
    if r.role != "primary":
        raise InvalidArgument(f"RVG {name} is the secondary on this site: run this on its primary ({r.peer_addr})")
    return r


def cmd_createpri(cfg: Config, a: argparse.Namespace) -> None:
    vols = [v for v in a.volumes.split(",")]
    size = parse_size(a.srl, "SRL size")
    dg = _open(cfg, a.diskgroup)
    try:
        for v in vols:
            check_name(v, "volume name")
        # the volumes' locks too: a vol rm or grow under way finishes first, a later one sees the RVG
        with rvg.locked(dg), dg.locks.hold(*vols):
            r = rvg.create(dg, rvg.Rvg(a.rvg, tuple(vols), size, "primary"))
        _emit(a, r.to_json(), f"RVG {r.name} created as primary of {', '.join(r.volumes)} with an SRL of"
              f" {format_size(size, long=True)}")
    finally:
        dg.close()


def cmd_addsec(cfg: Config, a: argparse.Namespace) -> None:
    link.parse_addr(a.primary_addr)
    link.parse_addr(a.secondary_addr)
    key = _key(cfg, a)
    dg = _open(cfg, a.diskgroup)
    try:
        with rvg.locked(dg):
            r = _primary(dg, a.rvg)
            if r.peer_addr:
                raise AlreadyExists(f"RVG {r.name} already has a secondary at {r.peer_addr}")
            conn = link.Conn(a.secondary_addr, key)
            try:
                conn.call({"type": "addsec", "rvg": r.name, "volumes": list(r.volumes), "srl_size": r.srl_size,
                           "primary_addr": a.primary_addr, "secondary_addr": a.secondary_addr,
                           "shapes": role.shapes(dg, r.volumes)}, "ok")
            finally:
                conn.close()
            r = rvg.update(dg, r.name, local_addr=a.primary_addr, peer_addr=a.secondary_addr)
        _emit(a, r.to_json(), f"RVG {r.name}: secondary {r.peer_addr} added (startrep {r.name} starts replication)")
    finally:
        dg.close()


def _progress(name: str) -> link.Progress:
    tty = sys.stderr.isatty()
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        if tty:
            if pct != last[0]:
                bar = "#" * (pct // 5)
                sys.stderr.write(f"\rstartrep {name}: [{bar:<20}] {pct:3d}% {format_size(done)}/{format_size(total)}")
                if done >= total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
        elif pct // 10 != last[0] // 10 or done >= total and last[0] != 100:
            print(f"veritas: startrep {name}: {pct}% ({done} of {total} bytes)", file=sys.stderr, flush=True)
        last[0] = pct
    return show


def cmd_startrep(cfg: Config, a: argparse.Namespace) -> None:
    key = _key(cfg, a)
    dg = _open(cfg, a.diskgroup)
    try:
        r = _primary(dg, a.rvg)
        if not r.peer_addr:
            raise InvalidArgument(f"RVG {r.name} has no secondary: addsec {r.name} PRIMARY_ADDR SECONDARY_ADDR first")
        if r.state != "stopped":
            raise InvalidArgument(f"RVG {r.name} is {r.state}: stoprep it first to start again with a full sync")
        t0 = time.monotonic()
        seq = link.full_sync(dg, r, key, _progress(r.name))
        with rvg.locked(dg):
            r = rvg.update(dg, r.name, state="replicating", synced=True)
        out = {**r.to_json(), "seq": seq, "seconds": round(time.monotonic() - t0, 3)}
        _emit(a, out, f"RVG {r.name}: secondary {r.peer_addr} holds checkpoint {seq}; replicating")
    finally:
        dg.close()


def _set_state(cfg: Config, a: argparse.Namespace, want: str, allowed: tuple[str, ...]) -> None:
    dg = _open(cfg, a.diskgroup)
    try:
        with rvg.locked(dg):
            r = _primary(dg, a.rvg)
            if r.state not in allowed:
                raise InvalidArgument(f"RVG {r.name} is {r.state}: cannot {a.cmd} it (needs {' or '.join(allowed)})")
            r = rvg.update(dg, r.name, state=want)
        with dg.locks.hold(link.sender_lock(r.name)):
            pass  # a round of the link service under way ends first: after this, it sees the new state
        _emit(a, r.to_json(), f"RVG {r.name}: {want}")
    finally:
        dg.close()


def cmd_stoprep(cfg: Config, a: argparse.Namespace) -> None:
    _set_state(cfg, a, "stopped", ("replicating", "paused"))


def cmd_pauserep(cfg: Config, a: argparse.Namespace) -> None:
    _set_state(cfg, a, "paused", ("replicating",))


def cmd_resumerep(cfg: Config, a: argparse.Namespace) -> None:
    _set_state(cfg, a, "replicating", ("paused",))


def _with_key(cfg: Config, a: argparse.Namespace, op: Callable[[DiskGroup, bytes], dict[str, Any]]) -> dict[str, Any]:
    """``op`` on the disk group with the link's key: the frame of every role change and resync."""
    key = _key(cfg, a)
    dg = _open(cfg, a.diskgroup)
    try:
        return op(dg, key)
    finally:
        dg.close()


def cmd_migrate(cfg: Config, a: argparse.Namespace) -> None:
    out = _with_key(cfg, a, lambda dg, key: failover.migrate(dg, a.rvg, a.new_primary, key))
    _emit(a, out, f"RVG {a.rvg}: {out['primary']} is primary from checkpoint {out['seq']}; this site is its"
          f" secondary")


def cmd_takeover(cfg: Config, a: argparse.Namespace) -> None:
    out = _with_key(cfg, a, lambda dg, key: failover.takeover(dg, a.rvg, key, autofb=a.autofb,
                                                                         force=a.force))
    then = "it becomes secondary when it returns" if a.autofb else f"fbsync {a.rvg} makes it secondary"
    _emit(a, out, f"RVG {a.rvg}: this site is primary from checkpoint {out['seq']}; the old primary"
          f" {out['old_primary']} keeps that checkpoint: {then}")


def cmd_fbsync(cfg: Config, a: argparse.Namespace) -> None:
    out = _with_key(cfg, a, lambda dg, key: failover.fbsync(dg, a.rvg, key))
    _emit(a, out, f"RVG {a.rvg}: old primary resynchronised from checkpoint {out['from_seq']} to {out['to_seq']}:"
          f" {out['bytes_sent']} bytes sent for {out['changed_bytes']} changed; replicating")


def cmd_resync(cfg: Config, a: argparse.Namespace) -> None:
    out = _with_key(cfg, a, lambda dg, key: failover.resync(dg, a.rvg, key, full=a.full))
    _emit(a, out, f"RVG {a.rvg}: {out['kind']} resync done; the secondary holds checkpoint {out['seq']}")


def cmd_delvol(cfg: Config, a: argparse.Namespace) -> None:
    check_name(a.volume, "volume name")
    out = _with_key(cfg, a, lambda dg, key: membership.delvol(dg, a.rvg, a.volume, key))
    _emit(a, out, f"RVG {a.rvg}: volume {a.volume} taken out on both sites (it stays a volume here); volumes"
          f" left: {', '.join(out['volumes'])}; startrep {a.rvg} resynchronises them in full")


def cmd_delsec(cfg: Config, a: argparse.Namespace) -> None:
    if a.secondary_addr is not None:
        link.parse_addr(a.secondary_addr)
    out = _with_key(cfg, a, lambda dg, key: membership.delsec(dg, a.rvg, key, a.secondary_addr, force=a.force))
    if out.get("role") == "secondary":
        text = f"RVG {a.rvg}: this site's replica and record are removed (its primary was not asked)"
    elif out["peer_told"]:
        text = f"RVG {a.rvg}: secondary {out['removed_secondary']} removed, and its replica there"
    else:
        text = (f"RVG {a.rvg}: secondary {out['removed_secondary']} forgotten on this site only (it did not"
                f" answer): run `veritas rvg delsec {a.rvg} --force` there to drop its replica")
    _emit(a, out, text)


def cmd_delpri(cfg: Config, a: argparse.Namespace) -> None:
    dg = _open(cfg, a.diskgroup)
    try:
        out = membership.delpri(dg, a.rvg)
    finally:
        dg.close()
    _emit(a, out, f"RVG {a.rvg} removed; its volumes {', '.join(out['volumes'])} stay, unreplicated")


def status(dg: DiskGroup, name: str) -> dict[str, Any]:
    """repstatus: role, link state, consistent or not, lag (bytes, seconds), SRL use, last consistent point.

    Read-only: it changes no file (no SRL recovery, no directory made), and tolerates the link
    service (or a role change) replacing records and removing entries and checkpoints under it, so
    it runs at any time beside a running service without its sender lock."""
    r = rvg.get(dg, name)
    st = rvg.link_state(dg, name)
    out: dict[str, Any] = {"rvg": r.name, "role": r.role, "state": r.state, "volumes": list(r.volumes),
                           "local_addr": r.local_addr, "peer_addr": r.peer_addr,
                           "link": st.get("link", "unknown"), "link_error": st.get("error", ""),
                           "common_seq": r.common_seq, "autofb": r.autofb}
    if r.role == "secondary":
        rec = store.read_json(rvg.replica_root(dg, name) / "consistent.json")
        seq = int(rec["seq"]) if rec and rec.get("rvg") == name else 0
        out.update(consistent=seq > 0, last_consistent_seq=seq, last_consistent_time=st.get("applied_created"),
                   applied_at=st.get("applied_at"))
        return out
    srl = peek(rvg.srl_root(dg, name))
    d = srl.dcm
    latest = _latest(dg, name)
    acked_t = st.get("acked_created")
    lag_s = max(0.0, latest.created - float(acked_t)) if latest and acked_t is not None else None
    dcm_bytes = sum(n for rs in d.ranges.values() for _o, n in rs) if d else 0
    out.update(consistent=r.synced and d is None, synced=r.synced, dcm=d is not None,
               srl_used=srl.used, srl_size=r.srl_size, lag_bytes=srl.used + dcm_bytes,
               lag_seconds=lag_s, latest_seq=latest.seq if latest else 0,
               last_consistent_seq=srl.acked, last_consistent_time=acked_t)
    return out


def _latest(dg: DiskGroup, name: str, tries: int = 20) -> checkpoint.Checkpoint | None:
    """The newest checkpoint, read while the service may take the next one and prune this one."""
    for _ in range(tries):
        try:
            return checkpoint.last_consistent(dg, name)
        except NoSuchCheckpoint:
            continue  # pruned between its record and its manifest: read again
    return None


def cmd_repstatus(cfg: Config, a: argparse.Namespace) -> None:
    dg = _open(cfg, a.diskgroup)
    try:
        s = status(dg, a.rvg)
    finally:
        dg.close()
    lines = [f"RVG {s['rvg']}: {s['role']}, {s['state']}, link {s['link']} to {s['peer_addr'] or '-'}",
             f"  secondary consistent: {'yes' if s['consistent'] else 'no'};"
             f" last consistent checkpoint {s['last_consistent_seq']}"]
    if s["role"] == "primary":
        lag = "-" if s["lag_seconds"] is None else f"{s['lag_seconds']:.1f} s"
        lines.append(f"  lag {s['lag_bytes']} bytes, {lag}; SRL {format_size(s['srl_used'])} of"
                     f" {format_size(s['srl_size'])} used{' (DCM: resync pending)' if s['dcm'] else ''}")
    if s["link_error"]:
        lines.append(f"  link error: {s['link_error']}")
    _emit(a, s, "\n".join(lines))


def cmd_serve(cfg: Config, a: argparse.Namespace) -> None:
    rc = cfg.replication
    key = _key(cfg, a)
    interval = float(a.interval) if a.interval is not None else rc.interval
    if not 0 < interval < 86400:
        raise InvalidArgument(f"--interval {a.interval} must be more than 0 seconds and less than a day")
    dg = _open(cfg, a.diskgroup)
    stop = threading.Event()
    try:
        svc = link.Service(dg, key, a.listen or rc.listen, interval, stop,
                           failback=lambda r: failover.fbsync(dg, r.name, key),
                           migrate=lambda name, addr: failover.migrate(dg, name, addr, key))
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        print(f"listening on {svc.address}", flush=True)
        svc.run()
    finally:
        dg.close()


def add_commands(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser("rvg", help="replicated volume groups (vradmin's commands)")
    p.add_argument("-g", "--diskgroup")
    p.add_argument("--key-file", help="pre-shared key file (default: [replication] key_file)")
    sub = p.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("createpri", help="make an RVG of volumes on this (primary) site")
    x.add_argument("rvg")
    x.add_argument("volumes", metavar="VOL[,VOL...]")
    x.add_argument("srl", metavar="SRL", help="SRL size, like 256m")
    x.set_defaults(fn=cmd_createpri)
    x = sub.add_parser("addsec", help="make the site at SECONDARY_ADDR the RVG's secondary")
    x.add_argument("rvg")
    x.add_argument("primary_addr", metavar="PRIMARY_ADDR")
    x.add_argument("secondary_addr", metavar="SECONDARY_ADDR")
    x.set_defaults(fn=cmd_addsec)
    for name, fn, what in (("startrep", cmd_startrep, "initial full sync, then replicate"),
                           ("stoprep", cmd_stoprep, "stop replicating"),
                           ("pauserep", cmd_pauserep, "pause sending (the SRL keeps the deltas)"),
                           ("resumerep", cmd_resumerep, "resume sending"),
                           ("repstatus", cmd_repstatus, "replication status")):
        x = sub.add_parser(name, help=what)
        if name == "startrep":
            x.add_argument("-a", action="store_true", help="automatic sync (the only kind here)")
        x.add_argument("rvg")
        x.set_defaults(fn=fn)
    x = sub.add_parser("migrate", help="hand the primary role to the secondary (planned; volumes unused)")
    x.add_argument("rvg")
    x.add_argument("new_primary", metavar="NEWPRIMARY_ADDR")
    x.set_defaults(fn=cmd_migrate)
    x = sub.add_parser("takeover", help="make this secondary primary (its primary is gone)")
    x.add_argument("rvg")
    x.add_argument("--autofb", action="store_true", help="fbsync the old primary as soon as it is back")
    x.add_argument("--force", action="store_true", help="take over even though the primary's link service"
                   " answers without proving the key or in another protocol version (never from one that answers"
                   " as primary)")
    x.set_defaults(fn=cmd_takeover)
    x = sub.add_parser("fbsync", help="fast-failback: make the old primary secondary, sending only changes")
    x.add_argument("rvg")
    x.set_defaults(fn=cmd_fbsync)
    x = sub.add_parser("resync", help="resynchronise the secondary now (DCM ranges, or all with --full)")
    x.add_argument("rvg")
    x.add_argument("--full", action="store_true", help="every allocated extent, even with a DCM")
    x.set_defaults(fn=cmd_resync)
    x = sub.add_parser("delvol", help="take a volume out of the RVG on both sites (replication stopped)")
    x.add_argument("rvg")
    x.add_argument("volume", metavar="VOL")
    x.set_defaults(fn=cmd_delvol)
    x = sub.add_parser("delsec", help="remove the RVG's secondary and its replica (replication stopped)")
    x.add_argument("rvg")
    x.add_argument("secondary_addr", metavar="SECONDARY_ADDR", nargs="?", help="checked against the RVG's")
    x.add_argument("--force", action="store_true", help="on the primary: forget a secondary that does not"
                   " answer; on a secondary site: drop this site's replica without asking the primary")
    x.set_defaults(fn=cmd_delsec)
    x = sub.add_parser("delpri", help="remove the RVG from its primary (no secondary); its volumes stay")
    x.add_argument("rvg")
    x.set_defaults(fn=cmd_delpri)
    p = top.add_parser("rlink", help="the replication link service")
    sub = p.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("serve", help="serve this site's end of its RVGs' links (foreground)")
    x.add_argument("-g", "--diskgroup")
    x.add_argument("--listen", metavar="HOST:PORT", help="default: [replication] listen")
    x.add_argument("--key-file", help="pre-shared key file (default: [replication] key_file)")
    x.add_argument("--interval", type=float, help="seconds between checkpoints (default: [replication] interval)")
    x.set_defaults(fn=cmd_serve)
