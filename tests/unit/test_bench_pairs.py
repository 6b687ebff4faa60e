"""The benchmarks' noise handling (bench/common.py): interleaved pairs, the median of their ratios, more
pairs while they straddle the target up to a cap, and the verdicts printed with each figure."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from bench import common


def sides(ours: list[float], base: list[float]) -> tuple[Callable[[int], float], Callable[[int], float],
                                                        list[str]]:
    """Two sides returning the given values in turn, recording the order they ran in."""
    order: list[str] = []
    o: Iterator[float] = iter(ours)
    b: Iterator[float] = iter(base)

    def run_o(i: int) -> float:
        order.append(f"o{i}")
        return next(o)

    def run_b(i: int) -> float:
        order.append(f"b{i}")
        return next(b)

    return run_o, run_b, order


def test_pairs_alternate_which_side_goes_first() -> None:
    o, b, order = sides([1.0] * 4, [1.0] * 4)
    common.run_pairs(o, b, ">=0.85", 4)
    assert order == ["o0", "b0", "b1", "o1", "o2", "b2", "b3", "o3"]


def test_pairs_that_agree_on_the_target_stop_at_the_asked_number() -> None:
    o, b, order = sides([90.0, 95, 92, 99], [100.0] * 4)
    res = common.run_pairs(o, b, ">=0.85", 3, cap=15)
    assert len(res.ours) == 3 and res.settled(">=0.85") is True
    assert res.spread() == (0.9, 0.95)


def test_pairs_that_straddle_the_target_get_more_pairs_up_to_the_cap_then_are_unsettled() -> None:
    o, b, _ = sides([80.0, 90] * 10, [100.0] * 20)
    res = common.run_pairs(o, b, ">=0.85", 2, cap=7)
    assert len(res.ours) == 7, "the pairs straddle 0.85: the bench runs more, up to the cap"
    assert res.settled(">=0.85") is False
    assert res.spread() == (0.8, 0.9)


def test_more_pairs_settle_a_figure_whose_first_pairs_straddled_its_target() -> None:
    # one slow pair among steady ones: the spread keeps straddling 0.85, the median's interval stops doing so
    o, b, _ = sides([80.0] + [95.0] * 20, [100.0] * 21)
    res = common.run_pairs(o, b, ">=0.85", 7, cap=15)
    assert res.spread() == (0.8, 0.95), "the spread still straddles the target"
    assert len(res.ours) == 9 and res.settled(">=0.85") is True, "9 pairs: the interval is the 2nd to the 8th"


def test_median_interval_is_min_max_up_to_8_pairs_then_narrows() -> None:
    for n, k in ((1, 1), (7, 1), (8, 1), (9, 2), (15, 4), (31, 10)):
        res = common.Pairs([float(i) for i in range(1, n + 1)], [1.0] * n)
        assert res.interval() == (k, n - k + 1), n


def test_information_figures_never_get_more_pairs_and_have_no_verdict() -> None:
    o, b, _ = sides([80.0, 90], [100.0] * 2)
    res = common.run_pairs(o, b, None, 2, cap=15)
    assert len(res.ours) == 2 and res.settled(None) is None


def test_ratio_is_the_median_of_the_pairs_ratios_not_of_the_medians() -> None:
    # drift: the machine slows down over the run, both sides alike; each pair's ratio is 0.9
    res = common.Pairs([90.0, 180, 900], [100.0, 200, 1000])
    assert res.ratio == pytest.approx(0.9)
    assert res.value == 180 and res.baseline == 200


def test_emitted_line_carries_met_spread_and_settled(capsys: pytest.CaptureFixture[str]) -> None:
    common.Pairs([80.0, 90, 86], [100.0, 100, 100]).emit("m", "IOPS", ">=0.85")
    fig = json.loads(capsys.readouterr().out)
    assert fig == {"metric": "m", "value": 86.0, "unit": "IOPS", "baseline": 100.0, "ratio": 0.86,
                   "target": ">=0.85", "met": True, "spread": [0.8, 0.9], "settled": False}


def test_a_figure_that_cannot_be_taken_is_null_and_not_met(capsys: pytest.CaptureFixture[str]) -> None:
    common.emit_missing("m_dir", "IOPS", ">=0.85", "directory disks not available")
    fig = json.loads(capsys.readouterr().out)
    assert fig["value"] is None and fig["met"] is False and fig["note"] == "directory disks not available"


@pytest.mark.parametrize(("target", "ratio", "value", "met"), [
    (">=0.85", 0.85, 1.0, True), (">=0.85", 0.849, 1.0, False), ("<=1.5", 1.5, 1.0, True),
    ("<=1.5", 1.51, 1.0, False), ("value<100", 99.0, 99.0, True), ("value<100", 0.5, 100.0, False),
    (None, 0.1, 1.0, None)])
def test_verdict(target: str | None, ratio: float, value: float, met: bool | None) -> None:
    assert common.verdict(target, ratio, value) is met


def test_zram_removes_only_numbers_it_made() -> None:
    with pytest.raises(RuntimeError, match="not one this run made"):
        common.Zram().remove(common.Path("/dev/zram0"))


def test_settled_is_judged_on_the_printed_ends_as_met_is() -> None:
    """A top pair of 1.3004 prints as 1.3: under "<=1.3" both printed ends hold, so the line says settled
    (it once said false beside a spread of [1.08, 1.3], which contradicts itself)."""
    res = common.Pairs(ours=[108.0, 130.04], base=[100.0, 100.0])
    assert res.settled("<=1.3") is True
