"""scripts/lab up --pacemaker: corosync and Pacemaker on every lab node, fenced by the lab's fence_lab.

One three-node lab serves the module; the tests run in file order against it and the last one takes it
down and checks that nothing of it is left. The lab installs the OCF agents of a directory of the test's
own (VERITAS_LAB_OCF_DIR: one agent, a copy of Pacemaker's Dummy named LabProbe) as ocf:veritas:*, so
the test sees an installed agent run in the cluster whatever agents/ocf holds today.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_lab import LAB, Lab, lab_footprint, ns_holders, pid_alive, wait_for

pytestmark = pytest.mark.integration

NODES = ["node1", "node2", "node3"]
UP_LIMIT = 40.0  # seconds for `up --nodes 3 --pacemaker`: measured 9.0-9.4 s on the 2-core machine
HOST_FILES = [Path("/etc/corosync"), Path("/var/lib/corosync"), Path("/var/lib/pacemaker"),
              Path("/var/log/corosync"), Path("/var/log/pacemaker"), Path("/usr/lib/ocf/resource.d")]


class PLab(Lab):
    """The lab command line with the test's own OCF agent directory."""

    def __init__(self, dir: Path, ocf: Path) -> None:
        super().__init__(dir)
        self.ocf = ocf

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VERITAS_LAB_DIR": str(self.dir), "VERITAS_LAB_OCF_DIR": str(self.ocf)}
        proc = subprocess.run([str(LAB), *args], env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"scripts/lab {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr[-3000:]}{proc.stdout[-1000:]}")
        return proc


def host_tree(paths: list[Path]) -> dict[str, str]:
    """The host's cluster directories as they are: every entry with its size and a digest of small files."""
    out = {}
    for top in paths:
        for dirpath, dirs, files in os.walk(top):
            for f in files + dirs:
                p = Path(dirpath) / f
                try:
                    st = p.lstat()
                    digest = hashlib.sha256(p.read_bytes()).hexdigest() \
                        if p.is_file() and not p.is_symlink() and st.st_size < 1 << 20 else ""
                except OSError:
                    continue
                out[str(p)] = f"{st.st_mode:o} {st.st_size} {digest}"
    return out


def crm(lab: Lab, node: str) -> ET.Element:
    return ET.fromstring(lab.exec(node, "crm_mon", "-1", "--output-as=xml", timeout=30).stdout)


def online(root: ET.Element) -> list[str]:
    return sorted(n.get("name", "") for n in root.findall("./nodes/node")
                  if n.get("online") == "true" and n.get("standby") != "true")


def running_on(lab: Lab, via: str, rsc: str) -> list[str]:
    """The nodes where ``rsc`` (a resource, or every member of a group) is started, as ``via`` sees it."""
    root = crm(lab, via)
    where: list[list[str]] = []
    for r in root.iter("resource"):
        rid = r.get("id", "")
        if rid == rsc or any(g.get("id") == rsc and r in list(g) for g in root.iter("group")):
            where.append(sorted(x.get("name", "") for x in r.findall("node")
                                if r.get("role") == "Started" and r.get("active") == "true"))
    if not where or any(w != where[0] for w in where):
        return []  # not started, or members in different places (moving)
    return where[0]


def node_procs(status: dict[str, Any]) -> set[tuple[int, int]]:
    """(PID, start time) of every process in any node's mount namespace, and of the fencing helper."""
    def start(pid: int) -> int | None:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            return None

    mnts = {os.readlink(f"/proc/{n['pids']['init']}/ns/mnt") for n in status["nodes"] if n["pids"]["init"]}
    out = set()
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if os.readlink(f"/proc/{e}/ns/mnt") in mnts:
                    st = start(int(e))
                    if st is not None:
                        out.add((int(e), st))
            except OSError:
                continue
    f = status["pacemaker"]["fencer"]
    fst = start(f) if f else None
    if fst is not None:
        out.add((f, fst))
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    top = Path(tempfile.mkdtemp(prefix="labpcmk-", dir="/tmp"))
    ocf = top / "ocf"
    ocf.mkdir()
    shutil.copyfile("/usr/lib/ocf/resource.d/pacemaker/Dummy", ocf / "LabProbe")
    os.chmod(ocf / "LabProbe", 0o755)
    lab = PLab(top / "lab", ocf)
    host_before = host_tree(HOST_FILES)
    try:
        t0 = time.monotonic()
        up = lab.run("up", "--nodes", "3", "--pacemaker", timeout=240)
        up_seconds = time.monotonic() - t0
        print(f"\nlab up --nodes 3 --pacemaker: {up_seconds:.1f} s")
        yield {"lab": lab, "up": json.loads(up.stdout), "up_seconds": up_seconds, "host_before": host_before,
               "procs": set(), "mntns": {}, "netns": {}}
    finally:
        if lab.dir.exists():
            lab.run("down", check=False, timeout=180)
        shutil.rmtree(top, ignore_errors=True)


