"""``vxdg``, ``vxassist`` and ``vradmin``: the vendor's command lines, translated to ``veritas``'s.

Administrators type what the vendor's guide shows (``vxdg init dockerdg disk1 disk2``, ``vxassist -g
dockerdg make dockervol 1G``, ``vradmin -g dockerdg createpri rvg voll srlvol``); these front ends turn
such a line into the ``veritas`` command that does the same and run it in-process. Whatever has no
equivalent is refused before anything is touched, with a message naming the ``veritas`` command to use.
Installed by the optional veritas-vxcompat package as /usr/sbin/vxdg, vxassist and vradmin.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from storage.errors import Unsupported, VeritasError

DEFAULT_DISK_PATH = "/dev/vx/dmp:/dev"  # where a disk access name (sdb, disk1) is looked up
VVR_PORT = 4145  # vradmin names sites by address alone; the link service's port is VVR's


class Refused(Unsupported):
    """A vx command line with no veritas equivalent; the message names what to run instead."""


class Lookup(Protocol):
    """What a translation needs to know about this host: disks by name, volumes' sizes."""

    def disk(self, name: str) -> str: ...

    def volume_size(self, diskgroup: str | None, volume: str) -> int | None: ...


class HostLookup:
    """Disk access names are found in $VXDISK_PATH (default /dev/vx/dmp:/dev), the way VxVM names a disk
    by its device node; a path is taken as it is. Volumes are read from the disk group's catalog."""

    def disk(self, name: str) -> str:
        if "/" in name:
            return os.path.abspath(name)
        dirs = [d for d in os.environ.get("VXDISK_PATH", DEFAULT_DISK_PATH).split(":") if d]
        for d in dirs:
            p = Path(d) / name
            if p.exists():
                return str(p)
        raise Refused(f"disk {name} not found in {', '.join(dirs)} (VXDISK_PATH): name a block device or an image"
                      f" file by path, or run veritas dg init DG /path/to/{name}.img=SIZE")

    def volume_size(self, diskgroup: str | None, volume: str) -> int | None:
        from storage import diskgroup as dgmod
        from storage import volumes
        from storage.config import load_config
        from storage.errors import NotFound

        cfg = load_config(None)
        dg = dgmod.open_dg(cfg, diskgroup or cfg.diskgroup)
        try:
            return int(volumes.info(dg, volume)["size"])
        except NotFound:
            return None
        finally:
            dg.close()


def _opts(argv: Sequence[str], prog: str, flags: str, valued: str) -> tuple[dict[str, str], list[str]]:
    """Leading options in getopt style (-s, -g DG, -gDG); the rest is the command and its operands.
    Options may also follow the command word (vradmin -g dg -a startrep rvg, vxassist make -g dg ...)."""
    got: dict[str, str] = {}
    rest: list[str] = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--":
            rest += args
            break
        if len(a) >= 2 and a[0] == "-" and a[1] in flags + valued and not rest[1:]:
            key = a[1]
            if key in valued:
                value = a[2:] or (args.pop(0) if args else "")
                if not value:
                    raise Refused(f"{prog}: -{key} needs a value")
                got[key] = value
            elif len(a) == 2:
                got[key] = ""
            else:
                raise Refused(f"{prog}: unknown option {a}")
        elif a.startswith("-") and len(a) > 1 and not a[1].isdigit() and not rest[1:]:
            raise Refused(f"{prog}: option {a} is not supported (see veritas --help)")
        else:
            rest.append(a)
    return got, rest


def _need(prog: str, rest: list[str], n: int, usage: str) -> None:
    if len(rest) < n:
        raise Refused(f"{prog}: usage: {usage}")


# ------------------------------------------------------------------ vxdg

