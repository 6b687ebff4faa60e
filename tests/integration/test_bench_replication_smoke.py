"""Smoke test of the replication benchmark: `python -m bench.replication --quick` prints its three figures
well-formed, delta_bytes_ratio with a verdict, and leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.integration import benchfigs, conftest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # --quick takes about 6 s on an idle machine


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
    assert sorted(figs) == ["checkpoint_seconds", "delta_bytes_ratio", "delta_compute_seconds"], figs
    ratio = figs["delta_bytes_ratio"]
    assert ratio["target"] == "<=1.2" and isinstance(ratio["met"], bool), ratio
    assert ratio["value"] >= ratio["baseline"] > 0, "a delta carries at least the bytes changed"
    assert figs["checkpoint_seconds"]["met"] is None
    conftest.assert_bench_left_nothing(err)