def test_up_forms_a_cluster_with_quorum_and_fencing_on(cluster: dict[str, Any]) -> None:
    lab: Lab = cluster["lab"]
    assert [n["name"] for n in cluster["up"]["nodes"]] == NODES
    assert cluster["up_seconds"] < UP_LIMIT, cluster["up_seconds"]
    dcs = set()
    for n in NODES:  # every node's own Pacemaker, through its own sockets, sees the same cluster
        root = crm(lab, n)
        dc = root.find("./summary/current_dc")
        assert dc is not None and dc.get("with_quorum") == "true", ET.tostring(root)[:2000]
        dcs.add(dc.get("name"))
        assert online(root) == NODES
    assert len(dcs) == 1 and dcs <= set(NODES)
    text = lab.exec("node2", "crm_mon", "-1").stdout
    assert "partition with quorum" in text and "node1 node2 node3" in text, text
    q = lab.exec("node1", "crm_attribute", "--type", "crm_config", "--name", "stonith-enabled", "--query").stdout
    assert "value=true" in q, q
    assert "fence-lab" in lab.exec("node3", "stonith_admin", "--list-registered").stdout
    assert running_on(lab, "node1", "fence-lab") != []
    st = lab.status()
    assert st["pacemaker"]["dc"] in NODES and st["pacemaker"]["quorum"] is True
    assert st["pacemaker"]["ocf_agents"] == ["LabProbe"]
    for n in st["nodes"]:
        assert n["state"] == "running" and n["pacemaker"]["state"] == "online", n
        init = n["pids"]["init"]
        for role in ("corosync", "pacemakerd"):  # node processes: in the node's namespaces
            pid = n["pids"][role]
            assert pid and pid_alive(pid), (n["name"], role)
            for kind in ("mnt", "net", "uts"):
                assert os.readlink(f"/proc/{pid}/ns/{kind}") == os.readlink(f"/proc/{init}/ns/{kind}")


def test_each_node_has_its_own_cluster_files_and_the_host_keeps_its_own(cluster: dict[str, Any]) -> None:
    lab: Lab = cluster["lab"]
    for i, n in enumerate(NODES, 1):
        conf = lab.exec(n, "cat", "/etc/corosync/corosync.conf").stdout
        assert "transport: knet" in conf and "ring0_addr: 198.18.0.3" in conf and "written by scripts/lab" in conf
        links = lab.exec(n, "corosync-cfgtool", "-s").stdout
        assert f"addr\t= 198.18.0.{i}" in links and "knet" in links, links
        cib = lab.dir / "nodes" / n / "pcmk" / "lib-pacemaker" / "cib" / "cib.xml"
        inside = lab.exec(n, "stat", "-c", "%d:%i", "/var/lib/pacemaker/cib/cib.xml").stdout.strip()
        st = cib.stat()
        assert inside == f"{st.st_dev}:{st.st_ino}"  # the node's CIB is its own file under the lab
        assert lab.exec(n, "test", "-x", "/usr/sbin/fence_lab", check=False).returncode == 0
        # the engine's usual socket, in the node's own /run, is the node's engine
        name = lab.exec(n, "docker", "-H", "unix:///var/run/docker.sock", "info", "--format", "{{.Name}}").stdout
        assert name.strip() == n
        assert lab.exec(n, "test", "-x", "/usr/lib/ocf/resource.d/veritas/LabProbe", check=False).returncode == 0
        assert lab.exec(n, "test", "-x", "/usr/lib/ocf/resource.d/pacemaker/Dummy", check=False).returncode == 0
    meta = lab.exec("node1", "fence_lab", "-o", "metadata").stdout
    actions = {a.get("name") for a in ET.fromstring(meta).iter("action")}
    assert {"on", "off", "reboot", "status", "monitor", "list", "metadata"} <= actions
    assert host_tree(HOST_FILES) == cluster["host_before"], "the lab changed the host's cluster files"
    assert not Path("/usr/sbin/fence_lab").exists() and not Path("/usr/lib/ocf/resource.d/veritas").exists()


