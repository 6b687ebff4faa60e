"""bench/agents.py's own logic without an engine: the polling baseline's phases and schedule, the
watcher's timestamping notifier, and that its figure lines obey bench/common.py's rules."""

from __future__ import annotations

import random
import threading

import pytest

from bench import agents as bench_agents
from tests.integration import benchfigs


def test_phases_take_one_draw_from_each_stratum_of_the_interval() -> None:
    for n in (1, 3, 20):
        ph = bench_agents.strata_phases(n, 10.0, random.Random(n))
        assert len(ph) == n
        assert sorted(int(p // (10.0 / n)) for p in ph) == list(range(n)), ph
        assert all(0 <= p < 10.0 for p in ph)
    # shuffled: the runs do not walk the interval in order (drift would land on one end of it)
    ph = bench_agents.strata_phases(20, 10.0, random.Random(11))
    assert ph != sorted(ph)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        assert s > 0
        self.t += s


def test_poll_detection_is_phase_plus_the_monitor_that_sees_it_stopped() -> None:
    clk = FakeClock()
    calls: list[float] = []

    def monitor() -> int:
        calls.append(clk.t)
        clk.t += 0.2  # the monitor's own run time counts
        return 7

    dt = bench_agents.poll_detection(100.0, 3.5, 10.0, monitor, clk.now, clk.sleep)
    assert calls == [103.5] and dt == pytest.approx(3.7)


def test_poll_detection_waits_a_whole_interval_when_the_first_poll_still_sees_it_running() -> None:
    clk = FakeClock()
    answers = iter([0, 7])
    calls: list[float] = []

    def monitor() -> int:
        calls.append(clk.t)
        clk.t += 0.1
        return next(answers)

    dt = bench_agents.poll_detection(100.0, 0.5, 10.0, monitor, clk.now, clk.sleep)
    assert calls == [100.5, 110.5] and dt == pytest.approx(10.6)


@pytest.mark.parametrize("rc", [1, 5, 6])
def test_poll_detection_refuses_an_answer_that_is_neither_running_nor_stopped(rc: int) -> None:
    clk = FakeClock()
    with pytest.raises(RuntimeError, match=f"returned {rc}"):
        bench_agents.poll_detection(100.0, 1.0, 10.0, lambda: rc, clk.now, clk.sleep)


def test_poll_detection_gives_up_after_its_polls() -> None:
    clk = FakeClock()
    with pytest.raises(RuntimeError, match="never saw"):
        bench_agents.poll_detection(100.0, 1.0, 10.0, lambda: 0, clk.now, clk.sleep, max_polls=3)
    assert clk.t == pytest.approx(121.0)


def test_stamps_give_the_next_call_for_the_resource_after_a_drain() -> None:
    st = bench_agents.Stamps()
    st.fail("old", "stale")
    st.fail("benchweb", "from the previous run")
    st.drain()
    assert st.next_for("benchweb", 0.05) is None
    threading.Timer(0.05, st.fail, ("other", "x")).start()
    threading.Timer(0.1, st.fail, ("benchweb", "container bench-web died (exit code 137)")).start()
    hit = st.next_for("benchweb", 5)
    assert hit is not None and hit[0] == "benchweb" and "137" in hit[1]


def test_figure_lines_obey_the_bench_rules(capsys: pytest.CaptureFixture[str]) -> None:
    bench_agents.emit_monitor([180.0 + i for i in range(100)], [120.0 + i for i in range(100)])
    bench_agents.emit_detect([40.0 + i for i in range(20)], [300.0 + 500 * i for i in range(20)])
    lines = capsys.readouterr().out.splitlines()
    figs = [benchfigs.check(line) for line in lines]
    assert [f["metric"] for f in figs] == ["monitor_p95_50_containers", "detect_container_death",
                                           "detect_container_death_p95"]
    mon, p50, p95 = figs
    assert (mon["value"], mon["baseline"], mon["target"], mon["met"], mon["runs"]) == (275.0, 215.0, "value<50",
                                                                                       False, 100)
    assert p50["target"] == "value<1000" and p50["met"] is True and p50["settled"] is True
    assert p50["value"] == 49.5 and p50["runs"] == 20 and p50["unit"] == "ms"
    assert p95["target"] is None and p95["met"] is None and p95["value"] == 59.0
