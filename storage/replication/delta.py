"""The delta stream: one image's changed ranges between two checkpoints, versioned and checksummed.

Layout (integers little-endian)::

    header   b"VXRDELTA" | version u16 | n u32 | n bytes of JSON (rvg, volume, idx, from_seq, to_seq,
             size, chunk, method, digest) | the digest of all the header's bytes before it
    record   b"D" | index u32 | offset u64 | length u32 | length bytes of data | digest of the record
             b"Z" | index u32 | offset u64 | length u32 | digest of the record  (reads as zeros)
    trailer  b"T" | records u32 | data bytes u64 | zero bytes u64 | digest of the chain: the header's
             digest, every record's digest in order, then the trailer's bytes before this digest

Records come in ascending, non-overlapping offset order, numbered from 0, each at most ``chunk`` bytes
(so both ends hold one chunk at a time) and inside [0, size). ``from_seq`` 0 is the first delta (no base
checkpoint). The decoder checks every digest, the order, the numbering, the bounds and that the trailer
comes and nothing follows it; the chain digest catches records dropped, reordered, or moved in from
another delta.

Why a chain of digests rather than a second digest of every byte (version 1): each byte is hashed once
at each end, and hashing was most of the initial sync's time. SHA-256 because this machine kind has it
in hardware (SHA-NI: about twice blake2b's speed).

A delta whose header says method ``whole`` (startrep, a full resync) has records that tile [0, size):
the image is replaced, not patched. The receiver writes it into a new file rather than into a clone of
its previous image: a write over a clone's shared blocks reserves copies of them first (XFS reflink):
900 MiB in 1 MiB writes took a median 0.96 s into a clone, 0.32 s into a new file, on this machine kind,
and the receiver's writes were most of the initial sync's time. An older receiver treats it as any
delta, which is also right.

Why BLAKE3 where both ends have it (version 3 names the stream's digest in its header; version 2 is
SHA-256 and still read): hashing every byte at both ends bounded the initial sync at about half a plain
copy's speed on two cores (SHA-256 1.7 GB/s here, BLAKE3 5.5 GB/s, both cryptographic, so the keyed
seal over the chain digests still binds every byte). The sender picks a digest the receiver announced
(``digests`` in its status reply); without the ``blake3`` module a site uses SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from storage.replication import pipeline
from storage.replication.errors import DeltaCorrupt, DeltaTruncated, DeltaVersion
from storage.units import MiB

MAGIC = b"VXRDELTA"
VERSION = 3  # 1: blake2b, the trailer digest over every byte; 2: SHA-256, no digest field
READABLE = (2, 3)
DIGEST = 32
CHUNK = 1 * MiB
MAX_CHUNK = 16 * MiB
READ_AHEAD = 8 * MiB  # encode: how far ahead of the chunk being sent its source is read
_MAX_HEADER = 64 * 1024
_PRE = struct.Struct("<8sHI")
_REC = struct.Struct("<cIQI")
_TRL = struct.Struct("<cIQQ")

Piece = tuple[int, int, bool]  # offset, length, has data (False: zeros)


Hasher = Callable[[], "hashlib._Hash"]
KNOWN_DIGESTS = ("blake3", "sha256")  # what a version-3 header may name, fastest first
DIGESTS: dict[str, Hasher] = {"sha256": hashlib.sha256}  # those this site has
try:
    import blake3 as _blake3

    DIGESTS = {"blake3": _blake3.blake3, **DIGESTS}  # type: ignore[dict-item]
except ImportError:  # a site without it speaks SHA-256 and says so in its status
    pass


def available() -> list[str]:
    """The digests this site reads and writes, fastest first (what its status announces)."""
    return list(DIGESTS)


def announced(raw: object) -> list[str] | None:
    """The digest list a peer's status carried, as sent (None: it sent none, or not a list)."""
    return [str(d) for d in raw] if isinstance(raw, list) else None


def preferred(peer: Sequence[str] | None) -> str:
    """The fastest digest both this site and a peer that announced ``peer`` know (None: not known yet,
    SHA-256, which every version-2 and later site reads)."""
    for d in DIGESTS:
        if peer is not None and d in peer:
            return d
    return "sha256"


def hasher(name: str) -> Hasher:
    """The digest ``name``; a known one this site lacks is refused saying what to install."""
    if name in DIGESTS:
        return DIGESTS[name]
    hint = " install the Python module blake3 on this site," if name in KNOWN_DIGESTS else ""
    raise DeltaVersion(f"delta digest {name!r} is not known here (this site has {', '.join(DIGESTS)}):"
                       f"{hint} or upgrade it")


WHOLE = "whole"  # the method of a delta that covers its image whole: [0, size), every byte


@dataclass(frozen=True)
class Header:
    rvg: str
    volume: str
    idx: int
    from_seq: int
    to_seq: int
    size: int
    chunk: int = CHUNK
    method: str = "fiemap"
    digest: str = "sha256"

    @property
    def key(self) -> str:
        """The image this delta is for, as replicas name it."""
        return f"{self.volume}.{self.idx}"


