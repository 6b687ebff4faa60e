"""corosync and Pacemaker on lab nodes (``scripts/lab up --pacemaker``): files, configuration, views.

Each node runs its own corosync (knet, unicast UDP over the nodes' 198.18 addresses) and pacemakerd, in
the node's namespaces. The host's /etc/corosync, /var/lib/corosync, /var/lib/pacemaker and
/var/log/{corosync,pacemaker} are never used: lab.nodeinit bind-mounts the node's own copies over them
in the node's mount namespace, with a private /run (corosync's pid lock, the resource agents' state
files) and /dev/shm (libqb's IPC buffers). Pacemaker's IPC sockets are abstract, so they belong to the
node's network namespace. Under the lab directory:

    pcmk/sbin/fence_lab           the lab's fence agent, overlaid onto each node's /usr/sbin
    pcmk/ocf/veritas/AGENT        the repo's agents/ocf/* (symlinks; a Python agent: a wrapper running it
                                  under the lab's interpreter), overlaid onto /usr/lib/ocf/resource.d
    nodes/NODE/pcmk/etc-corosync  corosync.conf               -> /etc/corosync
    nodes/NODE/pcmk/lib-corosync                              -> /var/lib/corosync
    nodes/NODE/pcmk/lib-pacemaker cib/cib.xml (seeded by up)  -> /var/lib/pacemaker
    nodes/NODE/pcmk/log-corosync, log-pacemaker               -> /var/log/corosync, /var/log/pacemaker
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

FENCE_AGENT = Path(__file__).resolve().parent / "fence_lab"
CLUSTER_NAME = "veritas-lab"
FENCE_ID = "fence-lab"

# node directory -> where it is mounted inside the node, and whether Pacemaker's user owns it
NODE_DIRS: tuple[tuple[str, str, bool], ...] = (
    ("etc-corosync", "/etc/corosync", False),
    ("lib-corosync", "/var/lib/corosync", False),
    ("lib-pacemaker", "/var/lib/pacemaker", True),
    ("log-corosync", "/var/log/corosync", False),
    ("log-pacemaker", "/var/log/pacemaker", True),
)
TOOLS = ("corosync", "corosync-cfgtool", "pacemakerd", "crm_mon", "cibadmin", "crm_attribute", "stonith_admin")


def ocf_source() -> Path:
    """Where the OCF agents the lab installs come from: the repo's agents/ocf, or VERITAS_LAB_OCF_DIR."""
    return Path(os.environ.get("VERITAS_LAB_OCF_DIR") or Path(__file__).resolve().parents[1] / "agents" / "ocf")


def prepare_lab(dir: Path) -> list[str]:
    """The lab-wide files the nodes overlay: the fence agent (a copy: it is self-contained) and the OCF
    agents (absolute symlinks, or wrappers exec'ing the real path, so an agent that finds its package
    through its resolved path still does, and edits show at once). Returns the names of the OCF
    agents installed as ocf:veritas:NAME."""
    sbin = dir / "pcmk" / "sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FENCE_AGENT, sbin / "fence_lab")
    os.chmod(sbin / "fence_lab", 0o755)
    ocf = dir / "pcmk" / "ocf" / "veritas"
    ocf.mkdir(parents=True, exist_ok=True)
    os.chmod(ocf, 0o755)
    names = []
    src = ocf_source()
    for f in sorted(src.iterdir()) if src.is_dir() else []:
        if f.is_file() and os.access(f, os.X_OK) and not f.name.startswith((".", "_")):
            if _python_script(f):
                (ocf / f.name).write_text(python_agent_wrapper(f))
                os.chmod(ocf / f.name, 0o755)
            else:
                (ocf / f.name).symlink_to(f.resolve())
            names.append(f.name)
    return names


