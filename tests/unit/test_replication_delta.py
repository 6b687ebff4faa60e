"""The delta stream: round trip, and every damage (a flipped byte, a cut, reordering, a foreign version
or an out-of-range record) refused with a typed error."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.replication import delta, extents
from storage.replication.delta import Header, Reader
from storage.replication.errors import DeltaCorrupt, DeltaTruncated, DeltaVersion, ReplicationError

SIZE = 64 * 1024


def image(tmp: Path, seed: int) -> Path:
    p = tmp / f"img.{seed}"
    p.write_bytes(hashlib.shake_256(str(seed).encode()).digest(SIZE))
    return p


def decode(buf: bytes) -> tuple[Header, dict[int, bytes | None]]:
    r = Reader(io.BytesIO(buf))
    return r.header, {rec.offset: rec.data for rec in r.records()}


def encode(src: Path, pieces: list[tuple[int, int, bool]], chunk: int = 4096) -> bytes:
    h = Header("rvg1", "vol1", 0, 3, 4, SIZE, chunk=chunk)
    out = io.BytesIO()
    n = delta.encode(out, h, src, pieces)
    assert n == len(out.getvalue()) == delta.encoded_size(h, pieces)
    return out.getvalue()


ranges_st = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 9000)), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranges_st, st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 20000)), max_size=4),
       st.sampled_from([512, 4096, 65536]))
def test_round_trip(tmp_path: Path, ranges: list[tuple[int, int]], data: list[tuple[int, int]], chunk: int) -> None:
    src = image(tmp_path, 1)
    body = src.read_bytes()
    pieces = extents.split(extents.clip(ranges, SIZE), extents.merge(extents.clip(data, SIZE)))
    h, recs = decode(encode(src, pieces, chunk))
    assert h.key == "vol1.0" and (h.from_seq, h.to_seq, h.size) == (3, 4, SIZE)
    rebuilt = bytearray(SIZE)
    for off, payload in recs.items():
        if payload is not None:
            rebuilt[off:off + len(payload)] = payload
            assert len(payload) <= chunk
    for o, n, has in pieces:
        assert bytes(rebuilt[o:o + n]) == (body[o:o + n] if has else bytes(n))


def small_stream(tmp_path: Path) -> bytes:
    return encode(image(tmp_path, 2), [(0, 100, True), (4096, 300, False), (9000, 50, True)], chunk=64)


def test_every_single_byte_corruption_is_detected(tmp_path: Path) -> None:
    buf = small_stream(tmp_path)
    for i in range(len(buf)):
        for x in (0x01, 0x80, 0xFF):
            bad = bytearray(buf)
            bad[i] ^= x
            with pytest.raises(ReplicationError):
                decode(bytes(bad))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_single_byte_corruption_is_detected(tmp_path: Path, data: st.DataObject) -> None:
    buf = encode(image(tmp_path, 3), [(0, 5000, True), (20000, 4096, False), (30000, 9000, True)], chunk=4096)
    i = data.draw(st.integers(0, len(buf) - 1))
    bad = bytearray(buf)
    bad[i] = data.draw(st.integers(0, 255).filter(lambda v: v != buf[i]))
    with pytest.raises(ReplicationError):
        decode(bytes(bad))


def test_every_truncation_and_trailing_garbage_is_detected(tmp_path: Path) -> None:
    buf = small_stream(tmp_path)
    for n in range(len(buf)):
        with pytest.raises(DeltaTruncated, match="cut short"):
            decode(buf[:n])
    with pytest.raises(DeltaCorrupt, match="after the delta's trailer"):
        decode(buf + b"\0")


def _raw(records: list[tuple[bytes, int, int, bytes]], version: int = delta.VERSION, size: int = SIZE) -> bytes:
    """A stream with valid checksums around whatever records are given, to reach the structural checks."""
    h = Header("rvg1", "vol1", 0, 3, 4, size, chunk=4096)
    head = delta._header_bytes(h)
    if version != delta.VERSION:
        pre = struct.pack("<8sHI", delta.MAGIC, version, len(head) - 14 - 32) + head[14:-32]
        head = pre + hashlib.sha256(pre).digest()
    out = bytearray(head)
    digests = []
    nd = nz = 0
    for kind, idx, off, data in records:
        rec = struct.pack("<cIQI", kind, idx, off, len(data))
        payload = b"" if kind == b"Z" else data
        digests.append(hashlib.sha256(rec + payload).digest())
        out += rec + payload + digests[-1]
    trl = struct.pack("<cIQQ", b"T", len(records), nd, nz)
    out += trl + delta.chain_digest(head[-32:], digests, trl)
    return bytes(out)


def test_structural_checks_with_valid_checksums() -> None:
    d = b"a" * 10
    with pytest.raises(DeltaVersion, match="version 1; this build reads versions 2, 3"):
        decode(_raw([], version=1))
    with pytest.raises(DeltaCorrupt, match="record 1 where record 0"):
        decode(_raw([(b"D", 1, 0, d)]))
    with pytest.raises(DeltaCorrupt, match="reordered"):
        decode(_raw([(b"D", 0, 100, d), (b"D", 1, 50, d)]))
    with pytest.raises(DeltaCorrupt, match="past the image size"):
        decode(_raw([(b"D", 0, SIZE - 5, d)]))
    with pytest.raises(DeltaCorrupt, match="trailer counts"):
        decode(_raw([(b"D", 0, 0, d)]))  # its counts say no data bytes
    with pytest.raises(DeltaCorrupt, match="bad magic"):
        decode(b"NOTDELTA" + bytes(100))


def test_encoder_refuses_ranges_past_the_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="past the image size"):
        encode(image(tmp_path, 4), [(SIZE - 10, 20, True)])


def test_a_record_spliced_in_from_another_delta_is_caught_by_the_chain(tmp_path: Path) -> None:
    """Each record's own checksum holds for a record taken whole from another delta of the same layout
    (same index, offset and length, other data): only the trailer's chain of digests can tell."""
    pieces = [(0, 100, True), (4096, 300, True)]
    mine, other = encode(image(tmp_path, 3), pieces, chunk=4096), encode(image(tmp_path, 4), pieces, chunk=4096)
    head = len(delta._header_bytes(Header("rvg1", "vol1", 0, 3, 4, SIZE, chunk=4096)))
    rec0 = delta._REC.size + 100 + delta.DIGEST
    assert mine[:head] == other[:head] and mine[head:head + rec0] != other[head:head + rec0]
    spliced = mine[:head] + other[head:head + rec0] + mine[head + rec0:]
    r = Reader(io.BytesIO(spliced))
    with pytest.raises(DeltaCorrupt, match="delta checksum mismatch"):
        list(r.records())
    assert decode(mine)[1][0] == image(tmp_path, 3).read_bytes()[:100]


