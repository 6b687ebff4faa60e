"""What every benchmark shares: the one-JSON-object-per-figure output, timing helpers, and a main
that checks prerequisites and always runs the clean-up, also on SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

_PREFIX = ["bench"]


def log(msg: str) -> None:
    print(f"[{_PREFIX[0]} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(metric: str, value: float, unit: str, baseline: float, target: str) -> None:
    """One figure on stdout; ``ratio`` is always value / baseline."""
    ratio = value / baseline if baseline else float("inf")
    print(json.dumps({"metric": metric, "value": round(value, 3), "unit": unit,
                      "baseline": round(baseline, 3), "ratio": round(ratio, 3), "target": target}),
          flush=True)


def sh(*argv: str | Path, timeout: float = 600) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` took."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, by the nearest-rank method."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def rotated(n: int, *sides: Callable[[int], float]) -> list[list[float]]:
    """Run every side n times, rotating which goes first each round; one list of results per side."""
    out: list[list[float]] = [[] for _ in sides]
    for i in range(n):
        for k in range(len(sides)):
            j = (i + k) % len(sides)
            out[j].append(sides[j](i))
    return out


def alternate(runs: int, ours: Callable[[int], None], theirs: Callable[[int], None]) -> None:
    """One warm-up each (index -1), then ``runs`` rounds alternating which side goes first."""
    ours(-1)
    theirs(-1)
    for i in range(runs):
        first, second = (ours, theirs) if i % 2 == 0 else (theirs, ours)
        first(i)
        second(i)


class Bench(Protocol):
    def setup(self) -> None: ...
    def cleanup(self) -> None: ...


def main(name: str, doc: str | None, argv: Sequence[str] | None, tools: Sequence[str],
         groups: Sequence[str], make: Callable[[Path, bool], Bench],
         run_group: Callable[[Bench, str], None]) -> int:
    """Parse --quick/--only, check root and tools, run the groups, and clean up whatever happens."""
    _PREFIX[0] = name
    ap = argparse.ArgumentParser(description=doc.split("\n")[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help="a few repetitions of each figure (smoke test)")
    ap.add_argument("--only", nargs="*", choices=list(groups), help="run only these figure groups")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print(f"{name} needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{name} needs {tool}", file=sys.stderr)
            return 2

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    root = Path(tempfile.mkdtemp(prefix=f"v{name}-", dir="/tmp"))
    log(f"root {root}")
    bench = make(root, args.quick)
    t0 = time.perf_counter()
    try:
        bench.setup()
        for g in args.only or groups:
            os.sync()  # the previous group's writeback must not land on this group's measurements
            run_group(bench, g)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let clean-up finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.cleanup()
        log(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
