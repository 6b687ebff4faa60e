"""The managed (v2) plugin end to end: build it from Debian packages, create and enable it on a real
dockerd, use a volume from containers, survive a forced disable/enable, and leave nothing behind.

The plugin runs in Docker's own container for it, so the kernel shows its loop devices' backing files
by the paths the plugin sees (``/var/lib/veritas/...``), or with no prefix at all once its mount
namespace is gone. Loop devices are therefore told apart by backing inode, never by path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration import netns
from tests.integration.dockerstack import IMAGE, DockerNode, _pids_with_arg, end_pids, process_tree
from tests.integration.timeouts import overall_timeout

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build-managed-plugin.sh"
PLUGIN = "veritas-managed:latest"
TEST_TIMEOUT = 600  # seconds, per test (the first build bootstraps a Debian rootfs: about a minute)
TIMINGS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _overall_timeout() -> Iterator[None]:
    with overall_timeout(TEST_TIMEOUT):
        yield


@pytest.fixture(scope="module")
def plugin_dir() -> Iterator[Path]:
    """The plugin directory (config.json + rootfs/), built once for the module by the real script."""
    work = Path(tempfile.mkdtemp(prefix="vmplug-", dir="/tmp"))
    out = work / "plugin"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD), "--out", str(out), "--driver", PLUGIN.split(":")[0]],
                          capture_output=True, text=True, timeout=900, check=False)
    TIMINGS["build"] = time.monotonic() - t0
    try:
        assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        assert (out / "config.json").is_file() and (out / "rootfs" / "usr" / "bin" / "python3").exists()
        yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ what the plugin left in the kernel

def _loop_devices() -> list[dict[str, str]]:
    proc = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-INO,BACK-MAJ:MIN,BACK-FILE"],
                          capture_output=True, text=True, check=True)
    if not proc.stdout.strip():
        return []
    return [{k: str(v).strip() for k, v in d.items()} for d in json.loads(proc.stdout)["loopdevices"]]


def _devnum(dev: str) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def plugin_loops(state: Path) -> list[str]:
    """Loop devices on files under ``state`` (disk images), and on files in filesystems of those
    (volume images inside the disks), outermost first."""
    files = set()
    for p in [state, *state.rglob("*")]:
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink():
            files.add((f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", st.st_ino))
    devs = _loop_devices()
    ours: list[str] = []
    changed = True
    while changed:  # a loop device backed by a file on one of ours is ours too
        changed = False
        ours_nums = {_devnum(d) for d in ours}
        for d in devs:
            if d["name"] in ours:
                continue
            if (d["back-maj:min"], int(d["back-ino"])) in files or d["back-maj:min"] in ours_nums:
                ours.append(d["name"])
                changed = True
    return ours


def _mountinfo(pid: int | str) -> list[tuple[str, str]]:
    """(major:minor, target) of every mount in the mount namespace of ``pid``."""
    out = []
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        f = line.split()
        out.append((f[2], f[4].replace("\\040", " ")))
    return out


def plugin_mounts(state: Path, loops: list[str], pids: list[int | str]) -> list[str]:
    """Mounts under ``state`` or of our loop devices, in the namespaces of ``pids``."""
    nums = {_devnum(d) for d in loops if Path(d).exists()}
    prefix = str(state) + "/"
    return sorted({f"{pid}:{target}" for pid in pids for num, target in _mountinfo(pid)
                   if num in nums or target == str(state) or target.startswith(prefix)})


def leftovers(state: Path, pids: list[int | str]) -> list[str]:
    loops = plugin_loops(state)
    return [f"loop {d}" for d in loops] + [f"mount {m}" for m in plugin_mounts(state, loops, pids)]


def clean(state: Path, pids: list[int | str]) -> None:
    """Unmount what references ``state`` (deepest first), then detach its loop devices (innermost first)."""
    loops = plugin_loops(state)
    for entry in sorted(plugin_mounts(state, loops, pids), key=len, reverse=True):
        pid, target = entry.split(":", 1)
        cmd = ["umount", "-l", target]
        if pid != "self":
            cmd = ["nsenter", "-t", pid, "-m", *cmd]
        subprocess.run(cmd, capture_output=True, check=False)
    for dev in reversed(loops):
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    deadline = time.monotonic() + 10
    while plugin_loops(state) and time.monotonic() < deadline:
        time.sleep(0.1)


# ------------------------------------------------------------------ a node with the plugin


@dataclass
class ManagedStack:
    root: Path
    node: DockerNode
    state: Path
    timings: dict[str, float] = field(default_factory=dict)

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.node.cli(*args, check=check, timeout=timeout)

    def timed(self, what: str, *args: str) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        proc = self.docker(*args)
        self.timings[what] = time.monotonic() - t0
        return proc

    def dockerd_pid(self) -> int | None:
        try:
            return int((self.node.base / "docker.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int | str]:
        pid = self.dockerd_pid()
        return ["self"] + ([pid] if pid and Path(f"/proc/{pid}").exists() else [])

    def run(self, *cmd: str, detach: bool = False) -> str:
        args = ["run", "--network", "none", "-v", "mvol:/d"] + (["-d"] if detach else ["--rm"])
        return self.docker(*args, IMAGE, "sh", "-c", *cmd).stdout.strip()

    def plugin(self) -> dict:
        return json.loads(self.docker("plugin", "inspect", PLUGIN).stdout)[0]

    def plugin_log(self) -> str:
        lines = (self.node.base / "dockerd.log").read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "plugin=" in line)[-4000:]


@contextlib.contextmanager
def _node_with_state() -> Iterator[ManagedStack]:
    """A started DockerNode and a fresh state directory, torn down by _teardown."""
    root = Path(tempfile.mkdtemp(prefix="vmanaged-", dir="/tmp"))
    node = DockerNode(root / "node")
    state = root / "state"
    state.mkdir()  # a plugin mount's host source must exist before enable
    s = ManagedStack(root, node, state)
    node.start()
    try:
        yield s
    finally:
        _teardown(s)


@pytest.fixture
def mstack(plugin_dir: Path) -> Iterator[ManagedStack]:
    """A DockerNode with the plugin created from ``plugin_dir`` and enabled on a fresh state directory."""
    with _node_with_state() as s:
        s.timed("create", "plugin", "create", PLUGIN, str(plugin_dir))
        s.docker("plugin", "set", PLUGIN, f"state.source={s.state}", f"docker.source={s.node.sock}")
        s.timed("enable", "plugin", "enable", PLUGIN)
        yield s


def _teardown(s: ManagedStack) -> None:
    """Containers, volumes and every plugin of the node go, then the node; fail if anything of the
    plugin's state is still attached or mounted."""
    node, state = s.node, s.state
    try:
        if node.proc is not None and node.proc.poll() is None:
            for cid in s.docker("ps", "-aq", check=False).stdout.split():
                s.docker("rm", "-f", cid, check=False)
            for vol in s.docker("volume", "ls", "-q", check=False).stdout.split():
                s.docker("volume", "rm", "-f", vol, check=False)
            for plugin in s.docker("plugin", "ls", "-q", "--no-trunc", check=False).stdout.split():
                s.docker("plugin", "disable", "-f", plugin, check=False)
                s.docker("plugin", "rm", "-f", plugin, check=False)
    finally:
        pids = s.pids()
        clean(state, pids)
        node.stop()
        clean(state, ["self"])
        left = leftovers(state, ["self"])
        shutil.rmtree(s.root, ignore_errors=True)
        if left:
            pytest.fail(f"teardown left {left}")