def _v2(records: list[tuple[int, bytes]]) -> bytes:
    """A version-2 stream as the previous release wrote it (SHA-256, no digest field in the header):
    an SRL may hold such entries across an upgrade."""
    body = json.dumps({"rvg": "rvg1", "volume": "vol1", "idx": 0, "from_seq": 3, "to_seq": 4, "size": SIZE,
                       "chunk": 4096, "method": "fiemap"}, sort_keys=True, separators=(",", ":")).encode()
    pre = struct.pack("<8sHI", delta.MAGIC, 2, len(body)) + body
    out = bytearray(pre + hashlib.sha256(pre).digest())
    digests = []
    for i, (off, data) in enumerate(records):
        rec = struct.pack("<cIQI", b"D", i, off, len(data))
        digests.append(hashlib.sha256(rec + data).digest())
        out += rec + data + digests[-1]
    trl = struct.pack("<cIQQ", b"T", len(records), sum(len(d) for _, d in records), 0)
    out += trl + delta.chain_digest(hashlib.sha256(pre).digest(), digests, trl)
    return bytes(out)


def test_a_version_2_stream_is_still_read_as_sha256() -> None:
    h, recs = decode(_v2([(0, b"x" * 100), (4096, b"y" * 10)]))
    assert h.digest == "sha256" and recs == {0: b"x" * 100, 4096: b"y" * 10}
    buf = bytearray(_v2([(0, b"x" * 100)]))
    buf[-80] ^= 1  # in the record's data
    with pytest.raises(DeltaCorrupt, match="checksum mismatch"):
        decode(bytes(buf))


