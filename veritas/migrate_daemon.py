"""Offline migration of dockerd whose data root sits on a veritas volume (the seed's "Migrating Docker
Daemons and Docker Containers"), with the containers that were running started again on the target.

Two halves, because each runs on its own node: ``migrate daemon --to NODE`` on the source stops dockerd
(the DockerDaemon agent's offline) and releases the volume; ``migrate daemon --arrive VOLUME`` on the
target mounts it, starts dockerd with the same arguments (its data root moved to where the volume is
mounted there) and starts the containers. The volume carries what the target needs: a record
(``.veritas-daemon.json`` at its root) of the daemon's binary, arguments, socket, pid file and running
containers, written before dockerd stops. ``--via CMD`` runs the arriving half on the target (``ssh
NODE``, or ``scripts/lab exec NODE --`` in the lab); without it the command says what to run there.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from agents.daemon import DaemonSpec, DockerDaemon
from agents.params import API_VERSION
from storage import diskgroup, volumes
from storage.config import Config
from storage.errors import InvalidArgument
from storage.group import DiskGroup
from veritas.migrate import (
    MigrationFailed,
    MigrationRefused,
    NotManaged,
    VolMount,
    _check_volumes,
    _released,
    check_target,
)

RECORD = ".veritas-daemon.json"
RESOURCE = "veritas-migrate-dockerd"


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """dockerd's arguments without -H/--host and --pidfile (the agent adds them), and the -H values."""
    args: list[str] = []
    hosts: list[str] = []
    it = iter(argv)
    for a in it:
        key, eq, val = a.partition("=")
        if key in ("-H", "--host", "--pidfile", "-p"):
            v = val if eq else next(it, "")
            if key in ("-H", "--host"):
                hosts.append(v)
        else:
            args.append(a)
    return args, hosts


def spec_of_running(pidfile: str, logfile: str) -> tuple[DaemonSpec, int]:
    """The running dockerd of ``pidfile`` as a DaemonSpec: its binary (/proc/PID/exe), its arguments
    without the -H and --pidfile the agent adds itself, its unix socket."""
    try:
        pid = int(Path(pidfile).read_text().strip())
        binary = os.readlink(f"/proc/{pid}/exe")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except (OSError, ValueError):
        raise MigrationRefused(f"no running dockerd named by pid file {pidfile}") from None
    args, hosts = split_argv(argv[1:])
    socks = [h[len("unix://"):] for h in hosts if h.startswith("unix://")]
    if len(hosts) != 1 or not socks:
        raise MigrationRefused(f"dockerd pid {pid} serves {hosts or 'its default socket'}: migrate daemon needs one "
                               "-H unix://SOCKET (the agent's DockerDaemon form)")
    spec = DaemonSpec(binary=binary, args=args, socket=socks[0], pidfile=pidfile, logfile=logfile,
                      start_timeout=60, stop_timeout=60)
    if not DockerDaemon(RESOURCE, spec).ours(pid):
        raise MigrationRefused(f"pid {pid} of {pidfile} is not a dockerd started with that pid file")
    return spec, pid


def volume_of(dg: DiskGroup, path: str) -> str:
    """The veritas volume mounted here whose filesystem holds ``path``, by device number."""
    try:
        dev = os.stat(path).st_dev
    except OSError as exc:
        raise MigrationRefused(f"data root {path}: {exc.strerror}") from None
    for v in dg.catalog.volumes():
        mp = dg.mountpoint(v.name)
        try:
            if os.stat(mp).st_dev == dev and os.stat(mp.parent).st_dev != dev:
                return v.name
        except OSError:
            continue
    raise NotManaged(f"dockerd's data root {path} is not on a veritas volume of disk group {dg.name} mounted here")


def with_data_root(args: list[str], root: str) -> list[str]:
    """``args`` with the data root moved to ``root`` (where the volume is mounted on the target)."""
    out, it = [], iter(args)
    for a in it:
        if a in ("--data-root", "-g", "--graph"):
            next(it, None)
            out += ["--data-root", root]
        elif a.startswith(("--data-root=", "--graph=")):
            out.append(f"--data-root={root}")
        else:
            out.append(a)
    return out


