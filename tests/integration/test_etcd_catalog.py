"""The plugin stack with ``[cluster] catalog = etcd``: Docker creates, mounts (a container writes and
reads back) and removes a volume, with the catalog and locks in a real etcd and the disks, images and
mounts under the state root as ever."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.catalog.etcd_store import EtcdStore
from storage.config import load_config
from tests.integration.conftest import Env, Stack, finish
from tests.integration.dockerstack import IMAGE

RUN = ("run", "--rm", "--network", "none")


@pytest.fixture
def etcd_stack(etcd_server) -> Iterator[Stack]:
    """``stack`` (tests/integration/conftest.py) with the catalog on the session's etcd."""
    from tests.integration.dockerstack import (
        DockerNode,
        PluginProcess,
        share_mount_root,
        unshare_mount_root,
        write_plugin_config,
    )

    root = Path(tempfile.mkdtemp(prefix="vdock-", dir="/tmp"))
    node = DockerNode(root / "node1")
    cluster = f"[cluster]\ncatalog = etcd\netcd_endpoints = {etcd_server.endpoint}\n"
    path = write_plugin_config(root, node, extra=cluster)
    plugin = PluginProcess(path, node.plugins / "veritas.sock", root / "plugin.log")
    env = Env(root, path, load_config(path))
    try:
        share_mount_root(root / "mnt")
        node.start()
        plugin.start()
        yield Stack(env, node, plugin)
    finally:
        node.stop()
        plugin.stop()
        unshare_mount_root(root / "mnt")
        finish(env.config, root)  # destroys the disk group through the etcd store, then checks for leaks


def test_docker_volume_lifecycle_on_the_etcd_catalog(etcd_stack: Stack, etcd_server) -> None:
    stack, node = etcd_stack, etcd_stack.node
    t0 = time.monotonic()
    assert node.cli("volume", "create", "-d", "veritas", "--name", "etcdvol").stdout.strip() == "etcdvol"
    created = time.monotonic() - t0
    out = node.cli(*RUN, "-v", "etcdvol:/vol", IMAGE, "sh", "-c",
                   "echo from-etcd > /vol/f && cat /vol/f && grep ' /vol ' /proc/self/mountinfo").stdout
    ran = time.monotonic() - t0 - created
    assert out.startswith("from-etcd\n") and " xfs " in out  # the volume's own filesystem, not a directory
    assert node.cli(*RUN, "-v", "etcdvol:/vol", IMAGE, "cat", "/vol/f").stdout == "from-etcd\n"

    # the catalog is in etcd, not in a SQLite file under the state root; the disks are under the root
    cfg = stack.env.config
    assert not list(cfg.dg_parent.glob("*/catalog.db*"))
    assert list((cfg.dg_parent / "dockerdg" / "disks").iterdir())
    store = EtcdStore([etcd_server.endpoint])
    try:
        assert store.names() == ["dockerdg"]
        cat = store.open("dockerdg")
        assert [v.name for v in cat.volumes()] == ["etcdvol"] and cat.mounts() == [] and cat.intents() == []
    finally:
        store.close()

    node.cli("volume", "rm", "etcdvol")
    assert "etcdvol" not in node.cli("volume", "ls", "-q").stdout.split()
    assert not (cfg.mount_root / "etcdvol_dockerdg").is_mount()
    print(f"etcd catalog: docker volume create {created * 1000:.0f} ms, run with it {ran * 1000:.0f} ms")