@dataclass(frozen=True)
class Record:
    offset: int
    length: int
    data: bytes | None  # None: zeros
    digest: bytes = b""  # the record's checksum, as the stream carried and the reader checked it


@dataclass(frozen=True)
class Trailer:
    records: int
    data_bytes: int
    zero_bytes: int


def _header_bytes(h: Header) -> bytes:
    body = json.dumps(asdict(h), sort_keys=True, separators=(",", ":")).encode()
    pre = _PRE.pack(MAGIC, VERSION, len(body)) + body
    d = hasher(h.digest)()
    d.update(pre)
    return pre + d.digest()


def chain_digest(header_digest: bytes, record_digests: Sequence[bytes], trailer: bytes,
                 digest: str = "sha256") -> bytes:
    """The trailer's digest (for tests and tools that build a stream by hand)."""
    c = hasher(digest)()
    c.update(header_digest)
    for d in record_digests:
        c.update(d)
    c.update(trailer)
    return c.digest()


def chunks(pieces: Sequence[Piece], chunk: int) -> Iterator[Piece]:
    for off, n, has in pieces:
        step = chunk if has else max(chunk, n)  # a zero record has no payload: one per piece
        for o in range(off, off + n, step):
            yield o, min(step, off + n - o), has


def encoded_size(header: Header, pieces: Sequence[Piece]) -> int:
    """The exact size of the stream ``encode`` writes (so a bounded log can refuse it beforehand)."""
    total = len(_header_bytes(header)) + _TRL.size + DIGEST
    for _o, n, has in chunks(pieces, header.chunk):
        total += _REC.size + DIGEST + (n if has else 0)
    return total


def _records(fd: int, source: Path, header: Header,
             pieces: Sequence[Piece]) -> Iterator[tuple[bytes, bytes | None, bytes]]:
    """Each record of the delta: its fixed part, its data (None: zeros) and its digest, in order."""
    todo = list(chunks(pieces, header.chunk))
    new = hasher(header.digest)
    ahead = [(o, n) for o, n, has in todo if has]  # the data chunks, read ahead of their turn
    nxt = 0
    for count, (off, n, has) in enumerate(todo):
        if off + n > header.size:
            raise ValueError(f"range {off}+{n} is past the image size {header.size}")
        rec = _REC.pack(b"D" if has else b"Z", count, off, n)
        d = new()
        d.update(rec)
        data = None
        if has:
            # ask the kernel for the next chunks too (a checkpoint's fresh clone has no page cache)
            while nxt < len(ahead) and ahead[nxt][0] <= off + READ_AHEAD:
                os.posix_fadvise(fd, ahead[nxt][0], ahead[nxt][1], os.POSIX_FADV_WILLNEED)
                nxt += 1
            data = os.pread(fd, n, off)
            if len(data) < n:  # the image is shorter than its checkpoint said: it must not be
                raise OSError(f"short read of {source} at {off}")
            d.update(data)
        yield rec, data, d.digest()


def encode(out: BinaryIO, header: Header, source: Path, pieces: Sequence[Piece]) -> int:
    """Write the delta of ``pieces`` of image ``source`` (split by extents.split) to ``out``; returns
    its size in bytes. Holds a few chunks at a time: a thread reads and hashes the next ones while this
    one is written (both release the GIL), so the link is not idle while a chunk is hashed."""
    if not 0 < header.chunk <= MAX_CHUNK:
        raise ValueError(f"chunk size {header.chunk} out of range")
    chain = hasher(header.digest)()
    written = 0

    def put(b: bytes) -> None:
        nonlocal written
        out.write(b)
        written += len(b)

    head = _header_bytes(header)
    put(head)
    chain.update(head[-DIGEST:])
    count = data_bytes = zero_bytes = 0
    fd = os.open(source, os.O_RDONLY)
    try:
        # closed before fd is: the thread reading fd has stopped by then
        with contextlib.closing(pipeline.ahead(_records(fd, source, header, pieces), depth=4)) as recs:
            for rec, data, rd in recs:
                put(rec)
                if data is not None:
                    put(data)
                    data_bytes += len(data)
                else:
                    zero_bytes += _REC.unpack(rec)[3]
                put(rd)
                chain.update(rd)
                count += 1
    finally:
        os.close(fd)
    trl = _TRL.pack(b"T", count, data_bytes, zero_bytes)
    put(trl)
    chain.update(trl)
    dig = chain.digest()
    out.write(dig)
    return written + len(dig)


