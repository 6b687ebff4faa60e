"""The secondary's side: a replica of an RVG, and applying a set of deltas to it atomically.

A replica keeps one consistent checkpoint of every image (``<root>/<seq>/<volume>.<idx>.img``) and
the durable record of its sequence number (``consistent.json``). Applying the deltas from that
checkpoint to the next one never touches it: its images are reflink-cloned into ``staging.<to>/``, the
records written there (each checked against its checksum by the reader before it is written) and
fsynced, the staging directory renamed to ``<to>/`` and only then is ``consistent.json`` switched to the
new number, which is the commit. A process killed at any step leaves the previous checkpoint whole and
the record pointing at it; ``recover`` (run before every apply) removes the staging leftovers and any
uncommitted checkpoint.
The root must be on a reflink-capable filesystem (XFS with reflink, or btrfs).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from storage import crash, durable
from storage.errors import InvalidArgument
from storage.kernel import reflink
from storage.replication import pipeline, store
from storage.replication.delta import WHOLE, Reader
from storage.replication.errors import DeltaMismatch, NoSuchCheckpoint
from storage.units import check_name

_FALLOC_FL_KEEP_SIZE = 0x1
_FALLOC_FL_PUNCH_HOLE = 0x2


def _punch(fd: int, off: int, n: int) -> None:
    """Make [off, off+n) of ``fd`` a hole (reads zeros), keeping the file's size."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, n) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Replica:
    """An RVG's replica under ``root``: its last consistent checkpoint and how to move it forward."""

    def __init__(self, root: Path, rvg: str) -> None:
        self.root = root
        self.rvg = check_name(rvg, "RVG name")

    @classmethod
    def create(cls, root: Path, rvg: str) -> Replica:
        """An empty replica (consistent at sequence 0, no images), ready for the first deltas."""
        rep = cls(root, rvg)
        if (root / "consistent.json").exists():
            raise InvalidArgument(f"{root} already holds a replica; open it instead")
        (root / "0").mkdir(parents=True, exist_ok=True)
        durable.sync_dir(root)
        store.write_json(root / "consistent.json", {"seq": 0, "rvg": rvg})
        return rep

    def _record(self) -> dict[str, object]:
        rec = store.read_json(self.root / "consistent.json")
        if rec is None:
            raise NoSuchCheckpoint(f"{self.root} holds no replica (no consistent.json); create it first")
        if rec.get("rvg") != self.rvg:
            raise DeltaMismatch(f"{self.root} is a replica of RVG {rec.get('rvg')}, not {self.rvg}")
        return dict(rec)

    @property
    def seq(self) -> int:
        """The last consistent checkpoint's sequence number (0: none yet)."""
        return int(str(self._record()["seq"]))

    def keys(self) -> list[str]:
        return sorted(p.name.removesuffix(".img") for p in (self.root / str(self.seq)).glob("*.img"))

    def image(self, key: str) -> Path:
        """The image ``key`` (``volume.idx``) of the last consistent checkpoint."""
        p = self.root / str(self.seq) / f"{key}.img"
        if not p.exists():
            raise NoSuchCheckpoint(f"replica of RVG {self.rvg} has no image {key} at checkpoint {self.seq}")
        return p

    def recover(self) -> list[str]:
        """Remove what a killed apply left: staging directories, uncommitted or superseded checkpoints,
        temporary records. What was removed (empty when nothing was)."""
        seq = self.seq
        done = [str(p) for p in store.remove_tmp(self.root)]
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("staging.") or (p.name.isdigit() and int(p.name) != seq):
                store.remove_tree(p)
                done.append(str(p))
        return done

    def apply(self, streams: Sequence[BinaryIO], sealed: Callable[[Sequence[bytes]], None] | None = None) -> int:
        """Apply one delta per changed image, all from this replica's checkpoint to the same next one;
        images without a delta are carried forward unchanged. Returns the new sequence number.
        ``sealed``, given the streams' chain digests once all are decoded, raises to refuse the set
        before anything is committed (the link's keyed seal: storage.replication.protocol).

        :raises DeltaCorrupt: a damaged stream (nothing changed).
        :raises DeltaMismatch: a delta of another RVG, or from another base checkpoint (nothing changed).
        """
        self.recover()
        base = self.seq
        if not streams:
            raise InvalidArgument("no deltas to apply")
        staging: Path | None = None
        to: int | None = None
        seen: set[str] = set()
        chains: list[bytes] = []
        try:
            for fh in streams:
                r = Reader(fh)
                h = r.header
                if h.rvg != self.rvg:
                    raise DeltaMismatch(f"delta of RVG {h.rvg} sent to the replica of RVG {self.rvg}")
                if h.from_seq != base:
                    raise DeltaMismatch(f"delta from checkpoint {h.from_seq} of RVG {self.rvg}, but the replica"
                                        f" is at {base}: resynchronise from {base}")
                if to is None:
                    to = h.to_seq
                    staging = self.root / f"staging.{to}"
                    staging.mkdir()
                    for key in self.keys():
                        reflink.clone(self.image(key), staging / f"{key}.img")
                    crash.point("repl.apply.staged")
                elif h.to_seq != to:
                    raise DeltaMismatch(f"deltas to checkpoints {to} and {h.to_seq} in one apply; send one set")
                if h.key in seen:
                    raise DeltaMismatch(f"two deltas for image {h.key} in one apply")
                seen.add(h.key)
                assert staging is not None
                _write(r, staging / f"{h.key}.img")
                assert r.chain is not None  # _write read to the checked trailer
                chains.append(r.chain)
            assert staging is not None and to is not None
            if sealed is not None:
                sealed(chains)
            durable.sync_dir(staging)
            crash.point("repl.apply.verified")
            os.rename(staging, self.root / str(to))
            staging = None
            durable.sync_dir(self.root)
            crash.point("repl.apply.renamed")
            store.write_json(self.root / "consistent.json", {"seq": to, "rvg": self.rvg})
            crash.point("repl.apply.recorded")
        except BaseException:
            if staging is not None:
                store.remove_tree(staging)
            raise
        store.remove_tree(self.root / str(base))
        return to


