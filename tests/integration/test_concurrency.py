"""Many processes on one disk group at once: the catalog, the disks, loop devices and mounts still agree.

Workers are forked processes using the storage library (each opens the disk group itself, as a
gunicorn worker or a CLI would); the name race also goes through the real CLI.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import diskgroup, doctor, snapshots, volumes
from storage.config import Config
from storage.diskgroup import DiskGroup
from storage.errors import NoSpace
from storage.kernel import loop, mounts
from storage.units import MiB

DG = "testdg"
WORKERS = 20
HAMMERS = 4
HAMMER_ROUNDS = 12
SHARED = "shared"
ctx = multiprocessing.get_context("fork")


def payload(name: str) -> bytes:
    return (name.encode() + b"\n") * 2048


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _in_child(fn: Callable[..., Any], q: Any, *args: Any) -> None:
    try:
        q.put(("ok", fn(*args)))
    except BaseException as exc:  # reported to the parent, which fails the test
        q.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_all(jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]], timeout: float = 240) -> list[Any]:
    """Run every job in its own forked process, all at once; their results in order, or fail."""
    queues = [ctx.Queue() for _ in jobs]
    procs = [ctx.Process(target=_in_child, args=(fn, q, *args)) for (fn, args), q in zip(jobs, queues, strict=True)]
    for p in procs:
        p.start()
    results = []
    for p, q in zip(procs, queues, strict=True):
        results.append(q.get(timeout=timeout))
        p.join(timeout=30)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    errors = [r for status, r in results if status == "error"]
    assert not errors, "\n\n".join(errors)
    return [r for _status, r in results]


def check_agree(root: Path, dg: DiskGroup) -> None:
    """Catalog and disks agree exactly, only counted volumes are mounted, no stray loop, no over-commit."""
    assert dg.catalog.intents() == []
    findings = doctor.check(dg)
    assert findings == [], "doctor: " + "; ".join(map(str, findings))
    disks = dg.catalog.disks()
    sds = dg.catalog.subdisks()
    wanted = {dg.image(sd.disk, sd.volume, sd.idx) for sd in sds}
    present = {p for d in disks for p in (dg.disk_dir(d.name) / "vols").iterdir()}
    assert wanted == present, f"rows without images: {wanted - present}; images without rows: {present - wanted}"
    vols = {v.name for v in dg.catalog.volumes()}
    counted = {m.volume for m in dg.catalog.mounts() if m.node == dg.node}
    up = {n for n in vols if mounts.mounted_at(dg.mountpoint(n))}
    assert counted == up
    prefix = str(root) + "/"
    allowed = {d.source for d in disks} | {str(dg.image(sd.disk, sd.volume, sd.idx)) for sd in sds
                                           if sd.volume in up}
    stray = {dev: back for dev, back in loop.attached().items() if back.startswith(prefix) and back not in allowed}
    assert not stray, f"leaked loop devices: {stray}"
    expected = {str(dg.disk_dir(d.name)) for d in disks} | {str(dg.mountpoint(n)) for n in up}
    extra = [e.target for e in mounts.table() if e.target.startswith(prefix) and e.target not in expected]
    assert not extra, f"unexpected mounts: {extra}"
    cap, used = dg.capacity(), dg.catalog.reserved()
    for disk, n in used.items():
        assert n <= cap[disk], f"disk {disk} over-committed: {n} > {cap[disk]}"


# ------------------------------------------------------------------ 20 workers + mount hammers


def volume_worker(config: Config, k: int, barrier: Any) -> dict[str, bool]:
    """Make two volumes, mount and write them, snapshot one while mounted, then unmount/remove some.

    Returns the surviving volumes this worker made, each with whether it left it mounted.
    """
    barrier.wait(timeout=60)
    dg = diskgroup.open_dg(config, DG)
    try:
        a, b, s = f"w{k:02d}a", f"w{k:02d}b", f"w{k:02d}s"
        volumes.make(dg, a, "300m")
        volumes.make(dg, b, "100m", fstype="ext4")
        mpa = volumes.mount(dg, a, f"id-{k}")
        write_file(mpa / "data.bin", payload(a))
        mpb = volumes.mount(dg, b)
        write_file(mpb / "data.bin", payload(b))
        with open(mpa / "during.log", "ab") as fh:  # written around the snapshot of its mounted volume
            fh.write(b"before\n")
            fh.flush()
            snapshots.make(dg, a, s)
            fh.write(b"after\n")
        mps = volumes.mount(dg, s, f"id-{k}")
        assert (mps / "data.bin").read_bytes() == payload(a)
        assert (mps / "during.log").read_bytes() == b"before\n"
        write_file(mps / "data.bin", payload(s))
        volumes.umount(dg, s, f"id-{k}")
        assert (mpa / "data.bin").read_bytes() == payload(a)  # the snapshot's writes stay its own
        assert volumes.umount(dg, b)
        survivors: dict[str, bool] = {a: True}
        if k % 3 == 0:
            survivors[s] = False  # a's snapshot survives, unmounted
        else:
            volumes.remove(dg, s)
        if k % 2:
            volumes.remove(dg, b)
        else:
            survivors[b] = False
        if k % 4 == 0:
            assert volumes.umount(dg, a, f"id-{k}")
            survivors[a] = False
        return survivors
    finally:
        dg.close()


def hammer(config: Config, h: int, barrier: Any) -> list[str]:
    """Mount and unmount the shared volume under distinct mount IDs; returns the IDs it still holds."""
    barrier.wait(timeout=60)
    dg = diskgroup.open_dg(config, DG)
    held: list[str] = []
    try:
        for i in range(HAMMER_ROUNDS):
            mid = f"h{h}-{i}"
            mp = volumes.mount(dg, SHARED, mid)
            assert mounts.mounted_at(mp) is not None
            write_file(mp / f"h{h}", payload(mid))
            assert (mp / f"h{h}").read_bytes() == payload(mid)
            if h % 2 == 0 and i % 5 == 0:
                held.append(mid)  # keep some
            else:
                volumes.umount(dg, SHARED, mid)
        return held
    finally:
        dg.close()


def test_twenty_processes(env: Any) -> None:
    dg = env.make_dg(size="8g")
    volumes.make(dg, SHARED, "300m")
    dg.close()  # no catalog connection crosses a fork
    barrier = ctx.Barrier(WORKERS + HAMMERS)
    jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (volume_worker, (env.config, k, barrier)) for k in range(WORKERS)]
    jobs += [(hammer, (env.config, h, barrier)) for h in range(HAMMERS)]
    results = run_all(jobs)
    survivors: dict[str, bool] = {}
    for r in results[:WORKERS]:
        survivors.update(r)
    held = {mid for r in results[WORKERS:] for mid in r}
    assert held, "the hammers were meant to keep some mount IDs"

    dg = diskgroup.open_dg(env.config, DG)
    try:
        check_agree(env.root, dg)
        # the shared volume: counted exactly by the IDs still held, and mounted because some are
        ids = {m.mount_id for m in dg.catalog.mounts(SHARED)}
        assert ids == held
        assert volumes.is_mounted(dg, SHARED)
        for h in range(HAMMERS):
            data = (dg.mountpoint(SHARED) / f"h{h}").read_bytes()
            assert data == payload(f"h{h}-{HAMMER_ROUNDS - 1}")
        for n, mid in enumerate(sorted(held), 1):
            unmounted = volumes.umount(dg, SHARED, mid)
            assert unmounted == (n == len(held))
            assert volumes.is_mounted(dg, SHARED) == (n < len(held))
        # every survivor is there, mounted as its worker left it, and has its data
        expected = set(survivors) | {SHARED}
        assert {v.name for v in dg.catalog.volumes()} == expected
        logs = {"a": b"before\nafter\n", "s": b"before\n"}
        for name, is_up in sorted(survivors.items()):
            assert volumes.is_mounted(dg, name) == is_up, name
            mp = dg.mountpoint(name) if is_up else volumes.mount(dg, name, "check")
            assert (mp / "data.bin").read_bytes() == payload(name)
            if name[-1] in logs:
                assert (mp / "during.log").read_bytes() == logs[name[-1]]
            if not is_up:
                assert volumes.umount(dg, name, "check")
        check_agree(env.root, dg)
    finally:
        dg.close()


# ------------------------------------------------------------------ races


def make_one(config: Config, name: str, barrier: Any) -> str:
    dg = diskgroup.open_dg(config, DG)
    try:
        barrier.wait(timeout=60)
        try:
            volumes.make(dg, name, "100m", fstype="ext4")
        except Exception as exc:
            return type(exc).__name__
        return "ok"
    finally:
        dg.close()


def test_same_name_race(env: Any, dg: DiskGroup) -> None:
    dg.close()
    for r in range(4):
        barrier = ctx.Barrier(2)
        got = run_all([(make_one, (env.config, f"race{r}", barrier))] * 2)
        assert sorted(got) == ["AlreadyExists", "ok"], got
    # and through the CLI: exit 0 for one, 4 (AlreadyExists) for the other
    full_env = {**os.environ, "VERITAS_CONFIG": str(env.config_path)}
    for r in range(3):
        procs = [subprocess.Popen(["python3", "-m", "storage.cli", "vol", "make", "-g", DG, f"clirace{r}", "100m",
                                   "fstype=ext4"], cwd=Path(__file__).resolve().parents[2], env=full_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 4], outs
        assert any("already exists" in err for _out, err in outs), outs
    g = diskgroup.open_dg(env.config, DG)
    try:
        assert sorted(v.name for v in g.catalog.volumes()) == [*(f"clirace{r}" for r in range(3)),
                                                               *(f"race{r}" for r in range(4))]
        check_agree(env.root, g)
    finally:
        g.close()


FILL_SIZE = 100 * MiB


def filler(config: Config, k: int, barrier: Any) -> int:
    """Make volumes until no disk has room for another; returns how many this process made."""
    dg = diskgroup.open_dg(config, DG)
    made = 0
    try:
        barrier.wait(timeout=60)
        for i in range(60):
            try:
                volumes.make(dg, f"fill{k}-{i}", FILL_SIZE, fstype="ext4")
                made += 1
            except NoSpace:
                if max(dg.free().values()) < FILL_SIZE:
                    return made
        raise AssertionError("the disk group never filled up")
    finally:
        dg.close()


def test_fill_race(env: Any) -> None:
    dg = env.make_dg(ndisks=2, size="1g")
    cap = dg.capacity()
    dg.close()
    barrier = ctx.Barrier(4)
    made = run_all([(filler, (env.config, k, barrier)) for k in range(4)])
    g = diskgroup.open_dg(env.config, DG)
    try:
        vols = g.catalog.volumes()
        assert len(vols) == sum(made)
        assert sum(made) == sum(c // FILL_SIZE for c in cap.values())  # it really filled up, and no further
        used = g.catalog.reserved()
        for disk, c in cap.items():
            assert used.get(disk, 0) <= c, f"disk {disk} over-committed: {used[disk]} > {c}"
            assert c - used.get(disk, 0) < FILL_SIZE
        # what the catalog reserved is what the images are
        for disk in cap:
            on_disk = sum(p.stat().st_size for p in (g.disk_dir(disk) / "vols").iterdir())
            assert on_disk == used.get(disk, 0) <= cap[disk]
        check_agree(env.root, g)
    finally:
        g.close()
