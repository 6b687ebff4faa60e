"""A real Docker engine and a real veritas plugin for tests, isolated from the host and from each other.

Each DockerNode runs dockerd in a mount namespace of its own (slave propagation) with a private
/run/docker/plugins, so several test runs can each have a plugin called ``veritas``, and in a network
namespace of its own with only loopback up, so it never touches the host's interfaces (a
``--bridge=none`` engine in the host's namespace deletes the host engine's ``docker0``); its API is a
unix socket, so nothing else needs the network. The plugin runs on the host and mounts under a mount
root made shared first, so the node's containers see its mounts.
Processes are ended by PID (dockerd, its containerd, the plugin and its gunicorn tree), never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import requests_unixsocket

from lab.image import BUSYBOX_APPLETS, IMAGE, busybox_tar  # noqa: F401 - re-exported for the tests
from lab.procs import alive, end_pids, process_tree
from lab.procs import children as _children  # noqa: F401 - re-exported for the tests
from lab.procs import pids_with_arg as _pids_with_arg
from tests.integration import netns

REPO = Path(__file__).resolve().parents[2]


def container_cgroups() -> set[Path]:
    """Cgroups of Docker containers under the default parent, in every hierarchy."""
    return {p for p in Path("/sys/fs/cgroup").glob("*/docker/*") if p.is_dir() and len(p.name) == 64}


class DockerNode:
    """dockerd in its own mount and network namespaces; its plugin directory is ``self.plugins``."""

    def __init__(self, base: Path, keep_root: Path | None = None) -> None:
        self.base = base
        # mounts under keep_root (the test's own root, holding the shared mount root) stay visible
        self.keep_root = keep_root or base.parent
        self.plugins = base / "plugins"
        self.sock = base / "docker.sock"
        self.exec_root = base / "exec"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self._cgroups_before: set[Path] = set()
        # one per start: each holds its network namespace, so its inode names no other until stop()
        self._netns_fds: list[int] = []

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    @property
    def netns(self) -> str:
        """A path to the network namespace of the engine last started (for nsenter --net, setns)."""
        if not self._netns_fds:
            raise RuntimeError("the node has not started")
        return f"/proc/{os.getpid()}/fd/{self._netns_fds[-1]}"

    def start(self, timeout: float = 30.0) -> None:
        for d in (self.plugins, self.base / "data", self.exec_root):
            d.mkdir(parents=True, exist_ok=True)
        Path("/run/docker/plugins").mkdir(parents=True, exist_ok=True)
        ctrd = self.containerd_pid()
        deadline = time.monotonic() + 10
        while ctrd and Path(f"/proc/{ctrd}").exists() and not alive(ctrd) and time.monotonic() < deadline:
            time.sleep(0.05)  # the zombie containerd of a SIGKILLed dockerd: a new dockerd would think it runs
        self._cgroups_before = container_cgroups()
        prune = Path(__file__).with_name("ns_prune.py")
        script = ("ip link set lo up"
                  f" && mount --bind {self.plugins} /run/docker/plugins && {sys.executable} {prune} {self.keep_root}"
                  f" && exec dockerd --data-root {self.base}/data"
                  f" --exec-root {self.exec_root} --pidfile {self.base}/docker.pid -H {self.url}"
                  " --iptables=false --ip-masq=false --bridge=none --log-level=warn")
        self._log = open(self.base / "dockerd.log", "ab")
        self.proc = subprocess.Popen(["unshare", "-m", "-n", "--propagation", "slave", "sh", "-c", script],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {(self.base / 'dockerd.log').read_text()[-2000:]}")
            if self.sock.exists():
                try:
                    if self.client().ping():
                        break
                except Exception:  # not up yet
                    pass
            time.sleep(0.1)
        else:
            raise RuntimeError("dockerd did not come up")
        fd = os.open(f"/proc/{self.proc.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_ino == netns.inode():
            os.close(fd)
            raise RuntimeError("dockerd runs in the host's network namespace")
        self._netns_fds.append(fd)
        if not self.client().images.list(name=IMAGE.split(":")[0]):
            self.client().api.import_image_from_data(busybox_tar(), repository=IMAGE.split(":")[0], tag="latest")

    def client(self, timeout: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=timeout, version="auto")

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", "-H", self.url, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr}")
        return proc

    def containerd_pid(self) -> int | None:
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL dockerd only (its containers keep running under containerd)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, remove_containers: bool = True) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and remove_containers:
            try:
                c = self.client(timeout=20)
                for ctr in c.containers.list(all=True):
                    ctr.remove(force=True)
                for vol in c.volumes.list():
                    try:
                        vol.remove(force=True)
                    except docker.errors.APIError:
                        pass
            except Exception:  # best effort before stopping the engine
                pass
        if self.proc.poll() is None:
            # dockerd alone first: it stops its containers through its containerd, which must outlive it
            end_pids([self.proc.pid], signal.SIGTERM, 30)
        ctrd = self.containerd_pid()
        end_pids(process_tree(ctrd) if ctrd and alive(ctrd) else [], signal.SIGTERM, 20)
        self.proc.wait(timeout=10)
        # a SIGKILLed dockerd takes its containerd along (pdeathsig), but the shims and their containers
        # live on and keep volumes busy: end them by PID, found by this node's containerd socket
        shims = _pids_with_arg(f"{self.exec_root}/containerd/containerd.sock")
        end_pids([p for s in shims for p in process_tree(s)], signal.SIGKILL, 10)
        # whatever still runs in the node's network namespaces was started there for the node (a
        # host-network plugin, a helper run with nsenter): end it, so the namespaces end with it
        left: list[int] = []
        for fd in self._netns_fds:
            members = netns.members(os.fstat(fd).st_ino)
            end_pids(members, signal.SIGKILL, 10)
            left += [p for p in members if alive(p)]
            os.close(fd)
        self._netns_fds = []
        self.proc = None
        if self._log:
            self._log.close()
        # containers killed with their engine leave their cgroups (the runtime never ran its clean-up);
        # only this engine's containers: another engine's (a parallel run's) are not ours to remove
        ours = {p.name for p in (self.base / "data" / "containers").glob("*")}
        for cg in sorted(c for c in container_cgroups() - self._cgroups_before if c.name in ours):
            with contextlib.suppress(OSError):
                cg.rmdir()  # empty ones only: a live container's cannot go
        if left:
            raise RuntimeError(f"processes outlived SIGKILL in the node's network namespace: {left}")


class PluginProcess:
    """``veritas plugin serve`` for a test config; knows its whole process tree for clean ending."""

    def __init__(self, config_path: Path, socket: Path, log: Path) -> None:
        self.config_path = config_path
        self.socket = socket
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.tree: list[int] = []

    def start(self, timeout: float = 60.0, extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "VERITAS_CONFIG": str(self.config_path), "PYTHONPATH": str(REPO), **(extra_env or {})}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "veritas.cli", "plugin", "serve"], cwd=REPO,
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited: {self.log.read_text()[-3000:]}")
            if self.socket.exists():
                try:
                    if self.call("Plugin.Activate", {}).get("Implements") == ["VolumeDriver"]:
                        break
                except Exception:  # not listening yet
                    pass
            time.sleep(0.05)
        else:
            raise RuntimeError("plugin did not come up")
        self.tree = process_tree(self.proc.pid)

    def call(self, endpoint: str, body: object, raw: bytes | None = None, timeout: float = 150) -> dict:
        """POST to the plugin's socket as Docker does."""
        session = requests_unixsocket.Session()
        url = "http+unix://" + str(self.socket).replace("/", "%2F") + "/" + endpoint
        import json as _json

        data = raw if raw is not None else _json.dumps(body).encode()
        resp = session.post(url, data=data, headers={"Content-Type": "application/vnd.docker.plugins.v1+json"},
                            timeout=timeout)
        self.last_response = resp
        return resp.json()

    def kill9(self) -> None:
        """SIGKILL the plugin's supervisor; its gunicorn dies with it (PDEATHSIG), then we reap all."""
        assert self.proc is not None
        tree = process_tree(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        end_pids([p for p in tree if p != self.proc.pid], signal.SIGKILL, 10)

    def stop(self) -> None:
        if self.proc is None:
            return
        tree = process_tree(self.proc.pid) if self.proc.poll() is None else []
        end_pids(tree or [self.proc.pid], signal.SIGTERM, 15)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None


def write_plugin_config(root: Path, node: DockerNode, workers: int = 3, disk_size: str = "8g",
                        disks: int = 2, extra: str = "") -> Path:
    path = root / "veritas.conf"
    path.write_text(
        "[storage]\n"
        "diskgroup = dockerdg\n"
        f"state_root = {root}/state\n"
        f"mount_root = {root}/mnt\n"
        f"default_disk_size = {disk_size}\n"
        f"default_disk_count = {disks}\n"
        "[node]\nname = node1\n"
        "[plugin]\n"
        f"socket = {node.plugins}/veritas.sock\n"
        f"docker_host = {node.url}\n"
        f"workers = {workers}\n" + extra
    )
    return path


def share_mount_root(mnt: Path) -> None:
    """Make the mount root a shared mount so nodes' namespaces (slaves) receive the plugin's mounts."""
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(mnt), str(mnt)], check=True)
    subprocess.run(["mount", "--make-shared", str(mnt)], check=True)


def unshare_mount_root(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
