"""The lease thread's decisions on a fake clock: when a node that cannot renew fences itself."""

from __future__ import annotations

import dataclasses
import time
import types
import unittest.mock as mock
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin import events
from plugin.lease import LeaseKeeper
from storage.catalog.base import Catalog, DiskGroupRec, DiskRec, IntentRec, LeaseRec, SubdiskRec, VolumeRec
from storage.catalog.memory import MemoryCatalog
from storage.config import ClusterSettings, Config
from storage.errors import CatalogError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Failing(MemoryCatalog):
    """A catalog that can be made unreachable: renewals then fail as a lost catalog's do."""

    down = False

    def renew_lease(self, node: str, ttl: float, sent: float | None = None) -> LeaseRec:
        if self.down:
            raise CatalogError("catalog unreachable")
        return super().renew_lease(node, ttl, sent)


@pytest.fixture
def cat() -> Failing:
    c = Failing()
    c.init(DiskGroupRec("dockerdg", "u", "nodeA", 1.0))
    c.add_disk(DiskRec("d1", "/x", "file", 1 << 30))
    c.create_volume(VolumeRec("v", 1 << 20, "concat", "xfs"), [SubdiskRec("v", 0, "d1", 1 << 20, 1 << 20)],
                    IntentRec("v", "make"), {"d1": 1 << 30})
    c.finish_intent("v")
    return c


def keeper(tmp_path: Path, cat: Catalog, clock: Clock) -> tuple[LeaseKeeper, list[set[str]]]:
    config = Config(state_root=tmp_path / "state", mount_root=tmp_path / "mnt", node="nodeA",
                    cluster=ClusterSettings(lease_ttl=10, lease_interval=2))
    k = LeaseKeeper(config, clock=clock, open_catalog=lambda: cat)
    fenced: list[set[str]] = []
    k.fence = lambda names, engine_alive=True: fenced.append(set(names)) or set()  # type: ignore[method-assign]
    return k, fenced


def test_fences_half_a_ttl_after_the_last_renewal_that_succeeded(tmp_path: Path, cat: Failing) -> None:
    clock = Clock()
    k, fenced = keeper(tmp_path, cat, clock)
    cat.renew_lease("nodeB", 10)  # a peer: someone could take the volume
    assert k.renew()
    cat.attach("v", "nodeA")
    clock.now += 1
    assert k.renew()  # reads the attachment; this renewal's start is what counts from now on
    cat.down = True
    for _ in range(2):
        clock.now += 2
        assert not k.renew()
        assert k.check() == set() and fenced == []
    clock.now += 0.9  # 4.9 s since the last good renewal began
    assert k.check() == set()
    clock.now += 0.1  # 5 s = lease_ttl - fence_margin: the node stops writing, 5 s before expiry
    assert k.check() == {"v"} and fenced == [{"v"}]
    clock.now += 1
    assert k.check() == set() and fenced == [{"v"}]  # once


def test_a_node_alone_in_its_disk_group_never_fences(tmp_path: Path, cat: Failing) -> None:
    clock = Clock()
    k, fenced = keeper(tmp_path, cat, clock)
    assert k.renew()
    cat.attach("v", "nodeA")
    assert k.renew()
    cat.down = True
    clock.now += 60
    assert not k.renew()
    assert k.check() == set() and fenced == []


def test_renewals_that_succeed_never_fence(tmp_path: Path, cat: Failing) -> None:
    clock = Clock()
    k, fenced = keeper(tmp_path, cat, clock)
    cat.renew_lease("nodeB", 10)
    cat.renew_lease("nodeA", 10)
    cat.attach("v", "nodeA")
    for _ in range(20):
        clock.now += 2
        assert k.renew()
        assert k.check() == set()
    assert fenced == [] and dataclasses.asdict(cat.attachments()[0])["node"] == "nodeA"


