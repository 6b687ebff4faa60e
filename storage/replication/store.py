"""Small durable records of replication state: JSON written atomically (temporary file, fsync, rename,
fsync of the directory), so a crash leaves the old record or the new one, never a torn one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from storage import durable


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(value, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    durable.sync_dir(path.parent)


def read_json(path: Path) -> Any:
    """The record at ``path``, or None when there is none."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def remove_tmp(directory: Path) -> list[Path]:
    """Remove the temporary files a killed write_json left in ``directory``; what was removed. A file
    whose writer still runs is another process's write under way (an rvg command writing its record
    while the link service recovers a checkpoint in the same directory): it is left alone."""
    gone = [p for p in directory.glob(".*.tmp.*") if not _writer_alive(p)] if directory.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def _writer_alive(tmp: Path) -> bool:
    pid = tmp.name.rsplit(".", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a file or directory) if present, and make its removal durable."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return
    durable.sync_dir(path.parent)
