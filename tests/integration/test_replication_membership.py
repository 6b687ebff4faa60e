"""Taking an RVG apart through the real CLI on two sites with their link services (vradmin's delvol,
delsec, delpri): each refuses what it cannot do and changes nothing then; what it does reaches both
sites; a kill -9 half-way is finished by running the command again; the volumes stay usable."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import pytest

from storage import volumes
from storage.diskgroup import DiskGroup
from storage.replication import checkpoint, rvg
from storage.replication.apply import Replica
from tests.integration.twosites import RVG, Site, digest, live, poll, synced_pair, write_marker
from tests.integration.twosites import sites as sites_fixture

sites = sites_fixture


Pair = tuple[Site, Site, DiskGroup, DiskGroup]


@pytest.fixture
def pair(sites: tuple[Site, Site]) -> Iterator[Pair]:
    """RVG rvg1 of two 320 MiB XFS volumes v1, v2 on A, both link services up, B its secondary, the
    initial sync done and B's replica at A's newest checkpoint; both disk groups open."""
    a, b = sites
    dga = a.dg()
    try:
        volumes.make(dga, "v1", "320m", fstype="xfs")
        volumes.make(dga, "v2", "320m", fstype="xfs")
    finally:
        dga.close()
    b.serve()
    a.serve()
    a.cli("rvg", "createpri", RVG, "v1,v2", "64m")
    a.cli("rvg", "addsec", RVG, a.addr, b.addr)
    a.cli("rvg", "startrep", RVG)
    dga, dgb = a.dg(), b.dg()
    try:
        synced_pair(a, b, dga, dgb)
        yield a, b, dga, dgb
    finally:
        dga.close()
        dgb.close()


def _refused(site: Site, *args: str, code: int, says: str) -> None:
    p = site.cli(*args, check=False, text=True)
    assert p.returncode == code, (args, p.returncode, p.stderr)
    assert says in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def _disk_leftovers(site: Site) -> list[str]:
    """What is left of the RVG under the site's disks and root."""
    dg = site.dg()
    try:
        dirs = [dg.disk_dir(d.name) / sub / RVG for d in dg.catalog.disks() for sub in ("repl", "rlink")]
        dirs.append(checkpoint.meta_dir(dg, RVG))
    finally:
        dg.close()
    return [str(d) for d in dirs if d.exists()]


def test_delvol_takes_a_volume_out_on_both_sites_and_the_rest_replicates(pair: Pair) -> None:
    a, b, dga, dgb = pair
    before = (rvg.get(dga, RVG), rvg.get(dgb, RVG))
    _refused(a, "rvg", "delvol", RVG, "v2", code=5, says="stoprep rvg1")  # replicating
    assert (rvg.get(dga, RVG), rvg.get(dgb, RVG)) == before
    a.cli("rvg", "stoprep", RVG)
    _refused(a, "rvg", "delvol", RVG, "v9", code=3, says="not in RVG rvg1")
    _refused(b, "rvg", "delvol", RVG, "v2", code=2, says="run delvol on its primary")
    v2_data = digest(live(dga, "v2"))
    out = json.loads(a.cli("rvg", "delvol", RVG, "v2").stdout)
    assert out["volumes"] == ["v1"] and out["removed_volume"] == "v2"
    assert rvg.get(dga, RVG).volumes == ("v1",) and rvg.get(dgb, RVG).volumes == ("v1",)
    rep = Replica(rvg.replica_root(dgb, RVG), RVG)
    assert [k.split(".")[0] for k in rep.keys()] == ["v1"], rep.keys()
    assert checkpoint.list_checkpoints(dga, RVG) == []  # they held v2
    assert digest(live(dga, "v2")) == v2_data  # v2 stays a volume, untouched
    _refused(a, "rvg", "delvol", RVG, "v1", code=2, says="only volume")
    # v2 is an ordinary volume now: mounted, written, removed like one
    mnt = volumes.mount(dga, "v2")
    write_marker(mnt, "free")
    volumes.umount(dga, "v2")
    a.cli("vol", "rm", "v2")
    # and v1 replicates again after startrep (a full sync: the checkpoints went)
    a.cli("rvg", "startrep", RVG)
    mnt = volumes.mount(dga, "v1")
    try:
        write_marker(mnt, "after-delvol")
    finally:
        volumes.umount(dga, "v1")
    seq, got = synced_pair(a, b, dga, dgb)
    assert list(got) == ["v1.0"]


