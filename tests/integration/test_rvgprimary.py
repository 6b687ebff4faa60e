"""The RVGPrimary agent on two real replication sites (tests/integration/twosites.py), through its OCF
and VCS entry scripts: ocf-tester passes on the secondary (its start migrates the role there); an online
on the secondary while the primary answers waits for the primary's volume to be unmounted, then
migrates (roles swap, data identical); with the primary's service SIGKILLed an online takes over;
monitor codes on both sides at each step; an unknown RVG is a configuration error."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from storage import volumes
from storage.diskgroup import DiskGroup
from storage.replication import rvg
from storage.replication.apply import Replica
from tests.integration.twosites import RVG, Site, digest, live, replicating_pair, synced_pair, write_marker
from tests.integration.twosites import sites as sites_fixture

sites = sites_fixture
REPO = Path(__file__).resolve().parents[2]
OCF = REPO / "agents" / "ocf" / "RVGPrimary"
VCS = REPO / "agents" / "vcs" / "RVGPrimary"


def params(s: Site, rvg_name: str = RVG, dg: str = "testdg") -> dict[str, str]:
    return {"rvg": rvg_name, "diskgroup": dg, "config": str(s.config_path)}


def agent_env(s: Site, **extra: str) -> dict[str, str]:
    # each site its own agent state (another host's); no VERITAS_CONFIG: the attribute names the config
    env = {k: v for k, v in os.environ.items() if k != "VERITAS_CONFIG"}
    return {**env, "VERITAS_AGENT_STATE": str(s.root / "agent-state"), "OCF_RESOURCE_INSTANCE": "rvgres", **extra}


def ocf(s: Site, action: str, rvg_name: str = RVG, dg: str = "testdg") -> subprocess.CompletedProcess[str]:
    env = agent_env(s, **{f"OCF_RESKEY_{k}": v for k, v in params(s, rvg_name, dg).items()})
    return subprocess.run([str(OCF), action], env=env, capture_output=True, text=True, timeout=120, check=False)


def vcs_argv(s: Site, entry: str, wait: str = "30", rvg_name: str = RVG) -> list[str]:
    # ArgList: RVG, DiskGroup, ConfigFile, KeyFile, AutoTakeover, AutoResync, WaitTimeout
    return [str(VCS / entry), "rvgres", rvg_name, "testdg", str(s.config_path), "", "1", "1", wait]


def vcs(s: Site, entry: str, rvg_name: str = RVG) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vcs_argv(s, entry, rvg_name=rvg_name), env=agent_env(s), capture_output=True, text=True,
                          timeout=120, check=False)


def roles(dga: DiskGroup, dgb: DiskGroup) -> tuple[str, str]:
    return rvg.get(dga, RVG).role, rvg.get(dgb, RVG).role


def test_rvgprimary_migrates_then_takes_over_and_passes_ocf_tester(sites: tuple[Site, Site]) -> None:
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        replicating_pair(a, b, dga)
        mnt = volumes.mount(dga, "v1")
        data = write_marker(mnt, "marker")
        volumes.umount(dga, "v1")
        synced_pair(a, b, dga, dgb)

        # monitor: primary but never onlined here is offline (the vendor's lock file), secondary offline;
        # an RVG that does not exist is a configuration error
        assert ocf(a, "monitor").returncode == 7 and ocf(b, "monitor").returncode == 7
        assert vcs(b, "monitor").returncode == 100
        p = ocf(b, "monitor", "nosuch")
        assert p.returncode == 6 and "no such RVG: nosuch" in p.stderr, p.stderr
        assert vcs(b, "monitor", "nosuch").returncode == 99
        p = ocf(b, "monitor", dg="nodg")
        assert p.returncode == 5 and "no such disk group: nodg" in p.stderr, p.stderr
        t0 = time.monotonic()
        assert ocf(b, "monitor").returncode == 7
        print(f"OCF monitor: {1000 * (time.monotonic() - t0):.0f} ms")
        assert ocf(a, "start").returncode == 0 and roles(dga, dgb) == ("primary", "secondary")
        assert ocf(a, "monitor").returncode == 0 and vcs(a, "monitor").returncode == 110

        # ocf-tester on the secondary: its start migrates the role here, its stops change no role
        argv = ["ocf-tester", "-n", "rvgres"] + [x for k, v in params(b).items() for x in ("-o", f"{k}={v}")]
        t0 = time.monotonic()
        r = subprocess.run([*argv, str(OCF)], capture_output=True, text=True, timeout=180, check=False,
                           env={**agent_env(b), "OCF_ROOT": "/usr/lib/ocf"})
        print(r.stdout, f"ocf-tester: {time.monotonic() - t0:.1f} s")
        assert r.returncode == 0 and "passed all tests" in r.stdout, r.stdout + r.stderr
        assert roles(dga, dgb) == ("secondary", "primary"), "ocf-tester's start migrated the role to B"
        assert ocf(b, "monitor").returncode == 7, "ocf-tester left it stopped: offline, though B stays primary"
        assert ocf(a, "monitor").returncode == 7 and vcs(a, "monitor").returncode == 100
        assert digest(live(dgb)) == digest(Replica(rvg.replica_root(dga, RVG), RVG).image("v1.0"))
        mntb = volumes.mount(dgb, "v1")
        assert (mntb / "marker").read_bytes() == data, "the data moved with the role"
        synced_pair(b, a, dgb, dga)

        # VCS online on the secondary (A) while B's volume is mounted: refused by B, retried, and
        # done once B unmounts it: a migrate, roles swapped, data identical
        t0 = time.monotonic()
        online = subprocess.Popen(vcs_argv(a, "online"), env=agent_env(a), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(2)
            assert online.poll() is None, "online waits while the primary's volume is in use"
            volumes.umount(dgb, "v1")
            out, err = online.communicate(timeout=60)
        finally:
            if online.poll() is None:
                online.kill()
                online.wait()
        print(f"VCS online (migrate): {time.monotonic() - t0:.1f} s: {out.strip()}")
        assert online.returncode == 0 and "migrated" in out, out + err
        assert roles(dga, dgb) == ("primary", "secondary")
        assert vcs(a, "monitor").returncode == 110 and ocf(a, "monitor").returncode == 0
        assert vcs(b, "monitor").returncode == 100
        assert digest(live(dga)) == digest(Replica(rvg.replica_root(dgb, RVG), RVG).image("v1.0"))
        mnt = volumes.mount(dga, "v1")
        assert (mnt / "marker").read_bytes() == data
        volumes.umount(dga, "v1")
        synced_pair(a, b, dga, dgb)

        # the primary's service is SIGKILLed: online on B takes over (with fast-failback on its return)
        a.kill(a.procs[-1], signal.SIGKILL)
        at = Replica(rvg.replica_root(dgb, RVG), RVG).seq
        t0 = time.monotonic()
        p = ocf(b, "start")
        print(f"OCF start (takeover): {time.monotonic() - t0:.1f} s")
        assert p.returncode == 0, p.stderr
        assert rvg.get(dgb, RVG).role == "primary" and rvg.get(dgb, RVG).common_seq == at
        assert rvg.get(dgb, RVG).autofb is True
        assert ocf(b, "monitor").returncode == 0 and vcs(b, "monitor").returncode == 110
        assert vcs(b, "offline").returncode == 0 and rvg.get(dgb, RVG).role == "primary", "offline: no role change"
        assert vcs(b, "monitor").returncode == 100
    finally:
        dga.close()
        dgb.close()
