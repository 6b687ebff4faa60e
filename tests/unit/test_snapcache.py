"""The snapshot cache policy (storage.snapcache.decide): when a snapshot grows, when it is invalidated."""

from __future__ import annotations

from storage.snapcache import LOW_WATER, Action, DiskState, SubdiskUse, decide
from storage.units import GiB, MiB

ROOMY = DiskState(free=2 * GiB, promised=0, unreserved=GiB)  # slack 1 GiB: the disk rule stays quiet


def use(volume: str = "s1", unshared: int = 0, reserved: int = 100 * MiB, rate: float = 0.0,
        autogrow: bool = False, disk: str = "d1", idx: int = 0, size: int = GiB) -> SubdiskUse:
    return SubdiskUse(volume, idx, disk, size, reserved, unshared, rate, autogrow)


def kinds(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.kind, a.volume) for a in actions]


def test_within_cache_nothing_happens() -> None:
    assert decide([use(unshared=99 * MiB)], {"d1": ROOMY}, horizon=1.0) == []


def test_exhausted_cache_invalidates_and_says_why() -> None:
    [a] = decide([use(unshared=100 * MiB)], {"d1": ROOMY}, horizon=0.0)
    assert a.kind == "invalidate" and a.volume == "s1"
    assert "ran out" in a.reason and "cachesize" in a.reason and "autogrow=on" in a.reason


def test_projected_exhaustion_invalidates_before_it_happens() -> None:
    # 80 MiB used, growing 50 MiB/s: within the next second it would be past 100 MiB
    assert kinds(decide([use(unshared=80 * MiB, rate=50 * MiB)], {"d1": ROOMY}, horizon=1.0)) == [
        ("invalidate", "s1")]
    # the same growth with a shorter horizon still fits
    assert decide([use(unshared=80 * MiB, rate=50 * MiB)], {"d1": ROOMY}, horizon=0.2) == []


def test_a_cache_as_large_as_the_source_never_runs_out() -> None:
    assert decide([use(unshared=GiB, reserved=GiB, size=GiB)], {"d1": ROOMY}, horizon=1.0) == []


def test_autogrow_grows_from_free_space_at_the_high_water_mark() -> None:
    [a] = decide([use(unshared=81 * MiB, autogrow=True)], {"d1": ROOMY}, horizon=0.0)
    assert a.kind == "grow" and a.volume == "s1" and a.grow == {0: 20 * MiB}  # 20 % of 100 MiB
    # a fast writer gets twice what it writes within the horizon
    [a] = decide([use(unshared=81 * MiB, rate=100 * MiB, autogrow=True)], {"d1": ROOMY}, horizon=0.5)
    assert a.grow == {0: 100 * MiB}
    # below the mark it waits
    assert decide([use(unshared=70 * MiB, autogrow=True)], {"d1": ROOMY}, horizon=0.0) == []


def test_autogrow_never_grows_past_the_source_size() -> None:
    [a] = decide([use(unshared=95 * MiB, reserved=100 * MiB, size=110 * MiB, autogrow=True)], {"d1": ROOMY}, 0.0)
    assert a.grow == {0: 10 * MiB}


def test_autogrow_takes_what_free_space_there_is_then_invalidates() -> None:
    tight = DiskState(free=2 * GiB, promised=0, unreserved=5 * MiB + 1234)
    [a] = decide([use(unshared=90 * MiB, autogrow=True)], {"d1": tight}, horizon=0.0)
    assert a.kind == "grow" and a.grow == {0: 5 * MiB}  # whole MiB only
    full = DiskState(free=2 * GiB, promised=0, unreserved=0)
    [a] = decide([use(unshared=100 * MiB, autogrow=True)], {"d1": full}, horizon=0.0)
    assert a.kind == "invalidate" and "autogrow found no free space" in a.reason
    # not yet exhausted and nothing to grow into: wait
    assert decide([use(unshared=90 * MiB, autogrow=True)], {"d1": full}, horizon=0.0) == []