def python_agent_wrapper(agent: Path) -> str:
    """A shell wrapper for a Python agent: every action runs the agent under the lab's own interpreter,
    from its real path (Pacemaker's PATH may find a python3 without the docker SDK); meta-data is
    answered by the wrapper itself, from the agent's own output taken now.

    Why meta-data is inlined: the controller runs it as hacluster, who cannot execute the lab's
    interpreter when it lives under /root (pyenv). Pacemaker 2.1.5 fetches meta-data asynchronously
    before an agent's first operation on a node, and when two such fetches fail at once it can lose one
    of the operations waiting on them: never run, never reported, the DC's transition stuck until its
    timeout (90 s), with every event (a standby, a failure) waiting behind it."""
    run = [sys.executable, "-S", str(agent.resolve())]
    r = subprocess.run([*run, "meta-data"], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0 or not r.stdout.lstrip().startswith("<?xml"):
        raise RuntimeError(f"{agent} meta-data failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    end = "VERITAS_META_DATA_END"
    if end in r.stdout:
        raise RuntimeError(f"{agent} meta-data contains the wrapper's here-document delimiter {end}")
    return (f'#!/bin/sh\nif [ "$1" = meta-data ]; then\ncat <<\'{end}\'\n{r.stdout.rstrip()}\n{end}\n'
            f'exit 0\nfi\nexec {shlex.join(run)} "$@"\n')


def _python_script(f: Path) -> bool:
    with open(f, "rb") as fh:
        first = fh.readline(200)
    return first.startswith(b"#!") and b"python" in first


def hacluster() -> tuple[int, int]:
    """Pacemaker's user and group (its daemons drop to them)."""
    return pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid


def prepare_node(base: Path, peers: list[tuple[str, int, str]], fresh: bool) -> None:
    """A node's corosync and Pacemaker directories, its corosync.conf, and (``fresh``) its first CIB."""
    uid, gid = hacluster()
    p = base / "pcmk"
    for name, _target, pcmk_owned in NODE_DIRS:
        (p / name).mkdir(parents=True, exist_ok=True)
        if pcmk_owned:
            os.chown(p / name, uid, gid)
            os.chmod(p / name, 0o770 if name.startswith("log") else 0o750)
    for sub in ("cib", "pengine", "blackbox", "cores"):
        d = p / "lib-pacemaker" / sub
        d.mkdir(exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o750)
    (p / "log-pacemaker" / "bundles").mkdir(exist_ok=True)
    (p / "etc-corosync" / "corosync.conf").write_text(corosync_conf(peers))
    if fresh:
        cib = p / "lib-pacemaker" / "cib" / "cib.xml"
        cib.write_text(seed_cib())
        os.chown(cib, uid, gid)
        os.chmod(cib, 0o600)


def corosync_conf(peers: list[tuple[str, int, str]]) -> str:
    """knet over unicast UDP between the nodes' addresses; a 1 s token (the notes' measured setting);
    no crypto (no authkey to distribute: the lab's switch is private); logs in the node's own dir."""
    nodes = "".join(f"    node {{\n        name: {name}\n        nodeid: {nodeid}\n        ring0_addr: {addr}\n    }}\n"
                    for name, nodeid, addr in peers)
    two = "    two_node: 1\n" if len(peers) == 2 else ""
    return ("# written by scripts/lab for this node\n"
            "totem {\n    version: 2\n"
            f"    cluster_name: {CLUSTER_NAME}\n"
            "    transport: knet\n    ip_version: ipv4\n    token: 1000\n"
            "    crypto_cipher: none\n    crypto_hash: none\n"
            "    interface {\n        linknumber: 0\n        knet_transport: udp\n    }\n}\n"
            f"nodelist {{\n{nodes}}}\n"
            f"quorum {{\n    provider: corosync_votequorum\n{two}}}\n"
            "logging {\n    to_logfile: yes\n    logfile: /var/log/corosync/corosync.log\n"
            "    to_syslog: no\n    to_stderr: no\n    timestamp: on\n}\n")


def seed_cib() -> str:
    """The first CIB of every node: fencing off until every node has joined (else startup-fencing
    would shoot nodes still booting), and a 2 s dc-deadtime (a DC in seconds, not the default 20 s)."""
    return ('<cib admin_epoch="0" epoch="1" num_updates="0" validate-with="pacemaker-3.0">\n'
            '  <configuration>\n'
            '    <crm_config>\n'
            '      <cluster_property_set id="cib-bootstrap-options">\n'
            '        <nvpair id="cib-bootstrap-options-stonith-enabled" name="stonith-enabled" value="false"/>\n'
            '        <nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="2s"/>\n'
            f'        <nvpair id="cib-bootstrap-options-cluster-name" name="cluster-name" value="{CLUSTER_NAME}"/>\n'
            '      </cluster_property_set>\n'
            '    </crm_config>\n'
            '    <nodes/>\n    <resources/>\n    <constraints/>\n'
            '  </configuration>\n'
            '  <status/>\n'
            '</cib>\n')


def fence_device_xml(lab_dir: Path, names: list[str]) -> str:
    """The fence_lab device: one for every node (static host list), monitored every 30 s."""
    return (f'<primitive id="{FENCE_ID}" class="stonith" type="fence_lab">'
            f'<instance_attributes id="{FENCE_ID}-ia">'
            f'<nvpair id="{FENCE_ID}-lab_dir" name="lab_dir" value={quoteattr(str(lab_dir))}/>'
            f'<nvpair id="{FENCE_ID}-pcmk_host_list" name="pcmk_host_list" value="{" ".join(names)}"/>'
            f'<nvpair id="{FENCE_ID}-pcmk_host_check" name="pcmk_host_check" value="static-list"/>'
            '</instance_attributes>'
            f'<operations><op id="{FENCE_ID}-monitor" name="monitor" interval="30s"/></operations>'
            '</primitive>')


# cluster properties set once every node has joined: fencing on, and "off" (a fenced lab node stays
# down until `scripts/lab start`, as a powered-off host would)
FENCING_PROPERTIES = (("stonith-enabled", "true"), ("stonith-action", "off"))


@dataclass
class ClusterView:
    """What one node's crm_mon shows: the DC, quorum, each node's state, where each resource runs."""

    dc: str | None = None
    quorum: bool = False
    nodes: dict[str, dict[str, bool]] = field(default_factory=dict)
    resources: dict[str, list[str]] = field(default_factory=dict)

    def node_state(self, name: str) -> str:
        n = self.nodes.get(name)
        if n is None:
            return "unknown"
        if n.get("unclean"):
            return "unclean"
        if not n.get("online"):
            return "offline"
        if n.get("pending"):
            return "pending"
        if n.get("standby"):
            return "standby"
        return "online"

    def all_online(self, names: list[str]) -> bool:
        return self.dc is not None and self.quorum and all(
            self.nodes.get(n, {}).get("online") and not self.nodes[n].get("pending") for n in names)


def parse_crm_mon(text: str) -> ClusterView:
    """``crm_mon -1 --output-as=xml`` (Pacemaker 2.1) into a ClusterView."""
    root = ET.fromstring(text)
    v = ClusterView()
    dc = root.find("./summary/current_dc")
    if dc is not None and dc.get("present") == "true":
        v.dc = dc.get("name")
        v.quorum = dc.get("with_quorum") == "true"
    for n in root.findall("./nodes/node"):
        v.nodes[n.get("name", "")] = {k: n.get(k) == "true" for k in ("online", "standby", "unclean",
                                                                       "pending", "shutdown", "is_dc")}
    for r in root.iter("resource"):
        if r.get("active") == "true" and r.get("role") in ("Started", "Promoted", "Unpromoted", "Master", "Slave"):
            v.resources.setdefault(r.get("id", ""), []).extend(x.get("name", "") for x in r.findall("node"))
    return v


# ``up --pacemaker --app``: a container with a veritas volume on every node's DockerDaemon (lab.core)
APP_DAEMON = "dockerd"
APP_DAEMON_CLONE = "dockerd-clone"
APP_GROUP = "g-web"
APP_CONTAINER = "web"
APP_IMAGE = "localbusybox:latest"
APP_VOLUME = "webdata"
APP_MOUNT = "/data"
APP_DOCKER_HOST = "unix:///run/docker.sock"  # the same on every node (lab.nodeinit's symlink)
# the container's command: it ends at once on SIGTERM (a shell as PID 1 ignores it otherwise)
APP_COMMAND = "sh -c 'trap \"exit 0\" TERM; while :; do sleep 1; done'"
APP_MIGRATION_THRESHOLD = 3  # the container: restarted in place, moved once its fail count reaches 3 (one
# failure injected by the watcher is sometimes counted twice by Pacemaker 2.1.5: 2 would move it at once)
APP_FAILURE_TIMEOUT = "120s"


@dataclass
class DaemonSite:
    """One node's dockerd as ocf:veritas:DockerDaemon must see it to adopt the lab's daemon."""

    node: str
    pidfile: str
    socket: str
    args: list[str]
    logfile: str


def _nv(prefix: str, name: str, value: str) -> str:
    return f'<nvpair id="{prefix}-{name}" name="{name}" value={quoteattr(value)}/>'


def app_resources_xml(sites: list[DaemonSite]) -> list[str]:
    """The clone of ocf:veritas:DockerDaemon (each node's attributes chosen by a #uname rule: data root,
    pid file and socket differ per node) and the group of ocf:veritas:DockerContainer on it.

    The daemon's migration-threshold is 1: a dockerd that failed (killed) is not started again on its
    node, so the container fails over rather than waiting for the same node's engine to come back."""
    ias = []
    for i, s in enumerate(sites):
        pid = f"{APP_DAEMON}-ia-{s.node}"
        ias.append(f'<instance_attributes id="{pid}" score="{len(sites) - i}">'
                   f'<rule id="{pid}-rule" score="0"><expression id="{pid}-expr" attribute="#uname" '
                   f'operation="eq" value="{s.node}"/></rule>'
                   + _nv(pid, "pidfile", s.pidfile) + _nv(pid, "socket", s.socket)
                   + _nv(pid, "args", shlex.join(s.args)) + _nv(pid, "logfile", s.logfile)
                   + '</instance_attributes>')
    d, w = APP_DAEMON, APP_CONTAINER
    daemon = (f'<clone id="{APP_DAEMON_CLONE}"><meta_attributes id="{APP_DAEMON_CLONE}-meta">'
              + _nv(f"{APP_DAEMON_CLONE}-meta", "interleave", "true") + '</meta_attributes>'
              f'<primitive id="{d}" class="ocf" provider="veritas" type="DockerDaemon">' + "".join(ias)
              + f'<meta_attributes id="{d}-meta">' + _nv(f"{d}-meta", "migration-threshold", "1")
              + _nv(f"{d}-meta", "failure-timeout", APP_FAILURE_TIMEOUT) + '</meta_attributes>'
              f'<operations><op id="{d}-start" name="start" interval="0s" timeout="90s"/>'
              f'<op id="{d}-stop" name="stop" interval="0s" timeout="90s"/>'
              f'<op id="{d}-monitor" name="monitor" interval="5s" timeout="30s"/></operations>'
              '</primitive></clone>')
    wia = f"{w}-ia"
    group = (f'<group id="{APP_GROUP}"><meta_attributes id="{APP_GROUP}-meta">'
             + _nv(f"{APP_GROUP}-meta", "resource-stickiness", "100") + '</meta_attributes>'
             f'<primitive id="{w}" class="ocf" provider="veritas" type="DockerContainer">'
             f'<instance_attributes id="{wia}">' + _nv(wia, "name", w) + _nv(wia, "image", APP_IMAGE)
             + _nv(wia, "command", APP_COMMAND) + _nv(wia, "volumes", f"{APP_VOLUME}:{APP_MOUNT}")
             + _nv(wia, "docker_host", APP_DOCKER_HOST) + _nv(wia, "stop_timeout", "5")
             + '</instance_attributes>'
             f'<meta_attributes id="{w}-meta">' + _nv(f"{w}-meta", "migration-threshold", str(APP_MIGRATION_THRESHOLD))
             + _nv(f"{w}-meta", "failure-timeout", APP_FAILURE_TIMEOUT) + '</meta_attributes>'
             f'<operations><op id="{w}-start" name="start" interval="0s" timeout="60s"/>'
             f'<op id="{w}-stop" name="stop" interval="0s" timeout="60s"/>'
             f'<op id="{w}-monitor" name="monitor" interval="10s" timeout="30s"/></operations>'
             '</primitive></group>')
    return [daemon, group]


def app_constraints_xml() -> list[str]:
    """The group runs where the node's daemon runs, and starts after it."""
    return [f'<rsc_colocation id="{APP_GROUP}-with-{APP_DAEMON}" rsc="{APP_GROUP}" with-rsc="{APP_DAEMON_CLONE}" '
            'score="INFINITY"/>',
            f'<rsc_order id="{APP_DAEMON}-then-{APP_GROUP}" first="{APP_DAEMON_CLONE}" then="{APP_GROUP}" '
            'kind="Mandatory"/>']
