"""storage.qos against fake cgroup trees (no kernel): file formats, parsing, discovery, path checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import qos
from storage.errors import InvalidArgument

V1_READ, V1_WRITE = "blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device"


def _v1_cgroup(path: Path, write: str = "", read: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / V1_READ).write_text(read)
    (path / V1_WRITE).write_text(write)
    return path


def _v2_cgroup(path: Path, iomax: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "io.max").write_text(iomax)
    (path / "cgroup.controllers").write_text("io\n")
    return path


@pytest.fixture
def v1(tmp_path: Path) -> qos.Hierarchy:
    _v1_cgroup(tmp_path)
    return qos.Hierarchy(tmp_path, 1)


@pytest.fixture
def v2(tmp_path: Path) -> qos.Hierarchy:
    _v2_cgroup(tmp_path)
    return qos.Hierarchy(tmp_path, 2)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every (file name, text) written through Path.write_text, in order (a kernel file takes one rule per
    write and keeps the others, which a plain file cannot show)."""
    seen: list[tuple[str, str]] = []
    real = Path.write_text

    def spy(self: Path, data: str, *args: object, **kwargs: object) -> int:
        seen.append((self.name, data))
        return real(self, data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", spy)
    return seen


# ------------------------------------------------------------------ set_limit


def test_v2_set_limit_writes_riops_and_wiops(v2: qos.Hierarchy) -> None:
    qos.set_limit(v2, v2.root, [(7, 3)], 100)
    assert (v2.root / "io.max").read_text() == "7:3 riops=100 wiops=100\n"


def test_v2_zero_writes_max(v2: qos.Hierarchy) -> None:
    qos.set_limit(v2, v2.root, [(7, 3)], 0)
    assert (v2.root / "io.max").read_text() == "7:3 riops=max wiops=max\n"


def test_v2_one_line_per_device(v2: qos.Hierarchy, writes: list[tuple[str, str]]) -> None:
    qos.set_limit(v2, v2.root, [(7, 3), (7, 12)], 250)
    assert writes == [("io.max", "7:3 riops=250 wiops=250\n"), ("io.max", "7:12 riops=250 wiops=250\n")]


def test_v1_set_limit_writes_read_and_write_files(v1: qos.Hierarchy) -> None:
    qos.set_limit(v1, v1.root, [(7, 3)], 100)
    assert (v1.root / V1_WRITE).read_text() == "7:3 100\n"
    assert (v1.root / V1_READ).read_text() == "7:3 100\n"


def test_v1_zero_writes_zero(v1: qos.Hierarchy) -> None:
    """Under v1, writing 0 is how a rule is removed."""
    qos.set_limit(v1, v1.root, [(7, 3)], 0)
    assert (v1.root / V1_WRITE).read_text() == "7:3 0\n"
    assert (v1.root / V1_READ).read_text() == "7:3 0\n"


def test_v1_every_device_both_files(v1: qos.Hierarchy, writes: list[tuple[str, str]]) -> None:
    qos.set_limit(v1, v1.root, [(7, 3), (7, 4)], 42)
    assert sorted(writes) == sorted([(V1_READ, "7:3 42\n"), (V1_WRITE, "7:3 42\n"),
                                     (V1_READ, "7:4 42\n"), (V1_WRITE, "7:4 42\n")])


def test_set_limit_in_child_cgroup(v1: qos.Hierarchy) -> None:
    child = _v1_cgroup(v1.root / "docker" / "abc")
    qos.set_limit(v1, child, [(7, 9)], 300)
    assert (child / V1_WRITE).read_text() == "7:9 300\n"
    assert (v1.root / V1_WRITE).read_text() == ""


@pytest.mark.parametrize("version", [1, 2])
def test_negative_iops_refused(tmp_path: Path, version: int, writes: list[tuple[str, str]]) -> None:
    if version == 1:
        _v1_cgroup(tmp_path)
    else:
        _v2_cgroup(tmp_path)
    h = qos.Hierarchy(tmp_path, version)
    writes.clear()
    with pytest.raises(InvalidArgument):
        qos.set_limit(h, tmp_path, [(7, 3)], -1)
    assert writes == []


# ------------------------------------------------------------------ limits


def test_v1_limits_parses_lines(v1: qos.Hierarchy) -> None:
    (v1.root / V1_WRITE).write_text("7:3 100\n7:12 300\n8:0 5000\n")
    assert qos.limits(v1, v1.root) == {"7:3": 100, "7:12": 300, "8:0": 5000}


def test_v1_limits_reads_the_write_file_only(v1: qos.Hierarchy) -> None:
    (v1.root / V1_READ).write_text("7:3 100\n")
    assert qos.limits(v1, v1.root) == {}


def test_v1_limits_empty_and_missing(v1: qos.Hierarchy, tmp_path: Path) -> None:
    assert qos.limits(v1, v1.root) == {}
    assert qos.limits(v1, tmp_path / "gone") == {}


def test_v1_limits_skips_malformed_lines(v1: qos.Hierarchy) -> None:
    (v1.root / V1_WRITE).write_text("garbage\n7:3 abc\n\n7:4 10\n")
    assert qos.limits(v1, v1.root) == {"7:4": 10}


def test_v2_limits_parses_io_max(v2: qos.Hierarchy) -> None:
    (v2.root / "io.max").write_text(
        "7:3 rbps=max wbps=max riops=100 wiops=100\n"
        "7:4 rbps=max wbps=max riops=50 wiops=max\n"
        "8:0 rbps=1000000 wbps=max riops=max wiops=700\n"
    )
    assert qos.limits(v2, v2.root) == {"7:3": 100, "8:0": 700}


def test_v2_limits_missing_file(v2: qos.Hierarchy, tmp_path: Path) -> None:
    assert qos.limits(v2, tmp_path / "nope") == {}


def test_roundtrip_v1_and_v2(tmp_path: Path) -> None:
    h1 = qos.Hierarchy(_v1_cgroup(tmp_path / "one"), 1)
    qos.set_limit(h1, h1.root, [(7, 5)], 123)
    assert qos.limits(h1, h1.root) == {"7:5": 123}
    h2 = qos.Hierarchy(_v2_cgroup(tmp_path / "two"), 2)
    qos.set_limit(h2, h2.root, [(7, 5)], 123)
    assert qos.limits(h2, h2.root) == {"7:5": 123}
    qos.set_limit(h2, h2.root, [(7, 5)], 0)
    assert qos.limits(h2, h2.root) == {}


# ------------------------------------------------------------------ cgroups_limiting


def test_v1_cgroups_limiting_finds_exactly_those(v1: qos.Hierarchy) -> None:
    root = v1.root
    (root / V1_WRITE).write_text("7:3 100\n")
    a = _v1_cgroup(root / "docker" / "a", write="7:3 100\n")
    _v1_cgroup(root / "docker" / "b", write="7:4 100\n")  # another device
    c = _v1_cgroup(root / "docker" / "c", write="8:0 10\n7:5 100\n")
    _v1_cgroup(root / "docker" / "d", read="7:3 100\n")  # read limit only: not a write limit
    _v1_cgroup(root / "other")  # no limits at all
    (root / "plain-dir").mkdir()  # no files at all
    found = qos.cgroups_limiting(v1, [(7, 3), (7, 5)])
    assert sorted(found) == sorted([root, a, c])
    assert qos.cgroups_limiting(v1, [(7, 99)]) == []
    assert qos.cgroups_limiting(v1, []) == []


def test_v2_cgroups_limiting_finds_exactly_those(v2: qos.Hierarchy) -> None:
    root = v2.root
    a = _v2_cgroup(root / "system.slice" / "docker-a.scope", "7:3 rbps=max wbps=max riops=100 wiops=100\n")
    _v2_cgroup(root / "system.slice" / "docker-b.scope", "7:4 rbps=max wbps=max riops=100 wiops=100\n")
    _v2_cgroup(root / "system.slice" / "docker-c.scope", "7:3 rbps=max wbps=max riops=max wiops=max\n")
    assert qos.cgroups_limiting(v2, [(7, 3)]) == [a]


# ------------------------------------------------------------------ resolve


def test_resolve_relative_and_absolute(v1: qos.Hierarchy) -> None:
    child = _v1_cgroup(v1.root / "docker" / "abc")
    assert v1.resolve("docker/abc") == child
    assert v1.resolve(child) == child
    assert v1.resolve(str(child)) == child
    assert v1.resolve(v1.root) == v1.root
    assert v1.resolve(".") == v1.root


@pytest.mark.parametrize("bad", ["/etc", "/", "..", "../x", "docker/../../x", "/sys/fs/cgroup/blkio"])
def test_resolve_refuses_paths_outside_root(v1: qos.Hierarchy, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        v1.resolve(bad)


def test_resolve_refuses_sibling_with_common_prefix(tmp_path: Path) -> None:
    root = _v1_cgroup(tmp_path / "blkio")
    sibling = _v1_cgroup(tmp_path / "blkio-evil")
    h = qos.Hierarchy(root, 1)
    with pytest.raises(InvalidArgument):
        h.resolve(sibling)


def test_resolve_refuses_symlink_escaping_root(v2: qos.Hierarchy, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (v2.root / "link").symlink_to(outside)
    with pytest.raises(InvalidArgument):
        v2.resolve("link")


# ------------------------------------------------------------------ writeback


def test_apply_writeback_v1_limits_root(v1: qos.Hierarchy) -> None:
    qos.apply_writeback(v1, [(7, 3)], 100)
    assert qos.limits(v1, v1.root) == {"7:3": 100}


def test_apply_writeback_v2_does_nothing(v2: qos.Hierarchy) -> None:
    qos.apply_writeback(v2, [(7, 3)], 100)
    assert (v2.root / "io.max").read_text() == ""


def test_cgroup_of_pid_reads_proc_for_each_hierarchy_version(tmp_path):
    import os

    lines = Path(f"/proc/{os.getpid()}/cgroup").read_text().splitlines()
    blkio = next((ln.split(":", 2)[2] for ln in lines if "blkio" in ln.split(":", 2)[1].split(",")), None)
    unified = next((ln.split(":", 2)[2] for ln in lines if ln.split(":", 2)[1] == ""), None)
    v1 = qos.cgroup_of_pid(qos.Hierarchy(tmp_path, 1), os.getpid())
    v2 = qos.cgroup_of_pid(qos.Hierarchy(tmp_path, 2), os.getpid())
    assert v1 == (tmp_path / blkio.lstrip("/") if blkio is not None else None)
    assert v2 == (tmp_path / unified.lstrip("/") if unified is not None else None)
    assert qos.cgroup_of_pid(qos.Hierarchy(tmp_path, 1), 2**22 + 7) is None  # no such process