def test_delsec_then_delpri_leave_plain_volumes_and_nothing_of_the_rvg(pair: Pair) -> None:
    a, b, dga, dgb = pair
    _refused(a, "rvg", "delpri", RVG, code=5, says="stoprep rvg1")
    a.cli("rvg", "stoprep", RVG)
    _refused(a, "rvg", "delpri", RVG, code=5, says="still has a secondary")
    _refused(b, "rvg", "delpri", RVG, code=2, says="run delpri on its primary")
    _refused(a, "rvg", "delsec", RVG, "127.0.0.1:1", code=2, says="is not RVG rvg1's secondary")
    _refused(a, "rvg", "delsec", "nosuch", code=3, says="no such RVG: nosuch")
    assert rvg.get(dga, RVG).peer_addr == b.addr and rvg.names(dgb) == [RVG]
    out = json.loads(a.cli("rvg", "delsec", RVG, b.addr).stdout)
    assert out["peer_told"] and out["removed_secondary"] == b.addr
    assert rvg.names(dgb) == [] and _disk_leftovers(b) == []
    r = rvg.get(dga, RVG)
    assert (r.peer_addr, r.synced, r.state) == ("", False, "stopped")
    # the secondary's volume names are free: a local volume of that name can be made there now
    volumes.make(dgb, "v1", "320m", fstype="xfs")
    _refused(a, "rvg", "startrep", RVG, code=2, says="no secondary")
    out = json.loads(a.cli("rvg", "delpri", RVG).stdout)
    assert out["removed"] and out["volumes"] == ["v1", "v2"]
    assert rvg.names(dga) == [] and _disk_leftovers(a) == []
    # the primary's volumes stay, with their data, and are ordinary again: rm is no longer refused
    mnt = volumes.mount(dga, "v1")
    try:
        write_marker(mnt, "unreplicated")
    finally:
        volumes.umount(dga, "v1")
    a.cli("vol", "rm", "v2")
    # the RVG name can be used again
    a.cli("rvg", "createpri", RVG, "v1", "64m")


def test_delsec_of_a_silent_secondary_is_refused_unless_forced_then_dropped_there(pair: Pair) -> None:
    a, b, dga, dgb = pair
    a.cli("rvg", "stoprep", RVG)
    b.kill(b.procs[-1])
    before = rvg.get(dga, RVG)
    _refused(a, "rvg", "delsec", RVG, code=11, says="--force")
    assert rvg.get(dga, RVG) == before and checkpoint.list_checkpoints(dga, RVG)
    out = json.loads(a.cli("rvg", "delsec", RVG, "--force").stdout)
    assert not out["peer_told"] and rvg.get(dga, RVG).peer_addr == ""
    # the secondary still holds its replica; on its own site only --force drops it
    _refused(b, "rvg", "delsec", RVG, code=2, says="--force drops this site's replica")
    assert rvg.names(dgb) == [RVG]
    b.cli("rvg", "delsec", RVG, "--force")
    assert rvg.names(dgb) == [] and _disk_leftovers(b) == []


def test_a_delpri_or_delsec_killed_half_way_is_finished_by_running_it_again(pair: Pair) -> None:
    a, b, dga, dgb = pair
    a.cli("rvg", "stoprep", RVG)
    # the secondary's service dies removing its replica: the primary is unchanged
    port = int(b.addr.rsplit(":", 1)[1])
    b.kill(b.procs[-1], signal.SIGTERM)
    b.serve(port=port, VERITAS_CRASH_AT="repl.delsec.replica")
    p = a.cli("rvg", "delsec", RVG, check=False, text=True)
    assert p.returncode == 11, p.stderr
    poll("the secondary's service to die at its crash point", lambda: b.procs[-1].poll() is not None, 30)
    assert b.procs[-1].returncode == -signal.SIGKILL
    assert rvg.get(dga, RVG).peer_addr == b.addr  # the primary did not forget it
    assert rvg.names(dgb) == [RVG]  # the record is the last to go there
    b.serve(port=port)
    # the primary's own half killed after its checkpoints went
    p = a.cli("rvg", "delsec", RVG, check=False, env={"VERITAS_CRASH_AT": "repl.delsec.checkpoints"})
    assert p.returncode == -signal.SIGKILL
    assert rvg.names(dgb) == [] and rvg.get(dga, RVG).peer_addr == b.addr
    a.cli("rvg", "delsec", RVG)  # the secondary answers "already gone"; this site finishes
    assert rvg.get(dga, RVG).peer_addr == ""
    p = a.cli("rvg", "delpri", RVG, check=False, env={"VERITAS_CRASH_AT": "repl.delpri.checkpoints"})
    assert p.returncode == -signal.SIGKILL
    assert rvg.names(dga) == [RVG]
    a.cli("rvg", "delpri", RVG)
    assert rvg.names(dga) == [] and _disk_leftovers(a) == [] and _disk_leftovers(b) == []
    assert {v.name for v in dga.catalog.volumes()} == {"v1", "v2"}
