"""Replication between the two sites of a lab (``scripts/lab up --nodes 2 --sites 2``): node1 is site1,
node2 site2, each with its own disk group root, engine, plugin and ``veritas rlink serve`` on its lab
address. Everything goes through the nodes, as an administrator would: the veritas commands run in
the node, the containers through the node's docker on the veritas driver.

A container writes a checksummed stream (tests/cluster/replstream.py) into a replicated volume on
node1. While it writes, the link between the sites is cut and restored, and each side's link service
SIGKILLed and started again (`lab kill NODE --only rlink`); every checkpoint the
secondary commits is checked. Then the DR drill: the whole primary site is killed (mid-checkpoint:
its volume frozen, as the link service leaves it between freeze and thaw), node2 takes over, the
container starts there on the replicated volume; the old site returns, fast-failback sends only
what changed, and migrate moves the primary back with nothing lost.

One lab serves the module; the tests run in file order against it, and the last takes it down.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.kernel import loop
from storage.replication import link
from tests.cluster.replstream import WRITER, Stream, check, records
from tests.cluster.test_lab import Lab, lab_footprint, lab_loops, pid_alive, wait_for

pytestmark = pytest.mark.integration

RVG = "rvg1"
VOL = "stream"
SIZE = 320 << 20
INTERVAL = 1.5
# one delta's time on the link: a round takes the checkpoint and ships it (tens of KiB here), plus the
# service's half-second poll; generous for a shared 2-core machine
ONE_DELTA = 2.5
IMAGE = "localbusybox:latest"
A, B = "198.18.0.1:4145", "198.18.0.2:4145"


def uptime() -> float:
    """The clock the writer stamps its records with (containers share the kernel's)."""
    return float(Path("/proc/uptime").read_text().split()[0])


class Sites:
    """The lab, and what the tests below learn as they go."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.facts: dict[str, Any] = {}

    def veritas(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(node, "python3", "-m", "veritas.cli", *args, check=check)

    def rvg(self, node: str, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.veritas(node, "--json", "rvg", *args).stdout))

    def docker(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(node, "docker", *args, check=check)

    def writer(self, node: str, name: str) -> None:
        self.docker(node, "run", "-d", "--name", name, "-v", f"{VOL}:/data", "--volume-driver", "veritas", IMAGE,
                    "sh", "-c", WRITER)

    def stream(self, node: str) -> tuple[str, Stream]:
        """The stream as a container on ``node`` reads it from the volume."""
        text = self.docker(node, "run", "--rm", "-v", f"{VOL}:/data", "--volume-driver", "veritas", IMAGE,
                           "cat", "/data/stream").stdout
        return text, check(text)


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    dir = Path(tempfile.mkdtemp(prefix="lab-", dir="/tmp")) / "lab"
    lab = Lab(dir)
    try:
        lab.run("up", "--nodes", "2", "--sites", "2", "--repl-interval", f"{INTERVAL:g}", timeout=180)
        yield Sites(lab)
    finally:
        if dir.exists():
            lab.run("down", check=False, timeout=180)
        os.rmdir(dir.parent) if dir.parent.exists() and not any(dir.parent.iterdir()) else None


def test_every_node_serves_its_link_with_the_labs_key(sites: Sites) -> None:
    lab = sites.lab
    key = lab.dir / "rlink.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    for n in lab.status()["nodes"]:
        pid, init = n["pids"]["rlink"], n["pids"]["init"]
        assert n["state"] == "running" and n["rlink"] == f"{n['address']}:4145" and pid_alive(pid), n
        for ns in ("net", "mnt", "uts"):
            assert os.stat(f"/proc/{pid}/ns/{ns}").st_ino == os.stat(f"/proc/{init}/ns/{ns}").st_ino, \
                f"{n['name']}'s link service is not in the node's {ns} namespace"
        text = (lab.dir / "nodes" / n["name"] / "veritas.conf").read_text()
        assert f"[replication]\nlisten = {n['rlink']}\nkey_file = {key}\ninterval = {INTERVAL:g}\n" in text

    # each site's service answers the other site with the lab's key, and refuses (and logs) a wrong one
    hello = ("import sys; from pathlib import Path; from storage.replication import link, protocol\n"
             "link.Conn(sys.argv[1], protocol.load_key(Path(sys.argv[2]))).close(); print('welcome')")
    wrong = lab.dir / "wrong.key"
    wrong.write_text("fedcba9876543210fedcba9876543210\n")
    for src, dst in (("node1", B), ("node2", A)):
        assert lab.exec(src, "python3", "-c", hello, dst, str(key)).stdout.strip() == "welcome"
        r = lab.exec(src, "python3", "-c", hello, dst, str(wrong), check=False)
        assert r.returncode != 0 and "did not prove the pre-shared key" in r.stderr, r.stderr[-2000:]
    for n, peer in (("node2", "198.18.0.1"), ("node1", "198.18.0.2")):
        log, line = lab.dir / "nodes" / n / "rlink.log", f"refused link from {peer}"
        wait_for(lambda log=log, line=line: line in log.read_text(), 10, f"{n}'s log of the refusal")

    # a killed service comes back with its node's start, on the same address
    old = lab.node("node2")["pids"]["rlink"]
    lab.run("kill", "node2", "--only", "rlink")
    after = lab.node("node2")
    assert not pid_alive(old) and after["pids"]["rlink"] is None and after["state"] == "degraded"
    lab.run("start", "node2")
    back = lab.node("node2")
    assert back["state"] == "running" and back["pids"]["rlink"] not in (None, old)
    assert lab.exec("node1", "python3", "-c", hello, B, str(key)).stdout.strip() == "welcome"


def test_no_torn_deltas_while_the_link_is_cut_and_restored_and_the_services_killed(sites: Sites) -> None:
    lab = sites.lab
    sites.docker("node1", "volume", "create", "-d", "veritas", "-o", "size=320m", "-o", "layout=concat",
                 "-o", "fstype=xfs", VOL)
    sites.rvg("node1", "createpri", RVG, VOL, "64m")
    sites.rvg("node1", "addsec", RVG, A, B)
    assert sites.rvg("node2", "repstatus", RVG)["role"] == "secondary"
    assert sites.rvg("node1", "startrep", RVG)["state"] == "replicating"
    # the secondary's volume is not Docker's to mount, and no local volume of its name appears
    r = sites.docker("node2", "run", "--rm", "-v", f"{VOL}:/data", "--volume-driver", "veritas", IMAGE, "true",
                     check=False)
    assert r.returncode != 0 and "secondary" in r.stderr, r.stderr
    sites.writer("node1", "w1")

    # every checkpoint the secondary commits meanwhile, checked in node2 as it commits them
    window = 22.0
    args, env = ["scripts/lab", "exec", "node2", "--", "python3", "-m", "tests.cluster.replstream", "sample",
                 RVG, VOL, f"{window:g}"], {**os.environ, "VERITAS_LAB_DIR": str(lab.dir)}
    sampler = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        lab.run("cut", "node2")
        cut_at = uptime()
        time.sleep(2 * INTERVAL + 2)
        st = sites.rvg("node1", "repstatus", RVG)
        lab.run("heal", "node2")
        healed_at = uptime()
        # and either side's service SIGKILLed while it ships or applies, then started again
        time.sleep(INTERVAL)
        for node in ("node2", "node1"):
            lab.run("kill", node, "--only", "rlink")
            lab.run("start", node)
            time.sleep(INTERVAL)
        killed_at = uptime()
        out, err = sampler.communicate(timeout=window + 60)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait(timeout=30)
    assert sampler.returncode == 0, err[-3000:]
    assert int(st["lag_bytes"]) > 0, f"the cut held the writes back: {st}"
    seen = [json.loads(line) for line in out.splitlines()]
    print(f"cut at {cut_at:.2f}, healed at {healed_at:.2f}, services killed by {killed_at:.2f}; checkpoints: "
          + ", ".join(f"{s['seq']}: {s['records']} to {s['last_time']}" for s in seen))
    assert [s for s in seen if s["error"]] == [], "a checkpoint of the secondary holds a torn record"
    assert [s["records"] for s in seen] == sorted(s["records"] for s in seen) and seen[-1]["records"] > 0
    assert any(s["last_time"] > killed_at for s in seen), "replication went on after the link came back and" \
        " after the services' kills"
    assert len(seen) >= 6, seen


def test_a_long_cut_is_seen_as_disconnected_and_the_primary_goes_on_logging(sites: Sites) -> None:
    """A cut longer than the link's dead-path limit: the primary's send must not hang on TCP
    retransmissions (it held the sender lock up to link.IO_TIMEOUT, 120 s, with repstatus saying
    connected and no checkpoint taken): within DEAD_LINK and a round the link is disconnected, the
    checkpoints go on into the SRL, and after the heal the secondary catches up."""
    lab = sites.lab
    assert sites.rvg("node1", "repstatus", RVG)["link"] == "connected"
    lab.run("cut", "node2")
    t0 = time.monotonic()
    try:
        limit = link.DEAD_LINK + 3 * INTERVAL + ONE_DELTA
        seen: dict[str, Any] = {}

        def down() -> bool:
            seen.update(sites.rvg("node1", "repstatus", RVG))
            return seen["link"] != "connected"
        wait_for(down, limit + 20, "the primary to see the cut link as disconnected")
        took = time.monotonic() - t0
        used = int(seen["srl_used"])
        wait_for(lambda: int(sites.rvg("node1", "repstatus", RVG)["srl_used"]) > used, 4 * INTERVAL + ONE_DELTA,
                 "a checkpoint logged into the SRL while the link is down")
    finally:
        lab.run("heal", "node2")
    print(f"cut seen as {seen['link']} after {took:.1f} s ({seen['link_error']})")
    assert took <= limit, f"the cut was seen only after {took:.1f} s (limit {limit:.1f} s)"
    wait_for(lambda: sites.rvg("node1", "repstatus", RVG)["link"] == "connected", 30, "the link back after heal")
    logged = int(sites.rvg("node1", "repstatus", RVG)["last_consistent_seq"])
    wait_for(lambda: int(sites.rvg("node1", "repstatus", RVG)["last_consistent_seq"]) > logged + 1, 60,
             "the secondary applying checkpoints again after the heal")


def test_dr_drill_primary_site_killed_takeover_and_the_container_at_the_dr_site(sites: Sites) -> None:
    lab = sites.lab
    # the primary site dies in the middle of a checkpoint: its volume frozen, as the link service
    # leaves it between freeze and thaw
    mnt = sites.docker("node1", "volume", "inspect", "-f", "{{.Mountpoint}}", VOL).stdout.strip()
    devnum = lab.exec("node1", "findmnt", "-no", "MAJ:MIN", mnt).stdout.strip()
    dev = Path(f"/sys/dev/block/{devnum}").resolve().name
    assert Path(f"/sys/fs/xfs/{dev}").exists(), (devnum, dev)
    # (busy while the service's own checkpoint has it frozen: then just after that)
    wait_for(lambda: lab.exec("node1", "fsfreeze", "--freeze", mnt, check=False).returncode == 0, 10,
             "the volume frozen")
    lab.run("kill", "node1")
    assert lab.node("node1")["state"] == "killed"
    assert not Path(f"/sys/fs/xfs/{dev}").exists(), \
        "the killed node's frozen filesystem outlived it in the shared kernel"

    out = sites.rvg("node2", "takeover", RVG)
    assert out["old_primary"] == A
    st = sites.rvg("node2", "repstatus", RVG)
    assert st["role"] == "primary" and st["common_seq"] == out["seq"]
    dr_text, dr = sites.stream("node2")
    assert dr.ok and dr.records > 0, dr
    sites.writer("node2", "w2")  # the application goes on at the DR site, from the last record there

    lab.run("start", "node1")
    assert lab.node("node1")["state"] == "running"
    sites.docker("node1", "rm", "-f", "w1")
    old_text, old = sites.stream("node1")  # what the old primary had written when it died
    assert old.ok, old
    assert records(old_text)[:dr.records] == records(dr_text), "the DR site's data is not a prefix of the stream"
    lost, span = old.records - dr.records, old.last_time - dr.last_time
    print(f"takeover at checkpoint {out['seq']}: {dr.records} records at the DR site, {lost} lost"
          f" ({span:.2f} s of writes; interval {INTERVAL:g} s)")
    assert span <= INTERVAL + ONE_DELTA, f"RPO {span:.2f} s is worse than the interval plus one delta"
    sites.facts.update(dr=dr, old=old)


def test_fast_failback_sends_only_changed_extents_and_migrate_back_loses_nothing(sites: Sites) -> None:
    dr: Stream = sites.facts["dr"]
    wait_for(lambda: check(sites.lab.exec("node2", "docker", "exec", "w2", "cat", "/data/stream").stdout).records
             > dr.records + 20, 30, "the writer at the DR site to go on")
    fb = sites.rvg("node2", "fbsync", RVG)
    sent, changed = int(fb["bytes_sent"]), int(fb["changed_bytes"])
    print(f"fbsync: {sent} bytes sent for {changed} changed ({fb['changed_here']} at the DR site,"
          f" {fb['changed_there']} on the old primary); volume {SIZE}")
    assert int(fb["changed_there"]) > 0, "the old primary's writes after the last checkpoint are sent back over"
    assert sent <= 1.2 * changed + (64 << 10), "fast-failback sends the changed extents, not more"
    assert sent < SIZE // 20, "never a full copy"
    assert sites.rvg("node1", "repstatus", RVG)["role"] == "secondary"

    sites.docker("node2", "rm", "-f", "w2")
    final_text, final = sites.stream("node2")
    assert final.ok and final.records > dr.records, final
    mig = sites.rvg("node2", "migrate", RVG, A)
    assert mig["primary"] == A and mig["secondary"] == B
    assert sites.rvg("node1", "repstatus", RVG)["role"] == "primary"
    assert sites.rvg("node2", "repstatus", RVG)["role"] == "secondary"
    back_text, back = sites.stream("node1")
    assert back_text == final_text, f"migrate lost data: {back} on node1, {final} on node2"


def test_down_ends_the_link_services_and_leaves_nothing(sites: Sites) -> None:
    lab = sites.lab
    pids = [n["pids"]["rlink"] for n in lab.status()["nodes"]]
    assert all(pids)
    loops = lab_loops(lab.dir)
    assert loops, "the check below can see the lab's loop devices"
    lab.run("down", timeout=180)
    assert not [p for p in pids if pid_alive(p)]
    assert lab_footprint(lab.dir) == {"processes": [], "mounts": [], "loops": []}
    still = {dev: b for dev, b in loops.items() if loop.backing_id(dev) == b}
    assert still == {}, f"loop devices of the lab left attached: {still}"
    assert not lab.dir.exists()
