"""A mirror survives losing a disk: degraded mount on request, repair onto the third disk, full redundancy back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from storage import diskgroup, volumes
from storage.errors import CommandFailed, Degraded
from storage.kernel import loop, mounts
from storage.runner import run
from storage.units import MiB
from tests.integration.conftest import REPO


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def profiles(mp: Path) -> dict[str, set[str]]:
    """Block-group kinds (Data, Metadata, System) and the profiles btrfs has chunks of."""
    out = subprocess.run(["btrfs", "filesystem", "df", str(mp)], capture_output=True, text=True,
                         check=True).stdout
    found: dict[str, set[str]] = {}
    for m in re.finditer(r"^(Data|Metadata|System),\s*([^:]+):", out, re.M):
        found.setdefault(m.group(1), set()).add(m.group(2).strip())
    return found


def lose_disk(dg, disk: str) -> Path:
    """What a dead disk looks like: its filesystem gone, its loop device gone, its image gone."""
    rec = next(d for d in dg.catalog.disks() if d.name == disk)
    target = dg.disk_dir(disk)
    subprocess.run(["umount", str(target)], check=True)
    loop.detach_image(Path(rec.source))
    assert not loop.find(Path(rec.source))
    os.unlink(rec.source)
    return Path(rec.source)


@pytest.fixture
def degraded(env):
    """A 3-disk group with a 2-way mirror holding data, one of whose disks was then lost."""
    dg = env.make_dg(ndisks=3)
    volumes.make(dg, "m1", "500m", layout="mirror")
    mp = volumes.mount(dg, "m1")
    data = os.urandom(24 * MiB + 5)
    write_synced(mp / "data", data)
    volumes.umount(dg, "m1")
    sds = dg.catalog.subdisks("m1")
    lost = sds[0].disk
    kept = sds[1].disk
    spare = next(d.name for d in dg.catalog.disks() if d.name not in {lost, kept})
    lose_disk(dg, lost)
    dg.close()
    dg = diskgroup.open_dg(env.config, "testdg")
    try:
        yield dg, data, lost, kept, spare
    finally:
        dg.close()


def check_degraded_state(env, dg, lost: str) -> None:
    states = {d.name: d.state for d in dg.catalog.disks()}
    assert states[lost] == "missing" and list(states.values()).count("online") == 2
    info = volumes.info(dg, "m1")
    assert info["health"] == "degraded" and info["lost_disks"] == [lost]
    with pytest.raises(Degraded, match="--degraded"):
        volumes.mount(dg, "m1")
    assert mounts.mounted_at(dg.mountpoint("m1")) is None and volumes.devices(dg, dg.catalog.volume("m1")) == []
    proc = env.cli("vol", "mount", "m1", check=False)
    assert proc.returncode == Degraded.exit_code and "--degraded" in proc.stderr
    cli = {d["name"]: d["state"] for d in json.loads(env.cli("--json", "dg", "info", "testdg").stdout)["disks"]}
    assert cli == states


def check_repaired(dg, data: bytes, lost: str, kept: str, spare: str) -> None:
    sds = dg.catalog.subdisks("m1")
    assert sorted(sd.disk for sd in sds) == sorted([kept, spare]), "the lost subdisk was not moved to the spare"
    assert all(dg.image(sd.disk, "m1", sd.idx).exists() for sd in sds)
    info = volumes.info(dg, "m1")
    assert info["health"] == "ok" and info["lost_disks"] == []
    mp = volumes.mount(dg, "m1")  # not degraded
    assert "degraded" not in mounts.mounted_at(mp).options
    assert (mp / "data").read_bytes() == data
    found = profiles(mp)
    assert found["Data"] == {"RAID1"}, found
    assert all(p == {"RAID1"} for p in found.values()), found
    show = subprocess.run(["btrfs", "filesystem", "show", str(mp)], capture_output=True, text=True,
                          check=True).stdout
    assert "missing" not in show.lower() and len(re.findall(r"devid\s+\d+", show)) == 2, show
    volumes.umount(dg, "m1")


def test_mounted_repair_after_losing_a_disk(env, degraded):
    dg, data, lost, kept, spare = degraded
    check_degraded_state(env, dg, lost)

    mp = volumes.mount(dg, "m1", degraded=True)
    assert (mp / "data").read_bytes() == data
    more = os.urandom(8 * MiB)
    write_synced(mp / "written-while-degraded", more)

    volumes.repair(dg, "m1")
    assert mounts.mounted_at(mp) is not None, "repair of a mounted volume must keep it mounted"
    assert (mp / "data").read_bytes() == data
    volumes.umount(dg, "m1")
    assert volumes.devices(dg, dg.catalog.volume("m1")) == []

    check_repaired(dg, data, lost, kept, spare)
    mp = volumes.mount(dg, "m1")
    assert (mp / "written-while-degraded").read_bytes() == more
    volumes.umount(dg, "m1")


def test_unmounted_repair_mounts_by_itself(env, degraded):
    dg, data, lost, kept, spare = degraded
    check_degraded_state(env, dg, lost)
    volumes.repair(dg, "m1")
    assert mounts.mounted_at(dg.mountpoint("m1")) is None
    assert volumes.devices(dg, dg.catalog.volume("m1")) == []
    assert not list(dg.root.glob("tmp/repair-*")), "repair left its scratch mount point"
    check_repaired(dg, data, lost, kept, spare)
    # and through the CLI on a fresh process: nothing degraded left to report
    info = json.loads(env.cli("--json", "vol", "info", "m1").stdout)
    assert info["health"] == "ok"


def _replace_fails(argv, **kw):
    """The real btrfs, asked to replace a device id the filesystem does not have: a real failure."""
    args = [str(a) for a in argv]
    if args[:3] == ["btrfs", "replace", "start"]:
        args[5] = "99"  # btrfs replace start -B -f DEVID NEWDEV TARGET
    return run(args, **kw)


@pytest.mark.parametrize("mounted", [True, False], ids=["mounted", "unmounted"])
def test_failed_repair_leaks_nothing(env, degraded, mounted: bool):
    """A repair whose replace fails detaches and deletes its replacement image, records nothing, leaves
    no intent, and a later repair still works."""
    dg, data, lost, kept, spare = degraded
    if mounted:
        volumes.mount(dg, "m1", degraded=True)
    before_sds = dg.catalog.subdisks("m1")
    dg.runner = _replace_fails
    with pytest.raises(CommandFailed, match="btrfs failed"):
        volumes.repair(dg, "m1")
    dg.runner = run
    assert dg.catalog.intents() == []
    assert dg.catalog.subdisks("m1") == before_sds
    assert not list((dg.disk_dir(spare) / "vols").glob("m1.*.img")), "the replacement image was left behind"
    attached = set(loop.attached().values())
    allowed = {d.source for d in dg.catalog.disks()}
    if mounted:
        allowed |= {str(dg.image(sd.disk, "m1", sd.idx)) for sd in before_sds}
    stray = {b for b in attached if b.startswith(str(env.root) + "/") and b not in allowed}
    assert not stray, f"loop devices left by the failed repair: {stray}"
    assert (mounts.mounted_at(dg.mountpoint("m1")) is not None) == mounted
    assert not list(dg.root.glob("tmp/repair-*")), "repair left its scratch mount point"
    volumes.repair(dg, "m1")
    if mounted:
        volumes.umount(dg, "m1")
    check_repaired(dg, data, lost, kept, spare)


@pytest.mark.parametrize("point", ["repair.recorded", "repair.replaced"])
@pytest.mark.parametrize("mounted", [True, False], ids=["mounted", "unmounted"])
def test_open_while_repair_is_paused(env, degraded, mounted: bool, point: str):
    """Another process opening the disk group while a repair waits at one of its steps leaves it alone;
    released, the repair completes (the pause machinery of test_crash, for an operation that needs a
    lost disk)."""
    dg, data, lost, kept, spare = degraded
    if mounted:
        volumes.mount(dg, "m1", degraded=True)
    release = env.root / "release"
    trace = env.root / "trace"
    proc = subprocess.Popen(["python3", "-m", "storage.cli", "vol", "repair", "m1"], cwd=REPO, text=True,
                            env={**os.environ, "VERITAS_CONFIG": str(env.config_path), "VERITAS_PAUSE_AT": point,
                                 "VERITAS_PAUSE_FILE": str(release), "VERITAS_CRASH_TRACE": str(trace)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{release}.reached").exists():
            assert proc.poll() is None, f"repair ended before {point}: {proc.communicate()}"
            assert time.monotonic() < deadline, f"repair never reached {point}"
            time.sleep(0.02)
        opener = env.cli("vol", "list", check=False)  # opens the disk group: recovers abandoned intents
        assert opener.returncode == 0 and "recovery" not in opener.stderr, opener.stderr
        assert proc.poll() is None, "the paused repair ended while paused"
    finally:
        release.touch()
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert point in trace.read_text().split()
    assert dg.catalog.intents() == []
    if mounted:
        assert (dg.mountpoint("m1") / "data").read_bytes() == data
        volumes.umount(dg, "m1")
    check_repaired(dg, data, lost, kept, spare)
