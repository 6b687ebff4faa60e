#!/usr/bin/env python3
"""Generate veritas(8), the vx front ends' pages and bash completion from the argument parser itself, so
what the documentation and completion offer is what the command accepts (run by build-packages.sh).

    python3 packaging/gendoc.py man VERSION > veritas.8
    python3 packaging/gendoc.py vxman PROG VERSION > PROG.8      (PROG: vxdg, vxassist or vradmin)
    python3 packaging/gendoc.py bash > veritas                   (bash-completion/completions/veritas)
    python3 packaging/gendoc.py rpmchangelog packaging/changelog  (the spec's %changelog)
"""

from __future__ import annotations

import argparse
import email.utils
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from veritas import vxcompat
from veritas.cli import build_parser

FILES = [
    ("/etc/vx/docker/vxinfoscale-default.conf",
     "the configuration (a conffile; VERITAS_CONFIG or --config for another)"),
    ("/var/lib/veritas", "disk groups: catalogs, locks and disk mount points (state_root); never removed by the"
     " package, not even by purge"),
    ("/dockerfs", "volumes' mount points, <volume>_<diskgroup> (mount_root)"),
    ("/run/docker/plugins/veritas.sock", "the VolumeDriver socket Docker finds the plugin by"),
    ("/lib/systemd/system/veritas-plugin.service, veritas-plugin.socket, veritas-rlink.service",
     "the plugin and the replication link service"),
    ("/usr/lib/ocf/resource.d/veritas/", "OCF resource agents DockerDaemon, DockerContainer, RVGPrimary"),
]


def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name, in the order they were added."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def helps(p: argparse.ArgumentParser) -> dict[str, str]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return {c.dest: c.help or "" for c in a._choices_actions}
    return {}


def commands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                       argparse.ArgumentParser]]:
    """Every parser under ``p`` with its path of command words, depth first, ``p`` itself first."""
    yield path, p
    for name, sub in subparsers(p).items():
        yield from commands(sub, (*path, name))


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes escaped, hyphens literal, no control character at the start."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + out if out[:1] in (".", "'") else out


def _date() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))))


def _usage(p: argparse.ArgumentParser) -> str:
    return " ".join(p.format_usage().removeprefix("usage: ").split())


def _option_lines(p: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for a in options(p):
        meta = "" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}"
        out += [".TP", f"\\fB{roff(', '.join(a.option_strings))}\\fR{roff(meta)}",
                roff(a.help or "") if a.help and a.help != argparse.SUPPRESS else ""]
    return out


