"""The changed ranges between two checkpoints' extent maps: checked against a block-level model."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.replication import extents
from storage.replication.extents import EXTENT_DATA_INLINE, EXTENT_UNWRITTEN, Extent

B = 4096
# a block's content: None a hole, "u" unwritten (reads zeros), an int the physical block holding it
Block = int | str | None


def to_extents(blocks: list[Block], cuts: set[int]) -> list[Extent]:
    """Extents for a block map: physically contiguous runs joined, also cut at ``cuts`` (the same
    mapping may come back as differently split extents)."""
    out: list[Extent] = []
    for i, b in enumerate(blocks):
        if b is None:
            continue
        flags = EXTENT_UNWRITTEN if b == "u" else 0
        phys = 0 if b == "u" else int(b) * B
        if out and i not in cuts:
            last = out[-1]
            prev = blocks[i - 1]
            if prev is not None and last.logical + last.length == i * B and last.flags == flags and (
                    b == "u" or last.physical + last.length == phys):
                out[-1] = Extent(last.logical, last.physical, last.length + B, flags)
                continue
        out.append(Extent(i * B, phys, B, flags))
    return out


def zeroish(b: Block) -> bool:
    return b is None or b == "u"


def expected(old: list[Block], new: list[Block]) -> list[tuple[int, int]]:
    return extents.merge((i * B, B) for i, (a, b) in enumerate(zip(old, new, strict=True))
                         if not (zeroish(a) and zeroish(b)) and a != b)


blocks_st = st.lists(st.one_of(st.none(), st.just("u"), st.integers(0, 40)), min_size=0, max_size=40)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[list[Block], list[Block]]:
    old = draw(blocks_st)
    new = list(old)
    fresh = 1000
    for i in draw(st.lists(st.integers(0, max(0, len(old) - 1)), max_size=10)) if old else []:
        kind = draw(st.sampled_from(["write", "hole", "unwritten", "run"]))
        if kind == "write":
            new[i] = fresh
            fresh += 1
        elif kind == "run":  # a rewrite landing physically contiguous with its neighbours' new blocks
            new[i] = fresh + i
        elif kind == "hole":
            new[i] = None
        else:
            new[i] = "u"
    return old, new


@settings(max_examples=400, deadline=None)
@given(pairs(), st.sets(st.integers(0, 40)), st.sets(st.integers(0, 40)))
def test_changed_is_exactly_the_blocks_whose_content_moved(p: tuple[list[Block], list[Block]],
                                                          cuts_a: set[int], cuts_b: set[int]) -> None:
    old, new = p
    size = len(old) * B
    got = extents.changed(to_extents(old, cuts_a), to_extents(new, cuts_b), size)
    assert got == expected(old, new)


@settings(max_examples=200, deadline=None)
@given(blocks_st, st.sets(st.integers(0, 40)))
def test_first_delta_is_every_allocated_extent_and_no_hole(blocks: list[Block], cuts: set[int]) -> None:
    size = len(blocks) * B
    got = extents.changed(None, to_extents(blocks, cuts), size)
    assert got == extents.merge((i * B, B) for i, b in enumerate(blocks) if not zeroish(b))
    assert got == extents.data_ranges(to_extents(blocks, cuts), size)


def test_growth_and_opaque_extents() -> None:
    old = [Extent(0, 0, 2 * B)]
    # the image grew by two blocks, one of them written; an inline extent is never taken as unchanged
    new = [Extent(0, 0, 2 * B), Extent(3 * B, 99 * B, B)]
    assert extents.changed(old, new, 4 * B, old_size=2 * B) == [(3 * B, B)]
    inline = [Extent(0, 0, B, EXTENT_DATA_INLINE)]
    assert extents.changed(inline, inline, B) == [(0, B)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30))),
       st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30))))
def test_split_covers_the_ranges_and_marks_data(ranges: list[tuple[int, int]], data: list[tuple[int, int]]) -> None:
    d = extents.merge(data)
    pieces = extents.split(ranges, d)
    want = {x for o, n in ranges for x in range(o, o + n)}
    got: set[int] = set()
    for o, n, has in pieces:
        assert n > 0
        for x in range(o, o + n):
            assert x not in got
            got.add(x)
            assert has == any(a <= x < a + m for a, m in d)
    assert got == want
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40))))
def test_merge_is_the_same_set_sorted_disjoint_and_not_adjacent(ranges: list[tuple[int, int]]) -> None:
    m = extents.merge(ranges)
    assert {x for o, n in m for x in range(o, o + n)} == {x for o, n in ranges for x in range(o, o + n)}
    for (a, n), (b, _) in zip(m, m[1:], strict=False):
        assert a + n < b


def test_fiemap_and_compare_agree_on_a_real_sparse_file(tmp_path: Path) -> None:
    """The ioctl's struct layout read right: a sparse file's data where it was written."""
    f = tmp_path / "img"
    with open(f, "wb") as fh:
        fh.truncate(64 * B)
        for blk in (3, 4, 10, 63):
            os.pwrite(fh.fileno(), b"x" * B, blk * B)
        os.fsync(fh.fileno())
    want = [(3 * B, 2 * B), (10 * B, B), (63 * B, B)]
    assert extents.data_ranges(extents.fiemap(f), 64 * B) == want
    assert extents.diff(None, f).ranges == want and extents.diff(None, f).method == "fiemap"
    assert extents.compare(None, f) == want
    g = tmp_path / "img2"
    g.write_bytes(f.read_bytes())
    with open(g, "r+b") as fh:
        os.pwrite(fh.fileno(), b"y", 20 * B + 7)
    assert extents.compare(f, g) == [(20 * B, B)]
