"""The first process of a lab node: it sets up the node's mount and UTS namespace, holds them, and
starts the node's daemons on request, as their parent and as the reaper of their orphans.

Started by the lab as ``nsenter --net=NETNS unshare -m -u --propagation slave python3 -m lab.nodeinit
LAB NODE ROLE``. Every process of the node descends from it (dockerd, containerd, the shims and their
containers, the plugin), so a dead node leaves no process behind that holds its mount namespace, and no
zombie containerd that a restarted dockerd would mistake for a live one.

Control: one JSON line in, one JSON line out, on the unix socket ``LAB/nodes/NODE/init.sock``:
``{"op": "ping"}`` and ``{"op": "spawn", "argv": [...], "env": {...}, "cwd": DIR, "log": FILE}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from lab import wire
from lab.nsprune import prune

PR_SET_CHILD_SUBREAPER = 36


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)}: {r.stderr.strip()}")


def setup_docker_mounts(base: Path) -> None:
    """The node's own /sys (its network devices), the host's cgroups, and its own /etc/docker and
    plugin socket directory (else every node shares one engine identity and one ``veritas`` socket)."""
    cg = base / "cg"
    cg.mkdir(exist_ok=True)
    _mount("--rbind", "/sys/fs/cgroup", str(cg))
    subprocess.run(["umount", "-l", "/sys"], check=True)
    _mount("-t", "sysfs", "sysfs", "/sys")
    _mount("--rbind", str(cg), "/sys/fs/cgroup")
    subprocess.run(["umount", "-l", str(cg)], check=True)
    _mount("--bind", str(base / "etc-docker"), "/etc/docker")
    _mount("--bind", str(base / "plugins"), "/run/docker/plugins")


def setup_pacemaker_mounts(lab: Path, base: Path) -> None:
    """What corosync and Pacemaker of this node must not share with the host or other nodes (see
    lab.pacemaker): a private /run (corosync's pid lock, the resource agents' state files; the docker
    plugin socket directory is bound into it afterwards) and /dev/shm (libqb's IPC buffers), the
    node's own config, state and log directories over the host's, and the lab's fence agent and OCF
    agents overlaid (read-only) onto /usr/sbin and /usr/lib/ocf/resource.d."""
    from lab.pacemaker import NODE_DIRS, hacluster

    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "lab-run", "/run")
    uid, gid = hacluster()
    for d, mode in (("/run/docker/plugins", 0o755), ("/run/resource-agents", 0o1755), ("/run/lock", 0o1777),
                    ("/run/crm", 0o750)):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, mode)
    os.chown("/run/crm", uid, gid)
    # the engine's usual socket, on every node: a resource that moves between nodes (DockerContainer's
    # docker_host) names the same socket everywhere, whoever (lab or ocf:veritas:DockerDaemon) started dockerd
    os.symlink(base / "docker.sock", "/run/docker.sock")
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "lab-shm", "/dev/shm")
    for name, target, _owned in NODE_DIRS:
        _mount("--bind", str(base / "pcmk" / name), target)
    _mount("-t", "overlay", "-o", f"lowerdir={lab / 'pcmk' / 'sbin'}:/usr/sbin", "lab-sbin", "/usr/sbin")
    _mount("-t", "overlay", "-o", f"lowerdir={lab / 'pcmk' / 'ocf'}:/usr/lib/ocf/resource.d", "lab-ocf",
           "/usr/lib/ocf/resource.d")


def _pacemaker(lab: Path) -> bool:
    try:
        return bool(json.loads((lab / "lab.json").read_text()).get("pacemaker"))
    except (OSError, ValueError):
        return False


def _reap(_signum: int = 0, _frame: object = None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _spawn(req: dict[str, object]) -> int:
    argv = [str(a) for a in req["argv"]]  # type: ignore[attr-defined]
    env = {str(k): str(v) for k, v in dict(req.get("env") or {}).items()}  # type: ignore[call-overload]
    pid = os.fork()
    if pid == 0:  # the child: its own session, output to its log, then the daemon
        try:
            os.setsid()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.chdir(str(req.get("cwd") or "/"))
            fd = os.open(str(req["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.closerange(3, 65536)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


def main() -> None:
    lab, node, role = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    base = lab / "nodes" / node
    socket.sethostname(node)
    # copies of the host's mounts that would keep other filesystems busy, and the lab's own namespace
    # files (a copy of one would keep that network namespace alive after the lab's down)
    prune(str(lab), also=(str(lab / "ns"),))
    if role == "docker" and _pacemaker(lab):
        setup_pacemaker_mounts(lab, base)
    if role == "docker":
        setup_docker_mounts(base)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    path = base / "init.sock"
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                req = json.loads(wire.recv_line(conn))
                if req["op"] == "ping":
                    reply: dict[str, object] = {"pid": os.getpid()}
                elif req["op"] == "spawn":
                    reply = {"pid": _spawn(req)}
                else:
                    reply = {"error": f"unknown op {req['op']!r}"}
            except Exception as exc:  # a bad request must not end the node
                reply = {"error": repr(exc)}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass


if __name__ == "__main__":
    main()