def _volume_status(s: ManagedStack, name: str) -> dict[str, Any]:
    return json.loads(s.docker("volume", "inspect", name).stdout)[0]["Status"]


def _assert_disks_only(s: ManagedStack, ndisks: int = 2) -> None:
    """Exactly one loop device per disk image: none for unmounted volumes, none left over from before."""
    loops = plugin_loops(s.state)
    assert len(loops) == ndisks, f"loop devices on the plugin's images: {loops}\n{s.plugin_log()}"


def test_managed_plugin_lifecycle(mstack: ManagedStack) -> None:
    s = mstack
    p = s.plugin()
    assert p["Enabled"] is True
    assert p["Config"]["Interface"]["Socket"] == "veritas.sock"
    assert {m["Name"]: m["Source"] for m in p["Settings"]["Mounts"]}["state"] == str(s.state)

    s.timed("volume create", "volume", "create", "-d", PLUGIN, "--name", "mvol", "-o", "size=1g")
    t0 = time.monotonic()
    s.run("echo hi > /d/f")
    s.timings["first run"] = time.monotonic() - t0
    assert s.run("cat /d/f") == "hi"
    # the disk group's images live in the host state directory, outside the plugin's rootfs
    assert sorted(p.name for p in (s.state / "images").iterdir()) == ["dockerdg-disk1.img", "dockerdg-disk2.img"]
    _assert_disks_only(s)

    # a forced disable and enable: the volume and its data are still there, and the disks are reused
    s.timed("disable -f", "plugin", "disable", "-f", PLUGIN)
    s.timed("enable again", "plugin", "enable", PLUGIN)
    vols = json.loads(s.docker("volume", "ls", "--format", "{{json .}}").stdout.splitlines()[0])
    assert (vols["Name"], vols["Driver"]) == ("mvol", PLUGIN)
    assert s.run("cat /d/f") == "hi"
    _assert_disks_only(s)
    info = json.loads(s.docker("volume", "inspect", "mvol").stdout)[0]
    assert info["Status"]["health"] == "ok" and info["Status"]["size"] == "1G"

    # removal: the volume's loop device goes with the volume; the plugin goes; no mount is left
    s.docker("volume", "rm", "mvol")
    _assert_disks_only(s)
    s.docker("plugin", "disable", PLUGIN)
    s.docker("plugin", "rm", PLUGIN)
    assert s.docker("plugin", "ls", "-q").stdout.strip() == ""
    loops = plugin_loops(s.state)
    assert plugin_mounts(s.state, loops, s.pids()) == []
    # the disk group outlives the plugin (it is state on the host); what remains is its disks' loops
    clean(s.state, s.pids())
    assert leftovers(s.state, s.pids()) == []
    TIMINGS.update(s.timings)
    print("managed plugin timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in TIMINGS.items()))


def test_forced_disable_with_a_running_container(mstack: ManagedStack) -> None:
    """A container keeps its volume through ``disable -f``; after enable, a new container of the same
    volume shares its filesystem (same loop devices, same superblock), not a second copy."""
    s = mstack
    s.docker("volume", "create", "-d", PLUGIN, "--name", "mvol", "-o", "size=1g")
    first = s.run("echo one > /d/a; exec sleep 600", detach=True)
    deadline = time.monotonic() + 20
    while s.docker("exec", first, "cat", "/d/a", check=False).stdout.strip() != "one":
        assert time.monotonic() < deadline, "first container did not write its file"
        time.sleep(0.1)
    s.docker("plugin", "disable", "-f", PLUGIN)
    s.docker("plugin", "enable", PLUGIN)
    # the running container's mount is still counted: Docker unmounted the plugin's propagated mount,
    # and the plugin mounted the volume again at start-up for it
    assert _volume_status(s, "mvol")["mounts"] == 1, s.plugin_log()
    assert s.run("cat /d/a; echo two > /d/b") == "one"
    assert s.docker("exec", first, "cat", "/d/b").stdout.strip() == "two", s.plugin_log()
    _assert_disks_only(s, ndisks=3)  # two disks and the volume, each attached once
    # the container's Unmount, sent to the new plugin instance, releases the volume
    s.docker("rm", "-f", first)
    assert _volume_status(s, "mvol")["mounts"] == 0, s.plugin_log()
    _assert_disks_only(s)
    assert s.run("cat /d/b") == "two"
    s.docker("volume", "rm", "mvol")
    _assert_disks_only(s)


# ------------------------------------------------------------------ upgrade through a registry, as users do


def _registry_binary() -> str:
    """The registry server of Debian's ``docker-registry`` package (scripts/test installs it)."""
    proc = subprocess.run(["dpkg", "-L", "docker-registry"], capture_output=True, text=True, check=False)
    found = [line for line in proc.stdout.splitlines() if line.endswith("/bin/docker-registry")]
    assert proc.returncode == 0 and found, "Debian package docker-registry is not installed (scripts/test installs it)"
    return found[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def registry(bare_stack: ManagedStack) -> Iterator[str]:
    """A plain-HTTP registry (distribution 2.8) on a free loopback port, storing under a temporary
    directory; yields its address ``127.0.0.1:PORT``. Docker treats 127.0.0.0/8 registries as insecure
    by default, so the node's dockerd pushes and pulls over HTTP with no daemon option. The node's
    engine has a network namespace of its own, so the registry listens on that namespace's loopback
    (nsenter --net), and this process probes it from there too."""
    binary = _registry_binary()
    ns = bare_stack.node.netns
    root = Path(tempfile.mkdtemp(prefix="vregistry-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy

    def answers(port: int) -> bool:
        try:
            with direct.open(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    try:
        for _attempt in range(3):  # another process may take the port between probe and bind
            port = netns.call_in(ns, _free_port)
            conf = root / "config.yml"
            conf.write_text("version: 0.1\n"
                            "log:\n  level: warn\n"
                            f"storage:\n  filesystem:\n    rootdirectory: {root}/data\n"
                            f"http:\n  addr: 127.0.0.1:{port}\n")
            with open(root / "registry.log", "ab") as log:
                proc = subprocess.Popen(["nsenter", f"--net={ns}", binary, "serve", str(conf)], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                if netns.call_in(ns, functools.partial(answers, port)):
                    break
                time.sleep(0.05)
            else:
                end_pids([proc.pid])
                proc.wait()
                continue
            break
        else:
            pytest.fail(f"registry did not come up:\n{(root / 'registry.log').read_text()[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        if proc is not None:
            end_pids([proc.pid])
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def bare_stack() -> Iterator[ManagedStack]:
    """A DockerNode with a fresh state directory and no plugin: the test installs it."""
    with _node_with_state() as s:
        yield s


def running_build_ids(s: ManagedStack) -> list[str]:
    """The build id in the root of every running ``veritas.cli`` process of the node's containerd (the
    plugin's processes), so the test knows which build actually serves."""
    shims = _pids_with_arg(f"{s.node.exec_root}/containerd/containerd.sock")
    ids = []
    for pid in sorted({p for shim in shims for p in process_tree(shim)}):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"veritas.cli" in argv:
                ids.append(Path(f"/proc/{pid}/root/etc/veritas-plugin-build-id").read_text().strip())
        except OSError:
            continue  # gone meanwhile
    return sorted(set(ids))


def _mount_sources(p: dict, section: str) -> dict[str, str]:
    return {m["Name"]: m["Source"] for m in p[section]["Mounts"]}


def test_upgrade_with_volumes_in_use(bare_stack: ManagedStack, registry: str, plugin_dir: Path) -> None:
    """Install v1 from a registry, use a volume (one container keeps running), ``disable -f``,
    ``upgrade`` to v2, enable: the volume, its data and the running container's view survive, and new
    containers and volumes work without restarting dockerd (hpe-storage#46)."""
    s = bare_stack
    repo = f"{registry}/veritas-managed"
    alias = PLUGIN.split(":")[0]  # volumes name the plugin's local name; upgrade keeps it (and the ID)
    v1_id = (plugin_dir / "rootfs" / "etc" / "veritas-plugin-build-id").read_text().strip()
    v2_id = f"upgrade-v2-{time.time_ns()}"
    v2_dir = s.root / "plugin-v2"

    def publish(tag: str, directory: Path) -> None:
        s.timed(f"create {tag}", "plugin", "create", f"{repo}:{tag}", str(directory))
        s.timed(f"push {tag}", "plugin", "push", f"{repo}:{tag}")
        s.docker("plugin", "rm", f"{repo}:{tag}")

    # v1 (the module's build) through the registry, installed the way a user installs it
    publish("v1", plugin_dir)
    assert s.docker("plugin", "ls", "-q").stdout.strip() == ""
    s.timed("install v1", "plugin", "install", "--grant-all-permissions", "--alias", alias, f"{repo}:v1",
            f"state.source={s.state}", f"docker.source={s.node.sock}")
    p = s.plugin()
    plugin_id = p["Id"]
    assert (p["Name"], p["PluginReference"], p["Enabled"]) == (PLUGIN, f"{repo}:v1", True)
    assert _mount_sources(p, "Settings")["state"] == str(s.state)
    assert running_build_ids(s) == [v1_id]

    s.docker("volume", "create", "-d", PLUGIN, "--name", "mvol", "-o", "size=1g")
    s.run("echo hi > /d/f")
    first = s.run("echo one > /d/a; exec sleep 600", detach=True)
    deadline = time.monotonic() + 20
    while s.docker("exec", first, "cat", "/d/a", check=False).stdout.strip() != "one":
        assert time.monotonic() < deadline, "the long-running container did not write its file"
        time.sleep(0.1)
    _assert_disks_only(s, ndisks=3)

    # v2: another build of the same sources (another build id), published as :v2
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD), "--out", str(v2_dir), "--driver", alias, "--build-id", v2_id],
                          capture_output=True, text=True, timeout=900, check=False)
    s.timings["build v2"] = time.monotonic() - t0
    assert proc.returncode == 0, f"build of v2 failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    publish("v2", v2_dir)
    shutil.rmtree(v2_dir)

    # the upgrade: Docker wants the plugin disabled, and a volume is in use, so only `disable -f` does
    dockerd = s.dockerd_pid()
    refused = s.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", PLUGIN,
                       f"{repo}:v2", check=False)
    assert refused.returncode != 0 and "disabled" in refused.stderr, refused.stderr
    assert "in use" in s.docker("plugin", "disable", PLUGIN, check=False).stderr
    s.timed("disable -f", "plugin", "disable", "-f", PLUGIN)
    s.timed("upgrade", "plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", PLUGIN, f"{repo}:v2")
    p = s.plugin()
    assert (p["Id"], p["Name"], p["PluginReference"], p["Enabled"]) == (plugin_id, PLUGIN, f"{repo}:v2", False)
    # Docker (20.10 here; moby's current source alike) replaces the plugin's config on upgrade but not its settings:
    # `plugin inspect` still shows state.source and docker.source in Settings, yet the container is
    # made from Config.Mounts, which are back at config.json's defaults (cf. moby#42128 for env).
    # Enabling now would fail, or worse run on /var/lib/veritas-plugin if that exists; so an upgrade
    # must set the sources again before enable.
    settings = _mount_sources(p, "Settings")
    assert (settings["state"], settings["docker"]) == (str(s.state), str(s.node.sock))
    if _mount_sources(p, "Config")["state"] != str(s.state):
        print(f"docker plugin upgrade reset the mount sources to {_mount_sources(p, 'Config')}")
    s.docker("plugin", "set", PLUGIN, f"state.source={s.state}", f"docker.source={s.node.sock}")
    assert _mount_sources(s.plugin(), "Config")["state"] == str(s.state)
    s.timed("enable v2", "plugin", "enable", PLUGIN)
    assert running_build_ids(s) == [v2_id]

    # same dockerd throughout: no restart was needed for any of what follows
    vols = [json.loads(line) for line in s.docker("volume", "ls", "--format", "{{json .}}").stdout.splitlines()]
    assert [(v["Name"], v["Driver"]) for v in vols] == [("mvol", PLUGIN)]
    info = json.loads(s.docker("volume", "inspect", "mvol").stdout)[0]
    assert info["Status"]["health"] == "ok" and info["Status"]["size"] == "1G"
    assert info["Status"]["mounts"] == 1, s.plugin_log()  # the container that runs through the upgrade
    # the container that ran through the upgrade still reads and writes its volume...
    assert s.docker("exec", first, "cat", "/d/a").stdout.strip() == "one"
    s.docker("exec", first, "sh", "-c", "echo old > /d/c")
    # ...and a new container mounts the same filesystem (not a second copy of it)
    t0 = time.monotonic()
    assert s.run("cat /d/f /d/a /d/c; echo two > /d/b").split() == ["hi", "one", "old"], s.plugin_log()
    s.timings["first run after upgrade"] = time.monotonic() - t0
    assert s.docker("exec", first, "cat", "/d/b").stdout.strip() == "two", s.plugin_log()
    _assert_disks_only(s, ndisks=3)  # two disks and the volume, each attached once
    # once that container has gone (its Unmount came), the next one still shares the running one's view
    assert s.run("cat /d/b; echo three > /d/e") == "two"
    assert s.docker("exec", first, "cat", "/d/e").stdout.strip() == "three", s.plugin_log()
    _assert_disks_only(s, ndisks=3)

    # a new volume on v2
    s.docker("volume", "create", "-d", PLUGIN, "--name", "mvol2", "-o", "size=1g")
    out = s.docker("run", "--rm", "--network", "none", "-v", "mvol2:/d", IMAGE, "sh", "-c", "echo new > /d/n; cat /d/n")
    assert out.stdout.strip() == "new"
    assert s.dockerd_pid() == dockerd

    # removal: nothing of v1 or v2 is left attached or mounted
    s.docker("rm", "-f", first)
    assert s.run("cat /d/a /d/b /d/c /d/e").split() == ["one", "two", "old", "three"]
    s.docker("volume", "rm", "mvol", "mvol2")
    _assert_disks_only(s)
    s.docker("plugin", "disable", PLUGIN)
    s.docker("plugin", "rm", PLUGIN)
    assert s.docker("plugin", "ls", "-q").stdout.strip() == ""
    assert not (s.node.base / "data" / "plugins" / plugin_id).exists()  # nor its rootfs (or rootfs-old)
    loops = plugin_loops(s.state)
    assert plugin_mounts(s.state, loops, s.pids()) == []
    clean(s.state, s.pids())
    assert leftovers(s.state, s.pids()) == []
    print("managed plugin upgrade timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in s.timings.items()))


# ------------------------------------------------------------------ host service and managed plugin, one engine


def _plugin_dir_with_state_at(plugin_dir: Path, state_path: Path, out: Path) -> Path:
    """A copy of ``plugin_dir`` (rootfs hard-linked, edited files replaced, never written through) whose
    plugin keeps its state at ``state_path`` inside its container: its state bind's destination and the
    baked config's state_root. So its disk images have the very paths the host service's have."""
    out.mkdir()
    subprocess.run(["cp", "-al", str(plugin_dir / "rootfs"), str(out / "rootfs")], check=True)
    config = json.loads((plugin_dir / "config.json").read_text())
    for m in config["mounts"]:
        if m["name"] == "state":
            m["destination"] = str(state_path)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    conf = out / "rootfs" / "etc" / "vx" / "docker" / "vxinfoscale-default.conf"
    text = conf.read_text().replace("state_root = /var/lib/veritas", f"state_root = {state_path}")
    assert f"state_root = {state_path}" in text
    build_id = out / "rootfs" / "etc" / "veritas-plugin-build-id"
    for path, content in ((conf, text), (build_id, f"same-state-path-{time.time_ns()}\n")):
        path.unlink()  # a hard link to the module's build: replace the file, do not write through it
        path.write_text(content)
    (out / "rootfs" / str(state_path).lstrip("/")).mkdir(parents=True, exist_ok=True)
    return out


def _loop_ids(loops: list[str]) -> dict[str, tuple[str, str]]:
    by_name = {d["name"]: d for d in _loop_devices()}
    return {n: (by_name[n]["back-maj:min"], by_name[n]["back-ino"]) for n in loops if n in by_name}


def _autoclear(dev: str) -> str:
    return (Path("/sys/block") / Path(dev).name / "loop" / "autoclear").read_text().strip()


def test_host_service_and_managed_plugin_on_one_engine(plugin_dir: Path) -> None:
    """Both instances on one engine, each with its embedded default disk group, and each calling its first
    disk image <state_root>/images/dockerdg-disk1.img by the same path (the host service on the host,
    the managed plugin in its container). Before the fix, enabling the managed plugin ran mkfs.xfs on the
    host service's disk device ("Device or resource busy") and its rollback marked that device autoclear.
    Now both create, mount and write volumes, and neither touches the other's devices."""
    from storage import diskgroup
    from storage.config import load_config
    from tests.integration.dockerstack import PluginProcess, share_mount_root, unshare_mount_root, write_plugin_config

    root = Path(tempfile.mkdtemp(prefix="vmanaged-", dir="/tmp"))
    node = DockerNode(root / "node")
    state = root / "state"  # the managed plugin's state on the host
    state.mkdir()
    host = root / "host"  # the host service: state_root host/state, mount root host/mnt (shared)
    host.mkdir()
    share_mount_root(host / "mnt")  # before the node's namespace is made, or it never sees volume mounts
    s = ManagedStack(root, node, state)
    service: PluginProcess | None = None
    host_state = host / "state"
    left: list[str] = []
    try:
        node.start()
        conf = write_plugin_config(host, node, disk_size="4g")
        service = PluginProcess(conf, node.plugins / "veritas.sock", host / "plugin.log")
        service.start()

        # the host service: a volume, written, and kept mounted by a running container
        s.docker("volume", "create", "-d", "veritas", "--name", "hvol", "-o", "size=1g")
        keeper = s.docker("run", "-d", "--network", "none", "-v", "hvol:/d", IMAGE, "sh", "-c",
                          "echo host > /d/f; exec sleep 600").stdout.strip()
        deadline = time.monotonic() + 20
        while s.docker("exec", keeper, "cat", "/d/f", check=False).stdout.strip() != "host":
            assert time.monotonic() < deadline, "the host service's container did not write its file"
            time.sleep(0.1)
        host_loops = plugin_loops(host_state)
        assert len(host_loops) == 3, host_loops  # two disks and the volume
        host_ids = _loop_ids(host_loops)

        # the managed plugin, whose disk images have the host service's paths inside its container
        pdir = _plugin_dir_with_state_at(plugin_dir, host_state, root / "plugin-same-path")
        s.docker("plugin", "create", PLUGIN, str(pdir))
        shutil.rmtree(pdir)
        s.docker("plugin", "set", PLUGIN, f"state.source={state}", f"docker.source={node.sock}")
        enabled = s.docker("plugin", "enable", PLUGIN, check=False)
        assert enabled.returncode == 0, f"enable failed: {enabled.stderr}\n{s.plugin_log()}"
        s.docker("volume", "create", "-d", PLUGIN, "--name", "mvol", "-o", "size=1g")
        assert s.run("echo managed > /d/f; cat /d/f") == "managed"
        assert sorted(p.name for p in (state / "images").iterdir()) == ["dockerdg-disk1.img", "dockerdg-disk2.img"]

        # each instance's devices are its own: the host service's are untouched and still in use
        managed_loops = plugin_loops(state)
        assert len(managed_loops) == 2, f"{managed_loops}\n{s.plugin_log()}"  # its disks (mvol is unmounted)
        assert not set(managed_loops) & set(host_loops)
        assert _loop_ids(host_loops) == host_ids
        assert [_autoclear(d) for d in host_loops] == ["0"] * 3, "the managed plugin marked a host device"
        s.docker("exec", keeper, "sh", "-c", "echo more >> /d/f")
        assert s.docker("exec", keeper, "cat", "/d/f").stdout.split() == ["host", "more"]
        out = s.docker("run", "--rm", "--network", "none", "-v", "hvol:/h", "-v", "mvol:/m", IMAGE, "sh", "-c",
                       "cat /h/f /m/f").stdout.split()
        assert out == ["host", "more", "managed"]
        for name in ("hvol", "mvol"):
            assert json.loads(s.docker("volume", "inspect", name).stdout)[0]["Status"]["health"] == "ok"

        # the host service goes first; the managed plugin's devices stay as they were
        s.docker("rm", "-f", keeper)
        s.docker("volume", "rm", "hvol")
        assert plugin_loops(state) == managed_loops
        assert s.run("cat /d/f") == "managed"
    finally:
        try:
            if node.proc is not None and node.proc.poll() is None:
                for cid in s.docker("ps", "-aq", check=False).stdout.split():
                    s.docker("rm", "-f", cid, check=False)
                s.docker("volume", "rm", "-f", "hvol", check=False)
            if service is not None:
                service.stop()
            cfg = load_config(host / "veritas.conf")
            for name in diskgroup.list_names(cfg):
                g = diskgroup.open_dg(cfg, name)
                for v in g.catalog.volumes():
                    for m in g.catalog.mounts(v.name):
                        g.catalog.remove_mount(v.name, m.node, m.mount_id)
                diskgroup.destroy(g, force=True)
            left = plugin_loops(host_state)
            clean(host_state, ["self"])
        finally:
            unshare_mount_root(host / "mnt")
            _teardown(s)  # the managed plugin, the node, and its state; fails on leftovers
        assert left == [], f"the host service left {left}"
