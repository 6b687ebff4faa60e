"""``scripts/lab up --pacemaker --app`` without a cluster: the agents as the lab installs them, and the
resources it defines (checked by Pacemaker's own crm_verify)."""

from __future__ import annotations

import os
import shlex
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab import pacemaker as pcmk

REPO = Path(__file__).resolve().parents[2]


def test_python_agents_run_under_the_labs_interpreter_whatever_pacemakers_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pacemaker runs agents with its own PATH; there ``env python3`` may lack the docker SDK. The
    installed agent must still answer as the agent (engine down: offline, 7), not crash (1)."""
    monkeypatch.setenv("VERITAS_LAB_OCF_DIR", str(REPO / "agents" / "ocf"))
    names = pcmk.prepare_lab(tmp_path)
    assert {"DockerContainer", "DockerDaemon"} <= set(names)
    agent = tmp_path / "pcmk" / "ocf" / "veritas" / "DockerContainer"
    env = {"PATH": "/usr/bin:/bin", "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "web",
           "OCF_RESKEY_name": "web", "OCF_RESKEY_image": "localbusybox:latest",
           "OCF_RESKEY_docker_host": f"unix://{tmp_path}/no-engine.sock", "VERITAS_AGENT_STATE": str(tmp_path / "st")}
    r = subprocess.run([str(agent), "monitor"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 7, (r.returncode, r.stderr[-2000:])
    md = subprocess.run([str(agent), "meta-data"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert md.returncode == 0 and ET.fromstring(md.stdout).get("name") == "DockerContainer"


def test_meta_data_is_answered_without_the_labs_interpreter(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Pacemaker's controller asks for meta-data as hacluster, who may not execute the lab's interpreter
    (pyenv under /root): the wrapper answers it by itself, with exactly what the agent says."""
    monkeypatch.setenv("VERITAS_LAB_OCF_DIR", str(REPO / "agents" / "ocf"))
    pcmk.prepare_lab(tmp_path)
    for name in ("DockerContainer", "DockerDaemon"):
        wrapper = tmp_path / "pcmk" / "ocf" / "veritas" / name
        own = subprocess.run([str(REPO / "agents" / "ocf" / name), "meta-data"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        # sh and cat only: the interpreter is never started (as hacluster: tests/cluster/test_pacemaker_failover)
        r = subprocess.run(["/bin/sh", str(wrapper), "meta-data"], env={"PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=10, check=True)
        assert r.stdout.strip() == own.strip() and ET.fromstring(r.stdout).get("name") == name
        assert "python" not in wrapper.read_text().split("then", 1)[1].split("fi", 1)[0]


def test_an_agent_whose_meta_data_fails_is_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Broken").write_text("#!/usr/bin/env python3\nimport sys\nsys.exit('no meta-data here')\n")
    os.chmod(src / "Broken", 0o755)
    monkeypatch.setenv("VERITAS_LAB_OCF_DIR", str(src))
    with pytest.raises(RuntimeError, match="meta-data failed.*no meta-data here"):
        pcmk.prepare_lab(tmp_path / "lab")


def test_a_shell_agent_is_still_installed_as_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Probe").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(src / "Probe", 0o755)
    monkeypatch.setenv("VERITAS_LAB_OCF_DIR", str(src))
    assert pcmk.prepare_lab(tmp_path / "lab") == ["Probe"]
    assert (tmp_path / "lab" / "pcmk" / "ocf" / "veritas" / "Probe").resolve() == (src / "Probe").resolve()


def sites() -> list[pcmk.DaemonSite]:
    return [pcmk.DaemonSite(f"node{i}", f"/l/nodes/node{i}/docker.pid", f"/l/nodes/node{i}/docker.sock",
                            ["--data-root", f"/l/nodes/node{i}/data", "--bip", f"198.19.{i}.1/24"],
                            f"/l/nodes/node{i}/dockerd.log") for i in (1, 2, 3)]


def test_the_app_cib_is_valid_for_pacemaker(tmp_path: Path) -> None:
    cib = pcmk.seed_cib() \
        .replace("<nodes/>", "<nodes>" + "".join(f'<node id="{i}" uname="node{i}"/>' for i in (1, 2, 3)) + "</nodes>") \
        .replace("<resources/>", "<resources>" + "".join(pcmk.app_resources_xml(sites())) + "</resources>") \
        .replace("<constraints/>", "<constraints>" + "".join(pcmk.app_constraints_xml()) + "</constraints>")
    f = tmp_path / "cib.xml"
    f.write_text(cib)
    r = subprocess.run(["crm_verify", "-V", "--xml-file", str(f)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_each_node_gets_its_own_daemon_attributes_and_the_container_the_same_everywhere() -> None:
    clone, group = (ET.fromstring(x) for x in pcmk.app_resources_xml(sites()))
    daemon = clone.find("primitive")
    assert daemon is not None and daemon.get("type") == "DockerDaemon"
    for i, ia in enumerate(daemon.findall("instance_attributes"), start=1):
        expr = ia.find("rule/expression")
        assert expr is not None and (expr.get("attribute"), expr.get("value")) == ("#uname", f"node{i}")
        nv = {n.get("name"): n.get("value") for n in ia.findall("nvpair")}
        assert nv["pidfile"] == f"/l/nodes/node{i}/docker.pid" and nv["socket"] == f"/l/nodes/node{i}/docker.sock"
        assert shlex.split(nv["args"] or "") == ["--data-root", f"/l/nodes/node{i}/data", "--bip", f"198.19.{i}.1/24"]
    web = group.find("primitive")
    assert web is not None and web.get("type") == "DockerContainer"
    nv = {n.get("name"): n.get("value") for n in web.iter("nvpair")}
    assert nv["docker_host"] == "unix:///run/docker.sock" and nv["volumes"] == "webdata:/data"
    assert nv["migration-threshold"] == "3"
