"""The primary's side: the deltas that take a replica from one checkpoint of an RVG to a later one,
one per image, found from the checkpoints' extent maps (or given as ranges, for a DCM resync)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.group import DiskGroup
from storage.replication import checkpoint, delta, extents
from storage.replication.checkpoint import Checkpoint, ImageRef
from storage.replication.delta import Header, Piece
from storage.replication.errors import DeltaMismatch
from storage.replication.extents import Range


@dataclass(frozen=True)
class ImagePlan:
    """What one image's delta will hold: the changed ranges (``ranges``) cut into data and zero pieces."""

    ref: ImageRef
    source: Path  # the image of the target checkpoint the data is read from
    header: Header
    ranges: list[Range]
    pieces: list[Piece]

    @property
    def changed_bytes(self) -> int:
        return sum(n for _, n in self.ranges)

    @property
    def encoded_size(self) -> int:
        return delta.encoded_size(self.header, self.pieces)


def _pieces(src: Path, ranges: Sequence[Range], size: int, data: list[Range] | None = None) -> list[Piece]:
    if data is None:
        try:
            data = extents.data_ranges(extents.fiemap(src), size)
        except OSError:
            data = [(0, size)]  # no FIEMAP: send every range as data
    return extents.split(extents.clip(ranges, size), data)


def _checkpoints(dg: DiskGroup, rvg: str, from_seq: int, to_seq: int) -> tuple[Checkpoint | None, Checkpoint]:
    if to_seq <= from_seq:
        raise DeltaMismatch(f"a delta goes forward: from checkpoint {from_seq} to {to_seq} does not")
    old = checkpoint.get(dg, rvg, from_seq) if from_seq else None
    return old, checkpoint.get(dg, rvg, to_seq)


def plan(dg: DiskGroup, rvg: str, from_seq: int, to_seq: int, digest: str = "sha256") -> list[ImagePlan]:
    """The deltas from checkpoint ``from_seq`` (0: none, the initial full sync of allocated extents)
    to ``to_seq``, from comparing the two checkpoints' extent maps, checksummed with ``digest``."""
    old, new = _checkpoints(dg, rvg, from_seq, to_seq)
    out: list[ImagePlan] = []
    for ref in new.images:
        src = new.path(dg, ref)
        prev = None
        if old is not None and any(i.key == ref.key for i in old.images):
            prev = old.path(dg, old.image(ref.key))
        d = extents.diff(prev, src)
        h = Header(rvg, ref.volume, ref.idx, from_seq, to_seq, d.size, method=d.method, digest=digest)
        out.append(ImagePlan(ref, src, h, d.ranges, _pieces(src, d.ranges, d.size, d.data)))
    return out


def plan_ranges(dg: DiskGroup, rvg: str, from_seq: int, to_seq: int,
                ranges: Mapping[str, Sequence[Range]], digest: str = "sha256", method: str = "dcm") -> list[ImagePlan]:
    """The deltas from ``from_seq`` to ``to_seq`` holding the given changed ranges of each image (a
    DCM's), the data read from checkpoint ``to_seq``; checkpoint ``from_seq`` need not exist any more."""
    new = checkpoint.get(dg, rvg, to_seq)
    if to_seq <= from_seq:
        raise DeltaMismatch(f"a delta goes forward: from checkpoint {from_seq} to {to_seq} does not")
    out: list[ImagePlan] = []
    for ref in new.images:
        src = new.path(dg, ref)
        size = os.stat(src).st_size
        rs = extents.merge(extents.clip(ranges.get(ref.key, []), size))
        h = Header(rvg, ref.volume, ref.idx, from_seq, to_seq, size, method=method, digest=digest)
        out.append(ImagePlan(ref, src, h, rs, _pieces(src, rs, size)))
    return out


def whole_ranges(dg: DiskGroup, ck: Checkpoint) -> dict[str, list[Range]]:
    """Each image of ``ck`` as one range from offset 0 to its end."""
    return {i.key: [(0, os.stat(ck.path(dg, i)).st_size)] for i in ck.images}


def plan_whole(dg: DiskGroup, rvg: str, from_seq: int, to_seq: int) -> list[ImagePlan]:
    """The deltas that replace every image of checkpoint ``to_seq`` whole (startrep, a full resync):
    its data as data records, its holes as zero records, from offset 0 to the image's end."""
    ranges = whole_ranges(dg, checkpoint.get(dg, rvg, to_seq))
    return plan_ranges(dg, rvg, from_seq, to_seq, ranges, method=delta.WHOLE)


def write(plans: Sequence[ImagePlan], directory: Path) -> list[Path]:
    """Encode each plan into ``directory/<volume>.<idx>.delta``, fsynced; the files, in plan order."""
    paths: list[Path] = []
    for p in plans:
        path = directory / f"{p.ref.key}.delta"
        with open(path, "wb") as fh:
            delta.encode(fh, p.header, p.source, p.pieces)
            fh.flush()
            os.fsync(fh.fileno())
        paths.append(path)
    return paths