def test_a_volume_fencing_could_not_unmount_is_never_released(tmp_path: Path, cat: Failing) -> None:
    """Engine gone and the volume wanted elsewhere: if something here still holds it mounted after the
    kills (a writer the engine never told us of), releasing it would let the peer mount beside a writer."""
    clock = Clock()
    k, _ = keeper(tmp_path, cat, clock)
    cat.renew_lease("nodeB", 10)
    assert k.renew()
    cat.attach("v", "nodeA")
    cat.want("v", "nodeB")
    assert k.renew()
    released: list[set[str]] = []
    k.fence = lambda names, engine_alive=True: set(names)  # type: ignore[method-assign]  # still mounted
    k._release = lambda names, why: released.append(set(names))  # type: ignore[method-assign]
    k.engine.reachable = lambda: False  # type: ignore[method-assign]
    k._watch_engine()  # the engine is found gone: the grace starts
    clock.now += 11
    k._watch_engine()  # past the grace: fenced, but still mounted
    assert released == [] and cat.attachments()[0].node == "nodeA"
    k.fence = lambda names, engine_alive=True: set()  # type: ignore[method-assign]  # now unmounted
    k._watch_engine()
    assert released == [{"v"}]


class DeadEngine:
    """An engine that does not answer (its dockerd SIGKILLed), or answers again once ``up``."""

    up = False

    def reachable(self) -> bool:
        return self.up

    def listed(self, name: str, states: object) -> list[object]:
        return []


def test_engine_gone_releases_a_wanted_volume_after_the_grace_and_renews_fast_meanwhile(
        tmp_path: Path, cat: Failing) -> None:
    """Swarm moves a task off a node whose dockerd is dead in ~3 s plus its restart delay (5 s): a grace
    of one lease_ttl (10 s) kept the volume from the new task for longer than the whole target (10 s)."""
    clock = Clock()
    k, fenced = keeper(tmp_path, cat, clock)
    released: list[set[str]] = []
    k._release = lambda names, why: released.append(set(names))  # type: ignore[method-assign]
    k.engine = DeadEngine()  # type: ignore[assignment]
    cat.renew_lease("nodeB", 10)
    assert k.renew()
    cat.attach("v", "nodeA")
    assert k.renew()
    assert k.next_wait() == 2
    k._after_renewal()  # the engine is found gone: the grace starts
    assert k.next_wait() == 0.25  # a peer's want is seen within a quarter second from now on
    cat.want("v", "nodeB")
    clock.now += 4.9
    assert k.renew()
    k._after_renewal()
    assert fenced == [] and released == []  # within the grace
    clock.now += 0.1  # engine_grace (5 s)
    assert k.renew()
    k._after_renewal()
    assert fenced == [{"v"}] and released == [{"v"}]


def test_engine_back_within_the_grace_kills_nothing(tmp_path: Path, cat: Failing) -> None:
    clock = Clock()
    k, fenced = keeper(tmp_path, cat, clock)
    k._release = lambda names, why: None  # type: ignore[method-assign]
    engine = DeadEngine()
    k.engine = engine  # type: ignore[assignment]
    cat.renew_lease("nodeB", 10)
    assert k.renew()
    cat.attach("v", "nodeA")
    cat.want("v", "nodeB")
    assert k.renew()
    k._after_renewal()
    clock.now += 4
    engine.up = True
    assert k.renew()
    k._after_renewal()
    assert k.next_wait() == 2 and k.engine_down_since is None
    clock.now += 10
    assert k.renew()
    k._after_renewal()
    assert fenced == []


def test_the_catalog_counts_the_lease_from_when_the_renewal_was_sent(tmp_path: Path, cat: Failing) -> None:
    """A renewal that waited 4 s on a locked catalog leaves the lease 6 s, not 10: the keeper fences 5 s
    after sending it, and a Mount the catalog still allows must not be one the keeper stops at once."""
    k, _ = keeper(tmp_path, cat, Clock())
    sent = time.time() - 4
    k.wall = lambda: sent
    assert k.renew()
    (rec,) = cat.leases()
    assert rec.expires == pytest.approx(sent + 10)


