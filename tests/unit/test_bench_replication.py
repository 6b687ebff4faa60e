"""bench/replication.py's own logic without two sites: which of a sequential writer's stamped writes a
point-in-time image holds (the lag figures' attribution), and bench/tcpcopy's plain copy (the
initial-sync baseline) delivering every byte."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bench import replication as br

REPO = Path(__file__).resolve().parents[2]


def _image(blocks: list[int], upto: int, nblocks: int) -> dict[int, bytes]:
    """What a point-in-time image holds after the first ``upto`` writes: each block the last stamp written to it."""
    img = {b: os.urandom(br.STAMP.size) for b in range(nblocks)}  # the prefill: random data
    for k in range(upto):
        img[blocks[k]] = br.stamp(k)
    return img


@given(st.integers(1, 40), st.lists(st.integers(0, 60), min_size=1, max_size=6), st.randoms())
@settings(max_examples=200, deadline=None)
def test_each_write_is_attributed_to_the_first_image_holding_it(nblocks: int, cuts: list[int],
                                                                rng: random.Random) -> None:
    # a few blocks rewritten often: an image may hold a later write over an earlier one's block
    n = max(cuts)
    blocks = [rng.randrange(nblocks) for _ in range(n)]
    done = [100.0 + k for k in range(n)]
    log = br.StampLog(blocks, done)
    got: dict[int, float] = {}
    held_before = 0
    for i, upto in enumerate(sorted(cuts)):  # images in order, each holding a longer prefix
        img = _image(blocks, upto, nblocks)
        seen = 1000.0 + i
        first = log.covered
        lags = log.scan(img.__getitem__, seen)
        assert log.covered == upto
        for k, lag in enumerate(lags, start=first):
            got[k] = lag
            assert lag == seen - done[k]
        held_before = upto
    assert sorted(got) == list(range(held_before)), "every held write once, none that is not held"


def test_a_write_not_yet_in_the_image_is_not_counted() -> None:
    blocks, done = [3, 3, 5], [1.0, 2.0, 3.0]
    log = br.StampLog(blocks, done)
    img = _image(blocks, 1, 8)  # write 0 only; write 1 (same block) not yet
    assert log.scan(lambda b: img[b], 10.0) == [9.0]
    assert log.scan(lambda b: img[b], 11.0) == [], "nothing new held: nothing counted"
    img = _image(blocks, 3, 8)
    assert log.scan(lambda b: img[b], 12.0) == [10.0, 9.0]


def test_tcpcopy_delivers_the_whole_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    with open(src, "wb") as fh:
        fh.write(os.urandom(3 << 20))
        fh.truncate(5 << 20)  # a hole at the end, sent as zeros like cat would
    recv = subprocess.Popen([sys.executable, "-m", "bench.tcpcopy", "recv", str(dst)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        port = int(recv.stdout.readline())
        subprocess.run([sys.executable, "-m", "bench.tcpcopy", "send", f"127.0.0.1:{port}", str(src)],
                       cwd=REPO, check=True, timeout=60)
        assert int(recv.stdout.readline()) == 5 << 20
        assert recv.wait(timeout=60) == 0
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert dst.read_bytes() == src.read_bytes()
