"""Smoke test of bench/failover.py: `--quick` prints the three failover figures, well formed (the mount
sampler's "overlaps" and "runs" included), and leaves nothing behind: its temp root, the lab's
processes, mounts and loop devices. (lab_up_3_nodes_swarm, its "up" group, is bench/lab.py's figure,
smoke-tested by test_bench_lab_smoke.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import benchfigs, conftest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_bench_failover_quick_prints_the_figures_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "failover.py"), "--quick", "--only", "drain",
                           "dockerd", "node"], cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figs = {f["metric"]: f for f in (benchfigs.check(line) for line in proc.stdout.splitlines())}
    assert list(figs) == ["drain_to_running_with_volume", "dockerd_kill_to_running_with_data",
                          "node_kill_to_running_with_data"], proc.stdout
    for fig in figs.values():
        assert fig["unit"] == "s" and fig["overlaps"] == 0 and fig["value"] > 0, fig
        assert fig["runs"] == 1, fig
    # the drain target is the run's own baseline plus one second, written out
    drain = figs["drain_to_running_with_volume"]
    assert drain["target"] == f"value<{round(drain['baseline'] + 1.0, 3)}", drain
    assert figs["dockerd_kill_to_running_with_data"]["target"] == "value<10"
    assert figs["node_kill_to_running_with_data"]["target"] == "value<13"  # the lab's lease_ttl 10 + 3
    # the sampler saw the volume mounted (so "overlaps": 0 means something)
    assert re.search(r"mount samples, 0 overlapping, \d*[1-9]\d* with it mounted", proc.stderr), proc.stderr[-2000:]
    conftest.assert_bench_left_nothing(proc.stderr)
    root = Path(re.search(r"\] root (\S+)", proc.stderr).group(1))  # type: ignore[union-attr]
    assert benchfigs.processes_under(root) == [], "the lab's processes outlived the bench"