def _operands(p: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for a in p._actions:
        if not a.option_strings and a.help and not isinstance(a, argparse._SubParsersAction):
            out += [".TP", f"\\fI{roff(str(a.metavar or a.dest))}\\fR", roff(a.help)]
    return out


def manpage(version: str) -> str:
    """veritas(8): a section per command group (dg, vol, snap, doctor, plugin, migrate, rvg, rlink)."""
    p = build_parser()
    lines = [f'.TH VERITAS 8 "{_date()}" "veritas {version}" "System Administration"', ".SH NAME",
             "veritas \\- " + roff(p.description or ""), ".SH SYNOPSIS", ".B veritas",
             roff("[--config FILE] [--json] GROUP COMMAND [ARGS...]"), ".br", ".B veritas", roff("--version"),
             ".SH DESCRIPTION",
             roff("Disk groups of disks (block devices, image files or directories), volumes with layouts, "
                  "space-optimised snapshots, the Docker volume plugin and VVR-style replication. "
                  "Commands check their input before they change anything. With --json they print JSON."),
             ".SH OPTIONS", *_option_lines(p)]
    top_help = helps(p)
    for group, gp in subparsers(p).items():
        lines += [f'.SH "{roff(group.upper())} \\(em {roff(top_help.get(group, ""))}"']
        subs = subparsers(gp)
        if not subs:  # a command of its own (doctor)
            lines += [".SS", f"\\fB{roff(_usage(gp))}\\fR", *_operands(gp), *_option_lines(gp)]
            continue
        if gp.description or options(gp):
            lines += [roff(_usage(gp)), *_option_lines(gp)]
        for cmd, cp in subs.items():
            lines += [f'.SS "veritas {roff(group)} {roff(cmd)}"', roff(helps(gp).get(cmd, "")) + ".", ".PP",
                      f"\\fB{roff(_usage(cp))}\\fR", *_operands(cp), *_option_lines(cp)]
    lines += [".SH EXIT STATUS", "0 on success; 1 an operation failed; 2 bad input (nothing was changed);"
              " 3 no such disk group, volume or RVG; other codes as the message says.", ".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{roff(path)}\\fR", roff(what)]
    lines += [".SH ENVIRONMENT", ".TP", "\\fBVERITAS_CONFIG\\fR", "configuration file when --config is not given",
              ".SH SEE ALSO", "vxdg(8), vxassist(8), vradmin(8) (package veritas\\-vxcompat), docker-volume(1)"]
    return "\n".join(line for line in lines if line != "") + "\n"


VX = {
    "vxdg": ("disk groups, as VxVM's vxdg", "vxdg [-s] init DG DISK...\nvxdg -g DG adddisk DISK...\nvxdg list [DG]"
             "\nvxdg [-C] import DG\nvxdg deport DG\nvxdg destroy DG", vxcompat.VXDG_EQUIVALENTS,
             "A DISK is a path, or a disk access name looked up in the directories of VXDISK_PATH (default "
             f"{vxcompat.DEFAULT_DISK_PATH}). -s makes a shared disk group (veritas dg init -s)."),
    "vxassist": ("volumes, as VxVM's vxassist", "vxassist -g DG make VOL LENGTH [layout=L] [nmirror=N] [ncol=N]\n"
                 "vxassist -g DG growto VOL LENGTH\nvxassist -g DG remove volume VOL", vxcompat.VXASSIST_EQUIVALENTS,
                 "A LENGTH without suffix counts 512-byte sectors, as in VxVM; k, m, g and t suffixes are bytes."),
    "vradmin": ("replicated volume groups, as VVR's vradmin", "vradmin -g DG createpri RVG VOL[,VOL...] SRL\n"
                "vradmin -g DG addsec RVG PRIMARY SECONDARY\nvradmin -g DG [-a] startrep RVG\n"
                "vradmin -g DG stoprep|pauserep|resumerep|repstatus|fbsync|resync|delpri RVG\n"
                "vradmin -g DG migrate RVG NEWPRIMARY\nvradmin -g DG takeover [-autofb] RVG\n"
                "vradmin -g DG delvol RVG VOL\nvradmin -g DG delsec RVG", vxcompat.VRADMIN_EQUIVALENTS,
                "SRL is a size or the name of a volume whose size the SRL takes. A site address without a port "
                f"uses VVR's, {vxcompat.VVR_PORT}."),
}


def vx_manpage(prog: str, version: str) -> str:
    """PROG(8) of the veritas-vxcompat package: what is translated, and what is refused for what."""
    what, synopsis, refused, notes = VX[prog]
    lines = [f'.TH {prog.upper()} 8 "{_date()}" "veritas {version}" "System Administration"', ".SH NAME",
             f"{prog} \\- {roff(what)}, over veritas(8)", ".SH SYNOPSIS"]
    for s in synopsis.split("\n"):
        lines += [f"\\fB{roff(s)}\\fR", ".br"]
    lines += [".SH DESCRIPTION", roff(f"{prog} translates the vendor's command lines to veritas(8) commands and "
                                      "runs them. " + notes),
              ".SH UNSUPPORTED COMMANDS", roff("Refused before anything changes (exit status 2), naming the veritas "
                                               "equivalent:")]
    for cmd, instead in refused.items():
        lines += [".TP", f"\\fB{roff(cmd)}\\fR", roff(instead)]
    lines += [".SH SEE ALSO", "veritas(8)"]
    return "\n".join(lines) + "\n"


def bash_completion() -> str:
    """A completion function: command words by position, each command's options, files for option values."""
    p = build_parser()
    cases: list[str] = []
    valued: set[str] = set()
    for path, sp in commands(p):
        opts = [s for a in options(sp) for s in a.option_strings]
        valued |= {s for a in options(sp) if a.nargs != 0 for s in a.option_strings}
        words = " ".join([*subparsers(sp), *opts, "--help"])
        cases.append(f'        "{" ".join(path)}") words="{words}" ;;')
    paths = "|".join(" ".join(path) for path, sp in commands(p) if path)
    return f"""# bash completion for veritas(8), generated from its argument parser by packaging/gendoc.py
_veritas() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} path="" w w2 i words
    case " {" ".join(sorted(valued))} " in *" $prev "*) COMPREPLY=(); return ;; esac  # a value: files
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        case " {" ".join(sorted(valued))} " in *" $w "*) ((i++)); continue ;; esac
        [[ $w == -* ]] && continue
        if [[ -z $path ]]; then w2=$w; else w2="$path $w"; fi
        case "|{paths}|" in *"|$w2|"*) path=$w2 ;; *) break ;; esac
    done
    case "$path" in
{chr(10).join(cases)}
        *) words="" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _veritas veritas
"""


def rpm_changelog(debian: str) -> str:
    """A Debian changelog's entries as an rpm %changelog (newest first, as both keep them)."""
    out: list[str] = []
    version = ""
    body: list[str] = []
    for line in debian.splitlines():
        head = re.match(r"^\S+ \(([^)]+)\) ", line)
        tail = re.match(r"^ -- (.+?)  (.+)$", line)
        if head:
            version, body = head.group(1), []
        elif tail:
            when = email.utils.parsedate_to_datetime(tail.group(2)).strftime("%a %b %d %Y")
            out.append(f"* {when} {tail.group(1)} - {version}-1")
            out += body
            out.append("")
        elif line.startswith("  * "):
            body.append("- " + line[4:].replace("%", "%%"))
        elif line.startswith("    ") and body:
            body[-1] += " " + line.strip().replace("%", "%%")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "man":
        sys.stdout.write(manpage(argv[1]))
    elif len(argv) == 3 and argv[0] == "vxman" and argv[1] in VX:
        sys.stdout.write(vx_manpage(argv[1], argv[2]))
    elif len(argv) == 2 and argv[0] == "rpmchangelog":
        sys.stdout.write(rpm_changelog(Path(argv[1]).read_text()))
    elif argv == ["bash"]:
        sys.stdout.write(bash_completion())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
