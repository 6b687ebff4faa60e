"""Bad requests get a clear, typed error and change nothing: through the library and through the CLI.

After every refused request the catalog's volumes, the image files on the disks, the loop devices, the
mounts and the disk group's free space are exactly what they were before.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pytest

from storage import snapshots, volumes
from storage.errors import AlreadyExists, BadName, BadSize, InvalidArgument, NoSpace, NoSuchVolume, UnknownOption
from storage.kernel import loop, mounts


def state(env, dg) -> dict[str, object]:
    prefix = str(env.root) + "/"
    return {
        "volumes": [asdict(v) for v in dg.catalog.volumes()],
        "subdisks": dg.catalog.subdisks(),
        "intents": dg.catalog.intents(),
        "mounts": dg.catalog.mounts(),
        "images": sorted(str(p) for d in dg.catalog.disks() for p in (dg.disk_dir(d.name) / "vols").iterdir()),
        "loops": sorted(f"{dev}={b}" for dev, b in loop.attached().items() if b.startswith(prefix)),
        "kernel_mounts": sorted(e.target for e in mounts.table() if e.target.startswith(prefix)),
        "mount_root": sorted(p.name for p in env.config.mount_root.iterdir())
        if env.config.mount_root.exists() else [],
        "free": dg.free(),
    }


@pytest.fixture
def populated(env, dg):
    """The disk group with a volume v1 (mounted) and its snapshot s1, as bad requests meet it."""
    volumes.make(dg, "v1", "400m")
    snapshots.make(dg, "v1", "s1")
    volumes.mount(dg, "v1")
    yield dg
    volumes.umount(dg, "v1")


LONG = "x" * 65


def make_named(name, dg):
    return volumes.make(dg, name, "400m")


def snap_named(name, dg):
    return snapshots.make(dg, "v1", name)

BAD_NAMES = ["a/b", "..", "a..b", "has space", "-lead", LONG, ""]


# (id, library call, expected error, message pattern, CLI arguments)
CASES = [
    ("size-abc", lambda dg: volumes.make(dg, "n1", "abc"), BadSize, "invalid size 'abc'",
     ["vol", "make", "n1", "abc"]),
    ("size-zero", lambda dg: volumes.make(dg, "n1", "0"), BadSize, "greater than zero",
     ["vol", "make", "n1", "0"]),
    ("size-negative", lambda dg: volumes.make(dg, "n1", "-1g"), BadSize, "invalid size",
     ["vol", "make", "n1", "--", "-1g"]),
    ("size-two-dots", lambda dg: volumes.make(dg, "n1", "1.5.g"), BadSize, "invalid size",
     ["vol", "make", "n1", "1.5.g"]),
    ("size-too-big", lambda dg: volumes.make(dg, "n1", "100g"), NoSpace,
     r"layout concat needs 1 disk with 100 GiB free; the largest free space on a disk of testdg is 3\.\d GiB;",
     ["vol", "make", "n1", "100g"]),
    ("size-huge", lambda dg: volumes.make(dg, "n1", "100p"), NoSpace, "needs 1 disk with 100 PiB free; the largest",
     ["vol", "make", "n1", "100p"]),
    ("size-too-big-mirror", lambda dg: volumes.make(dg, "n1", "5g", layout="mirror"), NoSpace,
     r"needs 2 disks with 5 GiB free each; 0 disks of testdg have that much \(free: testdg0\d 3\.\d GiB, ",
     ["vol", "make", "n1", "5g", "layout=mirror"]),
    ("grow-too-big", lambda dg: volumes.grow(dg, "v1", "100g"), NoSpace,
     r"disk testdg0\d has [\d.]+ [KMGT]iB free, 100 GiB needed",
     ["vol", "grow", "v1", "100g"]),
    ("grow-bad-size", lambda dg: volumes.grow(dg, "v1", "1.5.g"), BadSize, "invalid size",
     ["vol", "grow", "v1", "1.5.g"]),
    ("unknown-layout", lambda dg: volumes.make(dg, "n1", "400m", layout="raid7"), UnknownOption,
     "unknown layout 'raid7'; valid layouts: concat, mirror, stripe",
     ["vol", "make", "n1", "400m", "layout=raid7"]),
    ("unknown-option", lambda dg: volumes.make(dg, "n1", "400m", colour="red"), UnknownOption,
     "unknown option.*colour.*valid options: size, layout, fstype, nmirror, ncol, maxiops, protect",
     ["vol", "make", "n1", "400m", "colour=red"]),
    ("bad-fstype", lambda dg: volumes.make(dg, "n1", "400m", fstype="zfs"), InvalidArgument, "fstype",
     ["vol", "make", "n1", "400m", "fstype=zfs"]),
    ("bad-nmirror", lambda dg: volumes.make(dg, "n1", "400m", layout="mirror", nmirror="two"),
     InvalidArgument, "nmirror", ["vol", "make", "n1", "400m", "layout=mirror", "nmirror=two"]),
    ("too-few-disks", lambda dg: volumes.make(dg, "n1", "400m", layout="stripe", ncol=4), NoSpace,
     "needs 4 disks.*3", ["vol", "make", "n1", "400m", "layout=stripe", "ncol=4"]),
    ("mirror4-on-3", lambda dg: volumes.make(dg, "n1", "400m", layout="mirror", nmirror=4), NoSpace,
     "needs 4 disks", ["vol", "make", "n1", "400m", "layout=mirror", "nmirror=4"]),
    ("raid5", lambda dg: volumes.make(dg, "n1", "400m", layout="raid5"), InvalidArgument, "layout=mirror",
     ["vol", "make", "n1", "400m", "layout=raid5"]),
    *[(f"vol-name-{i}", partial(make_named, n), BadName, "invalid volume name",
       ["vol", "make", "--", n, "400m"]) for i, n in enumerate(BAD_NAMES)],
    *[(f"snap-name-{i}", partial(snap_named, n), BadName,
       "invalid snapshot name", ["snap", "make", "--", "v1", n]) for i, n in enumerate(BAD_NAMES)],
    ("snap-missing-source", lambda dg: snapshots.make(dg, "nosuch", "s2"), NoSuchVolume, "nosuch",
     ["snap", "make", "nosuch", "s2"]),
    ("snap-bad-cachesize", lambda dg: snapshots.make(dg, "v1", "s2", "lots"), BadSize, "cachesize",
     ["snap", "make", "v1", "s2", "cachesize=lots"]),
    ("snap-unknown-option", lambda dg: None, None, "valid options: cachesize",
     ["snap", "make", "v1", "s2", "cache=1g"]),
    ("snap-bad-maxiops", lambda dg: snapshots.make(dg, "v1", "s2", maxiops="abc"), InvalidArgument,
     "option maxiops must be an integer, got 'abc'", ["snap", "make", "v1", "s2", "maxiops=abc"]),
    *[(f"set-maxiops-{i}", partial(volumes.set_maxiops, name="v1", iops=raw), InvalidArgument,
       "option maxiops must be", ["vol", "set", "v1", f"maxiops={raw}"])
      for i, raw in enumerate(("1_0", "\u0661\u0662", "-5", "abc", "99999999999"))],
    ("snap-cache-too-big", lambda dg: snapshots.make(dg, "v1", "s2", "1t"), InvalidArgument,
     r"cachesize 1 TiB is larger than the source volume \(400 MiB\)", ["snap", "make", "v1", "s2", "cachesize=1t"]),
    ("size-twice", lambda dg: None, None, "size given twice",
     ["vol", "make", "n1", "400m", "size=1g"]),
    ("dup-volume", lambda dg: volumes.make(dg, "v1", "400m"), AlreadyExists, "v1 already exists",
     ["vol", "make", "v1", "400m"]),
    ("dup-volume-named-like-snapshot", lambda dg: volumes.make(dg, "s1", "400m"), AlreadyExists,
     "s1 already exists", ["vol", "make", "s1", "400m"]),
    ("dup-snapshot", lambda dg: snapshots.make(dg, "v1", "s1"), AlreadyExists, "s1 already exists",
     ["snap", "make", "v1", "s1"]),
    ("snapshot-named-like-volume", lambda dg: snapshots.make(dg, "s1", "v1"), AlreadyExists,
     "v1 already exists", ["snap", "make", "s1", "v1"]),
    ("rm-missing", lambda dg: volumes.remove(dg, "nosuch"), NoSuchVolume, "no such volume: nosuch",
     ["vol", "rm", "nosuch"]),
    ("mount-missing", lambda dg: volumes.mount(dg, "nosuch"), NoSuchVolume, "no such volume: nosuch",
     ["vol", "mount", "nosuch"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_changes_nothing(env, populated, case):
    dg = populated
    _id, call, exc, pattern, argv = case
    before = state(env, dg)

    if exc is not None:
        with pytest.raises(exc, match=pattern) as info:
            call(dg)
        assert str(info.value).strip(), "error without a message"
        assert state(env, dg) == before

    proc = env.cli(*argv, check=False)
    assert proc.returncode != 0, f"veritas {' '.join(argv)} succeeded: {proc.stdout}"
    if exc is not None:
        assert proc.returncode == exc.exit_code
    assert proc.stderr.startswith("veritas: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert re.search(pattern, proc.stderr), (pattern, proc.stderr)
    assert proc.stdout == ""
    assert state(env, dg) == before


def test_state_helper_sees_changes(env, populated):
    """The comparison above is not vacuous: a successful request shows up in every part of it."""
    dg = populated
    before = state(env, dg)
    volumes.make(dg, "n1", "400m")
    after = state(env, dg)
    for key in ("volumes", "subdisks", "images", "free"):
        assert after[key] != before[key], key
    volumes.mount(dg, "n1")
    mounted = state(env, dg)
    for key in ("loops", "kernel_mounts", "mounts", "mount_root"):
        assert mounted[key] != after[key], key
    volumes.umount(dg, "n1")
    volumes.remove(dg, "n1")
    assert state(env, dg) == before


def test_error_names_valid_options_and_layouts(env, populated):
    proc = env.cli("vol", "make", "n1", "400m", "colour=red", check=False)
    for opt in ("size", "layout", "fstype", "nmirror", "ncol", "maxiops", "protect"):
        assert opt in proc.stderr
    proc = env.cli("vol", "make", "n1", "400m", "layout=raid7", check=False)
    for layout in ("concat", "mirror", "stripe", "mirror-stripe", "auto"):
        assert layout in proc.stderr
    assert Path(env.config.mount_root / "n1_testdg").exists() is False
