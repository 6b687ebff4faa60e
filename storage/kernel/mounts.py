"""The kernel's mount table, read from /proc/self/mountinfo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: str
    major_minor: str


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 6 or len(rf) < 2:
                continue
            entries.append(
                MountEntry(
                    source=_unescape(rf[1]),
                    target=_unescape(lf[4]),
                    fstype=rf[0],
                    options=lf[5],
                    major_minor=lf[2],
                )
            )
    return entries


def mounted_at(target: Path) -> MountEntry | None:
    """The topmost mount at ``target``, or None."""
    t = str(target)
    found = None
    for e in table():
        if e.target == t:
            found = e
    return found


def targets_of(devices: set[str]) -> list[str]:
    """Mount points whose source is one of ``devices`` (or whose device number is)."""
    nums = set()
    for d in devices:
        try:
            import os

            st = os.stat(d)
            nums.add(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        except OSError:
            continue
    return [e.target for e in table() if e.source in devices or e.major_minor in nums]
