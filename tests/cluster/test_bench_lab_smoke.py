"""Smoke test of bench/lab.py: `--quick` prints one well-formed lab_up_3_nodes_swarm figure and leaves
nothing behind (its temp root, and every lab it brought up)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import benchfigs, conftest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_bench_lab_quick_prints_the_figure_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "lab.py"), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figs = [benchfigs.check(line) for line in proc.stdout.splitlines()]
    assert [f["metric"] for f in figs] == ["lab_up_3_nodes_swarm"]
    fig = figs[0]
    assert fig["unit"] == "s" and fig["target"] == "value<15" and fig["baseline"] > 0, fig
    conftest.assert_bench_left_nothing(proc.stderr)
