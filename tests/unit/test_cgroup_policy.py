"""Which cgroup a container's IOPS limit goes to (storage.qos.container_cgroup), and the plugin's use of it
to make and remove the cgroups Mount makes ahead of a container's start (fake cgroup trees, no kernel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from plugin import driver as plugin_driver
from plugin.docker_api import ContainerUse, Engine
from storage import qos
from storage.config import Config
from storage.errors import InvalidArgument

CID = "0123456789abcdef" * 4


@pytest.mark.parametrize(("parent", "want"), [
    (None, f"docker/{CID}"), ("", f"docker/{CID}"), ("custom", f"custom/{CID}"),
    ("/my/parent/", f"my/parent/{CID}"),
])
def test_a_container_cgroup_is_its_parent_or_docker_then_its_id(parent: str | None, want: str) -> None:
    assert qos.container_cgroup(parent, CID) == want


@pytest.mark.parametrize("cid", ["", ".", "..", "a/b", f"../{CID}"])
def test_an_id_that_is_not_one_path_component_is_refused(cid: str) -> None:
    with pytest.raises(InvalidArgument, match="container ID"):
        qos.container_cgroup(None, cid)


def test_the_cgroup_resolves_inside_the_hierarchy_and_a_parent_cannot_leave_it(tmp_path: Path) -> None:
    h = qos.Hierarchy(tmp_path, 2)
    assert h.resolve(qos.container_cgroup(None, CID)) == tmp_path / "docker" / CID
    with pytest.raises(InvalidArgument, match="not inside"):
        h.resolve(qos.container_cgroup("../..", CID))


@pytest.fixture
def v2_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake cgroup v2 hierarchy that Hierarchy.detect finds."""
    monkeypatch.setattr(qos, "V1_ROOT", tmp_path / "no-v1")
    monkeypatch.setattr(qos, "V2_ROOT", tmp_path)
    (tmp_path / "cgroup.controllers").write_text("io\n")
    return tmp_path


def test_release_prelimit_removes_the_cgroup_under_the_default_parent(v2_root: Path) -> None:
    (v2_root / "docker" / CID).mkdir(parents=True)
    assert plugin_driver.release_prelimit(CID)
    assert not (v2_root / "docker" / CID).exists() and (v2_root / "docker").is_dir()
    assert not plugin_driver.release_prelimit(CID)  # nothing left to remove
    assert not plugin_driver.release_prelimit("..")  # never a path outside the container's own


class _OneContainer:
    """An engine that knows one running container, which uses none of our volumes."""

    def inspect(self, container_id: str) -> ContainerUse | None:
        return ContainerUse(CID, "running", 4242, (), "elsewhere") if container_id == CID else None


def test_a_running_container_elsewhere_drops_the_cgroup_mount_made_ahead(v2_root: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (v2_root / "docker" / CID).mkdir(parents=True)
    (v2_root / "elsewhere" / CID).mkdir(parents=True)

    def cgroup_of_pid(h: qos.Hierarchy, pid: int) -> Path | None:
        return h.root / "elsewhere" / CID if pid == 4242 else None

    monkeypatch.setattr(qos, "cgroup_of_pid", cgroup_of_pid)
    drv = plugin_driver.Driver(cast(Config, None), cast(Engine, _OneContainer()))
    assert plugin_driver.apply_container_limits(drv, CID) == 0
    assert not (v2_root / "docker" / CID).exists()
    assert (v2_root / "elsewhere" / CID).is_dir()


def test_a_container_in_its_default_cgroup_keeps_it(v2_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (v2_root / "docker" / CID).mkdir(parents=True)
    monkeypatch.setattr(qos, "cgroup_of_pid", lambda h, pid: h.root / "docker" / CID)
    drv: Any = plugin_driver.Driver(cast(Config, None), cast(Engine, _OneContainer()))
    assert plugin_driver.apply_container_limits(drv, CID) == 0
    assert (v2_root / "docker" / CID).is_dir()
