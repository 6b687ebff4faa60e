"""The SRL: bounded, acknowledged entries, the switch to DCM on overflow, a torn tail recovered."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.replication import extents
from storage.replication.checkpoint import ImageRef
from storage.replication.delta import Header, Reader
from storage.replication.deltaset import ImagePlan
from storage.replication.errors import SrlOverflow
from storage.replication.srl import Srl, merge_maps

REPO = Path(__file__).resolve().parents[2]
SIZE = 1 << 20


def plan(src: Path, seq: int, ranges: list[tuple[int, int]], key: str = "v1") -> ImagePlan:
    h = Header("rvg1", key, 0, seq - 1, seq, SIZE)
    return ImagePlan(ImageRef(key, 0, "d1", SIZE), src, h, ranges, [(o, n, True) for o, n in ranges])


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "src.img"
    p.write_bytes(os.urandom(SIZE))
    return p


def test_append_ack_and_bound(tmp_path: Path, src: Path) -> None:
    srl = Srl(tmp_path / "srl", limit=40_000)
    p1 = plan(src, 1, [(0, 8192)])
    files = srl.append(1, [p1])
    assert srl.pending() == [1] and srl.used() >= p1.encoded_size
    r = Reader(open(files[0], "rb"))
    assert [(x.offset, x.length) for x in r.records()] == [(0, 8192)] and r.trailer is not None
    srl.append(2, [plan(src, 2, [(100_000, 4096)])])
    before = srl.used()
    with pytest.raises(SrlOverflow, match="switch to DCM"):
        srl.append(3, [plan(src, 3, [(0, 30_000)])])
    assert srl.pending() == [1, 2] and srl.used() == before, "an overflowing append must write nothing"
    srl.ack(1)
    assert srl.pending() == [2] and srl.acked == 1
    srl.append(3, [plan(src, 3, [(0, 20_000)])])  # fits once 1 is freed
    assert srl.pending() == [2, 3]


def test_overflow_to_dcm_keeps_every_pending_range(tmp_path: Path, src: Path) -> None:
    srl = Srl(tmp_path / "srl", limit=20_000)
    srl.append(1, [plan(src, 1, [(0, 4096)]), plan(src, 1, [(8192, 4096)], key="v2")])
    srl.ack(1)
    srl.append(2, [plan(src, 2, [(4096, 4096)])])
    with pytest.raises(SrlOverflow):
        srl.append(3, [plan(src, 3, [(65536, 30_000)])])
    d = srl.to_dcm(3, {"v1.0": [(65536, 30_000)]})
    assert srl.dcm_active and srl.pending() == []
    assert (d.since, d.upto) == (1, 3)
    assert d.ranges == {"v1.0": [(4096, 4096), (65536, 30_000)]}
    d = srl.dcm_add(4, {"v1.0": [(8192, 4096)], "v2.0": [(0, 10)]})
    assert d.ranges == {"v1.0": [(4096, 8192), (65536, 30_000)], "v2.0": [(0, 10)]}
    assert Srl(tmp_path / "srl", limit=20_000).dcm() == d, "the DCM is durable"
    srl.ack(4)
    assert srl.dcm() is None and srl.acked == 4


def test_torn_tail_is_recovered(tmp_path: Path, src: Path) -> None:
    """An append killed (SIGKILL) after writing its delta but before the rename leaves a temporary
    entry; the next open removes it and the log is as it was."""
    root = tmp_path / "srl"
    srl = Srl(root, limit=1 << 22)
    srl.append(1, [plan(src, 1, [(0, 4096)])])
    code = (f"from tests.unit.test_replication_srl import plan; from pathlib import Path;"
            f" from storage.replication.srl import Srl;"
            f" Srl(Path({str(root)!r}), 1 << 22).append(2, [plan(Path({str(src)!r}), 2, [(0, 65536)])])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VERITAS_CRASH_AT": "repl.srl.written"}, check=False)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in (root / "entries").iterdir() if p.name.startswith(".tmp.")], "no torn tail to test"
    again = Srl(root, limit=1 << 22)
    assert again.pending() == [1]
    assert not [p for p in (root / "entries").iterdir() if p.name.startswith(".tmp.")]
    again.append(2, [plan(src, 2, [(0, 65536)])])
    assert again.pending() == [1, 2]


def test_bad_input_changes_nothing(tmp_path: Path, src: Path) -> None:
    srl = Srl(tmp_path / "srl", limit=1 << 20)
    srl.append(2, [plan(src, 2, [(0, 4096)])])
    with pytest.raises(Exception, match="not after the last one"):
        srl.append(2, [plan(src, 2, [(0, 4096)])])
    with pytest.raises(Exception, match="not in DCM mode"):
        srl.dcm_add(3, {})
    with pytest.raises(Exception, match="must be positive"):
        Srl(tmp_path / "srl", limit=0)
    assert srl.pending() == [2]
    assert io.BytesIO(srl.entry(2)[0].read_bytes()).read(8) == b"VXRDELTA"


maps = st.dictionaries(st.sampled_from(["a", "b", "c"]),
                       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=6), max_size=3)


@settings(max_examples=200, deadline=None)
@given(maps, maps)
def test_merge_maps_is_the_union(a: dict[str, list[tuple[int, int]]], b: dict[str, list[tuple[int, int]]]) -> None:
    m = merge_maps(a, b)

    def cover(rs: list[tuple[int, int]]) -> set[int]:
        return {x for o, n in rs for x in range(o, o + n)}

    for k in set(a) | set(b):
        assert cover(m[k]) == cover(a.get(k, [])) | cover(b.get(k, []))
        assert m[k] == extents.merge(m[k])


def test_switch_to_dcm_killed_midway_drops_the_covered_entries(tmp_path: Path, src: Path) -> None:
    """SIGKILL after the DCM is durable but before the entries it covers are removed: the next open
    removes them, and the DCM holds their ranges."""
    root = tmp_path / "srl"
    Srl(root, limit=1 << 22).append(1, [plan(src, 1, [(0, 4096)])])
    code = (f"from pathlib import Path; from storage.replication.srl import Srl;"
            f" Srl(Path({str(root)!r}), 1 << 22).to_dcm(2, {{'v1.0': [(8192, 4096)]}})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VERITAS_CRASH_AT": "repl.srl.dcm"}, check=False)
    assert proc.returncode == -9, proc.stderr
    assert (root / "entries" / "1").exists(), "killed too late to test anything"
    again = Srl(root, limit=1 << 22)
    assert again.pending() == [] and not (root / "entries" / "1").exists()
    d = again.dcm()
    assert d is not None and d.ranges == {"v1.0": [(0, 4096), (8192, 4096)]}