VXDG_EQUIVALENTS = {
    "rmdisk": "veritas dg has no rmdisk: a disk leaves with its disk group (veritas dg destroy DG)",
    "free": "veritas dg info DG (its FREE column)",
    "join": "veritas dg has no join or split: make volumes in the disk group they belong to",
    "split": "veritas dg has no join or split: make volumes in the disk group they belong to",
    "move": "veritas dg has no move: make volumes in the disk group they belong to",
    "flush": "nothing to flush: the catalog is written as it changes (veritas doctor -g DG checks it)",
    "upgrade": "nothing to upgrade: veritas dg import DG",
    "set": "veritas dg has no settable attributes; defaults live in /etc/vx/docker/vxinfoscale-default.conf",
}


def vxdg(argv: Sequence[str], look: Lookup) -> list[str]:
    """``vxdg [-s] [-g DG] init|adddisk|list|destroy|import|deport ...`` as a veritas command line."""
    o, rest = _opts(argv, "vxdg", "sfC", "go")
    if "o" in o:
        if o["o"] == "fss":
            raise Refused("vxdg: -o fss (flexible shared storage: local disks shared over the network) is not"
                          " supported; a shared disk group is one whose root every node sees: veritas dg init -s"
                          " DG DISK... on shared storage")
        raise Refused(f"vxdg: -o {o['o']} is not supported (see veritas dg --help)")
    _need("vxdg", rest, 1, "vxdg [-s] init DG DISK...")
    cmd, ops = rest[0], rest[1:]
    group = o.get("g")
    if cmd == "init":
        _need("vxdg", rest, 3, "vxdg [-s] init DG DISK...")
        return ["dg", "init", *(["--shared"] if "s" in o else []), ops[0], *[look.disk(d) for d in ops[1:]]]
    if "s" in o:
        raise Refused(f"vxdg: -s applies to init only (veritas dg init -s DG DISK...), not to {cmd}")
    if cmd == "adddisk":
        dg = group or (ops.pop(0) if len(ops) > 1 else None)
        if not dg or not ops:
            raise Refused("vxdg: usage: vxdg -g DG adddisk DISK...")
        return ["dg", "adddisk", dg, *[look.disk(d.partition("=")[2] or d) for d in ops]]
    if cmd == "list":
        return ["dg", "info", ops[0]] if ops else ["dg", "list"]
    if cmd in ("destroy", "deport", "import"):
        dg = ops[0] if ops else group
        if not dg:
            raise Refused(f"vxdg: usage: vxdg {cmd} DG")
        force = ["--force"] if cmd == "import" and ("C" in o or "f" in o) else []
        return ["dg", cmd, dg, *force]
    if cmd in VXDG_EQUIVALENTS:
        raise Refused(f"vxdg {cmd} is not supported: {VXDG_EQUIVALENTS[cmd]}")
    raise Refused(f"vxdg {cmd} is not supported (veritas dg --help lists what is)")


# ------------------------------------------------------------------ vxassist

_ATTRS = {"layout": "layout", "nmirror": "nmirror", "ncol": "ncol", "ncolumn": "ncol", "ncolumns": "ncol"}
VXASSIST_EQUIVALENTS = {
    "snapshot": "veritas snap make -g DG SOURCE NAME [cachesize=SIZE]",
    "snapstart": "veritas snap make -g DG SOURCE NAME (instant: nothing to start)",
    "snapback": "veritas snap make makes a new snapshot; veritas vol rm -g DG SNAPSHOT drops one",
    "mirror": "layouts are chosen at make: veritas vol make -g DG VOL SIZE layout=mirror",
    "relayout": "layouts are chosen at make: veritas vol make -g DG VOL SIZE layout=...",
    "convert": "layouts are chosen at make: veritas vol make -g DG VOL SIZE layout=...",
    "growby": "veritas vol grow -g DG VOL NEWSIZE (the new total size)",
    "shrinkto": "volumes do not shrink (XFS cannot): make a smaller one and copy the data",
    "shrinkby": "volumes do not shrink (XFS cannot): make a smaller one and copy the data",
    "maxsize": "veritas dg info DG (its FREE column)",
    "maxgrow": "veritas dg info DG (its FREE column)",
    "addlog": "volumes need no log: each mirror copy is a btrfs device",
}


