"""Recovery of a checkpoint take killed while its volumes were frozen, on the fake kernel: it thaws
what the take froze, identified by the mount's device, and leaves alone a filesystem someone else
mounted and froze at the same path meanwhile."""

from __future__ import annotations

import dataclasses

import pytest

from storage import volumes
from storage.replication import checkpoint
from tests.unit.conftest import World

RVG = "rvg1"


def _killed_while_frozen(world: World, monkeypatch: pytest.MonkeyPatch) -> str:
    volumes.make(world.dg, "v1", "400m")
    volumes.mount(world.dg, "v1", "m1")
    target = str(world.dg.mountpoint("v1"))
    world.kill_at(monkeypatch, "repl.ckpt.frozen", lambda dg: checkpoint.take(dg, RVG, ["v1"]))
    assert target in world.kernel.frozen
    return target


def test_recover_thaws_what_the_killed_take_froze(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _killed_while_frozen(world, monkeypatch)
    done = checkpoint.recover(world.reopen(), RVG)
    assert f"thawed {target}" in done, done
    assert world.kernel.frozen == set()
    assert checkpoint.list_checkpoints(world.dg, RVG) == []


def test_recover_leaves_another_filesystem_at_the_path_frozen(world: World,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = _killed_while_frozen(world, monkeypatch)
    k = world.kernel
    volumes.make(world.dg, "other", "400m")
    volumes.mount(world.dg, "other", "m1")
    assert k(["umount", target]).returncode == 0  # the administrator unmounted v1, then
    theirs = next(m for m in k.mounted if m.entry.target == str(world.dg.mountpoint("other")))
    k.mounted.append(dataclasses.replace(theirs, entry=dataclasses.replace(theirs.entry, target=target)))
    assert k(["fsfreeze", "--freeze", target]).returncode == 0  # mounted another there and froze it
    done = checkpoint.recover(world.reopen(), RVG)
    assert not [d for d in done if d.startswith("thawed")], done
    assert any(d.startswith("left alone") and target in d for d in done), done
    assert target in k.frozen, "recover thawed a filesystem the take had not frozen"
    assert not (checkpoint.meta_dir(world.dg, RVG) / "frozen.json").exists()
