"""Giving a cloned multi-device btrfs its own fsid by editing the clone's image files.

``btrfstune -m`` refuses (and could scan the source's devices) while the source, which has the same
fsid, is mounted. The change it makes is confined to the superblocks, so it is done here on the clone
images before any loop device exists: the old fsid moves to ``metadata_uuid`` (tree blocks keep naming
it), a new fsid is written, the METADATA_UUID incompat flag is set, and each copy's CRC32C is redone.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

from storage.errors import VeritasError

SUPER_OFFSETS = (64 * 1024, 64 * 1024**2, 256 * 1024**3)
SUPER_SIZE = 4096
_MAGIC = b"_BHRfS_M"
_FSID = slice(32, 48)
_FLAGS_INCOMPAT = 188
_CSUM_TYPE = 196
_METADATA_UUID = slice(571, 587)
_INCOMPAT_METADATA_UUID = 1 << 10


def _table() -> list[int]:
    poly = 0x82F63B78
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        out.append(c)
    return out


_CRC = _table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def read_super(path: Path, offset: int = SUPER_OFFSETS[0]) -> bytes | None:
    with open(path, "rb") as fh:
        fh.seek(offset)
        sb = fh.read(SUPER_SIZE)
    return sb if len(sb) == SUPER_SIZE and sb[64:72] == _MAGIC else None


def fsid(path: Path) -> uuid.UUID:
    sb = read_super(path)
    if sb is None:
        raise VeritasError(f"{path} holds no btrfs superblock")
    return uuid.UUID(bytes=sb[_FSID])


def new_fsid(images: Sequence[Path], new: uuid.UUID | None = None) -> uuid.UUID:
    """Give the btrfs spread over ``images`` (all its members, none attached) a new fsid."""
    new = new or uuid.uuid4()
    for path in images:
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            for off in SUPER_OFFSETS:
                if off + SUPER_SIZE > size:
                    continue
                fh.seek(off)
                sb = bytearray(fh.read(SUPER_SIZE))
                if sb[64:72] != _MAGIC:
                    continue
                if struct.unpack_from("<H", sb, _CSUM_TYPE)[0] != 0:
                    raise VeritasError(f"{path}: only crc32c-checksummed btrfs can be given a new fsid")
                incompat = struct.unpack_from("<Q", sb, _FLAGS_INCOMPAT)[0]
                if not incompat & _INCOMPAT_METADATA_UUID:
                    sb[_METADATA_UUID] = sb[_FSID]
                    struct.pack_into("<Q", sb, _FLAGS_INCOMPAT, incompat | _INCOMPAT_METADATA_UUID)
                sb[_FSID] = new.bytes
                struct.pack_into("<I", sb, 0, crc32c(bytes(sb[32:])))
                sb[4:32] = bytes(28)
                fh.seek(off)
                fh.write(sb)
            fh.flush()
            os.fsync(fh.fileno())
    return new
