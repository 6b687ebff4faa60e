"""btrfs multi-device operations used by the redundant layouts: state, replace, rebalance."""

from __future__ import annotations

import re
from pathlib import Path

from storage.errors import Degraded
from storage.runner import Runner, run


def present_devids(target: Path, runner: Runner = run) -> tuple[set[int], bool]:
    """Device ids present in the mounted filesystem, and whether some are missing."""
    out = runner(["btrfs", "filesystem", "show", str(target)]).stdout
    ids = {int(m.group(1)) for m in re.finditer(r"devid\s+(\d+)\s+size\s+\S+\s+used\s+\S+\s+path\s+/dev/", out)}
    return ids, "missing" in out.lower()


def replace(devid: int, new_dev: str, target: Path, runner: Runner = run) -> None:
    runner(["btrfs", "replace", "start", "-B", "-f", str(devid), new_dev, str(target)], timeout=3600)


def convert(profile: str, target: Path, runner: Runner = run) -> None:
    """Rewrite chunks written with a weaker profile (e.g. while degraded) back to ``profile``, then check
    that it worked: a balance that fails or leaves weaker chunks must not pass for a restored mirror.

    :raises CommandFailed: if the balance fails.
    :raises Degraded: if data or metadata chunks of another profile remain.
    """
    runner(["btrfs", "balance", "start", f"-dconvert={profile},soft", f"-mconvert={profile},soft",
            str(target)], timeout=3600)
    weak = {kind: profs - {profile.lower()} for kind, profs in chunk_profiles(target, runner).items()
            if kind in ("data", "metadata") and profs - {profile.lower()}}
    if weak:
        found = "; ".join(f"{kind} in {', '.join(sorted(p))}" for kind, p in sorted(weak.items()))
        raise Degraded(f"{target}: after rebalancing to {profile}, chunks remain with {found}: redundancy"
                       " is not restored; free space on the volume, mount it and run btrfs balance start"
                       f" -dconvert={profile},soft -mconvert={profile},soft on it (see btrfs filesystem df)")


def chunk_profiles(target: Path, runner: Runner = run) -> dict[str, set[str]]:
    """Profiles that hold allocated chunks, by kind ("data", "metadata", "system"), lower case."""
    out = runner(["btrfs", "filesystem", "df", "-b", str(target)]).stdout
    found: dict[str, set[str]] = {}
    for m in re.finditer(r"^(Data|Metadata|System),\s*([^:]+):\s*total=(\d+)", out, re.M):
        if int(m.group(3)) > 0:
            found.setdefault(m.group(1).lower(), set()).add(m.group(2).strip().lower())
    return found
