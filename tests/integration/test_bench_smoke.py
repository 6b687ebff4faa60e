"""Smoke test of the storage benchmark: `bench/storage.py --quick` runs, prints only well-formed figures on
stdout (with met, spread and settled that agree with their target), and leaves nothing behind (its temp
root, loop devices and mounts are gone)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.integration import benchfigs, conftest

REPO = Path(__file__).resolve().parents[2]
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
    figs = [benchfigs.check(line) for line in lines]
    metrics = [f["metric"] for f in figs]
    by_name = {f["metric"]: f for f in figs}
    # the ratio figures come from interleaved pairs: each carries their spread and a verdict
    for name in ("make_mount_1g_p50", "snapshot_1g_500m_p50", "fio_randwrite_4k_qd32", "fio_seqwrite_1m_qd8",
                 "vol_list_200_p50"):
        assert by_name[name]["spread"] is not None and isinstance(by_name[name]["settled"], bool), by_name[name]
        assert isinstance(by_name[name]["met"], bool), by_name[name]
    assert by_name["umount_rm_1g_p50"]["target"] is None and by_name["umount_rm_1g_p50"]["met"] is None
    assert len(set(metrics)) == len(metrics), metrics
    for prefix in ("make_mount_1g", "umount_rm_1g", "snapshot_1g_500m", "snapshot_first_mount", "vol_list_200",
                   "make_cost_200th", "cli_vol_list_200", "fio_randwrite_4k", "fio_seqwrite_1m"):
        assert any(m.startswith(prefix) for m in metrics), (prefix, metrics)

    conftest.assert_bench_left_nothing(err)
