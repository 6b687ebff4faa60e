"""Changed byte ranges of an image between two checkpoints, from their extent maps (FS_IOC_FIEMAP).

A checkpoint image is a reflink clone of the volume's image: every extent the volume has not rewritten
since is the same physical extent in both checkpoints, and a rewritten one was copied on write to a new
place. So a logical range whose physical mapping is the same in both maps is unchanged (a shared block
is immutable while it is shared), and anything else is changed: a new physical place, data that became
a hole, or a hole that became data. Holes and unwritten (preallocated) extents both read as zeros and
count as the same content. A different physical place may still hold equal bytes (after a defrag, say):
that is sent again, which is safe. Where FIEMAP is missing the images are compared block by block, and
the result says so.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.kernel import reflink

EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2
EXTENT_DELALLOC = 0x4
EXTENT_DATA_INLINE = 0x200
EXTENT_NOT_ALIGNED = 0x100
EXTENT_UNWRITTEN = 0x800
EXTENT_SHARED = 0x2000
# flags whose physical offset says nothing about the content: never taken as unchanged
_OPAQUE = EXTENT_UNKNOWN | EXTENT_DELALLOC | EXTENT_DATA_INLINE | EXTENT_NOT_ALIGNED
BLOCK = 4096

Range = tuple[int, int]  # (offset, length) in bytes


@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent: ``logical`` and ``length`` in the file, ``physical`` on the device."""

    logical: int
    physical: int
    length: int
    flags: int = 0

    @property
    def zero(self) -> bool:
        """Reads as zeros (preallocated, never written)."""
        return bool(self.flags & EXTENT_UNWRITTEN)

    @property
    def opaque(self) -> bool:
        return bool(self.flags & _OPAQUE)


@dataclass(frozen=True)
class Diff:
    """The changed ranges of one image and how they were found (``fiemap`` or ``compare``)."""

    ranges: list[Range]
    method: str
    size: int
    data: list[Range] | None = None  # where the new image holds data (None: not known, without FIEMAP)

    @property
    def changed_bytes(self) -> int:
        return sum(n for _, n in self.ranges)


def fiemap(path: Path) -> list[Extent]:
    """The extent map of ``path`` (flushed first: FIEMAP_FLAG_SYNC), in logical order.

    :raises OSError: EOPNOTSUPP/ENOTTY where the filesystem has no FIEMAP.
    """
    return [Extent(*e) for e in reflink.extent_map(path)]


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-overlapping, adjacent ones joined; empty ranges dropped."""
    out: list[list[int]] = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(a, b) for a, b in out]


def clip(ranges: Iterable[Range], size: int) -> list[Range]:
    """``ranges`` cut to [0, size)."""
    return [(o, min(n, size - o)) for o, n in ranges if o < size]


def _segments(extents: Sequence[Extent], size: int) -> list[tuple[int, int, int | None]]:
    """[start, end) pieces covering [0, size), each with its content key: the physical offset of its
    first byte, None for zeros (hole or unwritten), -1 for content that cannot be compared."""
    segs: list[tuple[int, int, int | None]] = []
    pos = 0
    for e in sorted(extents, key=lambda e: e.logical):
        lo, hi = max(e.logical, pos), min(e.logical + e.length, size)
        if hi <= lo:
            continue
        if lo > pos:
            segs.append((pos, lo, None))
        key: int | None = None if e.zero else (-1 if e.opaque else e.physical + (lo - e.logical))
        segs.append((lo, hi, key))
        pos = hi
    if pos < size:
        segs.append((pos, size, None))
    return segs


def changed(old: Sequence[Extent] | None, new: Sequence[Extent], size: int, old_size: int | None = None) -> list[Range]:
    """The byte ranges of [0, size) whose content differs between the image with extent map ``old``
    (of size ``old_size``, default ``size``; None: no previous checkpoint, so every allocated extent of
    ``new`` and no hole) and the image with map ``new``. Pure: tested over random maps."""
    if old is None:
        return merge((lo, hi - lo) for lo, hi, key in _segments(new, size) if key is not None)
    osize = size if old_size is None else old_size
    a = _segments(old, min(osize, size)) + ([(osize, size, None)] if osize < size else [])
    b = _segments(new, size)
    out: list[Range] = []
    i = j = 0
    pos = 0
    while pos < size:
        while a[i][1] <= pos:
            i += 1
        while b[j][1] <= pos:
            j += 1
        (alo, ahi, ak), (blo, bhi, bk) = a[i], b[j]
        end = min(ahi, bhi)
        ka = None if ak is None else (ak if ak < 0 else ak + (pos - alo))
        kb = None if bk is None else (bk if bk < 0 else bk + (pos - blo))
        if ka != kb or ka == -1:
            out.append((pos, end - pos))
        pos = end
    return merge(out)


def data_ranges(extents: Sequence[Extent], size: int) -> list[Range]:
    """The ranges of [0, size) that hold data (not holes, not unwritten)."""
    return merge((lo, hi - lo) for lo, hi, key in _segments(extents, size) if key is not None)


def split(ranges: Iterable[Range], data: Sequence[Range]) -> list[tuple[int, int, bool]]:
    """Each of ``ranges`` cut into pieces (offset, length, has_data) by the data ranges ``data``
    (sorted, merged): a piece outside them reads as zeros and is sent as a zero record."""
    out: list[tuple[int, int, bool]] = []
    j = 0  # both lists are sorted: one pass over ``data`` for all the ranges
    for off, n in merge(ranges):
        pos, end = off, off + n
        while j < len(data) and data[j][0] + data[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(data) and data[k][0] < end:
            d0, d1 = data[k][0], data[k][0] + data[k][1]
            if d0 > pos:
                out.append((pos, d0 - pos, False))
                pos = d0
            hi = min(d1, end)
            out.append((pos, hi - pos, True))
            pos = hi
            if d1 <= end:
                k += 1
        if pos < end:
            out.append((pos, end - pos, False))
    return out


def compare(old: Path | None, new: Path, block: int = BLOCK) -> list[Range]:
    """Changed ranges by reading both images block by block (the fallback without FIEMAP); with no
    ``old``, the blocks that are not all zeros. Reads a megabyte at a time and looks at the blocks of
    the megabytes that differ."""
    span = block * 256
    zero = bytes(span)
    out: list[Range] = []
    with open(new, "rb") as fn:
        fo = open(old, "rb") if old is not None else None
        try:
            off = 0
            while True:
                b = fn.read(span)
                if not b:
                    break
                a = fo.read(span) if fo is not None else zero[:len(b)]
                if a != b:
                    for i in range(0, len(b), block):
                        if a[i:i + block] != b[i:i + block]:
                            out.append((off + i, min(block, len(b) - i)))
                off += len(b)
        finally:
            if fo is not None:
                fo.close()
    return merge(out)


def diff(old: Path | None, new: Path) -> Diff:
    """The changed ranges of image ``new`` since checkpoint image ``old`` (None: the first delta)."""
    size = os.stat(new).st_size
    try:
        new_map = fiemap(new)
        old_map = fiemap(old) if old is not None else None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise
        return Diff(compare(old, new), "compare", size)
    old_size = os.stat(old).st_size if old is not None else None
    return Diff(changed(old_map, new_map, size, old_size), "fiemap", size, data_ranges(new_map, size))
