"""``python bench/agents.py --quick --only monitor detect`` runs on its own private engine and plugin, prints
only well-formed figure lines (monitor with 50 containers against the stock heartbeat/docker agent, the
watcher's detection of a kill -9 against polling at 10 s), and leaves nothing behind: no
process naming its root (engine, plugin, shims, the containers, which carry the root in their
environment), no loop device backed by one of its files (by the kernel's identity of the file), no mount,
no temp root, and the host engine's docker0 as it was. (The failover and migration groups bring up a
Pacemaker lab: too long for the suite; their pure parts are tests/unit/test_bench_pcmk.py's, their
scenarios tests/cluster/test_pacemaker_failover.py's.)"""

from __future__ import annotations

import ast
import re
import signal
import subprocess
import sys
from pathlib import Path

from storage.kernel import loop
from tests.integration import benchfigs, conftest, hostengine

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # --quick takes about 90 s on an idle machine


def test_bench_agents_quick(host_engine: hostengine.HostState) -> None:
    assert hostengine.docker0_ifindex() == host_engine.docker0_ifindex is not None, \
        "the host engine's docker0 is already gone or changed" + hostengine.engines_in_host_netns(host_engine.pid)
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "agents.py"), "--quick", "--only", "monitor",
                             "detect"], cwd=REPO,
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

    figs = [benchfigs.check(line) for line in out.splitlines()]
    assert [f["metric"] for f in figs] == ["monitor_p95_50_containers", "detect_container_death",
                                           "detect_container_death_p95"], out
    mon, p50, p95 = figs
    # measured, in ms, with a verdict on the targets
    assert mon["unit"] == "ms" and mon["target"] == "value<50" and isinstance(mon["met"], bool), mon
    assert mon["runs"] == 10, mon
    assert "50 containers running" in err and "agent core in-process" in err, err[-3000:]
    assert p50["unit"] == "ms" and p50["target"] == "value<1000" and isinstance(p50["met"], bool), p50
    assert p50["runs"] == 3 and p50["spread"] is not None and isinstance(p50["settled"], bool), p50
    # polling at 10 s waits a uniform phase of the interval (the middle of three strata: over 3.3 s), the
    # watcher does not
    assert p50["baseline"] > 3333 and p50["value"] < p50["baseline"], p50
    assert p95["target"] is None and p95["met"] is None and p95["runs"] == 3, p95

    conftest.assert_bench_left_nothing(err)
    root = re.search(r"\] root (/tmp/vbench-agents-\S+)", err)
    assert root, err[:2000]
    assert benchfigs.processes_under(Path(root.group(1))) == [], "bench left processes behind"
    ids = re.search(r"loop identities: (\[.*\])", err)
    assert ids, err[-3000:]
    images = {tuple(x) for x in ast.literal_eval(ids.group(1))}
    assert images, "the bench's disk group had no files to back its loop devices"
    held = [dev for dev in loop.attached() if loop.backing_id(dev) in images]
    assert held == [], f"loop devices still backed by the bench's files: {held}"
    # its engine ran in a network namespace of its own: the host engine's bridge is the same one
    assert hostengine.docker0_ifindex() == host_engine.docker0_ifindex, \
        "the benchmark changed the host's docker0" + hostengine.engines_in_host_netns(host_engine.pid)
