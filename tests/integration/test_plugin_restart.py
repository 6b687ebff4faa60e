"""Restarts and crashes of the plugin and of dockerd while containers use veritas volumes.

After each, the mount state must be consistent: a volume a container uses stays mounted with its data,
Docker's later Unmount works, and once no container uses a volume it ends unmounted with its loop
devices detached and no mount rows left in the catalog — also when Docker never sends that Unmount.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from storage import diskgroup, volumes
from storage.catalog.base import MountRec
from storage.kernel import mounts
from tests.integration import conftest
from tests.integration.dockerstack import _pids_with_arg, alive

IMAGE = "localbusybox"
WRITER = "i=0; while true; do echo $i >> /data/log; i=$((i+1)); sleep 0.05; done"


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def mountpoint(stack: conftest.Stack, name: str) -> Path:
    return stack.env.config.mount_root / f"{name}_dockerdg"


def vol_state(stack: conftest.Stack, name: str) -> dict[str, object]:
    """Catalog mount rows, kernel mount and loop devices of one volume."""
    dg = diskgroup.open_dg(stack.env.config, "dockerdg")
    try:
        v = dg.catalog.volume(name)
        return {
            "rows": sorted(m.mount_id for m in dg.catalog.mounts(name)),
            "mounted": mounts.mounted_at(mountpoint(stack, name)) is not None,
            "loops": volumes.devices(dg, v) if v is not None else [],
        }
    finally:
        dg.close()


def released(stack: conftest.Stack, name: str) -> bool:
    return vol_state(stack, name) == {"rows": [], "mounted": False, "loops": []}


def log_lines(stack: conftest.Stack, name: str) -> int:
    """Lines the writer container has put into the volume (read on the host, under the mount root)."""
    try:
        return len((mountpoint(stack, name) / "log").read_text().splitlines())
    except OSError:
        return 0


def create(stack: conftest.Stack, name: str) -> None:
    stack.node.cli("volume", "create", "-d", "veritas", "--name", name, "-o", "size=400m")


def run_writer(stack: conftest.Stack, container: str, volume: str) -> None:
    stack.node.cli("run", "-d", "--name", container, "--network", "none", "--stop-timeout", "1",
                   "-v", f"{volume}:/data", IMAGE, "sh", "-c", WRITER)
    wait_for("the writer to write", lambda: log_lines(stack, volume) > 3)


def container_status(stack: conftest.Stack, container: str) -> str:
    return stack.node.cli("inspect", "-f", "{{.State.Status}}", container).stdout.strip()


def exec_lines(stack: conftest.Stack, container: str) -> int:
    return int(stack.node.cli("exec", container, "wc", "-l", "/data/log").stdout.split()[0])


def test_plugin_kill9_while_a_container_writes(stack):
    """(a) The container keeps its data through a plugin SIGKILL and restart; its Unmount then works."""
    node = stack.node
    create(stack, "va")
    run_writer(stack, "ca", "va")
    before = vol_state(stack, "va")
    assert before["mounted"] and len(before["rows"]) == 1 and before["loops"]

    stack.plugin.kill9()
    n = log_lines(stack, "va")
    wait_for("writes while the plugin is down", lambda: log_lines(stack, "va") > n + 5)
    stack.plugin.start()
    assert vol_state(stack, "va") == before  # reconciliation kept the mount the running container uses

    n = exec_lines(stack, "ca")
    wait_for("writes after the restart", lambda: exec_lines(stack, "ca") > n + 5)
    assert container_status(stack, "ca") == "running"
    seen = stack.plugin.call("VolumeDriver.Get", {"Name": "va"})["Volume"]["Status"]
    assert seen["mounts"] == 1 and seen["attached"] == ["node1"]

    node.cli("stop", "ca")
    assert released(stack, "va"), vol_state(stack, "va")
    node.cli("rm", "ca")
    # the data survived: a new container reads what the first one wrote
    out = node.cli("run", "--rm", "--network", "none", "-v", "va:/data", IMAGE, "wc", "-l", "/data/log").stdout
    assert int(out.split()[0]) > 10
    assert released(stack, "va")
    node.cli("volume", "rm", "va")


def test_mount_while_the_plugin_is_down_is_retried(stack):
    """(b) Docker retries a Mount the dead plugin cannot answer; it succeeds once the plugin is back."""
    node = stack.node
    create(stack, "vb")
    stack.plugin.kill9()
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            time.sleep(3)
            stack.plugin.start()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    t = threading.Thread(target=restart)
    t0 = time.monotonic()
    t.start()
    try:
        out = node.cli("run", "--rm", "--network", "none", "-v", "vb:/data", IMAGE,
                       "sh", "-c", "echo retried > /data/f && cat /data/f").stdout
    finally:
        t.join()
    assert not errors, errors
    assert out.strip() == "retried"
    assert time.monotonic() - t0 >= 3  # it really waited for the plugin
    assert released(stack, "vb"), vol_state(stack, "vb")
    out = node.cli("run", "--rm", "--network", "none", "-v", "vb:/data", IMAGE, "cat", "/data/f").stdout
    assert out.strip() == "retried"
    assert released(stack, "vb")


def test_dockerd_graceful_restart(stack):
    """(c) dockerd stops its containers on the way down: their volumes are unmounted; data survives."""
    node = stack.node
    create(stack, "vc")
    run_writer(stack, "cc", "vc")
    node.stop(remove_containers=False)
    # without live-restore Docker stopped the container, so it must have sent the Unmount
    assert released(stack, "vc"), vol_state(stack, "vc")
    node.start()
    assert container_status(stack, "cc") == "exited"
    assert released(stack, "vc")
    node.cli("run", "--rm", "--network", "none", "-v", "vc:/data", IMAGE, "true")
    node.cli("start", "cc")
    state = vol_state(stack, "vc")
    assert state["mounted"] and len(state["rows"]) == 1
    lines = (mountpoint(stack, "vc") / "log").read_text().splitlines()
    assert lines[:3] == ["0", "1", "2"], lines[:3]  # what was written before the restart is intact
    n = exec_lines(stack, "cc")
    wait_for("writes after docker start", lambda: exec_lines(stack, "cc") > n + 3)
    node.cli("stop", "cc")
    assert released(stack, "vc"), vol_state(stack, "vc")
    node.cli("rm", "cc")
    node.cli("volume", "rm", "vc")


def test_dockerd_and_plugin_kill9(stack):
    """(d) dockerd SIGKILL, plugin SIGKILL, plugin restart, dockerd restart: no mount count survives.

    The new dockerd kills the orphaned container while it restores and sends no Unmount for it; the
    plugin (started while dockerd was down, so its start-up reconciliation could not ask Docker) must
    still release the volume once no container references it.
    """
    node = stack.node
    create(stack, "vd")
    run_writer(stack, "cd", "vd")
    assert vol_state(stack, "vd")["mounted"]

    node.kill()
    n = log_lines(stack, "vd")
    wait_for("the orphaned container to keep writing", lambda: log_lines(stack, "vd") > n + 3)
    stack.plugin.kill9()
    stack.plugin.start()
    assert vol_state(stack, "vd")["mounted"]  # dockerd is down: nothing tells the plugin it is unused
    node.start()
    assert container_status(stack, "cd") in ("exited", "running")
    node.cli("rm", "-f", "cd")
    wait_for("the volume to be released after the container went",
             lambda: released(stack, "vd"), timeout=15)
    # and it is usable and removable as usual
    out = node.cli("run", "--rm", "--network", "none", "-v", "vd:/data", IMAGE, "wc", "-l", "/data/log").stdout
    assert int(out.split()[0]) > 3
    assert released(stack, "vd")
    node.cli("volume", "rm", "vd")
    assert "vd" not in node.cli("volume", "ls", "-q").stdout.split()


def test_node_stop_after_dockerd_kill9_ends_shims(stack):
    """The harness: after a dockerd SIGKILL, stop() ends the surviving shims and containers by PID."""
    node = stack.node
    create(stack, "ve")
    run_writer(stack, "ce", "ve")
    sock = f"{node.exec_root}/containerd/containerd.sock"
    shims = _pids_with_arg(sock)
    assert shims, "no shim found for the running container"
    node.kill()
    assert all(alive(p) for p in shims)  # they outlive dockerd
    node.stop()
    assert not [p for p in shims if alive(p)] and not _pids_with_arg(sock)
    n = log_lines(stack, "ve")
    time.sleep(0.3)
    assert log_lines(stack, "ve") == n  # the writer is gone
    node.start()
    node.cli("rm", "-f", "ce")
    wait_for("the volume to be released", lambda: released(stack, "ve"))


def test_reconcile_at_start(stack):
    """(e) With the plugin stopped: a stale mount row and an uncounted mount; start-up fixes both.

    A volume a running container uses keeps its mount and its row.
    """
    node = stack.node
    for name in ("stale", "uncounted", "used"):
        create(stack, name)
    run_writer(stack, "cu", "used")
    used = vol_state(stack, "used")
    stack.plugin.stop()

    dg = diskgroup.open_dg(stack.env.config, "dockerdg")
    try:
        dg.catalog.add_mount(MountRec("stale", dg.node, "ghost-id", time.time()))
        volumes.mount(dg, "uncounted", "temporary")
        assert dg.catalog.remove_mount("uncounted", dg.node, "temporary")
    finally:
        dg.close()
    assert vol_state(stack, "stale")["rows"] == ["ghost-id"]
    state = vol_state(stack, "uncounted")
    assert state["mounted"] and state["rows"] == [] and state["loops"]

    stack.plugin.start()
    assert released(stack, "stale"), vol_state(stack, "stale")
    assert released(stack, "uncounted"), vol_state(stack, "uncounted")
    assert vol_state(stack, "used") == used
    n = exec_lines(stack, "cu")
    wait_for("the container to keep writing", lambda: exec_lines(stack, "cu") > n + 3)
    log = stack.plugin.log.read_text()
    assert "stale-mount-record" in log and "unmounted uncounted" in log

    node.cli("rm", "-f", "cu")
    assert released(stack, "used"), vol_state(stack, "used")
    for name in ("stale", "uncounted", "used"):
        node.cli("volume", "rm", name)


def test_restart_mounts_again_what_containers_use(stack):
    """(f) The volume is unmounted under a stopped plugin while a container keeps using it, as Docker does to
    a managed plugin's propagated mount on ``disable -f`` or upgrade: start-up mounts it again with its
    mount IDs (one filesystem with the container's), and the container's later Unmount releases it."""
    node = stack.node
    create(stack, "lost")
    run_writer(stack, "cl", "lost")
    before = vol_state(stack, "lost")
    stack.plugin.stop()
    subprocess.run(["umount", str(mountpoint(stack, "lost"))], check=True)
    assert vol_state(stack, "lost") == {**before, "mounted": False}
    n = exec_lines(stack, "cl")

    stack.plugin.start()
    assert vol_state(stack, "lost") == before
    wait_for("the container's writes to show under the mount point", lambda: log_lines(stack, "lost") > n + 3)
    status = stack.plugin.call("VolumeDriver.Get", {"Name": "lost"})["Volume"]["Status"]
    assert status["mounts"] == 1 and status["attached"] == [stack.env.config.node], status
    assert "mounted lost again" in stack.plugin.log.read_text()

    node.cli("rm", "-f", "cl")
    assert released(stack, "lost"), vol_state(stack, "lost")
    node.cli("volume", "rm", "lost")


def test_restart_keeps_volume_of_a_created_container(stack):
    """Docker mounts before it starts a container: a plugin restarted in between must not unmount it."""
    node, plugin = stack.node, stack.plugin
    node.cli("volume", "create", "-d", "veritas", "--name", "pending", "-o", "size=500m")
    cid = node.cli("create", "--network", "none", "-v", "pending:/d", "localbusybox", "true").stdout.strip()
    mount_id = "ab" * 32  # shaped like Docker's own mount IDs
    reply = plugin.call("VolumeDriver.Mount", {"Name": "pending", "ID": mount_id})
    assert reply["Err"] == "", reply
    plugin.stop()
    plugin.start()
    dg = diskgroup.open_dg(stack.env.config, "dockerdg")
    try:
        assert volumes.is_mounted(dg, "pending"), "reconciliation unmounted a volume a created container holds"
        assert [m.mount_id for m in dg.catalog.mounts("pending")] == [mount_id]
    finally:
        dg.close()
    assert plugin.call("VolumeDriver.Unmount", {"Name": "pending", "ID": mount_id})["Err"] == ""
    node.cli("rm", cid)
    node.cli("volume", "rm", "pending")