def test_blake3_is_here_and_preferred_only_when_the_peer_reads_it() -> None:
    assert delta.available() == ["blake3", "sha256"]  # the test install has the blake3 module
    assert delta.preferred(None) == "sha256"  # the peer not heard yet: what every site reads
    assert delta.preferred(["sha256"]) == "sha256"
    assert delta.preferred(["sha256", "blake3"]) == "blake3"


@pytest.mark.parametrize("digest", ["blake3", "sha256"])
def test_each_digest_round_trips_and_catches_a_flipped_byte(tmp_path: Path, digest: str) -> None:
    src = image(tmp_path, 2)
    h = Header("rvg1", "vol1", 0, 3, 4, SIZE, chunk=4096, digest=digest)
    out = io.BytesIO()
    delta.encode(out, h, src, [(0, 10000, True), (12288, 4096, False)])
    assert len(out.getvalue()) == delta.encoded_size(h, [(0, 10000, True), (12288, 4096, False)])
    got, recs = decode(out.getvalue())
    assert got.digest == digest and b"".join(recs[o] or b"" for o in (0, 4096, 8192)) == src.read_bytes()[:10000]
    for pos in (20, 200, 5000, len(out.getvalue()) - 5):  # header, record head, data, trailer digest
        buf = bytearray(out.getvalue())
        buf[pos] ^= 1
        with pytest.raises((DeltaCorrupt, DeltaTruncated)):
            decode(bytes(buf))


def test_a_digest_this_site_lacks_is_refused_saying_what_to_install(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src = image(tmp_path, 3)
    out = io.BytesIO()
    delta.encode(out, Header("rvg1", "vol1", 0, 3, 4, SIZE, chunk=4096, digest="blake3"), src, [(0, 4096, True)])
    monkeypatch.setattr(delta, "DIGESTS", {"sha256": hashlib.sha256})
    with pytest.raises(DeltaVersion, match="install the Python module blake3"):
        decode(out.getvalue())
    with pytest.raises(DeltaVersion, match="not known here"):
        delta.encode(io.BytesIO(), Header("rvg1", "vol1", 0, 3, 4, SIZE, digest="blake3"), src, [(0, 4096, True)])


def test_a_header_naming_an_unknown_digest_is_damage() -> None:
    body = json.dumps({"rvg": "rvg1", "volume": "vol1", "idx": 0, "from_seq": 3, "to_seq": 4, "size": SIZE,
                       "chunk": 4096, "method": "fiemap", "digest": "md5"}).encode()
    pre = struct.pack("<8sHI", delta.MAGIC, 3, len(body)) + body
    with pytest.raises(DeltaCorrupt, match="names digest 'md5'"):
        decode(pre + hashlib.sha256(pre).digest())


@pytest.mark.parametrize(("pieces", "msg"), [
    ([(0, SIZE, True)], None),
    ([(0, 8192, True), (8192, SIZE - 8192, False)], None),
    ([(4096, SIZE - 4096, True)], "skips 4096 bytes at offset 0"),
    ([(0, 4096, True), (8192, SIZE - 8192, True)], "skips 4096 bytes at offset 4096"),
    ([(0, SIZE - 4096, True)], f"ends at {SIZE - 4096} of {SIZE}"),
])
def test_a_whole_delta_must_tile_its_image(tmp_path: Path, pieces: list[tuple[int, int, bool]],
                                           msg: str | None) -> None:
    """A delta that says it is whole replaces the image at the receiver (a new file): a range it left
    out would read as zeros there, so the reader refuses one that does not cover [0, size)."""
    out = io.BytesIO()
    delta.encode(out, Header("rvg1", "vol1", 0, 3, 4, SIZE, chunk=4096, method=delta.WHOLE), image(tmp_path, 5), pieces)
    r = Reader(io.BytesIO(out.getvalue()))
    if msg is None:
        assert sum(rec.length for rec in r.records()) == SIZE
    else:
        with pytest.raises(DeltaCorrupt, match=f"says it is whole but {msg}"):
            list(r.records())
