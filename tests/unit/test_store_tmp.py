"""store.remove_tmp removes what a killed writer left, never another live process's write under way
(the link service's checkpoint recovery ran beside an rvg command writing its record in the same
directory and removed its temporary file: the command failed with FileNotFoundError)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from storage.replication import store


def test_a_live_writers_temporary_file_is_kept_and_a_dead_ones_removed(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        keep = tmp_path / f".rvg.json.tmp.{live.pid}"
        drop = tmp_path / f".rvg.json.tmp.{dead.pid}"
        keep.write_text("{}")
        drop.write_text("{}")
        assert store.remove_tmp(tmp_path) == [drop]
        assert keep.exists() and not drop.exists()
    finally:
        live.kill()
        live.wait()
