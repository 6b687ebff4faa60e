"""Replication's data path on real loop devices and filesystems: checkpoints of several mounted volumes
taken together, the delta of known writes, apply byte-identical and atomic under kill -9, SRL overflow
into DCM and the resync that restores identity, and bad input that changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from storage import volumes
from storage.diskgroup import DiskGroup
from storage.errors import InvalidArgument, NoSuchVolume
from storage.kernel import fs, loop, reflink
from storage.replication import apply, checkpoint, delta, deltaset, extents
from storage.replication.apply import Replica
from storage.replication.checkpoint import Checkpoint
from storage.replication.errors import AuthFailed, DeltaCorrupt, DeltaMismatch, SrlOverflow
from storage.replication.srl import Srl
from tests.integration.conftest import REPO, Env

B = 4096
RVG = "rvg1"


def same_file(a: Path, b: Path) -> bool:
    if os.stat(a).st_size != os.stat(b).st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def assert_replica_is(dg: DiskGroup, rep: Replica, ck: Checkpoint) -> None:
    assert rep.seq == ck.seq
    assert rep.keys() == sorted(i.key for i in ck.images)
    for img in ck.images:
        assert same_file(rep.image(img.key), ck.path(dg, img)), f"replica image {img.key} differs from checkpoint"


def assert_not_frozen(mnt: Path) -> None:
    """A write to ``mnt`` completes (a frozen filesystem would block it): thawed if not, then fail."""
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/.probe", "bs=4k", "count=1", "conv=fsync"],
                       capture_output=True, timeout=20, check=True)
    except subprocess.TimeoutExpired:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, check=False)
        pytest.fail(f"{mnt} was left frozen")
    (mnt / ".probe").unlink()


def write_blocks(img: Path, writes: list[tuple[int, bytes]]) -> None:
    fd = os.open(img, os.O_WRONLY)
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def aligned(writes: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    return extents.merge((off // B * B, -(-(off + len(d)) // B) * B - off // B * B) for off, d in writes)


def ship(dg: DiskGroup, plans: list[deltaset.ImagePlan], where: Path) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    for p in where.iterdir():
        p.unlink()
    return deltaset.write(plans, where)


def apply_files(rep: Replica, files: list[Path]) -> int:
    fhs = [open(f, "rb") for f in files]
    try:
        return rep.apply(fhs)
    finally:
        for fh in fhs:
            fh.close()


def replica_root(dg: DiskGroup) -> Path:
    return dg.disk_dir(dg.catalog.disks()[0].name) / "replica-test"  # an XFS with reflink, like a site's disk


@contextmanager
def mounted_clone(dg: DiskGroup, ck: Checkpoint, volume: str, target: Path) -> Iterator[Path]:
    """Mount a copy of ``volume``'s images in ``ck`` read-only: XFS beside the live volume with nouuid;
    btrfs after giving the copies their own fsid (btrfstune -f -m), which btrfstune refuses while a
    filesystem of the same fsid (the live volume) is mounted: unmount that first."""
    imgs = [i for i in ck.images if i.volume == volume]
    copies = [ck.path(dg, i).with_suffix(".copy") for i in imgs]
    devs: list[str] = []
    target.mkdir(parents=True, exist_ok=True)
    fstype = dg.catalog.volume(volume).fstype  # type: ignore[union-attr]
    try:
        for i, c in zip(imgs, copies, strict=True):
            reflink.clone(ck.path(dg, i), c)
            devs.append(loop.attach(c))
        if fstype == "btrfs":
            tune = subprocess.run(["btrfstune", "-f", "-m", devs[0]], capture_output=True, text=True, timeout=60,
                                  check=False)
            assert tune.returncode == 0, f"btrfstune: {tune.stdout} {tune.stderr}"
            fs.mount(devs, target, "btrfs", options=["ro"])
        else:
            fs.mount(devs, target, fstype, options=["ro", "nouuid"])
        try:
            yield target
        finally:
            fs.umount(target)
    finally:
        if fstype == "btrfs":
            fs.forget_btrfs(devs)
        for d in devs:
            loop.detach(d)
        for c in copies:
            c.unlink(missing_ok=True)


def test_checkpoint_of_two_mounted_volumes_is_consistent(env: Env, dg: DiskGroup) -> None:
    volumes.make(dg, "v1", "320m", fstype="xfs")
    volumes.make(dg, "v2", "320m", layout="mirror")
    m1, m2 = volumes.mount(dg, "v1"), volumes.mount(dg, "v2")
    (m1 / "a").write_bytes(b"one" * 5000)
    (m2 / "b").write_bytes(b"two" * 5000)  # not fsynced: the freeze flushes it into the checkpoint
    ck = checkpoint.take(dg, RVG, ["v1", "v2"])
    assert ck.seq == 1 and set(ck.frozen) == {"v1", "v2"}
    assert sorted(i.key for i in ck.images) == ["v1.0", "v2.0", "v2.1"], "every image of the mirror"
    assert checkpoint.last_consistent(dg, RVG) == ck
    for m in (m1, m2):
        assert_not_frozen(m)
    (m1 / "a").write_bytes(b"later")
    (m2 / "b").write_bytes(b"later")
    os.sync()
    with mounted_clone(dg, ck, "v1", env.root / "c1") as c1:
        assert (c1 / "a").read_bytes() == b"one" * 5000
    volumes.umount(dg, "v2")
    with mounted_clone(dg, ck, "v2", env.root / "c2") as c2:
        assert (c2 / "b").read_bytes() == b"two" * 5000
    volumes.mount(dg, "v2")
    ck2 = checkpoint.take(dg, RVG, ["v1", "v2"])
    assert [c.seq for c in checkpoint.list_checkpoints(dg, RVG)] == [1, 2]
    checkpoint.delete(dg, RVG, 1)
    assert [c.seq for c in checkpoint.list_checkpoints(dg, RVG)] == [2]
    assert not checkpoint.image_dir(dg, ck.images[0].disk, RVG, 1).exists()
    assert checkpoint.last_consistent(dg, RVG) == ck2


def test_killed_while_frozen_recover_thaws(env: Env, dg: DiskGroup) -> None:
    """SIGKILL between freeze and thaw: the freeze is recorded, and the next take (or recover) thaws."""
    volumes.make(dg, "v1", "320m", fstype="xfs")
    m1 = volumes.mount(dg, "v1")
    code = ("import sys; from pathlib import Path; from storage import diskgroup;"
            " from storage.config import load_config; from storage.replication import checkpoint;"
            f" checkpoint.take(diskgroup.open_dg(load_config(Path({str(env.config_path)!r})), 'testdg'),"
            f" {RVG!r}, ['v1'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VERITAS_CRASH_AT": "repl.ckpt.frozen"}, check=False)
    try:
        assert proc.returncode == -9, proc.stderr
        assert (checkpoint.meta_dir(dg, RVG) / "frozen.json").exists()
        done = checkpoint.recover(dg, RVG)
        assert any("thawed" in d for d in done) and any("removed" in d for d in done), done
    finally:
        fs.thaw(m1)  # never leave a frozen filesystem to the teardown, whatever failed above
    assert_not_frozen(m1)
    assert checkpoint.list_checkpoints(dg, RVG) == []
    assert checkpoint.take(dg, RVG, ["v1"]).seq == 1


def test_delta_of_known_writes_is_exactly_those_ranges(env: Env, dg: DiskGroup) -> None:
    volumes.make(dg, "v1", "320m", fstype="xfs")
    ck1 = checkpoint.take(dg, RVG, ["v1"])
    first = deltaset.plan(dg, RVG, 0, 1)
    img1 = ck1.path(dg, ck1.images[0])
    assert first[0].ranges == extents.data_ranges(extents.fiemap(img1), os.stat(img1).st_size)
    assert 0 < first[0].changed_bytes < os.stat(img1).st_size, "the first delta sends allocated extents only"
    img = dg.image(dg.catalog.subdisks("v1")[0].disk, "v1", 0)
    writes = [(100 * B, os.urandom(B)), (101 * B, os.urandom(B)), (5000 * B + 10, os.urandom(100)),
              (70000 * B, os.urandom(3 * B)), (40000 * B - 1, b"xy")]
    write_blocks(img, writes)
    checkpoint.take(dg, RVG, ["v1"])
    plans = deltaset.plan(dg, RVG, 1, 2)
    assert plans[0].header.method == "fiemap"
    assert plans[0].ranges == aligned(writes)


def test_apply_is_byte_identical_and_atomic_under_kill9(env: Env, dg: DiskGroup) -> None:
    volumes.make(dg, "v1", "320m", fstype="xfs")
    volumes.make(dg, "v2", "320m", fstype="xfs")
    m1 = volumes.mount(dg, "v1")
    (m1 / "f").write_bytes(os.urandom(1 << 20))
    ck1 = checkpoint.take(dg, RVG, ["v1", "v2"])
    rep = Replica.create(replica_root(dg), RVG)
    apply_files(rep, ship(dg, deltaset.plan(dg, RVG, 0, 1), env.root / "d1"))
    assert_replica_is(dg, rep, ck1)
    with open(m1 / "f", "r+b") as fh:
        for off in (0, 300_000, 900_000):
            fh.seek(off)
            fh.write(os.urandom(8192))
    img2 = dg.image(dg.catalog.subdisks("v2")[0].disk, "v2", 0)
    volumes.umount(dg, "v1")
    write_blocks(img2, [(1000 * B, os.urandom(B))])
    d0, dn = extents.data_ranges(extents.fiemap(img2), os.stat(img2).st_size)[-1]  # data that becomes a hole
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(d0), "--length", str(min(dn, 4 * B)), str(img2)],
                   check=True, capture_output=True)
    ck2 = checkpoint.take(dg, RVG, ["v1", "v2"])
    plans = deltaset.plan(dg, RVG, 1, 2)
    assert (d0, min(dn, 4 * B), False) in [p for p in plans[1].pieces], "the punched range goes as zeros"
    files = ship(dg, plans, env.root / "d2")
    code = ("import sys; from pathlib import Path; from storage.replication.apply import Replica;"
            f" r = Replica(Path({str(rep.root)!r}), {RVG!r});"
            f" r.apply([open(p, 'rb') for p in {[str(f) for f in files]!r}])")
    for point in ("repl.apply.staged", "repl.apply.record", "repl.apply.written", "repl.apply.verified",
                  "repl.apply.renamed", "repl.apply.recorded"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "VERITAS_CRASH_AT": point}, check=False)
        assert proc.returncode == -9, f"{point}: {proc.stderr}"
        left = rep.recover()
        if point != "repl.apply.recorded":
            assert left, f"{point}: the killed apply left nothing to clean up; was it killed mid-way?"
            assert_replica_is(dg, rep, ck1)  # the previous consistent checkpoint, whole
        else:
            assert_replica_is(dg, rep, ck2)  # killed after the commit: the new one
        assert sorted(p.name for p in rep.root.iterdir()) == sorted(["consistent.json", str(rep.seq)]), point


def test_srl_overflow_to_dcm_then_resync_restores_identity(env: Env, dg: DiskGroup) -> None:
    volumes.make(dg, "v1", "320m", fstype="xfs")
    img = dg.image(dg.catalog.subdisks("v1")[0].disk, "v1", 0)
    checkpoint.take(dg, RVG, ["v1"])
    rep = Replica.create(replica_root(dg), RVG)
    apply_files(rep, ship(dg, deltaset.plan(dg, RVG, 0, 1), env.root / "d1"))
    srl = Srl(env.root / "srl", limit=64 * 1024)
    srl.ack(rep.seq)

    def step(seq: int, writes: list[tuple[int, bytes]]) -> list[deltaset.ImagePlan]:
        write_blocks(img, writes)
        assert checkpoint.take(dg, RVG, ["v1"]).seq == seq
        return deltaset.plan(dg, RVG, seq - 1, seq)

    srl.append(2, step(2, [((1000 + i * 7) * B, os.urandom(B)) for i in range(10)]))
    p3 = step(3, [(50_000 * B + i * 3 * B, os.urandom(B)) for i in range(20)])
    with pytest.raises(SrlOverflow):
        srl.append(3, p3)
    srl.to_dcm(3, {p.ref.key: p.ranges for p in p3})
    assert srl.pending() == []
    p4 = step(4, [((1000 + 9 * 7) * B, os.urandom(B)), (60_000 * B, os.urandom(2 * B))])  # one block again
    srl.dcm_add(4, {p.ref.key: p.ranges for p in p4})
    for seq in (2, 3):  # the DCM needs neither the SRL's deltas nor the checkpoints between
        checkpoint.delete(dg, RVG, seq)
    d = srl.dcm()
    assert d is not None and (d.since, d.upto) == (1, 4)
    resync = deltaset.plan_ranges(dg, RVG, d.since, d.upto, d.ranges)
    assert resync[0].changed_bytes == 32 * B, "the resync sends the union of the changes, each once"
    apply_files(rep, ship(dg, resync, env.root / "d4"))
    srl.ack(4)
    assert not srl.dcm_active
    assert_replica_is(dg, rep, checkpoint.get(dg, RVG, 4))


def test_a_whole_delta_replaces_the_image_and_one_with_a_gap_is_refused(env: Env, dg: DiskGroup) -> None:
    """startrep's and a full resync's deltas (method whole) are written into a new file, not over the
    replica's previous image: what was data there and is a hole now must read as zeros, and a whole
    delta whose records leave a gap is damage, refused with nothing applied."""
    volumes.make(dg, "v1", "320m", fstype="xfs")
    img = dg.image(dg.catalog.subdisks("v1")[0].disk, "v1", 0)
    checkpoint.take(dg, RVG, ["v1"])
    rep = Replica.create(replica_root(dg), RVG)
    apply_files(rep, ship(dg, deltaset.plan(dg, RVG, 0, 1), env.root / "d1"))
    old = [(40_000 * B, os.urandom(64 * B)), (60_000 * B, os.urandom(8 * B))]
    write_blocks(img, old)
    checkpoint.take(dg, RVG, ["v1"])
    apply_files(rep, ship(dg, deltaset.plan(dg, RVG, 1, 2), env.root / "d2"))
    fd = os.open(img, os.O_RDWR)
    try:
        apply._punch(fd, 40_000 * B, 64 * B)  # data on the replica, a hole in the next checkpoint
        os.fsync(fd)
    finally:
        os.close(fd)
    write_blocks(img, [(70_000 * B, os.urandom(4 * B))])
    ck3 = checkpoint.take(dg, RVG, ["v1"])
    whole = deltaset.plan_whole(dg, RVG, 2, 3)
    assert [p.header.method for p in whole] == [delta.WHOLE]
    apply_files(rep, ship(dg, whole, env.root / "d3"))
    assert_replica_is(dg, rep, ck3)
    with open(rep.image(whole[0].ref.key), "rb") as fh:
        fh.seek(40_000 * B)
        assert fh.read(64 * B) == bytes(64 * B), "the old data where the checkpoint has a hole was kept"
    checkpoint.take(dg, RVG, ["v1"])
    size = os.stat(img).st_size
    key = whole[0].ref.key
    for ranges, msg in (([(0, size - (1 << 20))], "ends at"), ([(1 << 20, size - (1 << 20))], "skips")):
        gapped = deltaset.plan_ranges(dg, RVG, 3, 4, {key: ranges}, method=delta.WHOLE)
        with pytest.raises(DeltaCorrupt, match=f"says it is whole but {msg}"):
            apply_files(rep, ship(dg, gapped, env.root / "d4"))
        assert_replica_is(dg, rep, ck3)
        assert sorted(p.name for p in rep.root.iterdir()) == ["3", "consistent.json"]


def test_bad_input_changes_nothing(env: Env, dg: DiskGroup) -> None:
    volumes.make(dg, "v1", "320m", fstype="xfs")
    m1 = volumes.mount(dg, "v1")
    for vols, err, msg in ((["v1", "nosuch"], NoSuchVolume, "no such volume: nosuch"),
                           (["v1", "v1"], InvalidArgument, "named twice"),
                           ([], InvalidArgument, "at least one volume")):
        with pytest.raises(err, match=msg):
            checkpoint.take(dg, RVG, vols)
        assert checkpoint.list_checkpoints(dg, RVG) == []
        assert not any((dg.disk_dir(d.name) / "repl").exists() for d in dg.catalog.disks())
        assert_not_frozen(m1)
    ck1 = checkpoint.take(dg, RVG, ["v1"])
    rep = Replica.create(replica_root(dg), RVG)
    first = ship(dg, deltaset.plan(dg, RVG, 0, 1), env.root / "d1")
    apply_files(rep, first)
    content = os.urandom(1 << 16)
    (m1 / "f").write_bytes(content)
    checkpoint.take(dg, RVG, ["v1"])
    files = ship(dg, deltaset.plan(dg, RVG, 1, 2), env.root / "d2")
    raw = bytearray(files[0].read_bytes())
    at = raw.find(content[1000:1032])
    assert at > 0, "the file's data is not in the delta"
    raw[at] ^= 0x10  # one bit of a data record
    files[0].write_bytes(bytes(raw))
    with pytest.raises(DeltaCorrupt, match="checksum mismatch"):
        apply_files(rep, files)
    assert_replica_is(dg, rep, ck1)
    with pytest.raises(DeltaMismatch, match="replica is at 1"):
        apply_files(rep, first)  # a stale delta from before the replica's checkpoint
    with pytest.raises(DeltaMismatch, match="replica of RVG rvg1, not other"), open(first[0], "rb") as fh:
        Replica(rep.root, "other").apply([fh])
    assert_replica_is(dg, rep, ck1)
    # an intact delta whose seal (the link's keyed list of chain digests) is refused: nothing applied
    files = ship(dg, deltaset.plan(dg, RVG, 1, 2), env.root / "d2")
    chains: list[bytes] = []

    def refuse(got: Sequence[bytes]) -> None:
        chains.extend(got)
        raise AuthFailed("not the streams the primary sealed")
    fhs = [open(f, "rb") for f in files]
    try:
        with pytest.raises(AuthFailed):
            rep.apply(fhs, refuse)
    finally:
        for fh in fhs:
            fh.close()
    assert chains == [f.read_bytes()[-delta.DIGEST:] for f in files], "the seal is asked of each stream's chain"
    assert_replica_is(dg, rep, ck1)
    assert sorted(p.name for p in rep.root.iterdir()) == ["1", "consistent.json"]
