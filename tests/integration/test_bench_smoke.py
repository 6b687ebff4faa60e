"""Smoke test of the storage benchmark: `bench/storage.py --quick` runs, prints only well-formed figures on
stdout, and leaves nothing behind (its temp root, loop devices and mounts are gone)."""

from __future__ import annotations

import json
import numbers
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration import conftest

REPO = Path(__file__).resolve().parents[2]
KEYS = {"metric", "value", "unit", "baseline", "ratio", "target"}
TIMEOUT = 240  # --quick takes well under a minute on an idle machine


def test_bench_quick_prints_json_figures_and_cleans_up():
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "storage.py"), "--quick"], cwd=REPO,
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

    lines = out.splitlines()
    assert lines, f"no figures printed; stderr: {err[-2000:]}"
    metrics = []
    for line in lines:
        fig = json.loads(line)
        assert isinstance(fig, dict), line
        assert set(fig) == KEYS, line
        for k in ("value", "baseline", "ratio"):
            assert isinstance(fig[k], numbers.Real) and not isinstance(fig[k], bool), line
        assert isinstance(fig["metric"], str) and isinstance(fig["unit"], str), line
        assert isinstance(fig["target"], str) and fig["target"], line
        if fig["baseline"]:
            assert abs(fig["ratio"] - fig["value"] / fig["baseline"]) <= 0.01 * max(1.0, abs(fig["ratio"])), line
        metrics.append(fig["metric"])
    assert len(set(metrics)) == len(metrics), metrics
    for prefix in ("make_mount_1g", "umount_rm_1g", "snapshot_1g_500m", "snapshot_first_mount", "vol_list_200",
                   "make_cost_200th", "cli_vol_list_200", "fio_randwrite_4k", "fio_seqwrite_1m"):
        assert any(m.startswith(prefix) for m in metrics), (prefix, metrics)

    conftest.assert_bench_left_nothing(err)