def test_two_autogrow_snapshots_share_the_free_space_and_never_overcommit_it() -> None:
    d = DiskState(free=2 * GiB, promised=0, unreserved=30 * MiB)
    acts = decide([use("a", 95 * MiB, autogrow=True), use("b", 95 * MiB, autogrow=True)], {"d1": d}, 0.0)
    assert sum(sum(a.grow.values()) for a in acts if a.kind == "grow") <= 30 * MiB
    assert kinds(acts) == [("grow", "a"), ("grow", "b")]


def test_a_mirror_snapshot_is_invalidated_whole_when_one_image_runs_out() -> None:
    acts = decide([use(unshared=10 * MiB, disk="d1", idx=0), use(unshared=100 * MiB, disk="d2", idx=1)],
                  {"d1": ROOMY, "d2": ROOMY}, horizon=0.0)
    assert kinds(acts) == [("invalidate", "s1")]


def test_an_invalidated_snapshot_gives_back_the_growth_it_was_planned() -> None:
    # idx 0 would grow, idx 1 is exhausted on a full disk: no grow survives for s1
    d2 = DiskState(free=2 * GiB, promised=0, unreserved=0)
    acts = decide([use(unshared=90 * MiB, autogrow=True, disk="d1", idx=0),
                   use(unshared=100 * MiB, autogrow=True, disk="d2", idx=1)], {"d1": ROOMY, "d2": d2}, 0.0)
    assert kinds(acts) == [("invalidate", "s1")]


def test_disk_rule_invalidates_the_snapshot_past_its_reservation_first() -> None:
    # the disk has less slack than the low water: s2 is 30 MiB over (missed by the cache rule because a
    # pass came late), s1 within its cache
    d = DiskState(free=100 * MiB, promised=90 * MiB, unreserved=0)
    acts = decide([use("s1", 50 * MiB), use("s2", 130 * MiB, reserved=100 * MiB)], {"d1": d}, 0.0)
    assert kinds(acts) == [("invalidate", "s2")]


def test_disk_rule_catches_what_fiemap_cannot_attribute_one_snapshot_per_pass() -> None:
    # two snapshots of one rewritten source share what they preserve: FIEMAP charges it to neither
    d = DiskState(free=40 * MiB, promised=40 * MiB, unreserved=0)
    acts = decide([use("s1", 1 * MiB), use("s2", 5 * MiB)], {"d1": d}, 0.0)
    [a] = acts
    assert a.kind == "invalidate" and a.volume == "s2" and "promised" in a.reason


def test_disk_rule_quiet_above_low_water_and_ignores_other_disks() -> None:
    ok = DiskState(free=LOW_WATER + 10 * MiB, promised=10 * MiB, unreserved=0)
    bad = DiskState(free=0, promised=10 * MiB, unreserved=0)
    assert decide([use("s1", 50 * MiB, disk="d1")], {"d1": ok, "d2": bad}, 0.0) == []


def test_disk_rule_counts_unreserved_space_as_promised() -> None:
    """Free space not yet reserved is what the next make will be promised: overshoot may not eat it."""
    d = DiskState(free=200 * MiB, promised=0, unreserved=195 * MiB)
    assert kinds(decide([use("s1", 50 * MiB)], {"d1": d}, 0.0)) == [("invalidate", "s1")]


def test_disk_rule_drops_a_planned_grow_of_the_snapshot_it_invalidates() -> None:
    d = DiskState(free=100 * MiB, promised=100 * MiB, unreserved=0)
    acts = decide([use("s1", 90 * MiB, autogrow=True)], {"d1": d}, 0.0)
    assert kinds(acts) == [("invalidate", "s1")]


def test_autogrow_catches_up_in_one_step_with_a_snapshot_already_past_its_cache() -> None:
    """A snapshot made before caches were enforced (migrated catalogs give those autogrow)."""
    [a] = decide([use(unshared=500 * MiB, reserved=100 * MiB, autogrow=True)], {"d1": ROOMY}, horizon=0.0)
    assert a.kind == "grow" and a.grow == {0: 416 * MiB}
