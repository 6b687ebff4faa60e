"""The replication link between two sites on one machine: two disk groups under two state roots, each
site's ``veritas rlink serve`` a subprocess on 127.0.0.1 (ephemeral port), the rvg commands run as the
real CLI. Initial sync makes the secondary byte-identical; writes arrive within the interval and one
delta; SIGKILL of either service mid-delta leaves the secondary's last consistent checkpoint whole and
replication resumes; a wrong key, an unreachable secondary and bad names are refused, changing nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time

from storage import volumes
from storage.replication import link, rvg
from storage.replication.apply import Replica
from tests.integration.twosites import (
    RVG,
    Site,
    digest,
    free_port,
    poll,
    status,
    synced_pair,
    write_marker,
)
from tests.integration.twosites import sites as sites_fixture

sites = sites_fixture  # the two sites, for the tests below


def test_startrep_then_writes_arrive_and_kill_9_of_either_service_mid_delta(sites: tuple[Site, Site]) -> None:
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        volumes.make(dga, "v1", "320m", fstype="xfs")
        mnt = volumes.mount(dga, "v1")
        write_marker(mnt, "before")
        b.serve()
        a.serve()
        a.cli("rvg", "createpri", RVG, "v1", "2m")
        a.cli("rvg", "addsec", RVG, a.addr, b.addr)
        assert rvg.get(dgb, RVG).role == "secondary" and rvg.get(dga, RVG).peer_addr == b.addr
        start = a.cli("rvg", "startrep", RVG)
        assert "100%" in start.stderr, "progress lines on stderr (not a terminal)"
        seq0 = json.loads(start.stdout)["seq"]
        seq1, _ = synced_pair(a, b, dga, dgb)
        assert seq1 >= seq0

        # a write arrives within the interval and one delta
        t0 = time.monotonic()
        marker = write_marker(mnt, "after")
        poll("the write to reach the secondary",
             lambda: int(status(a)["last_consistent_seq"]) > seq1 + 1, 15)  # a checkpoint taken after it
        assert time.monotonic() - t0 < 1 + 10, "replication lag over interval + one delta"
        seq2, _ = synced_pair(a, b, dga, dgb)
        rep = Replica(rvg.replica_root(dgb, RVG), RVG)
        assert marker in rep.image("v1.0").read_bytes(), "the replica holds the write"
        st = status(a)
        assert st["role"] == "primary" and st["link"] == "connected" and st["consistent"] is True
        assert status(b)["role"] == "secondary"

        # SIGKILL of the secondary's service while it applies a delta
        b.kill(b.procs[-1], signal.SIGTERM)
        before = {k: digest(rep.image(k)) for k in rep.keys()}
        at = rep.seq
        port = int(b.addr.rsplit(":", 1)[1])
        victim = b.serve(port=port, VERITAS_CRASH_AT="repl.apply.record")
        write_marker(mnt, "during-b")
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL, "the secondary's service was killed mid-apply"
        rep.recover()
        assert rep.seq == at and {k: digest(rep.image(k)) for k in rep.keys()} == before, \
            "the last consistent checkpoint still verifies"
        b.serve(port=port)
        seq3, _ = synced_pair(a, b, dga, dgb)
        assert seq3 > at

        # SIGKILL of the primary's service with part of a delta on the wire
        a.kill(a.procs[-1], signal.SIGTERM)
        aport = int(a.addr.rsplit(":", 1)[1])
        at = rep.seq
        before = {k: digest(rep.image(k)) for k in rep.keys()}
        victim = a.serve(port=aport, VERITAS_CRASH_AT="rlink.send.partial")
        write_marker(mnt, "during-a")
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL, "the primary's service was killed mid-send"
        time.sleep(0.5)
        assert rep.seq == at and {k: digest(rep.image(k)) for k in rep.keys()} == before, \
            "a torn delta changed nothing on the secondary"
        a.serve(port=aport)
        seq4, _ = synced_pair(a, b, dga, dgb)
        assert seq4 > at

        # paused, the SRL overflows into the DCM (secondary marked inconsistent); resumed, one resync
        a.cli("rvg", "pauserep", RVG)
        paused_at = rep.seq  # once pauserep returns, nothing more is sent
        big = os.urandom(3 << 20)
        (mnt / "big").write_bytes(big)
        os.sync()
        poll("the SRL to overflow into the DCM", lambda: status(a)["dcm"] is True, 15)
        st = status(a)
        assert st["consistent"] is False and int(st["lag_bytes"]) >= len(big)
        assert rep.seq == paused_at, "paused: nothing is sent"
        a.cli("rvg", "resumerep", RVG)
        poll("the DCM resync", lambda: status(a)["dcm"] is False, 20)
        synced_pair(a, b, dga, dgb)
        assert big in rep.image("v1.0").read_bytes()
        assert status(a)["consistent"] is True
        # a secondary whose replica went back (here: recreated empty) gets a full resync, not a mismatch
        b.kill(b.procs[-1], signal.SIGTERM)
        shutil.rmtree(rvg.replica_root(dgb, RVG))
        rvg.replica_root(dgb, RVG).mkdir()
        Replica.create(rvg.replica_root(dgb, RVG), RVG)
        b.serve(port=port)
        synced_pair(a, b, dga, dgb)
        assert big in rep.image("v1.0").read_bytes() and "full resync" in a.log()
        text = a.cli("rvg", "repstatus", RVG, text=True).stdout
        assert text.startswith(f"RVG {RVG}: primary, replicating, link connected to {b.addr}") and "SRL" in text
    finally:
        dga.close()
        dgb.close()


def test_bad_input_is_refused_and_changes_nothing(sites: tuple[Site, Site]) -> None:
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        volumes.make(dga, "v1", "320m", fstype="xfs")
        volumes.make(dga, "v2", "320m", fstype="xfs")
        p = a.cli("rvg", "createpri", RVG, "v1,nosuch", "64m", check=False)
        assert p.returncode == 3 and "no such volume: nosuch" in p.stderr and rvg.names(dga) == []
        p = a.cli("rvg", "createpri", RVG, "v1", "lots", check=False)
        assert p.returncode == 2 and rvg.names(dga) == []
        a.cli("rvg", "createpri", RVG, "v1", "64m")
        p = a.cli("rvg", "createpri", "rvg2", "v2,v1", "64m", check=False)
        assert p.returncode == 5 and "volume v1 is already in RVG rvg1" in p.stderr and rvg.names(dga) == [RVG]
        for cmd in ("repstatus", "startrep", "pauserep"):
            p = a.cli("rvg", cmd, "nosuch", check=False)
            assert p.returncode == 3 and "no such RVG: nosuch" in p.stderr, cmd
        p = a.cli("rvg", "startrep", RVG, check=False)
        assert p.returncode == 2 and "has no secondary" in p.stderr
        record = rvg.get(dga, RVG)

        # addsec to an address nobody listens on
        p = a.cli("rvg", "addsec", RVG, "127.0.0.1:1", f"127.0.0.1:{free_port()}", check=False)
        assert p.returncode == 11 and "cannot reach the link service" in p.stderr
        assert rvg.get(dga, RVG) == record

        # a secondary whose key differs: refused both ways, logged, nothing recorded anywhere
        b.serve()
        wrong = a.root / "wrong.key"
        wrong.write_text("fedcba9876543210fedcba9876543210\n")
        p = a.cli("rvg", "addsec", RVG, "127.0.0.1:1", b.addr, check=False, key=wrong)
        assert p.returncode == 11 and "did not prove the pre-shared key" in p.stderr
        assert rvg.get(dga, RVG) == record and rvg.names(dgb) == []
        assert not rvg.replica_root(dgb, RVG).exists()
        poll("the refusal in the secondary's log", lambda: "refused link from 127.0.0.1" in b.log(), 10)

        # a peer that skips the handshake: refused, logged, nothing changed
        with socket.create_connection(tuple(link.parse_addr(b.addr))) as s:  # type: ignore[arg-type]
            body = json.dumps({"type": "addsec", "rvg": RVG, "volumes": ["v1"], "srl_size": 1}).encode()
            s.sendall(len(body).to_bytes(4, "big") + body)
            s.settimeout(10)
            while s.recv(4096):
                pass
        assert rvg.names(dgb) == []
        # a volume of the RVG's already on the secondary: refused unless it has the primary's shape and
        # is unused (a takeover replaces its images), before anything is recorded on either site
        volumes.make(dgb, "v1", "400m", fstype="xfs")
        p = a.cli("rvg", "addsec", RVG, "127.0.0.1:1", b.addr, check=False)
        assert p.returncode != 0 and "volume v1 exists on this site with another shape" in p.stderr, p.stderr
        assert "size 400M here, 320M on the primary" in p.stderr and "veritas vol rm -g" in p.stderr, p.stderr
        assert rvg.get(dga, RVG) == record and rvg.names(dgb) == [] and not rvg.replica_root(dgb, RVG).exists()
        volumes.remove(dgb, "v1")
        volumes.make(dgb, "v1", "320m", fstype="xfs")  # as on the primary, as VVR's procedure makes it
        volumes.mount(dgb, "v1")
        p = a.cli("rvg", "addsec", RVG, "127.0.0.1:1", b.addr, check=False)
        assert p.returncode != 0 and "volume v1 of RVG rvg1 is mounted on this site" in p.stderr, p.stderr
        assert rvg.get(dga, RVG) == record and rvg.names(dgb) == []
        volumes.umount(dgb, "v1")
        # and with the right key, a volume of the primary's shape and unused, it works
        a.cli("rvg", "addsec", RVG, "127.0.0.1:1", b.addr)
        assert rvg.get(dgb, RVG).role == "secondary"
        p = b.cli("rvg", "startrep", RVG, check=False)
        assert p.returncode == 2 and "secondary on this site" in p.stderr
        assert a.cli("rvg", "repstatus", RVG, text=True).stdout.startswith(f"RVG {RVG}: primary, stopped, link")
        assert b.cli("rvg", "repstatus", RVG, text=True).stdout.startswith(f"RVG {RVG}: secondary, stopped")
    finally:
        dga.close()
        dgb.close()
