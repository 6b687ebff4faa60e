"""dg destroy --force: removes snapshots of snapshots (deepest first), and holds the exclusive disk group
lock from its check to the last removal, so nothing is made in a disk group being destroyed."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from storage import snapshots, volumes
from storage.diskgroup import DiskGroup
from tests.integration.conftest import REPO, leaks

DG = "testdg"


def test_destroy_force_removes_a_snapshot_of_a_snapshot(env, dg: DiskGroup) -> None:
    volumes.make(dg, "base", "300m")
    volumes.mount(dg, "base")
    snapshots.make(dg, "base", "snap1")
    snapshots.make(dg, "snap1", "snap2")  # by name, snap1 comes before snap2: removal must not go by name
    volumes.mount(dg, "snap2")
    dg.close()
    proc = env.cli("dg", "destroy", DG, "--force", check=False)
    assert proc.returncode == 0, proc.stderr
    assert not (env.config.dg_parent / DG).exists()
    assert leaks(env.root) == []


def _popen(env, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(["python3", "-m", "storage.cli", *args], cwd=REPO, text=True,
                            env={**os.environ, "VERITAS_CONFIG": str(env.config_path), **(extra or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_destroy_holds_its_lock_throughout(env, dg: DiskGroup) -> None:
    """A make started after destroy checked the volumes waits, and then finds the disk group gone."""
    volumes.make(dg, "old", "300m")
    dg.close()
    release = env.root / "release"
    destroy = _popen(env, "dg", "destroy", DG, "--force",
                     extra={"VERITAS_PAUSE_AT": "destroy.checked", "VERITAS_PAUSE_FILE": str(release)})
    make = None
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{release}.reached").exists():
            assert destroy.poll() is None, f"destroy ended before its pause point: {destroy.communicate()}"
            assert time.monotonic() < deadline, "destroy never reached destroy.checked"
            time.sleep(0.02)
        make = _popen(env, "vol", "make", "-g", DG, "late", "300m")
        time.sleep(3)
        assert make.poll() is None, f"vol make ran while destroy was between check and removal: {make.communicate()}"
    finally:
        release.touch()
        out, err = destroy.communicate(timeout=300)
    assert destroy.returncode == 0, err
    out, err = make.communicate(timeout=300)
    assert make.returncode != 0, f"vol make succeeded in a destroyed disk group: {out}"
    assert "Traceback" not in err and "destroyed" in err, err
    assert not (env.config.dg_parent / DG / "catalog.db").exists()
    assert leaks(env.root) == []
