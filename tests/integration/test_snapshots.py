"""Space-optimised snapshots: cache reservation and use, snapshots of snapshots and of unmounted volumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from storage import snapshots, volumes
from storage.errors import InUse, InvalidArgument
from storage.units import MiB


def total_free(dg) -> int:
    return sum(dg.free().values())


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def test_default_cachesize_is_30_percent_rounded_up_and_reserved(env, dg):
    size = 1000 * MiB + 4096  # 30% of it is not a whole number of MiB
    volumes.make(dg, "v1", size)
    src_size = dg.catalog.volume("v1").size
    expected = -(-src_size * 30 // (100 * MiB)) * MiB  # 30 %, rounded up to a whole MiB
    assert expected == 301 * MiB
    free = total_free(dg)
    snap = snapshots.make(dg, "v1", "s1")
    assert snap.cachesize == expected
    assert volumes.info(dg, "s1")["cachesize"] == expected
    assert free - total_free(dg) == expected, "a snapshot must reserve its cachesize, not its source's size"
    assert json.loads(env.cli("--json", "dg", "info", "testdg").stdout)["free"] == total_free(dg)
    volumes.remove(dg, "s1")
    assert total_free(dg) == free


def test_explicit_cachesize(env, dg):
    volumes.make(dg, "v1", "1g")
    free = total_free(dg)
    snapshots.make(dg, "v1", "s1", "200m")
    assert volumes.info(dg, "s1")["cachesize"] == 200 * MiB
    assert free - total_free(dg) == 200 * MiB
    # and through the CLI
    env.cli("snap", "make", "v1", "s2", "cachesize=100m")
    assert volumes.info(dg, "s2")["cachesize"] == 100 * MiB
    assert free - total_free(dg) == 300 * MiB


def test_cachesize_larger_than_source_is_refused(env, dg):
    volumes.make(dg, "v1", "500m")
    free = total_free(dg)
    with pytest.raises(InvalidArgument, match="cachesize.*larger than the source"):
        snapshots.make(dg, "v1", "s1", "600m")
    proc = env.cli("snap", "make", "v1", "s1", "cachesize=2g", check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("veritas: error: cachesize")
    assert [v.name for v in dg.catalog.volumes()] == ["v1"]
    assert total_free(dg) == free
    assert sorted(p.name for p in (dg.disk_dir(dg.catalog.subdisks("v1")[0].disk) / "vols").iterdir()) == [
        "v1.0.img"]


# A fresh snapshot, even once mounted, uses next to none of its cache: XFS keeps its source's UUID
# (a new one would rewrite its whole 64 MiB log), btrfs changes only its superblocks.
@pytest.mark.parametrize("opts,fresh_max", [({"layout": "concat"}, 4 * MiB), ({"layout": "mirror"}, 4 * MiB)],
                         ids=["xfs", "btrfs-mirror"])
def test_cache_used_grows_with_new_data_in_the_snapshot(env, dg, opts, fresh_max):
    volumes.make(dg, "v1", "1g", **opts)
    mp = volumes.mount(dg, "v1")
    write_synced(mp / "base", os.urandom(20 * MiB))
    snapshots.make(dg, "v1", "s1")
    fresh = volumes.info(dg, "s1")["cache_used"]
    assert fresh < fresh_max, f"a fresh snapshot already uses {fresh} bytes of its cache"

    smp = volumes.mount(dg, "s1")
    mounted = volumes.info(dg, "s1")["cache_used"]
    assert mounted < fresh_max, f"mounting a fresh snapshot used {mounted} bytes of its cache"
    chunk = os.urandom(4 * MiB)
    with open(smp / "new", "wb") as fh:
        for _ in range(25):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    used = volumes.info(dg, "s1")["cache_used"]
    assert used >= fresh + 95 * MiB, (fresh, used)
    cli = json.loads(env.cli("--json", "vol", "info", "s1").stdout)
    assert cli["cache_used"] >= 95 * MiB
    # the source's images are untouched by writes into the snapshot
    assert (mp / "base").stat().st_size == 20 * MiB and not (mp / "new").exists()
    volumes.umount(dg, "s1")
    volumes.umount(dg, "v1")


def test_snapshot_of_a_snapshot(env, dg):
    volumes.make(dg, "v1", "500m", layout="mirror")
    mp = volumes.mount(dg, "v1")
    write_synced(mp / "a", b"generation 1")
    snapshots.make(dg, "v1", "s1")
    write_synced(mp / "a", b"generation 2")
    smp = volumes.mount(dg, "s1")
    write_synced(smp / "b", b"written in s1")
    snapshots.make(dg, "s1", "s2")
    write_synced(smp / "b", b"changed in s1 after s2")
    s2 = volumes.mount(dg, "s2")
    assert (s2 / "a").read_bytes() == b"generation 1"
    assert (s2 / "b").read_bytes() == b"written in s1"
    assert volumes.info(dg, "s2")["snapshot_of"] == "s1"
    assert volumes.info(dg, "s1")["snapshots"] == ["s2"]
    for name in ("s2", "s1", "v1"):
        volumes.umount(dg, name)
    with pytest.raises(InUse, match="s2"):
        volumes.remove(dg, "s1")
    volumes.remove(dg, "s2")
    volumes.remove(dg, "s1")
    volumes.remove(dg, "v1")


def test_snapshot_of_unmounted_source(env, dg):
    volumes.make(dg, "v1", "500m")
    mp = volumes.mount(dg, "v1")
    data = os.urandom(5 * MiB)
    write_synced(mp / "d", data)
    volumes.umount(dg, "v1")
    snapshots.make(dg, "v1", "s1")
    assert volumes.info(dg, "v1")["mounted"] is False and volumes.info(dg, "s1")["devices"] == []
    smp = volumes.mount(dg, "s1")
    mp = volumes.mount(dg, "v1")
    assert (smp / "d").read_bytes() == data
    write_synced(mp / "d", b"changed")
    assert (smp / "d").read_bytes() == data
    volumes.umount(dg, "s1")
    volumes.umount(dg, "v1")
