"""DockerDaemon: dockerd kept online or offline by its pid file.

The process is trusted as "this resource's dockerd" only if the pid file's process is alive, runs the
configured binary (same inode) and was started with this resource's pid file; online also needs the
API to answer a ping on the configured socket. Clean kills it and what it left running: its process tree
(containerd), and its containers' processes and shims, found by PID through the containers' cgroups.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agents import engine, procs, registry
from agents.errors import ConfigError, NotInstalled
from agents.params import Param, check_abs_path, parse_int, split_words, values
from agents.result import CLEAN_REASONS, ActionResult, MonitorResult, State

KIND = "DockerDaemon"
STARTING_CONFIDENCE = 30

PARAMS = [
    Param("binary", "DockerdBinary", "string", "/usr/sbin/dockerd", False, "dockerd binary",
          "Absolute path of the dockerd executable."),
    Param("args", "DockerdArgs", "string", "", False, "dockerd arguments",
          "Arguments for dockerd, split with shell-like quoting (never run by a shell), such as "
          "--data-root /dockerfs/dockervol_dockerdg/docker. The agent adds -H and --pidfile itself."),
    Param("socket", "DockerSocket", "string", "/var/run/docker.sock", False, "API socket",
          "Unix socket path the daemon serves its API on."),
    Param("pidfile", "PidFile", "string", "/var/run/docker.pid", False, "pid file",
          "dockerd's pid file; it identifies this resource's daemon."),
    Param("logfile", "LogFile", "string", "/var/log/veritas-dockerd.log", False, "log file",
          "File the daemon's output is appended to."),
    Param("start_timeout", "StartTimeout", "integer", "60", False, "start timeout",
          "Seconds online waits for the API to answer."),
    Param("stop_timeout", "StopTimeout", "integer", "60", False, "stop timeout",
          "Seconds offline waits after SIGTERM before killing the daemon and what it left (as clean)."),
]

REFUSED_ARGS = ("-H", "--host", "-p", "--pidfile")


@dataclass(frozen=True)
class DaemonSpec:
    binary: str
    args: list[str]
    socket: str
    pidfile: str
    logfile: str
    start_timeout: int
    stop_timeout: int

    @classmethod
    def parse(cls, given: Mapping[str, str]) -> DaemonSpec:
        v = values(PARAMS, given)
        args = split_words("args", v["args"])
        for a in args:
            if a.split("=", 1)[0] in REFUSED_ARGS:
                raise ConfigError(f"dockerd argument {a} is set by the agent from the socket and pidfile "
                                  "attributes: remove it from args")
        return cls(binary=check_abs_path("binary", v["binary"]), args=args,
                   socket=check_abs_path("socket", v["socket"]), pidfile=check_abs_path("pidfile", v["pidfile"]),
                   logfile=check_abs_path("logfile", v["logfile"]),
                   start_timeout=parse_int("start_timeout", v["start_timeout"], 1, 3600),
                   stop_timeout=parse_int("stop_timeout", v["stop_timeout"], 1, 3600))

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def data_root(self) -> str:
        """The daemon's data root, from its arguments (dockerd's default otherwise)."""
        root = "/var/lib/docker"
        for i, a in enumerate(self.args):
            if a in ("--data-root", "-g", "--graph") and i + 1 < len(self.args):
                root = self.args[i + 1]
            elif a.startswith(("--data-root=", "--graph=")):
                root = a.split("=", 1)[1]
        return root


class DockerDaemon:
    """The agent core for one DockerDaemon resource."""

    def __init__(self, resource: str, spec: DaemonSpec) -> None:
        self.resource = resource
        self.spec = spec

    def validate(self) -> None:
        b = Path(self.spec.binary)
        if not b.is_file() or not os.access(b, os.X_OK):
            raise NotInstalled(f"dockerd binary {self.spec.binary} is missing or not executable")

    def _ping(self, timeout: float = 5) -> bool:
        return engine.ping(self.spec.url, timeout)  # agents.engine: no docker SDK on the monitor path

    def _pidfile_pid(self) -> int | None:
        try:
            return int(Path(self.spec.pidfile).read_text().strip())
        except (OSError, ValueError):
            return None

    def ours(self, pid: int | None) -> bool:
        """Whether ``pid`` is this resource's dockerd: alive, the configured binary, our pid file."""
        if pid is None or pid <= 1 or not procs.alive(pid) or not procs.runs_binary(pid, self.spec.binary):
            return False
        argv = procs.cmdline(pid)
        return any((a == "--pidfile" and i + 1 < len(argv) and argv[i + 1] == self.spec.pidfile)
                   or a == f"--pidfile={self.spec.pidfile}" for i, a in enumerate(argv))

    def pid(self) -> int | None:
        p = self._pidfile_pid()
        return p if self.ours(p) else None

    def monitor(self) -> MonitorResult:
        """The monitor entry point: observe, and adopt a dockerd found answering that the watcher does not
        follow (the cluster found it at its probe and never ran online, which registers; or it was
        restarted under another PID)."""
        res = self.observe()
        if res.state is State.ONLINE and res.confidence == 100:
            pid = self.pid()
            rec = registry.read(self.resource)
            if rec is None or rec.get("expect") != "online" or rec.get("pid") != pid \
                    or rec.get("docker_host") != self.spec.url:
                self._register(pid)
        return res

    def _register(self, pid: int | None) -> None:
        registry.register(self.resource, KIND, "online", pid=pid, pidfile=self.spec.pidfile, binary=self.spec.binary,
                          docker_host=self.spec.url)

    def observe(self) -> MonitorResult:
        pid = self.pid()
        if pid is None:
            if self._ping(2):
                return MonitorResult.unknown(f"an engine answers on {self.spec.socket} but it is not the dockerd "
                                             f"of pid file {self.spec.pidfile}")
            why = "no pid file" if self._pidfile_pid() is None else "stale pid file"
            return MonitorResult.offline(f"dockerd not running ({why} {self.spec.pidfile})")
        if self._ping():
            return MonitorResult.online(100, f"dockerd pid {pid} answers on {self.spec.socket}")
        age = procs.age_seconds(pid) or 0.0
        if age < self.spec.start_timeout:
            return MonitorResult.online(STARTING_CONFIDENCE, f"dockerd pid {pid} is starting ({age:.0f}s)")
        return MonitorResult.faulted(f"dockerd pid {pid} runs but its API on {self.spec.socket} does not answer")

    def online(self, timeout: float | None = None) -> ActionResult:
        before = self.observe()
        if before.state is State.ONLINE and before.confidence == 100:
            self._register(self.pid())
            return ActionResult(True, before.reason)
        if before.state in (State.UNKNOWN, State.FAULTED):
            return ActionResult(False, before.reason)
        self.validate()
        proc: subprocess.Popen[bytes] | None = None
        if before.state is State.OFFLINE:
            if self._pidfile_pid() is not None:  # not our daemon's (checked above): dockerd would refuse to
                Path(self.spec.pidfile).unlink(missing_ok=True)  # start while its PID names a live process
            Path(self.spec.logfile).parent.mkdir(parents=True, exist_ok=True)
            Path(self.spec.pidfile).parent.mkdir(parents=True, exist_ok=True)
            argv = [self.spec.binary, *self.spec.args, "--pidfile", self.spec.pidfile, "-H", self.spec.url]
            with open(self.spec.logfile, "ab") as log:
                # its own session: no signal meant for the agent's caller reaches it
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True)
        deadline = time.monotonic() + (timeout if timeout is not None else self.spec.start_timeout)
        while True:
            if proc is not None and proc.poll() is not None:
                return ActionResult(False, f"dockerd exited with {proc.returncode}: {self._log_tail()}")
            res = self.observe()
            if res.state is State.ONLINE and res.confidence == 100:
                self._register(self.pid())
                return ActionResult(True, res.reason)
            if time.monotonic() > deadline:
                return ActionResult(False, f"dockerd did not answer in time: {res.reason}; {self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            return Path(self.spec.logfile).read_text(errors="replace")[-600:].strip()
        except OSError:
            return ""

    def _containers(self) -> list[str]:
        """IDs of the containers in this daemon's data root (the names of their cgroups)."""
        d = Path(self.spec.data_root()) / "containers"
        try:
            return [p.name for p in d.iterdir() if len(p.name) == 64]
        except OSError:
            return []

    def leftovers(self, pid: int | None) -> tuple[list[int], list[Path]]:
        """Processes of this daemon: its tree (containerd...), its containers' processes (by their
        cgroups) and the shims above them (their parents); and those cgroups."""
        pids: list[int] = procs.tree(pid) if pid else []
        cgroups: list[Path] = []
        ctr_pids: set[int] = set()
        for cid in self._containers():
            for d in procs.cgroup_dirs(cid):
                cgroups.append(d)
                ctr_pids |= procs.cgroup_pids(d)
        me = set(procs.tree(os.getpid()))
        ancestors, p = set(), os.getpid()
        while p and p > 1:
            ancestors.add(p)
            p = procs.ppid(p) or 0
        shims = {pp for c in ctr_pids if (pp := procs.ppid(c)) and pp > 1 and pp not in ctr_pids}
        for x in [*sorted(shims), *sorted(ctr_pids)]:
            if x not in pids and x not in me and x not in ancestors and procs.alive(x):
                pids.append(x)
        return pids, cgroups

    def offline(self) -> ActionResult:
        """SIGTERM dockerd (it stops its containers) and wait; past the stop timeout, clean."""
        registry.expect_offline(self.resource)
        pid = self.pid()
        if pid is None:
            before = self.observe()
            if before.state is State.UNKNOWN:
                return ActionResult(False, before.reason)
            if self.leftovers(None)[0]:  # a killed dockerd's containers run on, holding their volumes
                res = self.clean(4)
                return ActionResult(res.ok, f"{before.reason}; {res.reason}")
            return ActionResult(True, before.reason)
        tree = procs.tree(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # it ended meanwhile
            pass
        if not procs.wait_gone(tree, self.spec.stop_timeout):
            return ActionResult(True, f"dockerd pid {pid} stopped")
        res = self.clean(1)
        return ActionResult(res.ok, f"dockerd pid {pid} did not stop in {self.spec.stop_timeout}s; {res.reason}")

    def clean(self, reason: int = 0) -> ActionResult:
        """SIGKILL dockerd and everything it left running; remove its containers' emptied cgroups."""
        why = CLEAN_REASONS.get(reason, f"reason {reason}")
        registry.expect_offline(self.resource)
        pid = self.pid()
        if pid is None and (before := self.observe()).state is State.UNKNOWN:
            return ActionResult(False, f"clean ({why}): {before.reason}")  # another engine's: not ours to kill
        killed: list[int] = []
        left: list[int] = []
        cgroups: list[Path] = []
        for _ in range(3):  # again: a shim may have started a process while the first pass ran
            pids, cgroups = self.leftovers(pid)
            if not pids:
                break
            killed += pids
            left = procs.kill_all(pids)
            pid = None
        for d in sorted(set(cgroups), key=lambda p: -len(p.parts)):
            if not procs.cgroup_pids(d):
                try:
                    d.rmdir()
                except OSError:
                    pass
        if left:
            return ActionResult(False, f"clean ({why}): processes outlived SIGKILL: {left}")
        if self._ping(2):
            return ActionResult(False, f"clean ({why}): an engine still answers on {self.spec.socket}")
        return ActionResult(True, f"clean ({why}): killed {len(set(killed))} process(es) of dockerd")

    def info(self) -> dict[str, str]:
        pid = self.pid()
        return {"PidFile": self.spec.pidfile, "Pid": str(pid or ""), "Socket": self.spec.socket,
                "DataRoot": self.spec.data_root(), "Containers": str(len(self._containers()))}


def from_attributes(resource: str, given: Mapping[str, str]) -> DockerDaemon:
    from agents.params import check_resource

    return DockerDaemon(check_resource(resource), DaemonSpec.parse(given))
