"""Fixtures for integration tests: a private state root, mount root and disk group on real loop devices.

Every test gets its own root under /tmp; teardown destroys what the test left and then fails the test
if any loop device, mount or btrfs registration under that root survived, so leaks cannot pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import diskgroup
from storage.config import Config, load_config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.kernel import loop, mounts

REPO = Path(__file__).resolve().parents[2]


# the host-engine checks of test_host_engine.py: one before every Docker test, one after them all
HOST_ENGINE_FIRST = "tests/integration/test_host_engine.py::test_host_engine_before_docker_tests"
HOST_ENGINE_LAST = "tests/integration/test_host_engine.py::test_host_engine_after_docker_tests"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    first = [i for i in items if i.nodeid.endswith(HOST_ENGINE_FIRST)]
    last = [i for i in items if i.nodeid.endswith(HOST_ENGINE_LAST)]
    items[:] = first + [i for i in items if i not in first and i not in last] + last


@pytest.fixture(autouse=True, scope="session")
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (loop devices, mounts, cgroups)")
    for tool in ("mkfs.xfs", "mkfs.btrfs", "losetup", "fsfreeze", "xfs_admin"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run the README's test command, which installs it")


@dataclass
class Env:
    root: Path
    config_path: Path
    config: Config

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the real ``veritas`` CLI (python -m storage.cli) against this environment's config."""
        full_env = {**os.environ, "VERITAS_CONFIG": str(self.config_path), **(env or {})}
        proc = subprocess.run(["python3", "-m", "storage.cli", *args], capture_output=True, text=True,
                              cwd=REPO, env=full_env, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"veritas {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def disk_image(self, name: str) -> Path:
        d = self.root / "disks"
        d.mkdir(exist_ok=True)
        return d / f"{name}.img"

    def make_dg(self, name: str = "testdg", ndisks: int = 3, size: str = "4g") -> DiskGroup:
        specs = [DiskSpec.parse(f"{self.disk_image(f'{name}-d{i}')}={size}") for i in range(1, ndisks + 1)]
        return diskgroup.init(self.config, name, specs)

    def open(self, name: str = "testdg") -> DiskGroup:
        return diskgroup.open_dg(self.config, name)


def write_config(root: Path, diskgroup: str = "testdg", disks: int = 3, disk_size: str = "4g") -> Path:
    path = root / "veritas.conf"
    path.write_text(
        "[storage]\n"
        f"diskgroup = {diskgroup}\n"
        f"state_root = {root}/state\n"
        f"mount_root = {root}/mnt\n"
        f"default_disk_size = {disk_size}\n"
        f"default_disk_count = {disks}\n"
        "[node]\nname = node1\n"
    )
    return path


def leaks(root: Path) -> list[str]:
    """Loop devices and mounts that still reference ``root``."""
    prefix = str(root) + "/"
    out = [f"loop {dev} -> {back}" for dev, back in loop.attached().items() if back.startswith(prefix)]
    out += [f"mount {e.target}" for e in mounts.table() if e.target.startswith(prefix)]
    return out


def assert_bench_left_nothing(stderr: str) -> None:
    """A benchmark run (its stderr given) removed its root and left no loop device or mount under it,
    without needing its forced clean-up."""
    m = re.search(r"\] root (/tmp/vbench-\S+)", stderr)
    assert m, f"bench did not log its root; stderr: {stderr[:2000]}"
    root = Path(m.group(1))
    assert not root.exists(), f"bench left its temp root {root} behind"
    assert leaks(root) == [], "bench left loop devices or mounts"
    assert "forced clean-up" not in stderr, "bench needed a forced clean-up: something was left"


def force_clean(root: Path) -> None:
    prefix = str(root) + "/"
    for e in sorted(mounts.table(), key=lambda e: -len(e.target)):
        if e.target.startswith(prefix):
            subprocess.run(["fsfreeze", "-u", e.target], capture_output=True, check=False)
            subprocess.run(["umount", "-l", e.target], capture_output=True, check=False)
    for dev, back in loop.attached().items():
        if back.startswith(prefix):
            subprocess.run(["btrfs", "device", "scan", "--forget", dev], capture_output=True, check=False)
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def finish(config: Config, root: Path) -> None:
    """Destroy every disk group under ``root``, then fail the test if anything leaked or failed."""
    problems = destroy_all(config)
    left = leaks(root)
    force_clean(root)
    shutil.rmtree(root, ignore_errors=True)
    if problems or left:
        pytest.fail("teardown found leaks or failures: " + "; ".join(problems + left))


def destroy_all(config: Config) -> list[str]:
    """Destroy every disk group of ``config`` (volumes and all); what failed, as messages."""
    problems: list[str] = []
    for name in diskgroup.list_names(config):
        try:
            dg = diskgroup.DiskGroup(config, name)
            dg.catalog.set_imported(config.node)  # a test may have deported it
            dg.close()
            dg = diskgroup.open_dg(config, name)
            for v in dg.catalog.volumes():
                for m in dg.catalog.mounts(v.name):
                    dg.catalog.remove_mount(v.name, m.node, m.mount_id)
            diskgroup.destroy(dg, force=True)
        except Exception as exc:  # teardown must go on and report
            problems.append(f"destroying {name}: {exc}")
    return problems


@pytest.fixture
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="vtest-", dir="/tmp"))
    path = write_config(root)
    e = Env(root, path, load_config(path))
    try:
        yield e
    finally:
        finish(e.config, root)