class Reader:
    """Decode one delta from ``fh``, checking as it goes. ``header`` is read at construction; iterate
    ``records()`` to the end, which checks the trailer (``trailer`` is set then). Nothing from a delta
    may be made durable before its iteration ended without an error."""

    def __init__(self, fh: BinaryIO, *, strict_end: bool = True) -> None:
        self._fh = fh
        self._new: Hasher = hashlib.sha256
        self._chain = hashlib.sha256()
        self._strict = strict_end
        self.trailer: Trailer | None = None
        self.chain: bytes | None = None  # the chain digest, once the trailer checked
        self.header = self._read_header()

    def _read(self, n: int, what: str) -> bytes:
        b = self._fh.read(n)
        if len(b) != n:
            raise DeltaTruncated(f"delta ends inside its {what} ({len(b)} of {n} bytes): it was cut short in"
                                 f" transit or on disk; send it again")
        return b

    def _read_header(self) -> Header:
        pre = self._read(_PRE.size, "header")
        magic, version, n = _PRE.unpack(pre)
        if magic != MAGIC:
            raise DeltaCorrupt("not a veritas delta (bad magic): the stream is damaged or is something else")
        if version not in READABLE:
            raise DeltaVersion(f"delta format version {version}; this build reads versions"
                               f" {', '.join(map(str, READABLE))}: upgrade the older side")
        if n > _MAX_HEADER:
            raise DeltaCorrupt(f"delta header length {n} is implausible: the stream is damaged")
        body = self._read(n, "header")
        check = self._read(DIGEST, "header checksum")
        try:  # parsed before it is checked: it names the digest that checks it
            raw = json.loads(body)
            if version == 2 and isinstance(raw, dict) and "digest" in raw:
                raise ValueError("a version 2 header has no digest field")
            h = Header(**raw)
        except (ValueError, TypeError) as exc:
            raise DeltaCorrupt(f"delta header unreadable ({exc}): the stream is damaged") from exc
        if not isinstance(h.digest, str) or h.digest not in KNOWN_DIGESTS:
            raise DeltaCorrupt(f"delta header names digest {h.digest!r}: the stream is damaged")
        self._new = hasher(h.digest)
        d = self._new()
        d.update(pre + body)
        hd = d.digest()
        if check != hd:
            raise DeltaCorrupt("delta header checksum mismatch: the stream is damaged; send it again")
        self._chain = self._new()
        self._chain.update(hd)
        ints = (h.idx, h.from_seq, h.to_seq, h.size, h.chunk)
        if (not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ints)
                or not all(isinstance(x, str) and x for x in (h.rvg, h.volume, h.method))
                or h.to_seq <= h.from_seq or not 0 < h.chunk <= MAX_CHUNK):
            raise DeltaCorrupt(f"delta header has out-of-range fields: {raw}")
        return h

    def records(self) -> Iterator[Record]:
        h = self.header
        index = 0
        end = 0
        data_bytes = zero_bytes = 0
        while True:
            kind = self._read(1, "record")
            if kind == b"T":
                break
            if kind not in (b"D", b"Z"):
                raise DeltaCorrupt(f"delta record {index} has unknown kind {kind!r}: the stream is damaged")
            rest = self._read(_REC.size - 1, "record")
            _k, i, off, n = _REC.unpack(kind + rest)
            if i != index:
                raise DeltaCorrupt(f"delta record {i} where record {index} was due: records lost or reordered")
            if n == 0 or (kind == b"D" and n > h.chunk):
                raise DeltaCorrupt(f"delta record {i} has length {n} (chunk {h.chunk}): the stream is damaged")
            if off < end:
                raise DeltaCorrupt(f"delta record {i} at offset {off} overlaps or precedes the previous one"
                                   f" (ending at {end}): records reordered")
            if off + n > h.size:
                raise DeltaCorrupt(f"delta record {i} ({off}+{n}) is past the image size {h.size}")
            if h.method == WHOLE and off != end:
                raise DeltaCorrupt(f"delta of image {h.key} says it is whole but skips {off - end} bytes at"
                                   f" offset {end}: the stream is damaged; send it again")
            d = self._new()
            d.update(kind + rest)
            data: bytes | None = None
            if kind == b"D":
                data = self._read(n, "record data")
                d.update(data)
                data_bytes += n
            else:
                zero_bytes += n
            rd = d.digest()
            if self._read(DIGEST, "record checksum") != rd:
                raise DeltaCorrupt(f"delta record {i} (offset {off}, {n} bytes) checksum mismatch: the stream"
                                   f" is damaged; send it again")
            self._chain.update(rd)
            yield Record(off, n, data, rd)
            index += 1
            end = off + n
        rest = self._read(_TRL.size - 1, "trailer")
        _t, count, db, zb = _TRL.unpack(b"T" + rest)
        self._chain.update(b"T" + rest)
        expect = self._chain.digest()
        if self._read(DIGEST, "trailer checksum") != expect:
            raise DeltaCorrupt("delta checksum mismatch: the stream is damaged; send it again")
        if (count, db, zb) != (index, data_bytes, zero_bytes):
            raise DeltaCorrupt(f"delta trailer counts ({count}, {db}, {zb}) disagree with its records")
        if h.method == WHOLE and end != h.size:
            raise DeltaCorrupt(f"delta of image {h.key} says it is whole but ends at {end} of {h.size} bytes:"
                               f" the stream is damaged; send it again")
        self.chain = expect
        if self._strict and self._fh.read(1):
            raise DeltaCorrupt("bytes after the delta's trailer: the stream is damaged or two were joined")
        self.trailer = Trailer(count, db, zb)
