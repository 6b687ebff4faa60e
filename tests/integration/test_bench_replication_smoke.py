"""Smoke test of the replication benchmark: `python -m bench.replication --quick` prints its figures
well-formed (the two-site ones through real link services), each with the verdict its target asks for,
and leaves nothing behind: no loop device, mount, temp root or link service process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration import benchfigs, conftest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # --quick takes about 30 s on an idle machine


def test_bench_replication_quick_prints_figures_and_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bench.replication", "--quick"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench cleans up on SIGTERM
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"bench --quick took over {TIMEOUT} s; stderr tail: {err[-2000:]}") from None
    assert proc.returncode == 0, f"bench failed ({proc.returncode}): {err[-3000:]}"
    figs = {f["metric"]: f for f in (benchfigs.check(line) for line in out.splitlines())}
    assert sorted(figs) == ["checkpoint_seconds", "delta_bytes_ratio", "delta_compute_seconds",
                            "failback_bytes_ratio", "initial_sync_throughput", "lag_seconds_p50",
                            "lag_seconds_p99", "primary_write_overhead"], figs
    ratio = figs["delta_bytes_ratio"]
    assert ratio["target"] == "<=1.2" and isinstance(ratio["met"], bool), ratio
    assert ratio["value"] >= ratio["baseline"] > 0, "a delta carries at least the bytes changed"
    assert figs["checkpoint_seconds"]["met"] is None
    for metric in ("initial_sync_throughput", "primary_write_overhead"):
        assert figs[metric]["target"] == ">=0.8" and isinstance(figs[metric]["met"], bool), figs[metric]
        assert figs[metric]["runs"] == 1, "--quick: one pair"
    p50, p99 = figs["lag_seconds_p50"], figs["lag_seconds_p99"]
    assert p50["baseline"] == p99["baseline"] == 1, "the lag lines state --quick's interval, 1 s"
    assert 0 < p50["value"] <= p99["value"] and p50["met"] is None and p50["runs"] > 50, (p50, p99)
    fb = figs["failback_bytes_ratio"]
    assert fb["target"] == "<=1.2" and isinstance(fb["met"], bool) and fb["runs"] == 1, fb
    assert 0 < fb["baseline"] <= fb["value"] < 10 * fb["baseline"], "fast-failback sends the changed extents"
    conftest.assert_bench_left_nothing(err)
    root = Path(re.search(r"\] root (/tmp/vbench-\S+)", err).group(1))  # type: ignore[union-attr]
    assert benchfigs.processes_under(root) == [], "a link service outlived the bench"