@pytest.fixture
def zram_devices() -> Iterator[Callable[[int, str], list[Path]]]:
    """A maker of real block devices: ``zram_devices(n, size)`` adds ``n`` zram devices of ``size``
    (``1G``) and gives their /dev paths. At teardown exactly the numbers added are removed; one that
    cannot be removed (still held) or is still there fails the test."""
    from tests.integration.zram import ZramPool

    pool = ZramPool()
    try:
        yield lambda n, size: [pool.add(size) for _ in range(n)]
    finally:
        problems = pool.remove_all()
        problems += [f"{d} left behind" for d in pool.left() if not any(d in p for p in problems)]
        if problems:
            pytest.fail("zram teardown: " + "; ".join(problems))


@pytest.fixture
def block_env(zram_devices: Callable[[int, str], list[Path]]) -> Iterator[Env]:
    """``env`` for tests on zram devices: torn down (disk groups destroyed, leaks checked) before the
    devices are removed, which the dependency on ``zram_devices`` orders."""
    root = Path(tempfile.mkdtemp(prefix="vtest-", dir="/tmp"))
    path = write_config(root)
    e = Env(root, path, load_config(path))
    try:
        yield e
    finally:
        finish(e.config, root)


@pytest.fixture
def dg(env: Env) -> Iterator[DiskGroup]:
    """A 3-disk group of 4 GiB sparse image disks."""
    g = env.make_dg()
    try:
        yield g
    finally:
        g.close()


@pytest.fixture(scope="session")
def host_engine():  # returns a hostengine.HostState
    """The machine's own engine, started (and left running) if none runs; its state before any
    Docker test, which the tests must leave as it is (tests/integration/test_host_engine.py)."""
    from tests.integration import hostengine

    if not hostengine.host_engine_answers():
        hostengine.start_host_engine()
    return hostengine.recorded_state()


@dataclass
class Stack:
    """A Docker engine, the veritas plugin serving it, and the storage environment behind the plugin."""

    env: Env
    node: object
    plugin: object

    def docker(self):  # returns a docker.DockerClient
        return self.node.client()  # type: ignore[attr-defined]


@pytest.fixture
def stack() -> Iterator[Stack]:
    """dockerd (own namespace) + ``veritas plugin serve`` on a fresh default disk group; all torn down."""
    from tests.integration.dockerstack import (
        DockerNode,
        PluginProcess,
        share_mount_root,
        unshare_mount_root,
        write_plugin_config,
    )

    root = Path(tempfile.mkdtemp(prefix="vdock-", dir="/tmp"))
    node = DockerNode(root / "node1")
    path = write_plugin_config(root, node)
    plugin = PluginProcess(path, node.plugins / "veritas.sock", root / "plugin.log")
    env = Env(root, path, load_config(path))
    try:  # a start that fails half-way still ends the engine and drops the shared mount root
        share_mount_root(root / "mnt")  # before the node's namespace is made, or it never sees volume mounts
        node.start()
        plugin.start()
        yield Stack(env, node, plugin)
    finally:
        node.stop()
        plugin.stop()
        unshare_mount_root(root / "mnt")
        finish(env.config, root)
