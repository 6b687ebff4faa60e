"""The lab itself: nodes, the switch, etcd, swarm; up, kill, start, cut, heal, status, down.

Everything lives under one directory (``VERITAS_LAB_DIR``, default /var/lib/veritas-lab), so two labs
never collide:

    lab.json                  what ``up`` made: nodes, sites, options, which nodes are cut
    ns/                       a private bind mount holding the network namespaces (switch, nodes, etcd)
    sites/siteK/state         the site's shared disk group state root ("shared storage")
    nodes/NODE/               data (docker data root), exec, etc-docker, plugins (socket dir), mnt
                              (the plugin's mount root), veritas.conf, pids.json, logs
    rlink.key                 with --sites 2 or more: the pre-shared key of every node's ``veritas rlink
                              serve`` (one key: the sites authenticate each other with it), mode 0600
    nodes/etcd/               etcd's data and log, with --catalog etcd
    nodes/NODE/pcmk/, pcmk/   with --pacemaker: each node's corosync/Pacemaker dirs, the overlaid agents
                              (lab.pacemaker); fencer.sock and fencer.log of the fencing helper (lab.fencer)

A node's network namespace is a file under ns/ and lives as long as the lab (so a restarted node keeps
its address). Its mount and UTS namespaces belong to its first process (lab.nodeinit) and end with the
node's last process: a killed node leaves no mount behind, as a dead host would not.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import pacemaker as pcmk
from lab import uhttp, wire
from lab.image import IMAGE, busybox_tar
from lab.procs import Proc, Snapshot, alive, kill_until_gone, listening, ns_inode

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = "/var/lib/veritas-lab"  # not /run: a small tmpfs on most hosts, and the images are 8 GiB sparse
SUBNET = "198.18.0.0/16"  # the switch; engines take their bridges from 198.19.0.0/16
ETCD_ADDR = "198.18.1.1"
MANAGER_ADDR = "198.18.0.1"
MAX_NODES = 60  # docker bridges 198.19.N.0/24 stay below the address pool 198.19.64.0/18
RLINK_PORT = 4145  # VVR's port: every node's `veritas rlink serve` listens on ADDRESS:4145
REPL_INTERVAL = 2.0  # seconds between checkpoints in a lab (the config's default, 10 s, is slow for tests)


_T0 = time.monotonic()
_RECORD_LOCK = threading.Lock()


def debug(msg: str) -> None:
    """Progress on stderr when VERITAS_LAB_DEBUG is set (stdout carries only the JSON)."""
    if os.environ.get("VERITAS_LAB_DEBUG"):
        print(f"[lab {time.monotonic() - _T0:7.3f}] {msg}", file=sys.stderr, flush=True)


class LabError(Exception):
    """A lab command that cannot do what was asked; the message says why."""


def lab_dir() -> Path:
    return Path(os.environ.get("VERITAS_LAB_DIR", DEFAULT_DIR)).resolve()


def _run(argv: list[str], input: str | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _in_net(nsfile: Path, *argv: str, input: str | None = None) -> str:
    return _run(["nsenter", f"--net={nsfile}", *argv], input=input)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Node:
    name: str
    index: int
    site: str
    lab: Lab

    @property
    def base(self) -> Path:
        return self.lab.dir / "nodes" / self.name

    @property
    def address(self) -> str:
        return f"198.18.0.{self.index}"

    @property
    def netns(self) -> Path:
        return self.lab.dir / "ns" / f"{self.name}.net"

    @property
    def port(self) -> str:
        """The node's port on the switch (the switch-side end of its veth)."""
        return f"n{self.index}"

    @property
    def sock(self) -> Path:
        return self.base / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.sock}"

    @property
    def config(self) -> Path:
        return self.base / "veritas.conf"

    @property
    def plugin_sock(self) -> Path:
        return self.base / "plugins" / "veritas.sock"

    @property
    def state_root(self) -> Path:
        return self.lab.dir / "sites" / self.site / "state"

    @property
    def rlink_addr(self) -> str:
        """Where the node's replication link service listens (its lab address, a fixed port)."""
        return f"{self.address}:{RLINK_PORT}"

    # --- recorded processes -------------------------------------------------------------------------
    def pids(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.base / "pids.json").read_text()))
        except (OSError, ValueError):
            return {}

    def _record(self, **kv: Any) -> None:
        with _RECORD_LOCK:  # a node's plugin and dockerd start in threads of their own
            rec = self.pids()
            rec.update(kv)
            tmp = self.base / "pids.json.tmp"
            tmp.write_text(json.dumps(rec))
            tmp.replace(self.base / "pids.json")

    def proc(self, role: str) -> Proc | None:
        """The live process recorded for ``role`` (init, dockerd, plugin), or None. The node's dockerd
        may also be one that ocf:veritas:DockerDaemon started (``up --app``): then it is the process
        its pid file names, if that runs in this node's mount namespace with that pid file."""
        rec = self.pids()
        p = Proc.from_json(rec.get(role))
        if p is not None and p.alive():
            return p
        return self._started_dockerd(rec) if role == "dockerd" and self.lab.meta.get("app") else None

    def _started_dockerd(self, rec: dict[str, Any]) -> Proc | None:
        try:
            pid = int(self.dockerd_pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if rec.get("mnt") is None or ns_inode(pid, "mnt") != rec["mnt"] or \
                str(self.dockerd_pidfile).encode() not in argv or Proc.of(pid) is None:
            return None
        return Proc.of(pid)

    def containerd(self) -> Proc | None:
        try:
            pid = int((self.base / "exec" / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        p = Proc.of(pid)
        init = self.proc("init")
        # only a containerd of this node: the pid file may name a PID recycled since
        if p is None or not p.alive() or init is None or ns_inode(pid, "mnt") != ns_inode(init.pid, "mnt"):
            return None
        return p

    # --- the node's first process -------------------------------------------------------------------
    def _ask(self, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        reply = wire.ask(self.base / "init.sock", req, timeout)
        if "error" in reply:
            raise LabError(f"{self.name}: {reply['error']}")
        return reply

    def start_init(self, role: str = "docker") -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = open(self.base / "init.log", "ab")
        (self.base / "init.sock").unlink(missing_ok=True)
        p = subprocess.Popen(["nsenter", f"--net={self.netns}", "unshare", "-m", "-u", "--propagation", "slave",
                              sys.executable, "-m", "lab.nodeinit", str(self.lab.dir), self.name, role],
                             cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if p.poll() is not None:
                raise LabError(f"{self.name}: node init exited: {_tail(self.base / 'init.log')}")
            try:
                if self._ask({"op": "ping"}, timeout=2)["pid"] == p.pid:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: node init did not answer: {_tail(self.base / 'init.log')}")
            time.sleep(0.02)
        proc = Proc.of(p.pid)
        assert proc is not None
        self._record(init=proc.to_json(), mnt=ns_inode(p.pid, "mnt"), dockerd=None, plugin=None,
                     corosync=None, pacemakerd=None, watch=None, rlink=None)

    def spawn(self, role: str, argv: list[str], env: dict[str, str], log: str) -> Proc:
        pid = int(self._ask({"op": "spawn", "argv": argv, "env": env, "cwd": str(REPO),
                             "log": str(self.base / log)})["pid"])
        proc = Proc.of(pid)
        if proc is None:
            raise LabError(f"{self.name}: {role} exited at once: {_tail(self.base / log)}")
        self._record(**{role: proc.to_json()})
        return proc

    # --- daemons ------------------------------------------------------------------------------------
    def dockerd_argv(self) -> list[str]:
        # with Pacemaker, the node's /run/docker.sock is a symlink to this socket (lab.nodeinit)
        return ["dockerd", "--pidfile", str(self.dockerd_pidfile), "-H", self.docker_host, *self.dockerd_args()]

    @property
    def dockerd_pidfile(self) -> Path:
        return self.base / "docker.pid"

    def dockerd_args(self) -> list[str]:
        """dockerd's arguments but its pid file and socket: what ocf:veritas:DockerDaemon (``args``) is given
        to start the same daemon the lab starts (the agent adds --pidfile and -H itself)."""
        return ["--data-root", str(self.base / "data"), "--exec-root", str(self.base / "exec"),
                "--iptables=false", "--bip", f"198.19.{self.index}.1/24",
                "--default-address-pool", "base=198.19.64.0/18,size=24", "--log-level=warn"]

    def start_dockerd(self, timeout: float = 60) -> None:
        ctrd = self.containerd()
        deadline = time.monotonic() + 10
        while ctrd is not None and ctrd.alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # the containerd of a killed dockerd ends with it (pdeathsig)
        self.sock.unlink(missing_ok=True)
        if ctrd is None:  # pid files of dead daemons (their PIDs may be anyone's by now)
            (self.base / "exec" / "containerd" / "containerd.pid").unlink(missing_ok=True)
        (self.base / "docker.pid").unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        proc = self.spawn("dockerd", self.dockerd_argv(), env, "dockerd.log")
        debug(f"{self.name}: dockerd spawned")
        deadline = time.monotonic() + timeout
        while not uhttp.alive(str(self.sock)):
            if not proc.alive():
                raise LabError(f"{self.name}: dockerd exited: {_tail(self.base / 'dockerd.log')}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: dockerd did not come up: {_tail(self.base / 'dockerd.log')}")
            time.sleep(0.05)
        status, _ = uhttp.request(str(self.sock), "GET", f"/images/{IMAGE}/json")
        if status == 404:
            repo, tag = IMAGE.split(":")
            status, body = uhttp.request(str(self.sock), "POST", f"/images/create?fromSrc=-&repo={repo}&tag={tag}",
                                         body=busybox_tar(), content_type="application/x-tar", timeout=60)
            if status != 200:
                raise LabError(f"{self.name}: importing {IMAGE}: HTTP {status} {body[:300]!r}")

    def start_plugin(self, timeout: float = 60) -> None:
        self.plugin_sock.unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": str(REPO),
               "VERITAS_CONFIG": str(self.config), "HOME": "/root"}
        proc = self.spawn("plugin", [sys.executable, "-m", "veritas.cli", "plugin", "serve"], env, "plugin.log")
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive():
                raise LabError(f"{self.name}: the plugin exited: {_tail(self.base / 'plugin.log')}")
            try:
                status, body = uhttp.request(str(self.plugin_sock), "POST", "/Plugin.Activate", body=b"{}",
                                             timeout=2, content_type="application/vnd.docker.plugins.v1+json")
                if status == 200 and json.loads(body).get("Implements") == ["VolumeDriver"]:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: the plugin did not come up: {_tail(self.base / 'plugin.log')}")
            time.sleep(0.05)

    def start_rlink(self, timeout: float = 60) -> None:
        """``veritas rlink serve`` inside the node, on its lab address; ready once the kernel shows the
        process holding a listening socket there (in the node's network namespace). A restarted service
        takes the port at once: the service sets SO_REUSEADDR."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": str(REPO),
               "VERITAS_CONFIG": str(self.config), "HOME": "/root"}
        proc = self.spawn("rlink", [sys.executable, "-m", "veritas.cli", "rlink", "serve"], env, "rlink.log")
        deadline = time.monotonic() + timeout
        while not listening(proc.pid, self.address, RLINK_PORT):
            if not proc.alive():
                self._record(rlink=None)
                raise LabError(f"{self.name}: veritas rlink serve exited: {_tail(self.base / 'rlink.log')}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: veritas rlink serve did not listen on {self.rlink_addr}:"
                               f" {_tail(self.base / 'rlink.log')}")
            time.sleep(0.05)
        debug(f"{self.name}: rlink listening on {self.rlink_addr}")

    def stop_rlink(self, timeout: float = 30) -> None:
        """SIGTERM the link service (by its recorded PID): it ends the round under way, so no checkpoint's
        freeze is left behind; SIGKILL if it has not ended after ``timeout``."""
        proc = self.proc("rlink")
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        self._record(rlink=None)

    def write_config(self) -> None:
        text = ("# written by scripts/lab for this node\n"
                "[storage]\n"
                "diskgroup = dockerdg\n"
                f"state_root = {self.state_root}\n"
                f"mount_root = {self.base / 'mnt'}\n"
                "default_disk_size = 8g\n"
                "default_disk_count = 2\n"
                "[node]\n"
                f"name = {self.name}\n"
                "[plugin]\n"
                f"socket = {self.plugin_sock}\n"
                f"docker_host = {self.docker_host}\n"
                "workers = 2\n")
        cluster = []
        if self.lab.catalog == "etcd":
            cluster += ["catalog = etcd", f"etcd_endpoints = http://{ETCD_ADDR}:2379"]
        for key in ("lease_ttl", "lease_interval"):
            if self.lab.meta.get(key) is not None:
                cluster.append(f"{key} = {self.lab.meta[key]:g}")
        if cluster:
            text += "[cluster]\n" + "".join(line + "\n" for line in cluster)
        repl = self.lab.replication
        if repl is not None:
            text += ("[replication]\n"
                     f"listen = {self.rlink_addr}\n"
                     f"key_file = {self.lab.rlink_key}\n"
                     f"interval = {float(repl['interval']):g}\n")
        self.config.write_text(text)

    def boot(self, fresh: bool = False) -> None:
        """Everything of a node that is not running: its first process, the plugin, dockerd.

        The plugin comes first, as on a host whose plugin service starts before Docker: a dockerd with
        veritas volumes in its data root loads their driver while it starts (and waits for it), before
        its swarm agent describes the node; a node described without the plugin gets no task with a
        veritas volume until the agent's next description, up to 20 s later. On a fresh data root
        (``fresh``) there is nothing to load: both start at once. With Pacemaker, corosync starts beside
        them and pacemakerd after them.
        """
        if self.proc("init") is None:
            self.set_port(not self.lab.is_cut(self.name))
            self.start_init()
            debug(f"{self.name}: init up")
        if not self.lab.pacemaker:
            self._boot_docker(fresh)
            return
        # pacemakerd once the engine is up, as on a host whose cluster stack starts after Docker (the
        # resources it will run need the engine)
        _parallel([functools.partial(self._boot_docker, fresh), self._boot_corosync])
        if self.proc("pacemakerd") is None:
            self.start_pacemakerd()
            debug(f"{self.name}: pacemakerd up")
        if self.lab.meta.get("app") and self.proc("watch") is None:
            self.start_watcher()

    def _boot_docker(self, fresh: bool) -> None:
        want_plugin = self.lab.plugin and self.proc("plugin") is None
        if fresh and want_plugin and self.proc("dockerd") is None:
            _parallel([self._boot_storage, self.start_dockerd])
            debug(f"{self.name}: plugin and dockerd up")
        else:
            self._boot_storage()
            if self.proc("dockerd") is None:
                self.start_dockerd()
                debug(f"{self.name}: dockerd up")
        if self.lab.plugin:
            # dockerd loads a plugin found by its socket only when it first needs one; listing volumes
            # does, and the node then shows the driver in `docker info` (what swarm schedules by)
            uhttp.get_json(str(self.sock), "/volumes", timeout=60)

    def _boot_storage(self) -> None:
        """The plugin, then (with replication) the link service: after the plugin, which makes the
        site's default disk group on first use, as a host's rlink unit starts after its plugin."""
        if self.lab.plugin and self.proc("plugin") is None:
            self.start_plugin()
            debug(f"{self.name}: plugin up")
        if self.lab.replication is not None and self.proc("rlink") is None:
            self.start_rlink()

    # --- corosync and Pacemaker (lab.pacemaker) ------------------------------------------------------
    def run_in(self, argv: list[str], timeout: float = 30) -> str:
        """Run ``argv`` inside the node (its mount, UTS and network namespace); its stdout."""
        init = self.proc("init")
        if init is None:
            raise LabError(f"{self.name} is killed")
        return _run(["nsenter", "-t", str(init.pid), "-m", "-u", "-n", "--wd=/", *argv], timeout=timeout)

    def _boot_corosync(self) -> None:
        if self.proc("corosync") is None:
            self.start_corosync()
            debug(f"{self.name}: corosync up")

    def start_corosync(self, timeout: float = 30) -> None:
        """corosync in the foreground under the node's init; ready once its configuration service answers."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        proc = self.spawn("corosync", ["corosync", "-f"], env, "corosync.out")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run_in(["corosync-cfgtool", "-s"], timeout=5)
                return
            except (LabError, subprocess.TimeoutExpired):
                pass
            logs = _tail(self.base / "corosync.out") + _tail(self.base / "pcmk" / "log-corosync" / "corosync.log")
            if not proc.alive():
                raise LabError(f"{self.name}: corosync exited: {logs}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: corosync did not come up: {logs}")
            time.sleep(0.05)

    def start_pacemakerd(self) -> None:
        """pacemakerd (it starts and watches the other Pacemaker daemons), logging in the node's own dir."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PCMK_logfacility": "none",
               "PCMK_logfile": "/var/log/pacemaker/pacemaker.log"}
        self.spawn("pacemakerd", ["pacemakerd"], env, "pacemakerd.out")

    def start_watcher(self) -> None:
        """The agents' watcher (agents.watch): it fails a registered resource in Pacemaker the moment its
        container or dockerd dies. A node process like the others (recorded, ended by kill and down)."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": str(REPO)}
        self.spawn("watch", [sys.executable, "-m", "agents.watch", "--notifier", "pacemaker", "--node", self.name],
                   env, "watch.log")
        debug(f"{self.name}: watcher up")

    def daemon_site(self) -> pcmk.DaemonSite:
        """This node's dockerd as ocf:veritas:DockerDaemon is to adopt it (and start it again)."""
        return pcmk.DaemonSite(self.name, str(self.dockerd_pidfile), str(self.sock), self.dockerd_args(),
                               str(self.base / "dockerd.log"))

    def cluster_view(self) -> pcmk.ClusterView:
        """The cluster as this node's Pacemaker sees it (LabError while it cannot tell)."""
        return pcmk.parse_crm_mon(self.run_in(["crm_mon", "-1", "--output-as=xml"], timeout=20))

    def wait_cluster(self, names: list[str], timeout: float) -> pcmk.ClusterView:
        """Until this node sees a DC, quorum and every one of ``names`` online."""
        deadline = time.monotonic() + timeout
        last: str = "no answer yet"
        while True:
            try:
                view = self.cluster_view()
                if view.all_online(names):
                    return view
                last = f"DC {view.dc}, quorum {view.quorum}, nodes {view.nodes}"
            except (LabError, subprocess.TimeoutExpired, ValueError) as exc:
                last = str(exc)
            if self.proc("pacemakerd") is None:
                raise LabError(f"{self.name}: pacemakerd exited: {_tail(self.base / 'pacemakerd.out')}"
                               f"{_tail(self.base / 'pcmk' / 'log-pacemaker' / 'pacemaker.log')}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: the cluster did not form in {timeout:g} s: {last}")
            time.sleep(0.2)

    # --- failures -----------------------------------------------------------------------------------
    def members(self) -> set[int]:
        """Every process of the node, by the kernel's namespace identities: whatever is in its mount or
        network namespace, and their descendants (containers have namespaces of their own)."""
        rec = self.pids()
        mnt = rec.get("mnt")
        snap = Snapshot.take()
        out = snap.in_namespaces(net=ns_inode_of_file(self.netns), mnt=mnt)
        init = Proc.from_json(rec.get("init"))
        if init is not None and init.alive():
            out |= snap.descendants({init.pid})
        return out

    def kill(self, only: str | None = None) -> None:
        if only is None:
            # nor does a dead host's kernel keep a filesystem frozen: the node's own are thawed, once they
            # are no longer mounted elsewhere, while (a writer blocked on one dies only then) and after
            # its processes die (lab.thaw)
            mine = self.mounted_loops()
            left = kill_until_gone(self.members, stuck=lambda pids: thaw_unused(mine, but=pids))
            thaw_unused(mine, but=set())
            if left:
                raise LabError(f"{self.name}: processes outlived SIGKILL: {left}")
            self.set_port(False)  # a dead host answers nobody
            self._record(init=None, dockerd=None, plugin=None, corosync=None, pacemakerd=None, watch=None,
                         rlink=None)
            return
        proc = self.proc(only)
        if proc is None:
            raise LabError(f"{self.name}: no {only} runs")
        if only in ("plugin", "rlink"):
            tree = Snapshot.take().descendants({proc.pid})
            kill_until_gone(lambda: {p for p in tree if alive(p)})
        else:
            ctrd = self.containerd()
            os.kill(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while (proc.alive() or (ctrd is not None and ctrd.alive())) and time.monotonic() < deadline:
                time.sleep(0.02)
        self._record(**{only: None})

    def mounted_loops(self) -> list[str]:
        """The lab's loop devices that the node's mount namespace shows mounted, outermost first."""
        init = self.proc("init")
        if init is None:
            return []
        try:
            mine = _devnums_in(Path(f"/proc/{init.pid}/mountinfo"))
        except OSError:
            return []
        from storage.kernel import loop

        out = []
        for dev, _ in sorted(_loops_of(_file_ids(self.lab.dir)).items(), key=lambda kv: -kv[1]):
            with contextlib.suppress(OSError):
                if loop.devnum(dev) in mine:
                    out.append(dev)
        return out

    def set_port(self, up: bool) -> None:
        """Plug the node into the switch or pull its cable. Plugging in returns once both ends are
        operationally up: the kernel reports a carrier change up to a second late (linkwatch), and
        until then the node is still cut off."""
        _in_net(self.lab.switch, "ip", "link", "set", self.port, "up" if up else "down")
        if not up:
            return
        deadline = time.monotonic() + 10
        while True:
            ends = [json.loads(_in_net(self.lab.switch, "ip", "-j", "link", "show", self.port))[0],
                    json.loads(_in_net(self.netns, "ip", "-j", "link", "show", "eth0"))[0]]
            if all(e.get("operstate") == "UP" for e in ends):
                return
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: its link did not come up: {ends}")
            time.sleep(0.05)

    # --- status -------------------------------------------------------------------------------------
    def state(self) -> str:
        init, dockerd, plugin = self.proc("init"), self.proc("dockerd"), self.proc("plugin")
        if init is None:
            return "killed"
        if dockerd is None or (self.lab.plugin and plugin is None):
            return "degraded"
        if self.lab.replication is not None and self.proc("rlink") is None:
            return "degraded"
        if self.lab.pacemaker and (self.proc("corosync") is None or self.proc("pacemakerd") is None):
            return "degraded"
        return "running"


def ns_inode_of_file(path: Path) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if st.st_dev != os.stat(path.parent).st_dev else None  # an nsfs bind mount, not the file


class Lab:
    """One lab, in ``dir``."""

    def __init__(self, dir: Path | None = None) -> None:
        self.dir = (dir or lab_dir()).resolve()
        self.meta: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            self.meta = dict(json.loads((self.dir / "lab.json").read_text()))

    # --- metadata -----------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return bool(self.meta)

    @property
    def catalog(self) -> str:
        return str(self.meta.get("catalog", "sqlite"))

    @property
    def plugin(self) -> bool:
        return bool(self.meta.get("plugin", True))

    @property
    def pacemaker(self) -> bool:
        return bool(self.meta.get("pacemaker"))

    @property
    def replication(self) -> dict[str, Any] | None:
        """With --sites 2 or more (and the plugin): the link services' settings ({"interval": s})."""
        r = self.meta.get("replication")
        return dict(r) if isinstance(r, dict) else None

    @property
    def rlink_key(self) -> Path:
        return self.dir / "rlink.key"

    @property
    def switch(self) -> Path:
        return self.dir / "ns" / "switch.net"

    @property
    def etcd_netns(self) -> Path:
        return self.dir / "ns" / "etcd.net"

    def nodes(self) -> list[Node]:
        return [Node(n["name"], n["index"], n["site"], self) for n in self.meta.get("nodes", [])]

    def node(self, name: str) -> Node:
        for n in self.nodes():
            if n.name == name:
                return n
        raise LabError(f"no node {name!r} in the lab at {self.dir} (nodes: "
                       f"{', '.join(n.name for n in self.nodes()) or 'none'})")

    def is_cut(self, name: str) -> bool:
        return name in self.meta.get("cut", [])

    def save(self) -> None:
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1))
        tmp.replace(self.dir / "lab.json")

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """One mutating command at a time per lab (``timeout``: LabError after waiting that long)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            if timeout is None:
                fcntl.flock(fh, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise LabError(f"another lab command held the lab's lock for {timeout:g} s") from None
                        time.sleep(0.05)
            self.meta = {}
            with contextlib.suppress(OSError, ValueError):
                self.meta = dict(json.loads((self.dir / "lab.json").read_text()))
            yield

    # --- up -----------------------------------------------------------------------------------------
    def up(self, nodes: int = 3, sites: int = 1, swarm: bool = False, catalog: str = "sqlite",
           plugin: bool = True, pacemaker: bool = False, lease_ttl: float | None = None,
           lease_interval: float | None = None, app: bool = False,
           repl_interval: float | None = None) -> dict[str, Any]:
        if not 1 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes must be 1..{MAX_NODES}, not {nodes}")
        if not 1 <= sites <= nodes:
            raise LabError(f"--sites must be 1..{nodes} (every site needs a node), not {sites}")
        if catalog not in ("sqlite", "etcd"):
            raise LabError(f"--catalog must be sqlite or etcd, not {catalog!r}")
        _check_leases(lease_ttl, lease_interval)
        if repl_interval is not None:
            if sites < 2 or not plugin:
                raise LabError("--repl-interval needs --sites 2 or more and the plugin (the link services run"
                               " only between sites)")
            _check_repl_interval(repl_interval)
        if app and not (pacemaker and plugin):
            raise LabError("--app needs --pacemaker and the plugin (its container mounts a veritas volume)")
        tools = ["dockerd", "docker", "nsenter", "unshare", "ip", "mount"] + (["etcd"] if catalog == "etcd" else [])
        tools += list(pcmk.TOOLS) if pacemaker else []
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise LabError(f"missing tools: {', '.join(missing)} (scripts/test installs them)")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, mounts)")
        if pacemaker and any(c in str(self.dir) for c in ":,"):
            raise LabError(f"--pacemaker needs a lab directory without ':' or ',' (overlay mounts): {self.dir}")
        with self.locked():
            if self.exists or (self.dir / "ns").exists():
                raise LabError(f"a lab is already in {self.dir}: `scripts/lab down` first "
                               "(or set VERITAS_LAB_DIR to another directory)")
            per_site = -(-nodes // sites)
            self.meta = {"nodes": [{"name": f"node{i}", "index": i, "site": f"site{(i - 1) // per_site + 1}"}
                                   for i in range(1, nodes + 1)],
                         "sites": sites, "swarm": swarm, "catalog": catalog, "plugin": plugin, "cut": [],
                         "etcd": catalog == "etcd", "lease_ttl": lease_ttl, "lease_interval": lease_interval,
                         "pacemaker": pacemaker, "app": app,
                         "replication": {"interval": repl_interval or REPL_INTERVAL}
                         if sites >= 2 and plugin else None}
            self.save()
            try:
                self._make_network()
                if catalog == "etcd":
                    self._start_etcd()
                if self.replication is not None:
                    write_key(self.rlink_key)
                for n in self.nodes():
                    for d in ("data", "exec", "etc-docker", "plugins", "mnt"):
                        (n.base / d).mkdir(parents=True, exist_ok=True)
                    n.state_root.mkdir(parents=True, exist_ok=True)
                    n.write_config()
                if pacemaker:
                    self.meta["ocf_agents"] = pcmk.prepare_lab(self.dir)
                    peers = [(n.name, n.index, n.address) for n in self.nodes()]
                    for n in self.nodes():
                        pcmk.prepare_node(n.base, peers, fresh=True)
                    self._start_fencer()
                for target in ("/run/docker/plugins", "/etc/docker"):  # the nodes' bind targets
                    Path(target).mkdir(parents=True, exist_ok=True)
                _parallel([functools.partial(n.boot, fresh=True) for n in self.nodes()])
                if swarm:
                    self._make_swarm()
                if pacemaker:
                    self._make_pacemaker_cluster()
                if app:
                    self._make_app()
            except BaseException:
                self._down_locked()
                raise
        return self.describe()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nodes": [{"name": n.name, "site": n.site, "docker_host": n.docker_host,
                                          "address": n.address} for n in self.nodes()]}
        if self.replication is not None:
            for entry, n in zip(out["nodes"], self.nodes(), strict=True):
                entry["rlink"] = n.rlink_addr
        if self.meta.get("etcd"):
            out["etcd"] = f"http://{ETCD_ADDR}:2379"
        return out

    # --- Pacemaker (lab.pacemaker) ------------------------------------------------------------------
    def fencer(self) -> Proc | None:
        """The live fencing helper (lab.fencer), or None."""
        p = Proc.from_json(self.meta.get("fencer"))
        return p if p is not None and p.alive() else None

    def _start_fencer(self) -> None:
        """The host side of fence_lab: it runs in these (the host's) namespaces, where Node.kill works."""
        sock = self.dir / "fencer.sock"
        sock.unlink(missing_ok=True)
        log = open(self.dir / "fencer.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "lab.fencer", str(self.dir)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc = Proc.of(p.pid)
        if proc is not None:
            self.meta["fencer"] = proc.to_json()
            self.save()
        deadline = time.monotonic() + 20
        while True:
            if p.poll() is not None:
                raise LabError(f"the fencing helper exited: {_tail(self.dir / 'fencer.log')}")
            try:
                if wire.ask(sock, {"op": "ping"}, timeout=2).get("ok"):
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise LabError(f"the fencing helper did not answer: {_tail(self.dir / 'fencer.log')}")
            time.sleep(0.02)

    def _make_pacemaker_cluster(self, timeout: float = 120) -> None:
        """Once every node is online with quorum: the fence_lab device, then fencing on (not before:
        with fencing on, nodes not yet seen would be shot at startup)."""
        nodes = self.nodes()
        names = [n.name for n in nodes]
        first = nodes[0]
        for n in nodes:  # each node sees all of them, not only the first
            n.wait_cluster(names, timeout)
        debug("pacemaker: every node online")
        first.run_in(["cibadmin", "--create", "-o", "resources", "--xml-text", pcmk.fence_device_xml(self.dir, names)])
        for name, value in pcmk.FENCING_PROPERTIES:
            first.run_in(["crm_attribute", "--type", "crm_config", "--name", name, "--update", value])
        deadline = time.monotonic() + timeout
        while pcmk.FENCE_ID not in first.cluster_view().resources:
            if time.monotonic() > deadline:
                raise LabError(f"the fence device {pcmk.FENCE_ID} did not start: {first.run_in(['crm_mon', '-1'])}")
            time.sleep(0.2)
        debug("pacemaker: fencing on")

    def _make_app(self, timeout: float = 120) -> None:
        """``--app``: every node's dockerd adopted by a clone of ocf:veritas:DockerDaemon, and the group
        of ocf:veritas:DockerContainer (lab.pacemaker.app_resources_xml) on it; returns once it runs."""
        nodes = self.nodes()
        first = nodes[0]
        for r in pcmk.app_resources_xml([n.daemon_site() for n in nodes]):
            first.run_in(["cibadmin", "--create", "-o", "resources", "--xml-text", r])
        for c in pcmk.app_constraints_xml():
            first.run_in(["cibadmin", "--create", "-o", "constraints", "--xml-text", c])
        deadline = time.monotonic() + timeout
        while True:
            view = first.cluster_view()
            if len(view.resources.get(pcmk.APP_CONTAINER, [])) == 1 and \
                    len(view.resources.get(pcmk.APP_DAEMON, [])) == len(nodes):
                break
            if time.monotonic() > deadline:
                raise LabError(f"the app did not start: {first.run_in(['crm_mon', '-1', '--show-detail'])}")
            time.sleep(0.2)
        debug(f"pacemaker: app running on {view.resources[pcmk.APP_CONTAINER][0]}")

    def cluster_view(self) -> tuple[pcmk.ClusterView | None, str | None]:
        """The cluster as the first node that can tell sees it, and which node that was."""
        for n in self.nodes():
            if n.proc("pacemakerd") is None:
                continue
            with contextlib.suppress(LabError, subprocess.TimeoutExpired, ValueError):
                return n.cluster_view(), n.name
        return None, None

    def _make_network(self) -> None:
        ns = self.dir / "ns"
        ns.mkdir(parents=True, exist_ok=True)
        # a private mount holds the namespace files: a bind mount of nsfs under a shared mount would
        # propagate into every namespace made later
        _run(["mount", "--bind", str(ns), str(ns)])
        _run(["mount", "--make-private", str(ns)])
        members = [(n.netns, n.port, n.address) for n in self.nodes()]
        if self.meta.get("etcd"):
            members.append((self.etcd_netns, "etcd", ETCD_ADDR))
        for f in [self.switch] + [m[0] for m in members]:
            f.touch()
            _run(["unshare", f"--net={f}", "true"])
        batch = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        for f, port, _ in members:
            batch += [f"link add {port} type veth peer name eth0 netns {f}", f"link set {port} master br0",
                      f"link set {port} up"]
        _in_net(self.switch, "ip", "-batch", "-", input="\n".join(batch) + "\n")
        for f, _, addr in members:
            _in_net(f, "ip", "-batch", "-",
                    input=f"link set lo up\naddr add {addr}/16 dev eth0\nlink set eth0 up\n")

    def _start_etcd(self) -> None:
        # etcd runs under a node init of its own (own mount and UTS namespace), on the switch's etcd port
        node = _EtcdNode("etcd", 0, "", self)
        d = node.base
        (d / "data").mkdir(parents=True, exist_ok=True)
        node.start_init(role="plain")
        url = f"http://{ETCD_ADDR}:2379"
        node.spawn("etcd", ["etcd", "--name", "lab", "--data-dir", str(d / "data"),
                            "--listen-client-urls", f"{url},http://127.0.0.1:2379", "--advertise-client-urls", url,
                            "--listen-peer-urls", "http://127.0.0.1:2380",
                            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                            "--initial-cluster", "lab=http://127.0.0.1:2380", "--log-level", "warn"],
                   {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "etcd.log")
        deadline = time.monotonic() + 30
        while True:
            proc = node.proc("etcd")
            if proc is None:
                raise LabError(f"etcd exited: {_tail(node.base / 'etcd.log')}")
            try:
                _run(["nsenter", "-t", str(proc.pid), "-n", sys.executable, "-c",
                      "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:2379/health', timeout=1)"])
                return
            except LabError:
                if time.monotonic() > deadline:
                    raise LabError(f"etcd did not come up: {_tail(node.base / 'etcd.log')}") from None
                time.sleep(0.1)

    def etcd_node(self) -> Node | None:
        if not self.meta.get("etcd"):
            return None
        return _EtcdNode("etcd", 0, "", self)

    def _make_swarm(self) -> None:
        nodes = self.nodes()
        mgr = nodes[0]
        docker = ["docker", "-H", mgr.docker_host]
        _run([*docker, "swarm", "init", "--advertise-addr", mgr.address, "--listen-addr", f"{mgr.address}:2377",
              "--dispatcher-heartbeat", "1s"])
        token = _run([*docker, "swarm", "join-token", "-q", "worker"]).strip()

        def join(n: Node) -> Callable[[], str]:
            return lambda: _run(["docker", "-H", n.docker_host, "swarm", "join", "--token", token,
                                 "--advertise-addr", n.address, "--listen-addr", f"{n.address}:2377",
                                 f"{mgr.address}:2377"])

        _parallel([join(n) for n in nodes[1:]])
        if len(nodes) > 1:  # tasks run on the workers; the manager is never the one that fails
            _run([*docker, "node", "update", "--availability", "drain", mgr.name])

    # --- node commands ------------------------------------------------------------------------------
    def _need(self) -> None:
        if not self.exists:
            raise LabError(f"no lab in {self.dir} (`scripts/lab up` first)")

    def kill(self, name: str, only: str | None = None, lock_timeout: float | None = None) -> None:
        with self.locked(lock_timeout):
            self._need()
            self.node(name).kill(only)

    def start(self, name: str, wait: bool = True, lock_timeout: float | None = None,
              timeout: float = 120) -> None:
        """Bring back what of the node is not running; with Pacemaker (and ``wait``), return once the
        node has rejoined (unless it is cut): waited for outside the lab's lock, so the cluster can
        fence meanwhile."""
        with self.locked(lock_timeout):
            self._need()
            node = self.node(name)
            node.boot()
            if self.pacemaker and self.fencer() is None:
                self._start_fencer()
        if self.pacemaker and wait and not self.is_cut(name):  # a cut node cannot rejoin until healed
            node.wait_cluster([name], timeout)

    def cut(self, name: str, cut: bool = True) -> None:
        with self.locked():
            self._need()
            n = self.node(name)
            cuts = set(self.meta.get("cut", []))
            cuts = cuts | {name} if cut else cuts - {name}
            self.meta["cut"] = sorted(cuts)
            self.save()
            n.set_port(not cut and n.proc("init") is not None)

    def exec_argv(self, name: str, cmd: list[str]) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that run ``cmd`` inside the node."""
        self._need()
        n = self.node(name)
        init = n.proc("init")
        if init is None:
            raise LabError(f"{name} is killed (`scripts/lab start {name}`)")
        if not cmd:
            raise LabError("exec needs a command after --")
        env = {**os.environ, "DOCKER_HOST": n.docker_host, "VERITAS_CONFIG": str(n.config),
               "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if "PYTHONPATH" in os.environ else "")}
        return ["nsenter", "-t", str(init.pid), "-m", "-u", "-n", f"--wd={os.getcwd()}", *cmd], env

    def status(self) -> dict[str, Any]:
        self._need()
        nodes = []
        swarm: dict[str, Any] = {}
        if self.meta.get("swarm"):
            mgr = self.nodes()[0]
            try:
                for sn in uhttp.get_json(str(mgr.sock), "/nodes", timeout=5):
                    swarm[sn["Description"]["Hostname"]] = {"status": sn["Status"]["State"],
                                                            "availability": sn["Spec"]["Availability"],
                                                            "manager": "ManagerStatus" in sn}
            except (OSError, ValueError, KeyError) as exc:
                swarm = {"error": str(exc)}
        view, seen_from = self.cluster_view() if self.pacemaker else (None, None)
        roles = ("init", "dockerd", "plugin") + (("corosync", "pacemakerd") if self.pacemaker else ()) \
            + (("watch",) if self.meta.get("app") else ()) + (("rlink",) if self.replication is not None else ())
        for n in self.nodes():
            pids = {role: (p.pid if p else None) for role in roles for p in [n.proc(role)]}
            ctrd = n.containerd()
            pids["containerd"] = ctrd.pid if ctrd else None
            entry: dict[str, Any] = {"name": n.name, "site": n.site, "address": n.address,
                                     "docker_host": n.docker_host, "state": n.state(), "cut": self.is_cut(n.name),
                                     "pids": pids}
            if self.replication is not None:
                entry["rlink"] = n.rlink_addr
            if self.meta.get("swarm"):
                entry["swarm"] = swarm.get(n.name)
            if self.pacemaker:
                entry["pacemaker"] = {"state": view.node_state(n.name) if view else "unknown",
                                      "dc": view is not None and view.dc == n.name,
                                      "resources": sorted(r for r, on in view.resources.items() if n.name in on)
                                      if view else []}
            nodes.append(entry)
        out: dict[str, Any] = {"dir": str(self.dir), "nodes": nodes, "catalog": self.catalog}
        if self.pacemaker:
            fencer = self.fencer()
            out["pacemaker"] = {"seen_from": seen_from, "dc": view.dc if view else None,
                                "quorum": view.quorum if view else False, "fencer": fencer.pid if fencer else None,
                                "ocf_agents": self.meta.get("ocf_agents", [])}
        e = self.etcd_node()
        if e is not None:
            p = e.proc("etcd")
            out["etcd"] = {"url": f"http://{ETCD_ADDR}:2379", "pid": p.pid if p else None}
        return out

    # --- down ---------------------------------------------------------------------------------------
    def down(self) -> None:
        with self.locked():
            self._down_locked()

    def _down_locked(self) -> None:
        """Ends every process of the lab by PID (by namespace identity), detaches the loop devices
        whose backing files are the lab's, unmounts the namespace files and removes the directory,
        disk group state included: a lab's data is throwaway."""
        errors: list[str] = []
        fencer = self.fencer()
        if fencer is not None:  # first: nodes dying one by one would otherwise be fenced while down runs
            left = kill_until_gone(lambda: Snapshot.take().descendants({fencer.pid}) if fencer.alive() else set())
            if left:
                errors.append(f"the fencing helper outlived SIGKILL: {left}")
        # the link services first, by SIGTERM: each ends its round, so no checkpoint's freeze outlives them
        _parallel([n.stop_rlink for n in self.nodes() if n.base.exists()])
        everyone = self.nodes()
        e = self.etcd_node()
        if e is not None:
            everyone.append(e)
        loops = [d for d, _ in sorted(_loops_of(_file_ids(self.dir)).items(), key=lambda kv: -kv[1])]
        for n in everyone:
            if n.base.exists() or n.netns.exists():
                # a writer blocked on a filesystem left frozen dies once it is thawed (lab.thaw)
                left = kill_until_gone(n.members, stuck=lambda pids: thaw_unused(loops, but=pids))
                if left:
                    errors.append(f"{n.name}: processes outlived SIGKILL: {left}")
        thaw_orphans(self.dir)
        errors += _detach_loops_under(self.dir)
        ns = self.dir / "ns"
        for f in sorted(ns.glob("*.net")) if ns.exists() else []:
            subprocess.run(["umount", str(f)], capture_output=True, check=False)
        if ns.exists():
            subprocess.run(["umount", str(ns)], capture_output=True, check=False)
        errors += _umount_under(self.dir)
        if errors:
            raise LabError("; ".join(errors))
        # the directory goes last, and only when nothing is mounted in it any more
        shutil.rmtree(self.dir, ignore_errors=True)
        self.meta = {}


class _EtcdNode(Node):
    """The etcd host: a node init with its own namespaces, no engine."""

    @property
    def netns(self) -> Path:
        return self.lab.etcd_netns


def _check_leases(ttl: float | None, interval: float | None) -> None:
    """--lease-ttl / --lease-interval by the config's own rules, before anything is made."""
    import configparser

    from storage.config import _cluster_settings
    from storage.errors import InvalidArgument

    parser = configparser.ConfigParser()
    parser["cluster"] = {k: f"{v:g}" for k, v in (("lease_ttl", ttl), ("lease_interval", interval)) if v is not None}
    try:
        _cluster_settings(parser["cluster"], lambda _s, _k: "")
    except InvalidArgument as exc:
        raise LabError(f"--lease-ttl/--lease-interval: {exc}") from None


def _check_repl_interval(interval: float) -> None:
    """--repl-interval by the config's own rule for [replication] interval."""
    import configparser

    from storage.config import _seconds
    from storage.errors import InvalidArgument

    parser = configparser.ConfigParser()
    parser["replication"] = {"interval": f"{interval:g}"}
    try:
        _seconds(parser["replication"], "interval", REPL_INTERVAL, "")
    except InvalidArgument as exc:
        raise LabError(f"--repl-interval: {exc}") from None


def write_key(path: Path) -> None:
    """A fresh pre-shared key for the lab's link services: 32 random bytes in hex, mode 0600 from the
    start (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    finally:
        os.close(fd)


def _parallel(fns: list[Callable[[], Any]]) -> None:
    errors: list[BaseException] = []

    def run(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _file_ids(root: Path) -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every non-empty regular file under ``root`` but the docker data roots."""
    ids = set()
    for dirpath, _dirs, files in os.walk(root):
        if Path(dirpath).is_relative_to(root / "nodes") and "/data" in dirpath:
            continue  # the docker data roots: many files, none an image
        for f in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, f))
                if st.st_size > 0 and (st.st_mode & 0o170000) == 0o100000:
                    ids.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    return ids


def _loops_of(ids: set[tuple[int, int, int]]) -> dict[str, int]:
    """The lab's loop devices, each with its depth: 0 when backed by a file of ``ids`` (a file under the
    lab's directory), n + 1 when backed by a file on the filesystem of a device of depth n (a volume's
    image inside a disk's filesystem)."""
    from storage.kernel import loop

    backing = {dev: loop.backing_id(dev) for dev in loop.attached()}
    depth: dict[str, int] = {dev: 0 for dev, b in backing.items() if b in ids}
    while True:
        nums = {}
        for d in depth:
            with contextlib.suppress(OSError):
                nums[loop.devnum(d)] = depth[d]
        more = {dev: nums[(b[0], b[1])] + 1 for dev, b in backing.items()
                if dev not in depth and b is not None and (b[0], b[1]) in nums}
        if not more:
            return depth
        depth.update(more)


def _devnums_in(mountinfo: Path) -> set[tuple[int, int]]:
    """The device numbers of the filesystems in one mount table (/proc/PID/mountinfo)."""
    out: set[tuple[int, int]] = set()
    with open(mountinfo) as fh:
        for line in fh:
            with contextlib.suppress(ValueError, IndexError):
                major, _, minor = line.split(" ", 3)[2].partition(":")
                out.add((int(major), int(minor)))
    return out


def _mounted_devnums(but: set[int]) -> set[tuple[int, int]]:
    """The device numbers that the mount table of some live process not in ``but`` shows (any namespace)."""
    out: set[tuple[int, int]] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in but:
            with contextlib.suppress(OSError):
                out |= _devnums_in(Path(f"/proc/{entry}/mountinfo"))
    return out


def _has_filesystem(dev: str) -> bool:
    """Whether the kernel holds a filesystem (a superblock) of ``dev``, mounted or not."""
    name = Path(dev).name
    return Path(f"/sys/fs/xfs/{name}").exists() or Path(f"/sys/fs/ext4/{name}").exists() or \
        any(Path("/sys/fs/btrfs").glob(f"*/devices/{name}"))


def thaw_orphans(root: Path) -> list[str]:
    """Thaw and let go the filesystems on the lab's loop devices that no live process mounts (lab.thaw:
    what a node killed mid-checkpoint leaves frozen in the shared kernel). The devices thawed."""
    return thaw_unused([d for d, _ in sorted(_loops_of(_file_ids(root)).items(), key=lambda kv: -kv[1])], set())


def thaw_unused(devs: list[str], but: set[int]) -> list[str]:
    """Thaw the filesystems of ``devs`` (loop devices, in this order) that the kernel still holds but no
    live process outside ``but`` mounts, and let them go (lab.thaw); a frozen one mounted elsewhere
    (another node's checkpoint under way) is never touched. The devices thawed."""
    from storage.kernel import loop

    mounted = _mounted_devnums(but)
    thawed = []
    for dev in devs:
        try:
            if loop.devnum(dev) in mounted or not _has_filesystem(dev):
                continue
        except OSError:
            continue
        mnt = tempfile.mkdtemp(prefix="lab-thaw-")
        try:
            r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-m", "lab.thaw", dev,
                                mnt], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                               text=True, timeout=60, check=False)
        finally:
            os.rmdir(mnt)
        debug(f"thaw {dev}: exit {r.returncode} {r.stderr.strip()}")
        if r.returncode == 0:
            thawed.append(dev)
    return thawed


def _detach_loops_under(root: Path) -> list[str]:
    """Detach the loop devices of the lab: those whose backing file (by device and inode) is a file
    under ``root``, and those whose backing file lies on a filesystem of one of those (a volume's image
    inside a disk's filesystem, which only a node's namespace had mounted: it keeps that filesystem,
    and so the disk's loop device, alive after the namespace is gone). The outermost go first."""
    from storage.kernel import loop

    ids = _file_ids(root)

    def ours() -> dict[str, int]:
        return _loops_of(ids)

    errors = []
    for dev, _ in sorted(ours().items(), key=lambda kv: -kv[1]):
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True, check=False)
        if r.returncode != 0 and loop.backing_id(dev) is not None:  # not merely auto-cleared meanwhile
            errors.append(f"losetup -d {dev}: {r.stderr.strip()}")
    # a filesystem of a namespace that just ended may still hold its device a moment: the detach then
    # only sets autoclear, and the device goes when the filesystem does
    deadline = time.monotonic() + 15
    while ours() and time.monotonic() < deadline:
        time.sleep(0.1)
    errors += [f"{dev} is still attached to a file of the lab" for dev in ours()]
    return errors


def _umount_under(root: Path) -> list[str]:
    """Unmount whatever is still mounted under ``root`` in the host's mount namespace (deepest first)."""
    from storage.kernel import mounts

    errors = []
    for e in sorted(mounts.table(), key=lambda e: -len(e.target)):
        if Path(e.target).is_relative_to(root):
            r = subprocess.run(["umount", "-l", e.target], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                errors.append(f"umount {e.target}: {r.stderr.strip()}")
    return errors
