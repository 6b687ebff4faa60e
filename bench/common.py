"""What every benchmark shares: the one-JSON-object-per-figure output, timing helpers, and a main
that checks prerequisites and always runs the clean-up, also on SIGTERM."""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from storage import diskgroup
from storage.kernel import mounts

_PREFIX = ["bench"]


def log(msg: str) -> None:
    print(f"[{_PREFIX[0]} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def verdict(target: str | None, ratio: float, value: float) -> bool | None:
    """Whether a figure meets ``target``: a condition on the ratio (">=0.85", "<=1.5"), on the value itself
    when it starts with "value" ("value<100"), or None (information: no verdict)."""
    if target is None:
        return None
    x = value if target.startswith("value") else ratio
    cond = target.removeprefix("value")
    for op, test in (("<=", operator.le), (">=", operator.ge), ("<", operator.lt), (">", operator.gt)):
        if cond.startswith(op):
            return bool(test(x, float(cond[len(op):])))
    raise ValueError(f"bad target {target!r}")


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def emit(metric: str, value: float | None, unit: str, baseline: float | None, target: str | None,
         ratio: float | None = None, spread: tuple[float, float] | None = None, settled: bool | None = None,
         note: str | None = None, fields: dict[str, Any] | None = None, failed: bool = False) -> None:
    """One figure on stdout. ``ratio`` is value / baseline unless given (the median of per-pair ratios);
    ``met`` is the verdict of ``target`` on it (None for information); ``spread`` is [min, max] of the
    per-pair ratios where the figure comes from interleaved pairs, and ``settled`` says whether the
    confidence interval of their median lies on one side of the target (Pairs.interval; None where
    there is no target or no pairs). A figure that could not be taken
    (a feature missing) has value null, met false and a ``note`` saying why. ``fields`` adds keys that
    tell variants of one metric apart (e.g. ``"prefill": false``), keeping the metric's name, or counts
    of the figure's own (``"overlaps"``); ``failed`` makes ``met`` false whatever the value (a run that
    broke a rule the target does not express, such as a volume mounted on two nodes at once)."""
    if ratio is None and value is not None and baseline is not None:
        ratio = value / baseline if baseline else float("inf")
    # judged on the printed (rounded) figures, so a line never contradicts itself at the third decimal
    met = None if target is None else (False if value is None or ratio is None
                                       else verdict(target, _r(ratio), _r(value)))
    if failed and target is not None:
        met = False
    fig: dict[str, Any] = {"metric": metric, "value": _r(value), "unit": unit, "baseline": _r(baseline),
                           "ratio": _r(ratio), "target": target, "met": met,
                           "spread": None if spread is None else [_r(spread[0]), _r(spread[1])],
                           "settled": settled}
    if note is not None:
        fig["note"] = note
    fig.update(fields or {})  # what sets a line apart beyond its name (e.g. "fstype": "none")
    print(json.dumps(fig), flush=True)


def emit_missing(metric: str, unit: str, target: str | None, note: str,
                 fields: dict[str, Any] | None = None) -> None:
    """A figure this build cannot take yet (the feature it measures is missing): null, not met, and why."""
    emit(metric, None, unit, None, target, note=note, fields=fields)


@dataclass
class Pairs:
    """Interleaved measurements: ``ours[i]`` and ``base[i]`` were taken back to back (order alternating)."""

    ours: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [o / b if b else float("inf") for o, b in zip(self.ours, self.base, strict=True)]

    @property
    def value(self) -> float:
        return statistics.median(self.ours)

    @property
    def baseline(self) -> float:
        return statistics.median(self.base)

    @property
    def ratio(self) -> float:
        """The median of the per-pair ratios: drift over the run (other load, a warming cache) lands on
        both halves of a pair alike, so it cancels in each pair's ratio."""
        return statistics.median(self.ratios())

    def spread(self) -> tuple[float, float]:
        r = self.ratios()
        return min(r), max(r)

    def interval(self, by_value: bool = False) -> tuple[float, float]:
        """A distribution-free ~95 % confidence interval of the median per-pair ratio (of the median value
        with ``by_value``): the k-th smallest and k-th largest of n, k the largest with
        2 P(Binomial(n, 1/2) < k) <= 0.05, at least 1. Up to 8 pairs that is [min, max], the spread
        itself; with more pairs it narrows (15 pairs: the 4th to the 12th), so that more pairs can
        settle a figure whose first ones straddled its target, which the spread (it only widens) cannot."""
        xs = sorted(self.ours if by_value else self.ratios())
        n, k = len(xs), 1
        while 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n <= 0.05:
            k += 1
        return xs[k - 1], xs[n - k]

    def settled(self, target: str | None) -> bool | None:
        """True when the interval of the median lies on one side of ``target`` (does not straddle it)."""
        if target is None:
            return None
        lo, hi = self.interval(by_value=target.startswith("value"))
        # judged on the printed (rounded) ends, as ``met`` is: a spread printed as [1.08, 1.3] under
        # "<=1.3" is settled even if its top was 1.3004 before rounding
        lo, hi = round(lo, 3), round(hi, 3)
        return verdict(target, lo, lo) == verdict(target, hi, hi)

    def emit(self, metric: str, unit: str, target: str | None, fields: dict[str, Any] | None = None) -> None:
        emit(metric, self.value, unit, self.baseline, target, ratio=self.ratio, spread=self.spread(),
             settled=self.settled(target), fields=fields)


def run_pairs(ours: Callable[[int], float], base: Callable[[int], float], target: str | None, pairs: int,
              cap: int | None = None, warmup: bool = False) -> Pairs:
    """``pairs`` interleaved pairs (ours then base, then base then ours, ...); while the interval of their
    median straddles ``target`` (Pairs.settled false), more pairs, up to ``cap`` in all. With ``warmup``
    one unrecorded run of each side first (index -1)."""
    cap = max(pairs, cap or pairs)
    if warmup:
        ours(-1)
        base(-1)
    res = Pairs()
    i = 0
    while i < pairs or (i < cap and res.settled(target) is False):
        if i % 2 == 0:
            o = ours(i)
            b = base(i)
        else:
            b = base(i)
            o = ours(i)
        res.ours.append(o)
        res.base.append(b)
        i += 1
    if i > pairs:
        log(f"   {i} pairs (spread {res.spread()[0]:.3f}..{res.spread()[1]:.3f} around {target})")
    return res


class Zram:
    """zram block devices this run made (hot_add), removed again by exactly those numbers (hot_remove);
    any other zram device, /dev/zram0 above all, belongs to someone else and is never touched."""

    CONTROL = Path("/sys/class/zram-control")

    def __init__(self) -> None:
        self.mine: list[int] = []

    def add(self, size: str) -> Path:
        n = int((self.CONTROL / "hot_add").read_text().strip())
        self.mine.append(n)  # recorded first: removed at clean-up whatever fails next
        log(f"zram: made /dev/zram{n}")
        (Path(f"/sys/block/zram{n}") / "disksize").write_text(size)
        dev = Path(f"/dev/zram{n}")
        deadline = time.monotonic() + 5
        while not dev.is_block_device():  # no udev here: the kernel's devtmpfs makes the node
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dev} did not appear")
            time.sleep(0.05)
        return dev

    def remove(self, dev: Path) -> None:
        n = int(dev.name.removeprefix("zram"))
        if n not in self.mine:
            raise RuntimeError(f"{dev} is not one this run made")
        for attempt in range(20):  # a device unmounted a moment ago may still be held briefly (EBUSY)
            try:
                (self.CONTROL / "hot_remove").write_text(str(n))
                break
            except OSError as exc:
                if attempt == 19:
                    raise RuntimeError(f"hot_remove of zram{n}: {exc}") from exc
                time.sleep(0.25)
        self.mine.remove(n)
        log(f"zram: removed zram{n}")

    def remove_all(self) -> None:
        """Clean-up: every device still ours, after unmounting whatever of it is still mounted."""
        for n in list(self.mine):
            dev = Path(f"/dev/zram{n}")
            try:
                rdev = dev.stat().st_rdev
                num: str | None = f"{os.major(rdev)}:{os.minor(rdev)}"
            except OSError:
                num = None
            for e in sorted(mounts.table(), key=lambda e: -len(e.target)):
                if e.source == str(dev) or (num is not None and e.major_minor == num):
                    log(f"forced clean-up: umount {e.target} (zram{n})")
                    subprocess.run(["umount", "-l", e.target], capture_output=True, check=False)
            try:
                self.remove(dev)
            except RuntimeError as exc:
                log(f"zram{n} left behind: {exc}")


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


def strata_phases(n: int, interval: float, rng: random.Random) -> list[float]:
    """``n`` phases in [0, interval): one uniform draw from each of n equal strata, in shuffled order, so
    that few runs still sample the whole interval evenly (a poll's phase against a kill is uniform)."""
    out = [(k + rng.random()) * interval / n for k in range(n)]
    rng.shuffle(out)
    return out


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


def destroy_dg(config: Any, name: str) -> None:
    """Destroy a bench's disk group ``name`` with its volumes (their mount records first: the plugin is
    gone), trying three times: the forced clean-up after it still runs if this fails."""
    for attempt in range(3):
        try:
            dg = diskgroup.open_dg(config, name)
            for v in dg.catalog.volumes():
                for m in dg.catalog.mounts(v.name):
                    dg.catalog.remove_mount(v.name, m.node, m.mount_id)
            diskgroup.destroy(dg, force=True)
            return
        except Exception as exc:  # the forced clean-up still runs
            log(f"destroying disk group {name} (attempt {attempt + 1}): {exc!r}")
            time.sleep(1)
