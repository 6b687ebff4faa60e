"""``veritas plugin serve`` under restarts: its socket, its start-up, its readiness, its workers.

- A second plugin on the same socket path refuses to start while the first answers, and a plugin at
  exit leaves a socket that is no longer its own.
- Reconciliation at start keeps what an administrator mounted with the CLI, releases only Docker's
  mount IDs, survives a busy volume, and does not wait on Docker calls that wait on the plugin.
- Get never denies an existing volume: while the disk group cannot be read it waits, and a Get that
  Docker resends with an empty body (its retry after a broken connection) gets no answer at all.
- With socket activation (a supervisor holds the socket, as systemd does with
  packaging/veritas-plugin.socket) a call made while the plugin is dead waits and then succeeds.
- A worker killed mid-snapshot leaves the source frozen only until its replacement starts.
- Containers dockerd restarts get their volumes' IOPS limits again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from storage import diskgroup, volumes
from tests.integration import conftest
from tests.integration.dockerstack import IMAGE, REPO, _children, alive, end_pids, process_tree
from tests.integration.test_plugin_maxiops import (
    BLKIO,
    FIO_MOUNTS,
    WRITE_FILE,
    _devnums,
    _fio_iops,
    _limit,
    _wait_limit,
)
from tests.integration.test_plugin_restart import mountpoint, released, vol_state, wait_for


def create(stack: conftest.Stack, name: str, *opts: str) -> None:
    stack.node.cli("volume", "create", "-d", "veritas", "--name", name, "-o", "size=400m", *opts)


def identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def serve_env(stack: conftest.Stack, **extra: str) -> dict[str, str]:
    return {**os.environ, "VERITAS_CONFIG": str(stack.env.config_path), "PYTHONPATH": str(REPO), **extra}


def gunicorn_workers(stack: conftest.Stack) -> list[int]:
    """PIDs of the plugin's gunicorn workers (children of its gunicorn master, the serve's child)."""
    (master,) = _children(stack.plugin.proc.pid)
    return _children(master)


def writable(target: Path, timeout: float) -> bool:
    """Whether a write+fsync on ``target`` completes in ``timeout`` s (a frozen filesystem blocks it)."""
    proc = subprocess.Popen(["dd", "if=/dev/zero", f"of={target}/.probe", "bs=4k", "count=1", "conv=fsync",
                             "status=none"])
    try:
        return proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        if proc.poll() is None:
            subprocess.run(["fsfreeze", "--unfreeze", str(target)], capture_output=True, check=False)
            proc.wait(timeout=30)
        (target / ".probe").unlink(missing_ok=True)


# ---------------------------------------------------------------- item 2: one plugin per socket


def test_second_serve_refuses_a_live_socket(stack):
    sock = stack.plugin.socket
    before = identity(sock)
    second = subprocess.Popen([sys.executable, "-m", "veritas.cli", "plugin", "serve"], cwd=REPO,
                              env=serve_env(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        _out, err = second.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        end_pids(process_tree(second.pid), signal.SIGKILL)
        second.wait()
        pytest.fail("a second plugin started on the socket of a live one")
    assert second.returncode != 0
    assert "already serving" in err and str(sock) in err, err
    assert identity(sock) == before  # the live plugin's socket is untouched
    assert stack.plugin.call("Plugin.Activate", {}, timeout=10)["Implements"] == ["VolumeDriver"]


def test_exit_leaves_a_successor_socket_alone(stack):
    sock = stack.plugin.socket
    # a successor took the path over (as one started while this plugin was thought dead would)
    sock.unlink()
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        successor.bind(str(sock))
        successor.listen(8)
        theirs = identity(sock)
        stack.plugin.stop()
        assert sock.exists() and identity(sock) == theirs, "the exiting plugin removed its successor's socket"
    finally:
        successor.close()
        sock.unlink(missing_ok=True)
    stack.plugin.start()
    stack.plugin.stop()
    assert not sock.exists()  # its own socket it does remove
    stack.plugin.start()


# ---------------------------------------------------------------- item 4: start-up reconciliation


def test_start_keeps_what_an_administrator_mounted(stack):
    create(stack, "admv")
    create(stack, "gone")
    stack.plugin.stop()
    stack.env.cli("vol", "mount", "admv")
    dg = diskgroup.open_dg(stack.env.config, "dockerdg")
    try:  # Docker mount IDs of containers that no longer exist
        volumes.mount(dg, "admv", "ef" * 32)
        volumes.mount(dg, "gone", "cd" * 32)
    finally:
        dg.close()
    stack.plugin.start()
    state = vol_state(stack, "admv")
    assert state["mounted"] and state["rows"] == [volumes.ADMIN_MOUNT_ID], state
    assert released(stack, "gone"), vol_state(stack, "gone")
    log = stack.plugin.log.read_text()
    assert "unmounted admv" not in log and "released 1 Docker mount ID(s) of admv" in log
    stack.env.cli("vol", "umount", "admv")
    assert released(stack, "admv")
    stack.node.cli("volume", "rm", "admv", "gone")


def test_a_busy_volume_does_not_stop_the_plugin(stack):
    create(stack, "busy")
    stack.plugin.stop()
    dg = diskgroup.open_dg(stack.env.config, "dockerdg")
    try:
        volumes.mount(dg, "busy", "12" * 32)  # counted for a container that is gone
    finally:
        dg.close()
    holder = subprocess.Popen(["sleep", "600"], cwd=mountpoint(stack, "busy"))  # keeps it busy
    try:
        stack.plugin.start()
        assert stack.plugin.call("Plugin.Activate", {}, timeout=10)["Implements"] == ["VolumeDriver"]
        assert "left busy as it is" in stack.plugin.log.read_text()
        assert vol_state(stack, "busy")["mounted"]
    finally:
        holder.kill()
        holder.wait()
    reply = stack.plugin.call("VolumeDriver.Unmount", {"Name": "busy", "ID": "12" * 32})
    assert reply["Err"] == "", reply
    assert released(stack, "busy")
    stack.node.cli("volume", "rm", "busy")


def test_restart_with_a_container_start_in_flight_is_quick(stack):
    """dockerd holds a starting container's lock while it waits on the volume's Mount: reconciliation
    must not ask Docker anything that waits on that lock (inspect), or the restart waits for its timeout."""
    create(stack, "inflight")
    ctr = stack.node.cli("create", "--network", "none", "-v", "inflight:/d", IMAGE, "sh", "-c",
                         "echo up > /d/f; cat /d/f").stdout.strip()
    stack.plugin.kill9()
    result: list[subprocess.CompletedProcess[str]] = []
    run = threading.Thread(target=lambda: result.append(stack.node.cli("start", "-a", ctr, check=False)))
    run.start()
    try:
        time.sleep(1.5)  # dockerd is now retrying the Mount, holding the container's lock
        t0 = time.monotonic()
        stack.plugin.start()
        took = time.monotonic() - t0
    finally:
        run.join(timeout=120)
    assert result and result[0].returncode == 0 and result[0].stdout.strip() == "up", result
    assert took < 3.0, f"the plugin took {took:.1f} s to start with a container start in flight"
    stack.node.cli("rm", ctr)
    assert released(stack, "inflight")
    stack.node.cli("volume", "rm", "inflight")


# ---------------------------------------------------------------- Get never denies a volume that exists


def test_get_waits_while_the_disk_group_cannot_be_read(stack):
    create(stack, "kept")
    dg = diskgroup.open_dg(stack.env.config, "dockerdg")
    result: list[subprocess.CompletedProcess[str]] = []
    try:
        # the disk group is not imported here for a moment (an import in progress, say), and the workers
        # are new: they cannot open it yet
        dg.catalog.set_imported(None)
        old = gunicorn_workers(stack)
        end_pids(old, signal.SIGKILL)
        wait_for("new workers", lambda: len([p for p in gunicorn_workers(stack) if p not in old]) == len(old))
        time.sleep(1.0)  # let them boot
        inspect = threading.Thread(target=lambda: result.append(stack.node.cli(
            "volume", "inspect", "kept", check=False, timeout=90)))
        inspect.start()
        time.sleep(2.0)
    finally:
        dg.catalog.set_imported(stack.env.config.node)
        dg.close()
    inspect.join(timeout=90)
    assert result and result[0].returncode == 0, result
    got = json.loads(result[0].stdout)[0]
    assert got["Name"] == "kept" and got["Driver"] == "veritas", got
    assert [v for v in stack.docker().volumes.list() if v.name == "kept"][0].attrs["Driver"] == "veritas"
    stack.node.cli("volume", "rm", "kept")


def test_get_with_an_empty_body_gets_no_answer(stack):
    """Docker resends a Get whose connection broke with an empty body, and takes any answered error for
    "no such volume": such a Get is dropped unanswered, so Docker reports a transport error instead."""
    create(stack, "kept2")
    with pytest.raises(requests.exceptions.ConnectionError):
        stack.plugin.call("VolumeDriver.Get", None, raw=b"", timeout=30)
    assert stack.plugin.call("VolumeDriver.Get", {"Name": "kept2"})["Volume"]["Name"] == "kept2"
    # malformed bodies still get their error
    assert "malformed" in stack.plugin.call("VolumeDriver.Get", None, raw=b"{x")["Err"]
    stack.node.cli("volume", "rm", "kept2")


# ---------------------------------------------------------------- socket activation


class Supervisor:
    """Holds the plugin's listening socket and starts ``veritas plugin serve`` on it as systemd does
    (fd 3, LISTEN_FDS=1, LISTEN_PID of the plugin); ends the plugin's processes by PID."""

    def __init__(self, stack: conftest.Stack) -> None:
        self.stack = stack
        self.path = stack.plugin.socket
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(128)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fd = self.sock.fileno()

        def setup() -> None:
            if fd != 3:
                os.dup2(fd, 3)
            os.set_inheritable(3, True)

        with open(self.stack.plugin.log, "ab") as log:
            # sh's $$ is the PID the plugin keeps through exec
            self.proc = subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$0" -m veritas.cli plugin serve',
                                          sys.executable], cwd=REPO, env=serve_env(self.stack, LISTEN_FDS="1"),
                                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=setup, close_fds=False,
                                         start_new_session=True)
        reply = self.stack.plugin.call("Plugin.Activate", {}, timeout=60)  # queues until it serves
        assert reply["Implements"] == ["VolumeDriver"]
        assert self.proc.poll() is None

    def end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            tree = process_tree(self.proc.pid)
            end_pids([self.proc.pid] if sig == signal.SIGTERM else tree, sig, 20)
            end_pids([p for p in tree if alive(p)], signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        # a worker the arbiter forked after the tree was read is in no tree; it holds the socket
        deadline = time.monotonic() + 20
        while holders := self.holders():
            assert time.monotonic() < deadline, f"processes {holders} still hold the plugin's socket"
            end_pids(holders, signal.SIGKILL, 5)

    def holders(self) -> list[int]:
        """PIDs other than ours with the listening socket open, found by the socket's inode."""
        link = f"socket:[{os.fstat(self.sock.fileno()).st_ino}]"
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
                if any(os.readlink(f"/proc/{entry}/fd/{fd}") == link for fd in fds):
                    out.append(int(entry))
            except OSError:
                continue
        return [p for p in out if alive(p)]

    def close(self) -> None:
        self.end(signal.SIGKILL)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def test_socket_activation_keeps_calls_across_a_plugin_restart(stack):
    node = stack.node
    create(stack, "act")
    stack.plugin.stop()
    sup = Supervisor(stack)
    try:
        sup.start()
        held = identity(sup.path)
        sup.end(signal.SIGKILL)
        assert identity(sup.path) == held
        got: list[dict] = []
        ran: list[subprocess.CompletedProcess[str]] = []
        get = threading.Thread(target=lambda: got.append(stack.plugin.call("VolumeDriver.Get", {"Name": "act"},
                                                                           timeout=90)))
        run = threading.Thread(target=lambda: ran.append(node.cli(
            "run", "--rm", "--network", "none", "-v", "act:/data", IMAGE, "sh", "-c", "echo ok > /data/f; cat /data/f",
            check=False)))
        get.start()
        run.start()
        time.sleep(3.0)
        assert get.is_alive(), f"the call was not queued while the plugin was down: {got}"
        sup.start()
        get.join(timeout=90)
        run.join(timeout=120)
        assert got and got[0]["Volume"]["Name"] == "act", got
        assert ran and ran[0].returncode == 0 and ran[0].stdout.strip() == "ok", ran
        assert released(stack, "act"), vol_state(stack, "act")
        assert "lacks field" not in stack.plugin.log.read_text()
        sup.end(signal.SIGTERM)  # a graceful stop leaves the socket to its owner
        assert identity(sup.path) == held
    finally:
        sup.close()
        stack.plugin.start()
    node.cli("volume", "rm", "act")


# ---------------------------------------------------------------- item 15: recovery at worker start


def test_worker_killed_mid_snapshot_thaws_the_source_without_another_request(stack):
    create(stack, "src")
    stack.plugin.stop()
    stack.plugin.start(extra_env={"VERITAS_CRASH_AT": "snap.frozen"})
    try:
        assert stack.plugin.call("VolumeDriver.Mount", {"Name": "src", "ID": "m1"})["Err"] == ""
        mp = mountpoint(stack, "src")
        assert writable(mp, 10)
        with pytest.raises(requests.exceptions.ConnectionError):  # the worker died at the frozen point
            stack.plugin.call("VolumeDriver.Create", {"Name": "snap1", "Opts": {"sourcevol": "src"}})
        assert writable(mp, 10), "the source stayed frozen after its worker was killed mid-snapshot"
        # the replacement worker's start rolled the snapshot back
        assert "no such volume" in stack.plugin.call("VolumeDriver.Get", {"Name": "snap1"})["Err"]
        assert stack.plugin.call("VolumeDriver.Unmount", {"Name": "src", "ID": "m1"})["Err"] == ""
    finally:
        stack.plugin.stop()
        stack.plugin.start()
    assert released(stack, "src")
    stack.node.cli("volume", "rm", "src")


# ---------------------------------------------------------------- maxiops after dockerd restarts


@pytest.mark.parametrize("how", ["graceful", "kill9"])
def test_containers_dockerd_restarts_are_limited_again(stack, how):
    """dockerd serves no API while it restores containers, and its restarts mount their volumes: the
    plugin cannot list who uses the volume then, yet the limit must bind from the restarted container's
    first I/O. Each start of the container notes the limit it finds in its own cgroup."""
    node = stack.node
    create(stack, "rlim", "-o", "maxiops=100")
    note = f"echo start $(cat /sys/fs/cgroup/blkio/{WRITE_FILE}) >> /vol/starts; exec sleep 600"
    ctr = node.cli("run", "-d", "--restart", "always", "--network", "none", "-v", "rlim:/vol", *FIO_MOUNTS,
                   IMAGE, "sh", "-c", note).stdout.strip()
    (dev,) = _devnums(stack, "rlim")
    assert _limit(BLKIO / "docker" / ctr, dev) == 100
    pid = node.client().api.inspect_container(ctr)["State"]["Pid"]
    if how == "graceful":
        node.stop(remove_containers=False)
    else:
        ctrd = node.containerd_pid()
        node.kill()
        # its containerd dies with it (pdeathsig), not at once: a new dockerd would wait on the old one
        wait_for("the killed dockerd's containerd to end", lambda: ctrd is None or not alive(ctrd), timeout=30)
    node.start()

    def restarted() -> bool:
        state = node.client().api.inspect_container(ctr)["State"]
        return bool(state["Running"]) and state["Pid"] != pid

    wait_for("dockerd to restart the container", restarted, timeout=60)
    starts = node.cli("exec", ctr, "cat", "/vol/starts").stdout.splitlines()
    assert len(starts) == 2 and all(" 100" in line for line in starts), \
        f"the restarted container started without its limit: {starts}"
    (dev,) = _devnums(stack, "rlim")
    _wait_limit(BLKIO / "docker" / ctr, dev, 100, timeout=15)
    iops = _fio_iops(stack, ctr, runtime=2)
    assert iops <= 1.1 * 100, f"{iops:.0f} write IOPS on a volume limited to 100"
    node.cli("rm", "-f", ctr)
    wait_for("the volume to be released", lambda: released(stack, "rlim"))
    node.cli("volume", "rm", "rlim")