def test_a_group_with_a_stock_and_an_installed_agent_runs_and_moves(cluster: dict[str, Any]) -> None:
    lab: Lab = cluster["lab"]
    group = ('<group id="grp"><meta_attributes id="grp-meta">'
             '<nvpair id="grp-stickiness" name="resource-stickiness" value="100"/></meta_attributes>'
             '<primitive id="dummy" class="ocf" provider="pacemaker" type="Dummy">'
             '<operations><op id="dummy-mon" name="monitor" interval="2s"/></operations></primitive>'
             '<primitive id="probe" class="ocf" provider="veritas" type="LabProbe">'
             '<operations><op id="probe-mon" name="monitor" interval="2s"/></operations></primitive></group>')
    lab.exec("node1", "cibadmin", "--create", "-o", "resources", "--xml-text", group)
    wait_for(lambda: len(running_on(lab, "node1", "grp")) == 1, 30, "the group running on one node")
    first = running_on(lab, "node1", "grp")[0]
    # the agents' state files are in the node's own /run: on that node only
    for n in NODES:
        there = lab.exec(n, "test", "-e", "/run/Dummy-dummy.state", check=False).returncode == 0
        assert there == (n == first), (n, first)
    assert "grp" in next(x for x in lab.status()["nodes"] if x["name"] == first)["pacemaker"]["resources"] \
        or "dummy" in next(x for x in lab.status()["nodes"] if x["name"] == first)["pacemaker"]["resources"]

    target = next(n for n in NODES if n != first)
    t0 = time.monotonic()
    lab.exec("node1", "crm_resource", "--move", "-r", "grp", "-N", target)
    wait_for(lambda: running_on(lab, "node1", "grp") == [target], 30, f"grp moved to {target}")
    print(f"\ncrm_resource --move: {time.monotonic() - t0:.1f} s")
    lab.exec("node1", "crm_resource", "--clear", "-r", "grp")

    t0 = time.monotonic()
    lab.exec("node1", "crm_attribute", "--node", target, "--name", "standby", "--update", "on")
    wait_for(lambda: running_on(lab, "node1", "grp") not in ([], [target]), 30, f"grp off standby {target}")
    print(f"standby: {time.monotonic() - t0:.1f} s")
    assert lab.exec(target, "test", "-e", "/run/Dummy-dummy.state", check=False).returncode != 0
    lab.exec("node1", "crm_attribute", "--node", target, "--name", "standby", "--update", "off")
    wait_for(lambda: online(crm(lab, "node1")) == NODES, 30, f"{target} out of standby")


def test_killing_the_node_running_the_group_fences_it_and_recovers_the_group(cluster: dict[str, Any]) -> None:
    lab: Lab = cluster["lab"]
    cluster["procs"] |= node_procs(lab.status())
    victim = running_on(lab, "node1", "grp")[0]
    via = next(n for n in NODES if n != victim)
    t0 = time.monotonic()
    lab.run("kill", victim)
    wait_for(lambda: running_on(lab, via, "grp") not in ([], [victim]), 90, "grp recovered on a survivor")
    took = time.monotonic() - t0
    now = running_on(lab, via, "grp")[0]
    print(f"\nkill {victim} -> grp running on {now}: {took:.1f} s")
    # recovered only after fencing: the fencer turned the victim off, through fence_lab and the lab's kill
    history = lab.exec(via, "stonith_admin", "--history", victim).stdout
    assert f"off of {victim} successful" in history or f"turn off node {victim}" in history, history
    fencer_log = (lab.dir / "fencer.log").read_text()
    assert f"off {victim}: ok" in fencer_log, fencer_log
    st = next(n for n in lab.status()["nodes"] if n["name"] == victim)
    assert st["state"] == "killed" and st["pacemaker"]["state"] == "offline", st
    cluster["victim"], cluster["survivor_host"] = victim, now


