"""Role changes between two replication sites on one machine (tests/integration/twosites.py): a DR drill
(the primary's service SIGKILLed and its site treated as gone, takeover, writes on the new primary,
fast-failback of the old one sending only changed extents, migrate back with nothing lost), a
secondary's volumes refusing mount and make, a migrate that fails half-way rolled back on both sites,
and bad input refused with nothing changed."""

from __future__ import annotations

import json
import os
import signal

import pytest

from plugin.app import create_app
from plugin.driver import Driver
from storage import volumes
from storage.diskgroup import DiskGroup
from storage.errors import SecondaryVolume
from storage.replication import checkpoint, rvg
from storage.replication.apply import Replica
from tests.integration.conftest import Env
from tests.integration.twosites import (
    RVG,
    Site,
    digest,
    live,
    poll,
    replicating_pair,
    status,
    synced_pair,
    write_marker,
)
from tests.integration.twosites import sites as sites_fixture

sites = sites_fixture
SIZE = 320 << 20


def js(p: object) -> dict[str, object]:
    return dict(json.loads(p.stdout))  # type: ignore[attr-defined]


def refused_on_secondary(dg: DiskGroup) -> None:
    with pytest.raises(SecondaryVolume, match="secondary of RVG rvg1"):
        volumes.mount(dg, "v1")
    with pytest.raises(SecondaryVolume):
        volumes.make(dg, "v1", "320m", fstype="xfs")
    assert dg.catalog.volume("v1") is None, "no local volume of the secondary's name appears"


def test_dr_drill_takeover_fbsync_then_migrate_back(sites: tuple[Site, Site]) -> None:
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        replicating_pair(a, b, dga)
        refused_on_secondary(dgb)
        mnt = volumes.mount(dga, "v1")
        before = write_marker(mnt, "before")
        seq0, _ = synced_pair(a, b, dga, dgb)
        poll("a checkpoint after the write to reach B", lambda: Replica(rvg.replica_root(dgb, RVG), RVG).seq > seq0 + 1,
             15)

        # the primary site goes: its service SIGKILLed, its volume left as it was (still mounted here)
        a.kill(a.procs[-1], signal.SIGKILL)
        rep = Replica(rvg.replica_root(dgb, RVG), RVG)
        last = rep.seq
        want = digest(rep.image("v1.0"))
        assert digest(checkpoint.get(dga, RVG, last).path(dga, checkpoint.get(dga, RVG, last).image("v1.0"))) == want, \
            "the old primary keeps the checkpoint the secondary holds (the common one)"
        lost = write_marker(mnt, "lost")  # written on A after the split: fast-failback discards it

        out = js(b.cli("rvg", "takeover", RVG))
        assert out["seq"] == last and rvg.get(dgb, RVG).role == "primary"
        assert digest(live(dgb)) == want, "the new primary's data is exactly the last consistent checkpoint"
        mntb = volumes.mount(dgb, "v1")  # beside A's mount of the same filesystem: its own UUID now
        assert (mntb / "before").read_bytes() == before and not (mntb / "lost").exists()
        on_b = os.urandom(1 << 20)
        (mntb / "on-b").write_bytes(on_b)
        os.sync()
        st = status(b)
        assert st["role"] == "primary" and st["common_seq"] == last

        # the old site returns (its volume no longer mounted), and is failed back
        volumes.umount(dga, "v1")
        a.serve(port=int(a.addr.rsplit(":", 1)[1]))
        fb = js(b.cli("rvg", "fbsync", RVG))
        sent, changed = int(str(fb["bytes_sent"])), int(str(fb["changed_bytes"]))
        print(f"fbsync: {sent} bytes sent, {changed} changed ({fb['changed_here']} on B, {fb['changed_there']}"
              f" on A), volume {SIZE}")
        assert int(str(fb["changed_there"])) >= len(lost) and int(str(fb["changed_here"])) >= len(on_b)
        assert sent <= 1.2 * changed + (64 << 10), "fast-failback sends the changed extents, not more"
        assert sent < SIZE // 20 and changed < 8 << 20, "never a full copy: 1 MiB written on B, 64 KiB on A, and logs"
        assert rvg.get(dga, RVG).role == "secondary" and rvg.get(dgb, RVG).common_seq == 0
        refused_on_secondary(dga)
        synced_pair(b, a, dgb, dga)  # replication B -> A goes on

        # migrate back: no data lost
        volumes.umount(dgb, "v1")
        mig = js(b.cli("rvg", "migrate", RVG, a.addr))
        assert rvg.get(dga, RVG).role == "primary" and rvg.get(dgb, RVG).role == "secondary"
        assert digest(live(dga)) == digest(Replica(rvg.replica_root(dgb, RVG), RVG).image("v1.0"))
        assert Replica(rvg.replica_root(dgb, RVG), RVG).seq >= int(str(mig["seq"]))
        refused_on_secondary(dgb)
        mnt = volumes.mount(dga, "v1")
        assert (mnt / "on-b").read_bytes() == on_b and (mnt / "before").read_bytes() == before
        assert not (mnt / "lost").exists()
        synced_pair(a, b, dga, dgb)
    finally:
        dga.close()
        dgb.close()


