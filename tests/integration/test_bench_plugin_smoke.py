"""``python bench/plugin.py --quick`` runs, cleans up after itself (also the host engine's docker0 it
must not touch, the zram devices it made and its plugins), and prints only figure lines: the same-disk
figures for every kind of disk, with spread, settled and met, and the 4k random-write ones again with
nothing prefilled ("prefill": false)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.integration import benchfigs, conftest, hostengine

REPO = Path(__file__).resolve().parents[2]
SAME_DISK = [f"container_{job}_same_disk_{kind}{prov}" for kind in ("image", "block", "dir")
             for prov in ("", "_thick", "_fstype_none") for job in ("randwrite_4k_qd32", "seqwrite_1m_qd8")]


def test_bench_plugin_quick(host_engine: hostengine.HostState):
    assert hostengine.docker0_ifindex() == host_engine.docker0_ifindex is not None, \
        "the host engine's docker0 is already gone or changed" + hostengine.engines_in_host_netns(host_engine.pid)
    zram0 = Path("/sys/block/zram0").exists()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "plugin.py"), "--quick"], capture_output=True,
                          text=True, timeout=480, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    figs = [benchfigs.check(line) for line in lines]
    metrics = [f["metric"] for f in figs]
    assert metrics[:9] == ["plugin_create_1g_p50", "docker_volume_create_p50", "docker_volume_create_p95",
                           "docker_run_true_p50", "fio_seqwrite_1m_qd8", "container_randwrite_4k_qd32_vs_host_fs",
                           "fio_randwrite_4k_qd32_disk_fs_vs_local", "fio_seqwrite_1m_qd1", "fio_randwrite_4k_qd1"]
    prefilled = [f for f in figs[9:] if "prefill" not in f]
    assert sorted(f["metric"] for f in prefilled) == sorted(SAME_DISK), metrics
    # the 4k random-write figures again, on fresh volumes and files (first writes), same names, "prefill": false
    first = [f for f in figs[9:] if "prefill" in f]
    # (thin and thick: an fstype=none volume has no first-write variant)
    assert sorted(f["metric"] for f in first) == sorted(m for m in SAME_DISK if "randwrite" in m
                                                        and not m.endswith("_fstype_none")), metrics
    for fig in first:
        assert fig["target"] == ">=0.85" and fig["value"] is not None and fig["spread"] is not None, fig
        assert isinstance(fig["met"], bool), fig
    by_name = {f["metric"]: f for f in figs if "prefill" not in f}
    assert by_name["container_randwrite_4k_qd32_vs_host_fs"]["target"] is None
    assert by_name["container_randwrite_4k_qd32_vs_host_fs"]["met"] is None
    for name in SAME_DISK:
        fig = by_name[name]
        assert fig["target"] == (">=0.85" if "randwrite" in name else ">=0.9"), fig
        if name.endswith("_fstype_none"):
            assert fig["fstype"] == "none", fig
            if "_dir" not in name:  # this kernel has no XFS quotas: refused on veritas's own XFS disks
                assert fig["value"] is None and "fstype=none" in fig["note"], fig
                continue
        elif "_dir" in name or name.endswith("_thick"):
            continue  # null with a note until directory disks / provisioning=thick land; then measured
        # image files and zram block devices work today: measured, in pairs, with a verdict
        assert fig["value"] is not None and fig["spread"] is not None, fig
        assert isinstance(fig["met"], bool) and isinstance(fig["settled"], bool), fig
    made = re.findall(r"zram: made /dev/zram(\d+)", proc.stderr)
    assert made, "the block and dir disks are zram devices the bench makes"
    assert benchfigs.zram_left(proc.stderr) == [], proc.stderr[-3000:]
    assert Path("/sys/block/zram0").exists() == zram0, "the machine's /dev/zram0 is not the bench's to touch"
    conftest.assert_bench_left_nothing(proc.stderr)
    root = re.search(r"\] root (/tmp/vbench-\S+)", proc.stderr)
    assert root and benchfigs.processes_under(Path(root.group(1))) == [], "bench left processes behind"
    # its engine ran in a network namespace of its own: the host engine's bridge is the same one
    assert hostengine.docker0_ifindex() == host_engine.docker0_ifindex, \
        "the benchmark changed the host's docker0" + hostengine.engines_in_host_netns(host_engine.pid)
