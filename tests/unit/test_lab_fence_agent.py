"""The lab's fence agent (lab/fence_lab) against its real host-side helper (lab.fencer), and the pieces of
lab.pacemaker that need no cluster: corosync.conf, and reading crm_mon's XML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import pacemaker as pcmk

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "lab" / "fence_lab"


def agent(stdin: str = "", *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(AGENT), *argv], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def fencer(tmp_path: Path) -> Iterator[Path]:
    """A lab directory that names two nodes, none of them running, and its fencing helper."""
    (tmp_path / "lab.json").write_text(json.dumps({"nodes": [{"name": "node1", "index": 1, "site": "site1"},
                                                             {"name": "node2", "index": 2, "site": "site1"}],
                                                   "pacemaker": True}))
    log = open(tmp_path / "fencer.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "lab.fencer", str(tmp_path)], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 20
        while agent(f"action=monitor\nlab_dir={tmp_path}\n").returncode != 0:
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "fencer.log").read_text()
            time.sleep(0.05)
        yield tmp_path
    finally:
        p.kill()
        p.wait()


def test_metadata_is_xml_with_the_fence_api_actions() -> None:
    r = agent("action=metadata\n")
    assert r.returncode == 0, r.stderr
    root = ET.fromstring(r.stdout)
    assert root.get("name") == "fence_lab"
    actions = {a.get("name") for a in root.iter("action")}
    assert {"on", "off", "reboot", "status", "monitor", "list", "metadata"} <= actions
    assert {"action", "plug", "port", "lab_dir"} <= {p.get("name") for p in root.iter("parameter")}
    assert agent("", "-o", "metadata").stdout == r.stdout


def test_status_list_and_refusals_through_the_helper(fencer: Path) -> None:
    # a node with no running init is off: status exits 2, as fence agents report "off"
    r = agent(f"action=status\nport=node2\nlab_dir={fencer}\n")
    assert r.returncode == 2 and "OFF" in r.stdout, (r.returncode, r.stdout, r.stderr)
    r = agent("", "-o", "status", "-n", "node1", "--lab-dir", str(fencer))
    assert r.returncode == 2, r.stderr
    r = agent(f"action=list\nlab_dir={fencer}\n")
    assert r.returncode == 0 and r.stdout.split() == ["node1,", "node2,"], r.stdout
    # a node the lab does not have: a clear failure, and nothing is done
    r = agent(f"action=off\nplug=node9\nlab_dir={fencer}\n")
    assert r.returncode == 1 and "node9" in r.stderr, r.stderr
    assert "off node9: failed" in (fencer / "fencer.log").read_text()
    assert agent(f"action=off\nlab_dir={fencer}\n").returncode == 1  # which node?
    assert agent("action=off\nplug=node1\n").returncode == 1  # which lab?
    assert agent(f"action=dance\nplug=node1\nlab_dir={fencer}\n").returncode == 1
    assert agent(f"action=monitor\nlab_dir={fencer / 'nowhere'}\n").returncode == 1


def test_corosync_conf_is_unicast_knet_between_the_node_addresses() -> None:
    peers = [("node1", 1, "198.18.0.1"), ("node2", 2, "198.18.0.2"), ("node3", 3, "198.18.0.3")]
    conf = pcmk.corosync_conf(peers)
    assert "transport: knet" in conf and "knet_transport: udp" in conf and "token: 1000" in conf
    for name, i, addr in peers:
        assert f"name: {name}\n        nodeid: {i}\n        ring0_addr: {addr}" in conf
    assert "two_node" not in conf
    assert "two_node: 1" in pcmk.corosync_conf(peers[:2])
    assert "/var/log/corosync/corosync.log" in conf  # the node's own log dir (bind-mounted)


CRM_MON = """<pacemaker-result api-version="2.29" request="crm_mon -1 --output-as=xml">
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5-a3f44794f94" name="node2" id="2" with_quorum="true"/>
  </summary>
  <nodes>
    <node name="node1" id="1" online="true" standby="false" standby_onfail="false" maintenance="false"
          pending="false" unclean="false" shutdown="false" expected_up="true" is_dc="false" resources_running="1"
          type="member"/>
    <node name="node2" id="2" online="true" standby="true" standby_onfail="false" maintenance="false"
          pending="false" unclean="false" shutdown="false" expected_up="true" is_dc="true" resources_running="0"
          type="member"/>
    <node name="node3" id="3" online="false" standby="false" standby_onfail="false" maintenance="false"
          pending="false" unclean="true" shutdown="false" expected_up="true" is_dc="false" resources_running="0"
          type="member"/>
  </nodes>
  <resources>
    <resource id="fence-lab" resource_agent="stonith:fence_lab" role="Started" active="true" orphaned="false"
              blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1">
      <node name="node1" id="1" cached="true"/>
    </resource>
    <group id="grp" number_resources="1" managed="true" disabled="false">
      <resource id="dummy" resource_agent="ocf:pacemaker:Dummy" role="Stopped" active="false" orphaned="false"
                blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="0"/>
    </group>
  </resources>
</pacemaker-result>
"""


def test_crm_mon_xml_is_read_into_a_cluster_view() -> None:
    v = pcmk.parse_crm_mon(CRM_MON)
    assert v.dc == "node2" and v.quorum
    assert [v.node_state(n) for n in ("node1", "node2", "node3", "node4")] == \
        ["online", "standby", "unclean", "unknown"]
    assert v.resources == {"fence-lab": ["node1"]}
    assert v.all_online(["node1", "node2"]) and not v.all_online(["node1", "node3"])
