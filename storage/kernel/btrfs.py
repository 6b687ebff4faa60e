"""btrfs multi-device operations used by the redundant layouts: state, replace, rebalance."""

from __future__ import annotations

import re
from pathlib import Path

from storage.runner import Runner, run


def present_devids(target: Path, runner: Runner = run) -> tuple[set[int], bool]:
    """Device ids present in the mounted filesystem, and whether some are missing."""
    out = runner(["btrfs", "filesystem", "show", str(target)]).stdout
    ids = {int(m.group(1)) for m in re.finditer(r"devid\s+(\d+)\s+size\s+\S+\s+used\s+\S+\s+path\s+/dev/", out)}
    return ids, "missing" in out.lower()


def replace(devid: int, new_dev: str, target: Path, runner: Runner = run) -> None:
    runner(["btrfs", "replace", "start", "-B", "-f", str(devid), new_dev, str(target)], timeout=3600)


def convert(profile: str, target: Path, runner: Runner = run) -> None:
    """Rewrite chunks written with a weaker profile (e.g. while degraded) back to ``profile``."""
    runner(["btrfs", "balance", "start", f"-dconvert={profile},soft", f"-mconvert={profile},soft",
            str(target)], timeout=3600, check=False)
