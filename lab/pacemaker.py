"""corosync and Pacemaker on lab nodes (``scripts/lab up --pacemaker``): files, configuration, views.

Each node runs its own corosync (knet, unicast UDP over the nodes' 198.18 addresses) and pacemakerd, in
the node's namespaces. The host's /etc/corosync, /var/lib/corosync, /var/lib/pacemaker and
/var/log/{corosync,pacemaker} are never used: lab.nodeinit bind-mounts the node's own copies over them
in the node's mount namespace, with a private /run (corosync's pid lock, the resource agents' state
files) and /dev/shm (libqb's IPC buffers). Pacemaker's IPC sockets are abstract, so they belong to the
node's network namespace. Under the lab directory:

    pcmk/sbin/fence_lab           the lab's fence agent, overlaid onto each node's /usr/sbin
    pcmk/ocf/veritas/AGENT        the repo's agents/ocf/* (symlinks), overlaid onto /usr/lib/ocf/resource.d
    nodes/NODE/pcmk/etc-corosync  corosync.conf               -> /etc/corosync
    nodes/NODE/pcmk/lib-corosync                              -> /var/lib/corosync
    nodes/NODE/pcmk/lib-pacemaker cib/cib.xml (seeded by up)  -> /var/lib/pacemaker
    nodes/NODE/pcmk/log-corosync, log-pacemaker               -> /var/log/corosync, /var/log/pacemaker
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
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
    agents (absolute symlinks, so an agent that finds its package through its resolved path still
    does, and edits show at once). Returns the names of the OCF agents installed as ocf:veritas:NAME."""
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
            (ocf / f.name).symlink_to(f.resolve())
            names.append(f.name)
    return names


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
