"""repstatus is a read: it creates, recovers and removes nothing (a torn SRL tail is the service's to
recover), and it runs in a loop beside a writer appending to the SRL, acknowledging, switching to DCM,
resyncing and recovering, without an error and with figures of one state each time."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from storage import rvgcli, volumes
from storage.replication import rvg
from storage.replication.errors import SrlOverflow
from storage.replication.srl import Srl
from tests.unit.conftest import World
from tests.unit.test_replication_srl import SIZE, plan

LIMIT = 60_000


def tree(root: Path) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.lstat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return sorted(out)


def primary(world: World) -> Path:
    volumes.make(world.dg, "v1", "400m")
    with rvg.locked(world.dg):
        rvg.create(world.dg, rvg.Rvg("rvg1", ("v1",), LIMIT, "primary", "replicating", synced=True))
    return rvg.srl_root(world.dg, "rvg1")


def test_repstatus_changes_no_file(world: World, tmp_path: Path) -> None:
    root = primary(world)
    parent = root.parent
    s = rvgcli.status(world.dg, "rvg1")  # no SRL yet: none is made
    assert (s["srl_used"], s["lag_bytes"], s["dcm"]) == (0, 0, False)
    assert not root.exists()
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    srl = Srl(root, LIMIT)
    srl.append(1, [plan(src, 1, [(0, 8192)])])
    torn = srl.entries / f".tmp.2.{os.getpid()}"  # an append under way (or killed): not status's to remove
    torn.mkdir()
    (torn / "v1.0.delta").write_bytes(b"x" * 100)
    (root / f".acked.json.tmp.{os.getpid()}").write_text("{")
    before = tree(parent)
    s = rvgcli.status(world.dg, "rvg1")
    assert tree(parent) == before, "repstatus changed files under the SRL"
    assert s["srl_used"] == sum(f.stat().st_size for f in (srl.entries / "1").iterdir())
    assert s["lag_bytes"] == s["srl_used"] and s["last_consistent_seq"] == 0


def test_repstatus_in_a_loop_beside_the_srl_switching_to_dcm_and_back(world: World, tmp_path: Path) -> None:
    root = primary(world)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    stop = threading.Event()
    errors: list[BaseException] = []
    switches = [0]

    def service() -> None:
        """What the link service does to the SRL, as fast as it can: append until it overflows, switch to
        DCM, add to it, resync (ack past the DCM), recover a torn tail, and again."""
        seq = 0
        try:
            while not stop.is_set():
                srl = Srl(root, LIMIT)  # recovers, as the service's Srl() does
                while not stop.is_set():
                    seq += 1
                    try:
                        srl.append(seq, [plan(src, seq, [(0, 16384)])])
                    except SrlOverflow:
                        srl.to_dcm(seq, {"v1.0": [(0, 16384)]})
                        switches[0] += 1
                        break
                    if seq % 3 == 0:
                        srl.ack(seq - 1)
                if not srl.dcm_active:
                    break  # stopped
                seq += 1
                srl.dcm_add(seq, {"v1.0": [(65536, 4096)]})
                srl.ack(seq)  # a resync from the DCM: the DCM is done
                (srl.entries / f".tmp.{seq + 1}.{os.getpid()}").mkdir()  # a torn append, for the next recover
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=service)
    t.start()
    reads = 0
    seen_dcm = seen_srl = False
    try:
        end = time.monotonic() + 4
        while time.monotonic() < end and not errors:
            s = rvgcli.status(world.dg, "rvg1")
            reads += 1
            assert 0 <= s["srl_used"] <= LIMIT, s
            if s["dcm"]:
                seen_dcm = True
                assert s["srl_used"] == 0, f"entries counted beside a DCM that dropped them: {s}"
                assert s["lag_bytes"] > 0 and not s["consistent"], s
            elif s["srl_used"]:
                seen_srl = True
                assert s["lag_bytes"] == s["srl_used"], s
    finally:
        stop.set()
        t.join(30)
    assert not errors, f"the SRL's writer failed beside repstatus: {errors[0]!r}"
    assert switches[0] >= 3 and reads >= 50 and seen_dcm and seen_srl, (switches, reads, seen_dcm, seen_srl)


def test_resync_decides_dcm_or_full_without_recovering_the_srl(world: World, tmp_path: Path) -> None:
    """resync reads whether a DCM is pending before it takes the sender lock: a read, as repstatus's."""
    from storage.replication import failover
    from storage.replication.errors import PeerUnreachable

    root = primary(world)
    with rvg.locked(world.dg):
        rvg.update(world.dg, "rvg1", peer_addr="127.0.0.1:1")
    srl = Srl(root, LIMIT)
    torn = srl.entries / f".tmp.2.{os.getpid()}"  # the service's append under way
    torn.mkdir()
    before = tree(root.parent)
    with pytest.raises(PeerUnreachable):
        failover.resync(world.dg, "rvg1", b"k" * 32)
    assert tree(root.parent) == before