def _vx_length(text: str) -> str:
    """VxVM lengths: a bare number counts 512-byte sectors; k/m/g/t suffixes as veritas reads them."""
    if re.fullmatch(r"[0-9]+", text):
        return str(int(text) * 512)
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?[kKmMgGtT]", text):
        return text
    raise Refused(f"vxassist: bad length {text!r}: a number of sectors, or with a k, m, g or t suffix (1g)")


def vxassist(argv: Sequence[str], look: Lookup) -> list[str]:
    """``vxassist -g DG make|growto|remove volume ...`` as a veritas command line."""
    o, rest = _opts(argv, "vxassist", "bf", "g")
    _need("vxassist", rest, 1, "vxassist -g DG make VOL LENGTH [layout=...]")
    cmd, ops = rest[0], rest[1:]
    g = ["-g", o["g"]] if "g" in o else []
    if cmd == "make":
        _need("vxassist", rest, 3, "vxassist -g DG make VOL LENGTH [layout=...] [nmirror=N] [ncol=N]")
        out = ["vol", "make", *g, ops[0], _vx_length(ops[1])]
        for attr in ops[2:]:
            key, sep, value = attr.partition("=")
            if not sep or key not in _ATTRS:
                raise Refused(f"vxassist: attribute {attr!r} is not supported; veritas vol make takes layout=,"
                              " nmirror=, ncol=, fstype=, maxiops=, protect=, provisioning= (veritas vol make -g DG"
                              " VOL SIZE KEY=VALUE...)")
            out.append(f"{_ATTRS[key]}={value}")
        return out
    if cmd == "growto":
        _need("vxassist", rest, 3, "vxassist -g DG growto VOL LENGTH")
        return ["vol", "grow", *g, ops[0], _vx_length(ops[1])]
    if cmd == "remove":
        if len(ops) != 2 or ops[0] != "volume":
            raise Refused("vxassist: usage: vxassist -g DG remove volume VOL (veritas vol rm -g DG VOL)")
        return ["vol", "rm", *g, ops[1]]
    if cmd in VXASSIST_EQUIVALENTS:
        raise Refused(f"vxassist {cmd} is not supported: {VXASSIST_EQUIVALENTS[cmd]}")
    raise Refused(f"vxassist {cmd} is not supported (veritas vol --help lists what is)")


# ------------------------------------------------------------------ vradmin

_RVG_SAME = {"startrep", "stoprep", "pauserep", "resumerep", "repstatus", "fbsync", "resync", "delpri",
             "migrate", "delvol", "delsec"}
VRADMIN_EQUIVALENTS = {
    "addvol": "an RVG takes its volumes at createpri: veritas rvg -g DG delpri RVG, then createpri with the list",
    "resizevol": "veritas rvg -g DG stoprep RVG, veritas vol grow on both sites, then startrep",
    "resizesrl": "the SRL's size is set at createpri (veritas rvg -g DG createpri RVG VOLS SIZE)",
    "printrvg": "veritas rvg -g DG repstatus RVG",
    "printvol": "veritas vol list -g DG",
    "syncrvg": "veritas rvg -g DG resync RVG --full",
    "syncvol": "veritas rvg -g DG resync RVG --full",
    "verifydata": "veritas rvg -g DG repstatus RVG (the secondary applies checkpoints whole, checked)",
    "ibc": "no in-band control messages: veritas snap make on the secondary's volumes after takeover",
    "set": "replication settings live in [replication] of /etc/vx/docker/vxinfoscale-default.conf",
    "changeip": "veritas rvg -g DG delsec RVG, then addsec with the new addresses",
    "makesec": "veritas rvg -g DG fbsync RVG on the new primary",
}