class StartingEngine(DeadEngine):
    """A dockerd that is starting: it takes the connection and answers only ``delay`` seconds later."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def reachable(self) -> bool:
        time.sleep(self.delay)
        return True


def test_an_engine_slow_to_answer_never_holds_renewals_back(tmp_path: Path, cat: Failing) -> None:
    """Real threads and clock: the engine answers each ping 1.5 s late, longer than fence_after (1 s).
    Renewals go on meanwhile, so a node whose catalog answers is never fenced (it was, in a full run,
    while its restarted dockerd came up: the renewer thread was waiting on the ping)."""
    config = Config(state_root=tmp_path / "state", mount_root=tmp_path / "mnt", node="nodeA",
                    cluster=ClusterSettings(lease_ttl=2, lease_interval=0.1))
    k = LeaseKeeper(config, open_catalog=lambda: cat)
    fenced: list[set[str]] = []
    k.fence = lambda names, engine_alive=True: fenced.append(set(names)) or set()  # type: ignore[method-assign]
    k.engine = StartingEngine(1.5)  # type: ignore[assignment]
    cat.renew_lease("nodeB", 60)
    cat.renew_lease("nodeA", 2)
    cat.attach("v", "nodeA")
    renewals: list[float] = []
    real_renew = k.renew
    k.renew = lambda: renewals.append(time.monotonic()) or real_renew()  # type: ignore[method-assign]
    k.start()
    try:
        time.sleep(3.5)
    finally:
        k.stop()
    assert fenced == []
    gaps = [b - a for a, b in zip(renewals, renewals[1:], strict=False)]
    assert len(renewals) >= 15 and max(gaps) < 0.5, gaps


def test_the_grace_starts_when_the_event_stream_ends_not_at_the_next_renewal(tmp_path: Path, cat: Failing) -> None:
    """A lease_interval (here 2 s) could pass between dockerd's death and the renewal that noticed it: a
    peer waited that much longer than engine_grace. The end of the event stream starts the grace."""
    clock = Clock()
    k, fenced = keeper(tmp_path, cat, clock)
    released: list[set[str]] = []
    k._release = lambda names, why: released.append(set(names))  # type: ignore[method-assign]
    engine = k.engine = DeadEngine()  # type: ignore[assignment]
    engine.up = True
    cat.renew_lease("nodeB", 10)
    assert k.renew()
    cat.attach("v", "nodeA")
    assert k.renew()
    k.note_engine()
    assert k.engine_down_since is None  # an engine that answers starts nothing
    engine.up = False
    k.note_engine()  # the stream ended: looked at at once
    assert k.engine_down_since == clock.now and k.next_wait() == 0.25
    cat.want("v", "nodeB")
    clock.now += 1.5
    k.note_engine()
    assert k.engine_down_since == clock.now - 1.5  # counted from the first look, not moved
    clock.now += 3.5  # engine_grace after the stream ended, earlier than a renewal would have begun it
    assert k.renew()
    k._after_renewal()
    assert fenced == [{"v"}] and released == [{"v"}]


def test_the_event_follower_tells_the_keeper_once_per_stream_that_ends() -> None:
    told: list[int] = []

    class Streams:
        """An engine whose event stream connects, yields nothing and ends, twice; then refuses."""

        ERRORS = (ConnectionError,)
        n = 0

        def start_events(self, since: int) -> Iterator[dict[str, object]]:
            self.n += 1
            if self.n > 2:
                f.stop()
                raise ConnectionError("refused")
            return iter([])

    f = events.EventFollower(types.SimpleNamespace(dg=None), Streams(),  # type: ignore[arg-type]
                             on_lost=lambda: told.append(1))
    f.stopping.wait = lambda _t=None: f.stopping.is_set()  # type: ignore[method-assign]
    with mock.patch.object(events, "apply_container_limits"), mock.patch.object(events, "release_orphans"):
        f.run()
    assert told == [1, 1]
