"""Fixtures of the fast unit tests: a disk group on the in-memory store and the fake kernel."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import diskgroup
from storage.catalog.memory_store import MemoryStore
from storage.config import Config
from storage.diskgroup import DiskGroup, DiskSpec
from storage.units import GiB
from tests.unit.fakekernel import FakeKernel, install, kill_at

DG = "fastdg"


@dataclass
class World:
    """Everything a fast test runs on: the fake kernel, the memory store, the config, the disk group."""

    kernel: FakeKernel
    store: MemoryStore
    config: Config
    dg: DiskGroup

    def state(self) -> object:
        """What an operation may change: catalog rows, loop devices, mounts, image files."""
        cat = self.dg.catalog
        files = sorted(str(p) for p in (self.config.dg_parent / DG).glob("disks/*/vols/*"))
        return (cat.volumes(), cat.subdisks(), cat.mounts(), cat.intents(), cat.disks(),
                sorted(self.kernel.attached().items()), self.kernel.table(), files)

    def vol_loops(self) -> list[str]:
        """Loop devices on volume images (the disks' own devices stay attached while imported)."""
        return sorted(d for d, back in self.kernel.attached().items() if "/vols/" in back)

    def kill_at(self, monkeypatch: pytest.MonkeyPatch, point: str, op: Callable[[DiskGroup], object]) -> None:
        """Run ``op`` on the disk group until crash point ``point`` and kill it there (see fakekernel)."""
        kill_at(monkeypatch, point, lambda: op(self.dg), self.store.abandon)

    def reopen(self) -> DiskGroup:
        """Open the disk group again, as the next process would (recovering what a dead one left)."""
        return diskgroup.open_dg(self.config, DG, self.kernel, store=self.store)

    def reopen_without_recovery(self) -> DiskGroup:
        return diskgroup.open_dg(self.config, DG, self.kernel, recover=False, store=self.store)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    kernel = install(monkeypatch)
    store = MemoryStore()
    (tmp_path / "disks").mkdir()
    config = Config(diskgroup=DG, state_root=tmp_path / "state", mount_root=tmp_path / "mnt", node="node1",
                    default_disk_size=2 * GiB, default_disk_count=2)
    specs = [DiskSpec(tmp_path / "disks" / f"d{i}.img", 2 * GiB) for i in (1, 2, 3, 4)]
    dg = diskgroup.init(config, DG, specs, runner=kernel, store=store)
    yield World(kernel, store, config, dg)
    dg.close()