WRITEBACK_BEHIND = 8  # records written before their writeback is started


def _write(r: Reader, dst: Path) -> None:
    """Write the records of ``r`` into ``dst`` (created if new; a new file for a whole delta) and fsync it.

    A thread reads and checks the next records from the link while this one is written, and the
    writeback of what was written a few records ago is started at once, so that the final fsync has
    little left to wait for (the disk writes while the link delivers).

    Not read back: right after the write a read is served from the page cache the write filled, so
    comparing it proves nothing about the disk, and it cost a read and a hash of every byte (version 1
    did it). The records were checked by the reader before they were written; an error the disk reports
    surfaces from pwrite or fsync, and then nothing is committed."""
    h = r.header
    whole = h.method == WHOLE  # the reader checks that its records tile the image
    if whole:
        # the image is replaced: a new file, not the staged clone of the previous one, whose shared
        # blocks every write would copy first (storage.replication.delta says what that cost)
        dst.unlink(missing_ok=True)
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | (os.O_EXCL if whole else 0), 0o600)
    try:
        os.ftruncate(fd, h.size)
        behind: collections.deque[tuple[int, int]] = collections.deque()
        with contextlib.closing(pipeline.ahead(r.records(), depth=4)) as recs:
            for rec in recs:
                if rec.data is None:
                    if not whole:  # a new file reads zeros there already
                        _punch(fd, rec.offset, rec.length)
                else:
                    view = memoryview(rec.data)
                    while view:
                        view = view[os.pwrite(fd, view, rec.offset + rec.length - len(view)):]
                    behind.append((rec.offset, rec.length))
                    if len(behind) > WRITEBACK_BEHIND:
                        off, n = behind.popleft()
                        # DONTNEED starts the writeback of dirty pages (without waiting) and drops clean
                        # ones: the replica's image need not stay in this node's page cache
                        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
                crash.point("repl.apply.record")
        os.fsync(fd)
        crash.point("repl.apply.written")
    finally:
        os.close(fd)
