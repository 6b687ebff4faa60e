"""Contract tests every Locks implementation must pass (FlockLocks, MemoryLocks, and EtcdLocks on a real
etcd: tests/etcd_server.py).

The ``handles`` fixture makes handles on one set of locks, as two processes (or two DiskGroup objects)
opening the same disk group have; every test in the contract section runs against each implementation.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage.catalog.etcd_store import EtcdStore
from storage.errors import LockTimeout, NoSuchDiskGroup
from storage.locks import FlockLocks, Locks, LockTable, MemoryLocks, stripe

Handles = Callable[[], Locks]


@pytest.fixture(params=["flock", "memory", "etcd"])
def handles(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Handles]:
    if request.param == "flock":
        yield lambda: FlockLocks(tmp_path / "locks")
    elif request.param == "etcd":
        store = EtcdStore([request.getfixturevalue("etcd_server").endpoint], prefix=f"/vtest/{uuid.uuid4().hex}")
        yield lambda: store.locks("testdg")
        store.close()
    else:
        table = LockTable()
        yield lambda: MemoryLocks("testdg", table)


def _two_stripes() -> tuple[str, str]:
    a = "vol-a"
    b = next(f"vol-{i}" for i in range(1000) if stripe(f"vol-{i}") != stripe(a))
    return a, b


def test_exclusive_dg_lock_excludes_every_other_holder(handles: Handles) -> None:
    one, two = handles(), handles()
    with one.hold(exclusive_dg=True):
        with two.try_hold() as free:
            assert not free
        with two.try_hold("v", shared_dg=False) as free:
            assert free  # stripes alone do not touch the disk group lock
    with two.try_hold(exclusive_dg=True) as free:
        assert free


def test_shared_dg_lock_is_shared(handles: Handles) -> None:
    one, two, three = handles(), handles(), handles()
    with one.hold(), two.hold():
        with three.try_hold(exclusive_dg=True) as free:
            assert not free


def test_stripes_exclude_the_same_key_only(handles: Handles) -> None:
    a, b = _two_stripes()
    one, two = handles(), handles()
    with one.hold(a):
        with two.try_hold(a) as free:
            assert not free
        with two.try_hold(b) as free:
            assert free


def test_a_refused_try_hold_holds_nothing(handles: Handles) -> None:
    a, b = _two_stripes()
    one, two, three = handles(), handles(), handles()
    with one.hold(b, shared_dg=False):
        with two.try_hold(a, b) as free:
            assert not free
            with three.try_hold(a, exclusive_dg=True) as free3:
                assert free3  # two took neither a nor the disk group lock


def test_a_handle_holds_again_for_free_what_its_thread_holds(handles: Handles) -> None:
    one = handles()
    with one.hold("v", exclusive_dg=True):
        with one.hold("v", exclusive_dg=True, timeout=0.5), one.try_hold("v") as free:
            assert free
        with handles().try_hold("v", shared_dg=False) as free:
            assert not free  # the inner release did not drop the outer hold


def test_shared_is_never_upgraded_in_place(handles: Handles) -> None:
    one = handles()
    with one.hold(), pytest.raises(LockTimeout, match="cannot be upgraded"):
        with one.hold(exclusive_dg=True, timeout=0.5):
            pass


def test_hold_times_out(handles: Handles) -> None:
    one, two = handles(), handles()
    with one.hold("v"):
        start = time.monotonic()
        with pytest.raises(LockTimeout, match="timed out"), two.hold("v", timeout=0.2):
            pass
        assert time.monotonic() - start < 5


def test_a_waiter_gets_the_lock_once_released(handles: Handles) -> None:
    one, two = handles(), handles()
    got = threading.Event()

    def wait() -> None:
        with two.hold("v", exclusive_dg=True, timeout=20):
            got.set()

    with one.hold("v"):
        t = threading.Thread(target=wait)
        t.start()
        assert not got.wait(0.2)
    t.join(20)
    assert got.is_set()


def test_owner_gone_while_its_locks_are_free(handles: Handles) -> None:
    owner, recoverer = handles(), handles()
    with owner.hold("v"):
        with recoverer.owner_gone("v") as gone:
            assert not gone  # a live owner's intent is left to it
    with recoverer.owner_gone("v") as gone:
        assert gone
        with owner.try_hold("v") as free:
            assert not free  # the recoverer holds the dead owner's locks while it finishes the intent


def test_gone_fails_waiters(handles: Handles) -> None:
    one, two = handles(), handles()
    got: list[BaseException] = []

    def wait() -> None:
        try:
            with two.hold(exclusive_dg=True, timeout=20):
                pass
        except BaseException as exc:
            got.append(exc)

    with one.hold():
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.1)
        one.gone()
    t.join(20)
    assert len(got) == 1 and isinstance(got[0], NoSuchDiskGroup)


# ------------------------------------------------------------------------------------------ flock only


def _hold_forever(root: str, ready: multiprocessing.synchronize.Event) -> None:
    with FlockLocks(Path(root)).hold("v", exclusive_dg=True):
        ready.set()
        time.sleep(300)


def test_flock_owner_is_gone_once_its_process_is_killed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_forever, args=(str(tmp_path / "locks"), ready))
    proc.start()
    try:
        assert ready.wait(20)
        with FlockLocks(tmp_path / "locks").owner_gone("v", exclusive_dg=True) as gone:
            assert not gone
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(20)
        with FlockLocks(tmp_path / "locks").owner_gone("v", exclusive_dg=True) as gone:
            assert gone
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(20)


# ----------------------------------------------------------------------------------------- memory only


def test_memory_owner_is_gone_once_its_thread_is_abandoned() -> None:
    """The in-process counterpart of a killed process: a thread stopped for good, its locks freed."""
    table = LockTable()
    held, never = threading.Event(), threading.Event()

    def owner() -> None:
        with MemoryLocks("testdg", table).hold("v", exclusive_dg=True):
            held.set()
            never.wait(300)

    t = threading.Thread(target=owner, daemon=True)
    t.start()
    assert held.wait(20)
    with MemoryLocks("testdg", table).owner_gone("v", exclusive_dg=True) as gone:
        assert not gone
    assert t.ident is not None
    table.abandon(t.ident)
    with MemoryLocks("testdg", table).owner_gone("v", exclusive_dg=True) as gone:
        assert gone
    never.set()


# ------------------------------------------------------------------------------------------- etcd only


def _hold_in_etcd(endpoint: str, prefix: str, ready: multiprocessing.synchronize.Event) -> None:
    store = EtcdStore([endpoint], prefix=prefix, lock_ttl=3)
    with store.locks("testdg").hold("v", exclusive_dg=True):
        ready.set()
        time.sleep(300)


def test_etcd_owner_is_gone_once_its_lease_expires_after_its_process_is_killed(etcd_server) -> None:
    """Another host sees a killed holder's locks free once its lease runs out (TTL 3 s here), not before:
    until then the owner may be alive and cut off, and its intent is left to it."""
    prefix = f"/vtest/{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_in_etcd, args=(etcd_server.endpoint, prefix, ready))
    proc.start()
    other = EtcdStore([etcd_server.endpoint], prefix=prefix)
    try:
        assert ready.wait(20)
        with other.locks("testdg").owner_gone("v", exclusive_dg=True) as gone:
            assert not gone
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(20)
        with other.locks("testdg").owner_gone("v", exclusive_dg=True) as gone:
            assert not gone  # its lease still runs
        deadline = time.monotonic() + 10
        while True:
            with other.locks("testdg").owner_gone("v", exclusive_dg=True) as gone:
                if gone:
                    break
            assert time.monotonic() < deadline, "the dead holder's locks outlived its lease"
            time.sleep(0.1)
    finally:
        other.close()
        if proc.is_alive():
            proc.kill()
            proc.join(20)


def test_etcd_locks_of_two_processes_exclude_each_other(etcd_server) -> None:
    """Two processes (as two hosts would be) on one disk group's locks: a holder's lock is refused to the
    other, and the other's timeout names the holder."""
    prefix = f"/vtest/{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_in_etcd, args=(etcd_server.endpoint, prefix, ready))
    proc.start()
    mine = EtcdStore([etcd_server.endpoint], prefix=prefix)
    try:
        assert ready.wait(20)
        with mine.locks("testdg").try_hold("v", shared_dg=False) as free:
            assert not free
        with pytest.raises(LockTimeout, match=r"pid \d+"):  # the timeout names the holder
            with mine.locks("testdg").hold(timeout=0.3):
                pass
    finally:
        mine.close()
        if proc.is_alive():
            proc.kill()
            proc.join(20)
