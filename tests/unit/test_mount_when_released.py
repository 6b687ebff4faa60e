"""The plugin's Mount waits for a volume another node holds (plugin.lease.mount_when_released) instead of
refusing at once: a refused Mount costs a swarm task its service's restart delay (5 s by default)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from plugin.lease import mount_when_released
from storage.catalog.base import DiskGroupRec, DiskRec, IntentRec, SubdiskRec, VolumeRec
from storage.catalog.memory import MemoryCatalog
from storage.errors import InUse, LeaseStale


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class DG:
    """What mount_when_released reads of a disk group: its catalog and this node's name."""

    catalog: MemoryCatalog
    node: str = "nodeB"


def make_dg() -> DG:
    c = MemoryCatalog()
    c.init(DiskGroupRec("dockerdg", "u", "nodeA", 1.0))
    c.add_disk(DiskRec("d1", "/x", "file", 1 << 30))
    c.create_volume(VolumeRec("v", 1 << 20, "concat", "xfs"), [SubdiskRec("v", 0, "d1", 1 << 20, 1 << 20)],
                    IntentRec("v", "make"), {"d1": 1 << 30})
    c.finish_intent("v")
    c.renew_lease("nodeA", 10)
    c.renew_lease("nodeB", 10)
    c.attach("v", "nodeA")
    return DG(c)


def claiming(dg: DG, clock: Clock, release_after: int | None) -> tuple[list[float], object]:
    """A mount that is refused while nodeA holds the volume; nodeA releases it after that many tries."""
    tries: list[float] = []

    def mount() -> str:
        tries.append(clock.now)
        if release_after is not None and len(tries) > release_after:
            dg.catalog.detach("v", "nodeA")
        dg.catalog.attach("v", "nodeB")  # raises InUse naming nodeA while it holds it
        return "/mnt/v"

    return tries, mount


def test_waits_for_the_holder_to_release(monkeypatch: pytest.MonkeyPatch) -> None:
    dg, clock = make_dg(), Clock()
    monkeypatch.setattr("plugin.lease.time.sleep", lambda s: setattr(clock, "now", clock.now + s))
    tries, mount = claiming(dg, clock, release_after=3)
    assert mount_when_released(dg, "v", mount, wait=12, clock=clock) == "/mnt/v"  # type: ignore[arg-type]
    assert len(tries) == 4 and dg.catalog.attachments()[0].node == "nodeB"


def test_refuses_naming_the_holder_once_the_wait_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    dg, clock = make_dg(), Clock()
    monkeypatch.setattr("plugin.lease.time.sleep", lambda s: setattr(clock, "now", clock.now + s))
    tries, mount = claiming(dg, clock, release_after=None)
    with pytest.raises(InUse, match="nodeA"):
        mount_when_released(dg, "v", mount, wait=12, clock=clock)  # type: ignore[arg-type]
    assert 12 <= tries[-1] < 12.5 and dg.catalog.attachments()[0].node == "nodeA"


def test_other_refusals_are_not_waited_on() -> None:
    dg, clock = make_dg(), Clock()
    dg.catalog.detach("v", "nodeA")  # attached nowhere: an InUse of another cause (an operation in progress)
    tries: list[float] = []

    def mount() -> str:
        tries.append(clock.now)
        raise InUse("volume v is creating in another operation")

    with pytest.raises(InUse, match="another operation"):
        mount_when_released(dg, "v", mount, wait=12, clock=clock)  # type: ignore[arg-type]
    assert tries == [0.0]


def test_waits_for_this_nodes_own_renewal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused because this node's lease is past half (the catalog just came back): the plugin renews
    within lease_interval, and the Mount gets the volume then rather than failing the container."""
    dg, clock = make_dg(), Clock()
    dg.catalog.detach("v", "nodeA")
    monkeypatch.setattr("plugin.lease.time.sleep", lambda s: setattr(clock, "now", clock.now + s))
    tries: list[float] = []

    def mount() -> str:
        tries.append(clock.now)
        if len(tries) < 3:
            raise LeaseStale("node nodeB's lease in disk group dockerdg has 2.0 s of 10 s left")
        return "/mnt/v"

    assert mount_when_released(dg, "v", mount, wait=12, clock=clock) == "/mnt/v"  # type: ignore[arg-type]
    assert len(tries) == 3


def test_a_holder_gone_between_the_refusal_and_the_next_look_is_waited_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race CI met on etcd: nodeA's lease ran out as nodeB attached (the server still counted it,
    refusal), and its attachment was revoked before the next look found no holder. The refusal was
    about a holder, so the Mount tries again, and gets the volume, rather than failing the container."""
    dg, clock = make_dg(), Clock()
    monkeypatch.setattr("plugin.lease.time.sleep", lambda s: setattr(clock, "now", clock.now + s))
    tries: list[float] = []

    def mount() -> str:
        tries.append(clock.now)
        try:
            dg.catalog.attach("v", "nodeB")
        except InUse:
            if len(tries) == 1:
                dg.catalog.detach("v", "nodeA")  # the holder's lease expired just after refusing
            raise
        return "/mnt/v"

    assert mount_when_released(dg, "v", mount, wait=12, clock=clock) == "/mnt/v"  # type: ignore[arg-type]
    assert len(tries) == 2 and dg.catalog.attachments()[0].node == "nodeB"