def _site(addr: str) -> str:
    """A site address as the link service takes it: HOST:PORT, VVR's port when none is given."""
    if addr.startswith("[") and "]:" in addr or addr.count(":") == 1:
        return addr
    return f"[{addr}]:{VVR_PORT}" if ":" in addr else f"{addr}:{VVR_PORT}"


def _srl(group: str | None, text: str, look: Lookup) -> str:
    """vradmin names the SRL by its volume; veritas keeps the SRL in the RVG's store, as large as it."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?[kKmMgGtT]?", text):
        return text
    size = look.volume_size(group, text)
    if size is None:
        raise Refused(f"vradmin: SRL volume {text} not found in disk group {group or '(default)'}: make it"
                      f" (vxassist -g DG make {text} 300m) or give its size (veritas rvg createpri RVG VOLS 300m)")
    print(f"vradmin: the SRL takes the size of volume {text} ({size} bytes) and lives in the RVG's own store;"
          f" volume {text} itself stays unused", file=sys.stderr)
    return str(size)


def vradmin(argv: Sequence[str], look: Lookup) -> list[str]:
    """``vradmin -g DG [-a] createpri|addsec|startrep|... RVG ...`` as a veritas command line."""
    autofb = [a for a in argv if a in ("-autofb", "--autofb")]  # VVR: takeover [-autofb] RVG
    o, rest = _opts([a for a in argv if a not in autofb], "vradmin", "afls", "g")
    if autofb and (not rest or rest[0] != "takeover"):
        raise Refused("vradmin: -autofb goes with takeover (vradmin -g DG takeover -autofb RVG)")
    _need("vradmin", rest, 2, "vradmin -g DG COMMAND RVG ...")
    cmd, rvg, ops = rest[0], rest[1], rest[2:]
    head = ["rvg", *(["-g", o["g"]] if "g" in o else [])]
    if "a" in o and cmd != "startrep":
        raise Refused(f"vradmin: -a (automatic sync) goes with startrep, not {cmd}")
    if cmd == "createpri":
        if len(ops) != 2:
            raise Refused("vradmin: usage: vradmin -g DG createpri RVG VOL[,VOL...] SRL")
        return [*head, "createpri", rvg, ops[0], _srl(o.get("g"), ops[1], look)]
    if cmd == "addsec":
        if len(ops) != 2:
            raise Refused("vradmin: usage: vradmin -g DG addsec RVG PRIMARY_ADDR SECONDARY_ADDR")
        return [*head, "addsec", rvg, _site(ops[0]), _site(ops[1])]
    if cmd == "takeover":
        if ops:
            raise Refused("vradmin: usage: vradmin -g DG takeover [-autofb] RVG")
        return [*head, "takeover", rvg, *(["--autofb"] if autofb else []), *(["--force"] if "f" in o else [])]
    if cmd == "startrep":
        return [*head, "startrep", *(["-a"] if "a" in o else []), rvg, *ops]
    if cmd in _RVG_SAME:
        return [*head, cmd, rvg, *ops]
    if cmd in VRADMIN_EQUIVALENTS:
        raise Refused(f"vradmin {cmd} is not supported: {VRADMIN_EQUIVALENTS[cmd]}")
    raise Refused(f"vradmin {cmd} is not supported (veritas rvg --help lists what is)")


# ------------------------------------------------------------------ entry points

Translator = Callable[[Sequence[str], Lookup], list[str]]


def run(prog: str, translate: Translator, argv: Sequence[str] | None = None) -> int:
    """Translate and run in-process; a refusal exits 2 with its message, like veritas's own errors."""
    from veritas.cli import main as veritas_main

    try:
        line = translate(sys.argv[1:] if argv is None else argv, HostLookup())
    except VeritasError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return veritas_main(line)


def main_vxdg() -> int:
    return run("vxdg", vxdg)


def main_vxassist() -> int:
    return run("vxassist", vxassist)


def main_vradmin() -> int:
    return run("vradmin", vradmin)