def test_start_brings_the_fenced_node_back_into_the_cluster(cluster: dict[str, Any]) -> None:
    lab: Lab = cluster["lab"]
    victim = cluster["victim"]
    t0 = time.monotonic()
    lab.run("start", victim, timeout=180)  # returns once it has rejoined
    print(f"\nstart {victim} -> rejoined: {time.monotonic() - t0:.1f} s")
    for n in NODES:
        assert online(crm(lab, n)) == NODES
    time.sleep(3)  # it stays: a node that was fenced while down is not shot again, nor stops itself
    assert online(crm(lab, victim)) == NODES
    st = next(n for n in lab.status()["nodes"] if n["name"] == victim)
    assert st["state"] == "running" and st["pacemaker"]["state"] == "online", st
    assert running_on(lab, victim, "grp") == [cluster["survivor_host"]]  # sticky: it did not move back


def test_a_partitioned_live_node_is_fenced_by_the_majority(cluster: dict[str, Any]) -> None:
    lab: Lab = cluster["lab"]
    cut = next(n for n in reversed(NODES) if n != running_on(lab, "node1", "grp")[0])
    cluster["procs"] |= node_procs(lab.status())
    init = next(n for n in lab.status()["nodes"] if n["name"] == cut)["pids"]["init"]
    fenced_before = (lab.dir / "fencer.log").read_text().count(f"off {cut}: ok")
    t0 = time.monotonic()
    lab.run("cut", cut)  # alive but unreachable: only fencing makes it safe to run its resources elsewhere
    wait_for(lambda: next(n for n in lab.status()["nodes"] if n["name"] == cut)["state"] == "killed", 60,
             f"{cut} fenced")
    print(f"\ncut {cut} -> fenced (killed whole): {time.monotonic() - t0:.1f} s")
    assert not pid_alive(init)
    # the fencer did it: it logs its "ok" once the lab's kill has returned, so just after "killed" shows
    wait_for(lambda: (lab.dir / "fencer.log").read_text().count(f"off {cut}: ok") == fenced_before + 1, 10,
             f"the fencer's log of turning {cut} off")
    lab.run("heal", cut)
    lab.run("start", cut, timeout=180)
    assert online(crm(lab, "node1")) == NODES


def test_bad_requests_are_refused_and_change_nothing(cluster: dict[str, Any]) -> None:
    lab: PLab = cluster["lab"]
    with tempfile.TemporaryDirectory() as d:
        other = PLab(Path(d) / "a:b" / "lab", lab.ocf)  # ':' separates an overlay's lower directories
        r = other.run("up", "--pacemaker", check=False)
        assert r.returncode == 1 and "without ':' or ','" in r.stderr, r.stderr
        assert not other.dir.exists()
    r = lab.run("up", "--pacemaker", check=False)
    assert r.returncode == 1 and "a lab is already in" in r.stderr, r.stderr
    # the fence agent refuses a node the lab does not have, and fences nothing
    before = [n["pids"] for n in lab.status()["nodes"]]
    r = lab.exec("node1", "fence_lab", "-o", "off", "-n", "node9", "--lab-dir", str(lab.dir), check=False)
    assert r.returncode == 1 and "node9" in r.stderr, r.stderr
    assert [n["pids"] for n in lab.status()["nodes"]] == before


def test_down_leaves_nothing_of_the_lab(cluster: dict[str, Any]) -> None:
    lab: Lab = cluster["lab"]
    st = lab.status()
    procs = cluster["procs"] | node_procs(st)
    assert any(p == st["pacemaker"]["fencer"] for p, _ in procs)
    mntns = {n["name"]: os.stat(f"/proc/{n['pids']['init']}/ns/mnt").st_ino for n in st["nodes"]}
    lab.run("down", timeout=180)

    def same(pid: int, start: int) -> bool:
        """The very process recorded, still running (a zombie holds nothing; its reaper is PID 1's)."""
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return f[0] not in ("Z", "X") and int(f[19]) == start
        except (OSError, ValueError, IndexError):
            return False

    assert [p for p, s in procs if same(p, s)] == [], "processes of the lab outlived down"
    assert lab_footprint(lab.dir) == {"processes": [], "mounts": [], "loops": []}
    assert not lab.dir.exists()
    for name, ino in mntns.items():
        assert ns_holders("mnt", ino) == [], f"{name}'s mount namespace outlived down"
    assert host_tree(HOST_FILES) == cluster["host_before"]
