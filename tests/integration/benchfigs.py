"""What every benchmark figure line must be: the keys, their types, and ``met``/``settled`` that agree with
``target``, ``ratio`` and ``spread`` (bench/common.py's rules, checked from the outside)."""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path

KEYS = {"metric", "value", "unit", "baseline", "ratio", "target", "met", "spread", "settled"}
# a figure's own counts (bench/failover.py): samples with a volume mounted on two nodes at once, which
# fail the figure whatever its time, and how many runs its median is of
OPTIONAL = {"overlaps", "runs"}


def _num(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _holds(target: str, ratio: float, value: float) -> bool:
    x = value if target.startswith("value") else ratio
    m = re.fullmatch(r"(<=|>=|<|>)([0-9.]+)", target.removeprefix("value"))
    assert m, target
    op, t = m.group(1), float(m.group(2))
    return {"<=": x <= t, ">=": x >= t, "<": x < t, ">": x > t}[op]


def check(line: str) -> dict[str, object]:
    """One figure line, parsed, after checking it against the rules."""
    fig = json.loads(line)
    assert isinstance(fig, dict), line
    if fig.get("value") is None:  # a figure the build cannot take yet: null, not met, and why
        assert set(fig) == KEYS | {"note"}, line
        assert isinstance(fig["note"], str) and fig["note"], line
        assert fig["met"] is False and fig["spread"] is None and fig["settled"] is None, line
        assert fig["baseline"] is None and fig["ratio"] is None, line
        return fig
    assert KEYS <= set(fig) <= KEYS | OPTIONAL, line
    for k in OPTIONAL & set(fig):
        assert isinstance(fig[k], int) and not isinstance(fig[k], bool) and fig[k] >= 0, line
    overlapped = bool(fig.get("overlaps"))
    assert isinstance(fig["metric"], str) and isinstance(fig["unit"], str), line
    for k in ("value", "baseline", "ratio"):
        assert _num(fig[k]), line
    assert fig["value"] > 0 and fig["baseline"] > 0, line
    target, ratio, spread = fig["target"], fig["ratio"], fig["spread"]
    if spread is None:  # no pairs: the plain ratio
        assert abs(ratio - fig["value"] / fig["baseline"]) <= 0.01 * max(1.0, abs(ratio)), line
    else:  # the median of the pairs' ratios lies within their spread
        assert isinstance(spread, list) and len(spread) == 2 and all(_num(x) for x in spread), line
        assert spread[0] <= ratio <= spread[1], line
    if target is None:
        assert not overlapped, f"an overlap needs a target to fail: {line}"
        assert fig["met"] is None and fig["settled"] is None, line
    else:
        assert isinstance(target, str) and target, line
        assert fig["met"] is (_holds(target, ratio, fig["value"]) and not overlapped), line
        if spread is None:
            assert fig["settled"] is None, line
        else:
            assert isinstance(fig["settled"], bool), line
            # settled judges an interval of the median, which lies within the spread: a spread on one
            # side of the target is settled (one that straddles it may be too, given enough pairs)
            if not target.startswith("value") and _holds(target, spread[0], 0) == _holds(target, spread[1], 0):
                assert fig["settled"] is True, line
    return fig


def zram_left(stderr: str) -> list[str]:
    """zram devices the bench logged making and not removing (it removes exactly the numbers it made)."""
    made = re.findall(r"zram: made /dev/zram(\d+)", stderr)
    removed = re.findall(r"zram: removed zram(\d+)", stderr)
    return [f"zram{n}" for n in made if made.count(n) > removed.count(n)]


def processes_under(root: Path) -> list[int]:
    """PIDs of processes whose command line or environment names ``root`` (a plugin, a dockerd left)."""
    needle = str(root).encode()
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "cmdline").read_bytes() or needle in (p / "environ").read_bytes():
                    out.append(int(p.name))
            except OSError:
                continue
    return out