def test_bad_input_and_a_failed_migrate_change_nothing(sites: tuple[Site, Site]) -> None:
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        replicating_pair(a, b, dga)
        synced_pair(a, b, dga, dgb)

        def state() -> tuple[object, ...]:
            return (rvg.get(dga, RVG), rvg.get(dgb, RVG), dgb.catalog.volume("v1"),
                    [c.seq for c in checkpoint.list_checkpoints(dgb, RVG)])
        for site, args, code, msg in (
                (b, ("takeover", "nosuch"), 3, "no such RVG: nosuch"),
                (b, ("fbsync", "nosuch"), 3, "no such RVG: nosuch"),
                (a, ("takeover", RVG), 2, "already primary on this site"),
                (a, ("fbsync", RVG), 11, "no checkpoint in common"),
                (b, ("fbsync", RVG), 2, "secondary on this site"),
                (b, ("migrate", RVG, a.addr), 2, "secondary on this site"),
                (a, ("migrate", RVG, "127.0.0.1:1"), 2, "is not RVG rvg1's secondary"),
                (a, ("migrate", RVG, "nonsense"), 2, "is not HOST:PORT"),
                (b, ("takeover", RVG), 5, "answers: use migrate")):
            before = state()
            p = site.cli("rvg", *args, check=False)
            assert p.returncode == code and msg in p.stderr, (args, p.returncode, p.stderr)
            assert state() == before, args

        volumes.mount(dga, "v1")
        before = state()
        p = a.cli("rvg", "migrate", RVG, b.addr, check=False)
        assert p.returncode == 5 and "mounted on this site" in p.stderr and state() == before
        volumes.umount(dga, "v1")
        a.cli("rvg", "pauserep", RVG)
        before = state()
        p = a.cli("rvg", "migrate", RVG, b.addr, check=False)
        assert p.returncode == 11 and "not kept up to date" in p.stderr and state() == before
        a.cli("rvg", "resumerep", RVG)

        # a failure on the old primary's half, after the new one was promoted: both rolled back
        p = a.cli("rvg", "migrate", RVG, b.addr, check=False, env={"VERITAS_FAIL_AT": "role.demote.replica"})
        assert p.returncode != 0 and "failure injected at role.demote.replica" in p.stderr, p.stderr
        assert rvg.get(dga, RVG).role == "primary" and rvg.get(dgb, RVG).role == "secondary"
        assert dgb.catalog.volume("v1") is None and dga.catalog.volume("v1") is not None
        assert not rvg.replica_root(dga, RVG).exists()
        seq, _ = synced_pair(a, b, dga, dgb)  # and replication goes on
        rs = js(a.cli("rvg", "resync", RVG))  # no DCM: a full resync, on demand
        assert rs["kind"] == "full" and int(str(rs["seq"])) > seq
        p = b.cli("rvg", "resync", RVG, check=False)
        assert p.returncode == 2 and "secondary on this site" in p.stderr
        # without the failure it works
        mig = js(a.cli("rvg", "migrate", RVG, b.addr))
        assert int(str(mig["seq"])) >= seq and rvg.get(dgb, RVG).role == "primary"
        refused_on_secondary(dga)
        synced_pair(b, a, dgb, dga)

        # takeover --autofb: the old primary becomes secondary by itself once its service is back
        b.kill(b.procs[-1], signal.SIGKILL)
        at = Replica(rvg.replica_root(dga, RVG), RVG).seq
        p = a.cli("rvg", "takeover", RVG, check=False, env={"VERITAS_FAIL_AT": "role.promote.checkpoint"})
        assert p.returncode != 0 and "failure injected" in p.stderr, p.stderr  # a failed takeover is undone:
        assert rvg.get(dga, RVG).role == "secondary" and dga.catalog.volume("v1") is None
        assert Replica(rvg.replica_root(dga, RVG), RVG).seq == at and checkpoint.list_checkpoints(dga, RVG) == []
        out = js(a.cli("rvg", "takeover", RVG, "--autofb"))
        assert out["autofb"] is True and rvg.get(dga, RVG).role == "primary"
        b.serve(port=int(b.addr.rsplit(":", 1)[1]))
        poll("the automatic fast-failback", lambda: rvg.get(dgb, RVG).role == "secondary", 20)
        poll("the new primary to replicate", lambda: rvg.get(dga, RVG).common_seq == 0, 10)
        synced_pair(a, b, dga, dgb)
        assert "automatic fast-failback" in a.log()
    finally:
        dga.close()
        dgb.close()


def test_the_plugin_refuses_create_and_mount_of_a_secondary_volume(env: Env) -> None:
    """Docker's Create and Mount, through the plugin's VolumeDriver views on the real disk group: a
    secondary's volume name gets a clear Err, and no local volume of that name appears."""
    drv = Driver(env.config)
    http = create_app(drv).test_client()

    def call(endpoint: str, body: dict[str, str]) -> dict[str, object]:
        return dict(http.post(f"/{endpoint}", data=json.dumps(body)).get_json())
    dg = drv.dg
    volumes.make(dg, "v2", "320m", fstype="xfs")  # kept from when this site was primary, say
    with rvg.locked(dg):
        rvg.create(dg, rvg.Rvg(RVG, ("v1", "v2"), 1 << 20, "secondary"), need_volumes=False)
    assert "secondary of RVG rvg1" in str(call("VolumeDriver.Create", {"Name": "v1"})["Err"])
    assert dg.catalog.volume("v1") is None
    assert "secondary of RVG rvg1" in str(call("VolumeDriver.Mount", {"Name": "v2", "ID": "c1"})["Err"])
    assert not volumes.is_mounted(dg, "v2") and dg.catalog.mounts("v2") == []
    assert [v["Name"] for v in call("VolumeDriver.List", {})["Volumes"]] == ["v2"]  # type: ignore[attr-defined]
