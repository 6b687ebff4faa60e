"""Making what the catalog is about to promise survive a power failure.

The catalog commits durably (SQLite WAL with synchronous=FULL). Files it points at must be durable
before the commit that publishes them: a volume recorded 'ok' whose image's size or extents were still
only in the disk's page cache would come back after a crash as a record without its data. A rename or
a new file is durable only once its directory is fsynced too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def sync_dir(path: Path) -> None:
    """fsync directory ``path``, so the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_files(paths: Iterable[Path]) -> None:
    """fsync each file and then each directory holding one (once)."""
    dirs: list[Path] = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if p.parent not in dirs:
            dirs.append(p.parent)
    for d in dirs:
        sync_dir(d)


def write_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and make it and its name durable."""
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    sync_dir(path.parent)
