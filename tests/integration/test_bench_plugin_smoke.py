"""``python bench/plugin.py --quick`` runs, cleans up after itself (also the host engine's docker0 it
must not touch), and prints only figure lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration import conftest, hostengine

REPO = Path(__file__).resolve().parents[2]
KEYS = {"metric", "value", "unit", "baseline", "ratio", "target"}


def test_bench_plugin_quick(host_engine: hostengine.HostState):
    assert hostengine.docker0_ifindex() == host_engine.docker0_ifindex is not None, \
        "the host engine's docker0 is already gone or changed" + hostengine.engines_in_host_netns(host_engine.pid)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "plugin.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 10, proc.stdout
    metrics = []
    for line in lines:
        fig = json.loads(line)
        assert isinstance(fig, dict) and set(fig) == KEYS, line
        assert isinstance(fig["value"], (int, float)) and fig["value"] > 0, line
        assert isinstance(fig["baseline"], (int, float)) and fig["baseline"] > 0, line
        assert abs(fig["ratio"] - fig["value"] / fig["baseline"]) < 0.01 * fig["ratio"] + 0.002, line
        metrics.append(fig["metric"])
    assert metrics == ["plugin_create_1g_p50", "docker_volume_create_p50", "docker_volume_create_p95",
                       "docker_run_true_p50", "fio_seqwrite_1m_qd8", "fio_randwrite_4k_qd32",
                       "fio_randwrite_4k_qd32_disk_fs_vs_local", "fio_randwrite_4k_qd32_volume_vs_disk_fs",
                       "fio_seqwrite_1m_qd1", "fio_randwrite_4k_qd1"]
    conftest.assert_bench_left_nothing(proc.stderr)
    # its engine ran in a network namespace of its own: the host engine's bridge is the same one
    assert hostengine.docker0_ifindex() == host_engine.docker0_ifindex, \
        "the benchmark changed the host's docker0" + hostengine.engines_in_host_netns(host_engine.pid)
