"""Errors that used to be swallowed: a failed or partial btrfs rebalance, e2fsck exit codes of 4 and
above, a writeback limit that could not be dropped, output parsed in a foreign locale, and checks that
vanished under ``python -O``. Subprocesses are faked only where a real failure cannot be provoked."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from storage import qos, volumes
from storage.errors import CommandFailed, Degraded, FsckFailed, VeritasError
from storage.kernel import btrfs, fs, loop
from storage.runner import run

REPO = Path(__file__).resolve().parents[2]
DF_RAID1 = ("Data, RAID1: total=1073741824, used=25427968\nSystem, RAID1: total=8388608, used=16384\n"
            "Metadata, RAID1: total=268435456, used=131072\nGlobalReserve, single: total=3407872, used=0\n")


class FakeRunner:
    """Answers each command by its first words; records every call."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], *, check: bool = True,
                 timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        args = [str(a) for a in argv]
        self.calls.append(args)
        rc, out = next((v for k, v in self.answers.items() if tuple(args[:len(k)]) == k), (0, ""))
        if check and rc != 0:
            raise CommandFailed(args, rc, "failed")
        return subprocess.CompletedProcess(args, rc, out, "")


def test_failed_balance_raises() -> None:
    r = FakeRunner({("btrfs", "balance"): (1, "")})
    with pytest.raises(CommandFailed):
        btrfs.convert("raid1", Path("/mnt/x"), r)


def test_balance_leaving_single_chunks_raises_degraded() -> None:
    df = DF_RAID1 + "Data, single: total=8388608, used=4096\n"
    r = FakeRunner({("btrfs", "filesystem", "df"): (0, df)})
    with pytest.raises(Degraded, match="data in single"):
        btrfs.convert("raid1", Path("/mnt/x"), r)


def test_balance_that_restored_the_profile_passes() -> None:
    df = DF_RAID1 + "Data, single: total=0, used=0\n"  # an empty leftover allocates nothing
    r = FakeRunner({("btrfs", "filesystem", "df"): (0, df)})
    btrfs.convert("raid1", Path("/mnt/x"), r)
    assert [c[:3] for c in r.calls] == [["btrfs", "balance", "start"], ["btrfs", "filesystem", "df"]]


@pytest.mark.parametrize("rc", [4, 8, 12])
def test_e2fsck_exit_4_and_above_stops_a_resize(rc: int) -> None:
    r = FakeRunner({("e2fsck",): (rc, "")})
    with pytest.raises(FsckFailed):
        fs.grow("ext4", ["/dev/loop9"], None, r)
    assert [c[0] for c in r.calls] == ["e2fsck"], "resize2fs ran on a filesystem e2fsck could not fix"


@pytest.mark.parametrize("rc", [0, 1, 2])
def test_e2fsck_corrected_errors_are_fine(rc: int) -> None:
    r = FakeRunner({("e2fsck",): (rc, "")})
    fs.grow("ext4", ["/dev/loop9"], None, r)
    assert [c[0] for c in r.calls] == ["e2fsck", "resize2fs"]


def test_commands_run_in_the_c_locale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LC_MESSAGES", "de_DE.UTF-8")
    env = dict(line.split("=", 1) for line in run(["env"]).stdout.splitlines() if "=" in line)
    assert env.get("LC_ALL") == "C" and env.get("LANG") == "C"
    assert "LC_MESSAGES" not in env


def test_checks_survive_python_O() -> None:
    """Under -O a missing mount point must still be refused, not handed to xfs_growfs as 'None'."""
    code = ("import subprocess\n"
            "from storage.kernel import fs\n"
            "calls = []\n"
            "def r(argv, check=True, timeout=120.0):\n"
            "    calls.append(list(argv)); return subprocess.CompletedProcess(argv, 0, '', '')\n"
            "try:\n"
            "    fs.grow('xfs', ['/dev/loop9'], None, r)\n"
            "    print('ran', calls)\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "InvalidArgument", out


@pytest.fixture
def v1_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> qos.Hierarchy:
    for name in ("blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device"):
        (tmp_path / name).write_text("7:3 100\n")  # loop3 carries a leaked limit; loop4 none
    h = qos.Hierarchy(tmp_path, 1)
    monkeypatch.setattr(qos.Hierarchy, "detect", classmethod(lambda cls: h))
    monkeypatch.setattr(loop, "devnum", lambda dev: (7, int(dev.removeprefix("/dev/loop"))))
    return h


def test_dropping_a_writeback_limit_that_fails_raises(v1_root: qos.Hierarchy,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(h: qos.Hierarchy, cg: Path, devs: object, iops: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(qos, "set_limit", broken)
    with pytest.raises(VeritasError, match="cannot remove the IOPS limit"):
        volumes._drop_writeback(["/dev/loop3"])


def test_a_device_without_a_rule_is_nothing_to_drop(v1_root: qos.Hierarchy,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[object] = []
    monkeypatch.setattr(qos, "set_limit", lambda h, cg, devs, iops: written.append(devs))
    volumes._drop_writeback(["/dev/loop4"])
    assert written == []
    volumes._drop_writeback(["/dev/loop3", "/dev/loop4"])
    assert written == [[(7, 3)]]


def test_no_io_controller_is_nothing_to_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    def none(cls: type) -> qos.Hierarchy:
        raise VeritasError("no cgroup IO controller found")
    monkeypatch.setattr(qos.Hierarchy, "detect", classmethod(none))
    volumes._drop_writeback(["/dev/loop3"])