def migrate_daemon(cfg: Config, target: str, pidfile: str, logfile: str, via: str | None) -> dict[str, Any]:
    import docker

    dg = diskgroup.open_dg(cfg, cfg.diskgroup)
    try:
        check_target(cfg, dg, "dockerd", target)
        spec, pid = spec_of_running(pidfile, logfile)
        root = spec.data_root()
        vol = volume_of(dg, root)
        _check_volumes(dg, cfg.node, [VolMount(vol, root, False)])
        with docker.APIClient(base_url=spec.url, version=API_VERSION, timeout=30) as api:
            running = [c["Id"] for c in api.containers()]
        mp = dg.mountpoint(vol)
        rec = {"binary": spec.binary, "args": spec.args, "data_root": os.path.relpath(root, mp),
               "socket": spec.socket, "pidfile": spec.pidfile, "logfile": spec.logfile, "running": running,
               "from": cfg.node, "to": target, "at": time.time()}
        tmp = mp / (RECORD + ".tmp")
        with open(tmp, "w") as f:
            json.dump(rec, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(mp / RECORD)
        res = DockerDaemon(RESOURCE, spec).offline()
        if not res.ok:
            raise MigrationFailed(f"dockerd pid {pid} did not stop: {res.reason}")
        volumes.umount(dg, vol, volumes.ADMIN_MOUNT_ID)
        left = _released(dg, cfg.node, [VolMount(vol, root, False)])
        if left:
            raise MigrationFailed(f"dockerd stopped, but volume {vol} is still mounted here by other users: unmount"
                                  f" it, then run `veritas migrate daemon --arrive {vol}` on node {target}")
    finally:
        dg.close()
    out: dict[str, Any] = {"volume": vol, "from": cfg.node, "to": target, "running": running}
    if via is None:
        out["next"] = f"on node {target}: veritas migrate daemon --arrive {vol}"
        return out
    r = subprocess.run([*shlex.split(via), "python3", "-m", "veritas.cli", "--json", "migrate", "daemon", "--arrive",
                        vol], capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise MigrationFailed(f"dockerd stopped and volume {vol} released, but arriving on node {target} failed "
                              f"({r.returncode}): {r.stderr.strip()[-500:]}")
    out["arrived"] = json.loads(r.stdout)
    return out


def arrive_daemon(cfg: Config, vol: str) -> dict[str, Any]:
    """Mount ``vol`` here, start the dockerd its record names with its data root there, start the
    containers that ran before."""
    import docker
    import docker.errors

    dg = diskgroup.open_dg(cfg, cfg.diskgroup)
    try:
        mp = volumes.mount(dg, vol, volumes.ADMIN_MOUNT_ID)
        try:
            rec = json.loads((Path(mp) / RECORD).read_text())
        except (OSError, ValueError) as exc:
            volumes.umount(dg, vol, volumes.ADMIN_MOUNT_ID)
            raise InvalidArgument(f"volume {vol} holds no migrated dockerd ({RECORD}: {exc})") from None
    finally:
        dg.close()
    root = str(Path(mp) / rec["data_root"])
    spec = DaemonSpec(binary=rec["binary"], args=with_data_root(list(rec["args"]), root), socket=rec["socket"],
                      pidfile=rec["pidfile"], logfile=rec["logfile"], start_timeout=60, stop_timeout=60)
    res = DockerDaemon(RESOURCE, spec).online()
    if not res.ok:
        raise MigrationFailed(f"dockerd did not start on node {cfg.node}: {res.reason}")
    started, failed = [], []
    with docker.APIClient(base_url=spec.url, version=API_VERSION, timeout=60) as api:
        for cid in rec["running"]:
            try:
                api.start(cid)
                started.append(cid)
            except docker.errors.APIError as exc:
                failed.append(f"{cid[:12]}: {exc.explanation or exc}")
    if failed:
        raise MigrationFailed(f"dockerd runs on node {cfg.node}, but containers did not start: {'; '.join(failed)}")
    return {"volume": vol, "node": cfg.node, "data_root": root, "socket": spec.socket, "started": started}
