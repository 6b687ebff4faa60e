"""bench/pcmk_failover.py and bench/pcmk_figures.py without a cluster: reading crm_mon and crm_failcount,
the stock resource's CIB fragment, when a move counts as done (the timing logic, against a scripted
cluster), and that the failover and migration lines obey bench/common.py's rules."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from bench import pcmk_failover as pf
from bench import pcmk_figures
from bench.common import Pairs
from tests.integration import benchfigs


def crm_mon(placed: dict[str, tuple[str, str, str]]) -> str:
    """A crm_mon --output-as=xml document (Pacemaker 2.1's shape): ``placed`` maps a resource to
    (node, role, failed); the DockerDaemon clone is started on every node."""
    clone = "".join(f'<resource id="dockerd" resource_agent="ocf:veritas:DockerDaemon" role="Started" active="true" '
                    f'failed="false" nodes_running_on="1"><node name="{n}" id="{i}" cached="true"/></resource>'
                    for i, n in enumerate(pf.NODES, 1))
    rs = "".join(f'<resource id="{r}" role="{role}" active="{str(role != "Stopped").lower()}" failed="{failed}" '
                 f'nodes_running_on="1"><node name="{node}" id="1" cached="true"/></resource>'
                 for r, (node, role, failed) in placed.items())
    return (f'<pacemaker-result api-version="2.2"><resources><clone id="dockerd-clone" multi_state="false">{clone}'
            f'</clone><group id="g-web" number_resources="1">{rs}</group></resources></pacemaker-result>')


def test_started_is_every_node_where_a_resource_is_started_and_not_failed() -> None:
    assert pf.started_in(crm_mon({}), "dockerd") == pf.NODES  # each instance of the clone
    assert pf.started_in(crm_mon({"web": ("node2", "Started", "false")}), "web") == ["node2"]
    assert pf.started_in(crm_mon({"web": ("node2", "Stopping", "false")}), "web") == []
    assert pf.started_in(crm_mon({"web": ("node2", "Started", "true")}), "web") == []  # failed there
    assert pf.started_in(crm_mon({"web": ("node2", "Started", "false")}), "stockweb") == []
    with pytest.raises(ET.ParseError):
        pf.started_in("crm_mon: connection refused", "web")


def test_failcount_reads_numbers_infinity_and_nothing() -> None:
    assert [pf.parse_failcount(s) for s in ("2\n", "INFINITY\n", "", "0")] == [2, 10**6, 0, 0]


def test_the_stock_resource_is_the_heartbeat_docker_agent_with_web_s_policies_and_no_volume() -> None:
    prim, cons = pf.stock_xml()
    p = ET.fromstring(prim)
    assert (p.get("class"), p.get("provider"), p.get("type")) == ("ocf", "heartbeat", "docker")
    ia = {n.get("name"): n.get("value") for n in p.iter("nvpair") if n.get("id", "").startswith(f"{pf.STOCK}-ia")}
    assert ia["image"] == "localbusybox:latest" and ia["name"] == pf.STOCK
    assert "-v" not in (ia.get("run_opts") or "") and "'" not in ia["run_cmd"]  # no volume; no quotes to split
    meta = {n.get("name"): n.get("value") for n in p.iter("nvpair") if n.get("id", "").startswith(f"{pf.STOCK}-meta")}
    assert meta["migration-threshold"] == str(pf.THRESHOLD) and meta["resource-stickiness"] == "100"
    c = [ET.fromstring(x) for x in cons]
    with_group = next(x for x in c if x.get("with-rsc") == pf.GROUP)
    # a finite score above the stickiness: it follows web, and can still move alone
    assert 100 < int(with_group.get("score", "0")) < 10**6
    assert {(x.tag, x.get("with-rsc") or x.get("first")) for x in c} >= {
        ("rsc_colocation", pf.DAEMON_CLONE), ("rsc_order", pf.DAEMON_CLONE)}


class ScriptedCluster(pf.Cluster):
    """crm_mon answers from a script of (from time, placement); a web container reads its token only
    from ``reads_from`` on; the clock is fake and advances by each probe's cost."""

    def __init__(self, script: list[tuple[float, dict[str, tuple[str, str, str]]]], reads_from: float) -> None:
        super().__init__(lab=None)
        self.t = 0.0
        self.script = script
        self.reads_from = reads_from

    def in_node(self, node: str, *argv: str, timeout: float = 30, check: bool = True) -> Any:
        self.t += 0.1
        placed = [p for at, p in self.script if at <= self.t][-1]
        return subprocess.CompletedProcess(list(argv), 0, crm_mon(placed), "")

    def runs_on(self, node: str, rsc: pf.Rsc, token: str | None) -> bool:
        self.t += 0.05
        return token is None or self.t >= self.reads_from


def test_a_move_is_done_per_resource_when_it_runs_elsewhere_with_its_data(monkeypatch: pytest.MonkeyPatch) -> None:
    c = ScriptedCluster([(0.0, {"web": ("node1", "Started", "false"), "stockweb": ("node1", "Started", "false")}),
                         (1.0, {"web": ("node1", "Stopping", "false"), "stockweb": ("node1", "Stopping", "false")}),
                         (2.0, {"web": ("node2", "Started", "false"), "stockweb": ("node2", "Started", "false")})],
                        reads_from=3.0)
    monkeypatch.setattr(pf.time, "monotonic", lambda: c.t)
    monkeypatch.setattr(pf.time, "sleep", lambda s: setattr(c, "t", c.t + s))
    out = pf.wait_moved(c, "node3", "node1", 0.0, {pf.WEB_RSC: "tok", pf.STOCK_RSC: None}, 60, "test")
    assert out["stockweb"][0] == "node2" and 2.0 <= out["stockweb"][1] < 2.5  # Started there: done
    assert out["web"][0] == "node2" and 3.0 <= out["web"][1] < 3.5  # only once it read its token there


def test_a_move_that_never_leaves_the_node_times_out_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    c = ScriptedCluster([(0.0, {"web": ("node1", "Started", "false"), "stockweb": ("node2", "Started", "false")})],
                        reads_from=0.0)
    monkeypatch.setattr(pf.time, "monotonic", lambda: c.t)
    monkeypatch.setattr(pf.time, "sleep", lambda s: setattr(c, "t", c.t + s))
    with pytest.raises(AssertionError, match=r"only \['stockweb'\] of \['stockweb', 'web'\]"):
        pf.wait_moved(c, "node3", "node1", 0.0, {pf.WEB_RSC: "tok", pf.STOCK_RSC: None}, 5, "standby")


def test_failover_and_migrate_lines_obey_the_bench_rules(capsys: pytest.CaptureFixture[str]) -> None:
    pairs = Pairs([2.0 + 0.1 * i for i in range(10)], [3.0 + 0.1 * i for i in range(10)])
    pcmk_figures.emit_failover("failover_standby", pairs, overlaps=0)
    pcmk_figures.emit_migrate(Pairs([1.5, 1.6, 1.4], [0.9, 1.0, 0.8]))
    figs = [benchfigs.check(line) for line in capsys.readouterr().out.splitlines()]
    assert [f["metric"] for f in figs] == ["failover_standby", "failover_standby_p95", "migrate_container"]
    p50, p95, mig = figs
    assert (p50["value"], p50["baseline"], p50["target"], p50["met"], p50["runs"], p50["overlaps"]) == (
        2.45, 3.45, None, None, 10, 0)
    assert p50["spread"] is not None and p50["unit"] == "s"
    assert (p95["value"], p95["baseline"]) == (2.9, 3.9)
    assert (mig["value"], mig["baseline"], mig["target"], mig["runs"]) == (1.5, 0.9, None, 3)


class KillCluster(pf.Cluster):
    """A resource whose fail count goes up by ``per_kill`` at each kill (2: Pacemaker counting one
    watcher-injected failure twice); restarted in place below the threshold, on node2 once it is reached."""

    def __init__(self, per_kill: int, threshold: int = 3) -> None:
        super().__init__(lab=None)
        self.per_kill, self.threshold = per_kill, threshold
        self.fc, self.pid, self.t = 0, 100, 0.0
        self.log: list[str] = []

    def on(self) -> str:
        return "node2" if self.fc >= self.threshold else "node1"

    def kill(self, pid: int, sig: int) -> None:
        assert pid == self.pid
        self.log.append(f"kill at {self.t:g}")
        self.fc += self.per_kill
        self.pid += 1

    def started(self, via: str, rsc: str) -> list[str]:
        return [self.on()]

    def failcount(self, via: str, rsc: str, node: str) -> int:
        return self.fc

    def settle(self, via: str, timeout: float = 120) -> None:
        self.log.append("settle")

    def write_token(self, node: str, rsc: pf.Rsc = pf.WEB_RSC) -> str:
        return "tok"

    def state(self, node: str, rsc: pf.Rsc) -> tuple[bool, int]:
        return node == self.on(), self.pid

    def runs_on(self, node: str, rsc: pf.Rsc, token: str | None) -> bool:
        return node == self.on()

    def reads(self, node: str, token: str, rsc: pf.Rsc = pf.WEB_RSC) -> bool:
        return node == self.on()

    def in_node(self, node: str, *argv: str, timeout: float = 30, check: bool = True) -> Any:
        return subprocess.CompletedProcess(list(argv), 0, crm_mon({"web": (self.on(), "Started", "false")}), "")


@pytest.mark.parametrize("per_kill, kills, restarts", [(1, 3, 2), (2, 2, 1)])
def test_container_kill_kills_until_the_threshold_and_times_the_move_from_the_crossing_kill(
        monkeypatch: pytest.MonkeyPatch, per_kill: int, kills: int, restarts: int) -> None:
    c = KillCluster(per_kill)
    monkeypatch.setattr(pf.os, "kill", c.kill)
    monkeypatch.setattr(pf.time, "monotonic", lambda: c.t)

    def sleep(s: float) -> None:
        c.log.append(f"sleep {s:g}")
        c.t += s

    monkeypatch.setattr(pf.time, "sleep", sleep)
    seen: list[int] = []
    m = pf.container_kill(c, pf.WEB_RSC, 3, after_restart=lambda k, _s: seen.append(k), phase=4.0)
    assert (m.kills, len(m.restarts), seen) == (kills, restarts, list(range(1, restarts + 1)))
    assert m.src == "node1" and m.dst(pf.WEB_RSC) == "node2"
    kill_times = [float(x.split()[-1]) for x in c.log if x.startswith("kill")]
    assert m.t0 == kill_times[-1]  # from the kill that crossed the threshold
    # the cluster settles before every kill; the phase is waited once, right before the kill at fail count 2
    assert c.log.count("settle") == kills
    assert c.log.count("sleep 4") == 1
    assert c.log.index("sleep 4") == c.log.index(f"kill at {kill_times[-1]:g}") - 1
