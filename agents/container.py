"""DockerContainer: one container kept online or offline through the engine's API.

Monitor inspects the container (one API call, never the CLI) and maps Docker's state the way the
vendor's KVMGuest maps VM states (see ``classify``). The container is created, when absent, from the
resource's attributes, with its veritas volumes mounted through the ``veritas`` volume driver.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Mapping

from agents import engine, registry, sdk
from agents.errors import AgentError, ConfigError, NotInstalled
from agents.params import (
    API_VERSION,
    NAME_RE,
    Param,
    check_abs_path,
    check_image,
    check_name,
    docker_host,
    parse_bool,
    parse_int,
    split_words,
    values,
)
from agents.record import Frozen
from agents.result import CLEAN_REASONS, ActionResult, MonitorResult, State

TYPE_CHECKING = False  # typing is ~9 ms of a monitor process (agents.record); mypy reads the block
if TYPE_CHECKING:
    from typing import Any

KIND = "DockerContainer"
LABEL = "com.veritas.agent.resource"  # set on containers the agent creates: which resource owns it

PARAMS = [
    Param("name", "ContainerName", "string", "", True, "container name",
          "Name of the container the resource manages."),
    Param("image", "ImageName", "string", "", True, "image",
          "Image the container is created from when it does not exist (must be present on the node)."),
    Param("command", "Command", "string", "", False, "command",
          "Command run in the container (split with shell-like quoting, never run by a shell); "
          "empty: the image's default."),
    Param("run_options", "RunOptions", "string", "", False, "docker run options",
          "Options as for docker run, from a safe subset: -e/--env, -l/--label, -p/--publish, --restart, "
          "--init, -w/--workdir, -u/--user, -h/--hostname, --network, -m/--memory, --cpus, --entrypoint, "
          "--stop-signal, --health-cmd, --health-interval, --health-timeout, --health-retries, "
          "--health-start-period, --no-healthcheck, --read-only, --tmpfs, --shm-size. Privileged or host-"
          "exposing options (--privileged, --cap-add, --device, --pid, -v, --mount...) are refused."),
    Param("volumes", "Volumes", "string", "", False, "veritas volumes",
          "Veritas volumes the container mounts, as NAME:/path[:ro] separated by spaces or commas; each is "
          "mounted through the veritas volume driver."),
    Param("docker_host", "DockerHost", "string", "unix:///var/run/docker.sock", False, "engine socket",
          "The engine's API socket, as DOCKER_HOST (unix:///path)."),
    Param("stop_timeout", "StopTimeout", "integer", "10", False, "stop timeout",
          "Seconds the container gets to stop before it is killed (0-3600)."),
    Param("start_timeout", "StartTimeout", "integer", "60", False, "start timeout",
          "Seconds online waits for the container to be running (and healthy, see use_healthcheck)."),
    Param("remove_on_offline", "RemoveOnOffline", "boolean", "false", False, "remove when offline",
          "Remove the container after stopping it; the next online creates it again."),
    Param("use_healthcheck", "UseHealthCheck", "boolean", "true", False, "health check decides",
          "Whether the container's health check decides its state (unhealthy: faulted)."),
    Param("check_command", "CheckCommand", "string", "", False, "deep check command",
          "Optional command run inside the running container at each monitor; a non-zero exit is a fault."),
]

DURATION_RE = re.compile(r"([0-9]+)(ms|s|m|h)")
MEM_RE = re.compile(r"[0-9]{1,15}[bkmgBKMG]?")
ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.S)
PORT_RE = re.compile(r"(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(?:(\d{1,5}):)?(\d{1,5})(?:/(tcp|udp|sctp))?")

# options refused on purpose: they give the container the host (devices, namespaces, capabilities) or
# mount storage the agent does not manage (data belongs on veritas volumes, in ``volumes``)
REFUSED = {"--privileged", "--cap-add", "--device", "--pid", "--ipc", "--userns", "--uts", "--security-opt",
           "--cgroup-parent", "--cgroupns", "-v", "--volume", "--mount", "--volumes-from", "--volume-driver",
           "--sysctl", "--name", "--rm", "-t", "--tty", "-i", "--interactive", "--add-host", "--runtime",
           "--device-cgroup-rule", "--gpus", "--oom-kill-disable"}
VALUE_OPTS = {"-e": "--env", "--env": "--env", "-l": "--label", "--label": "--label", "-p": "--publish",
              "--publish": "--publish", "--restart": "--restart", "-w": "--workdir", "--workdir": "--workdir",
              "-u": "--user", "--user": "--user", "-h": "--hostname", "--hostname": "--hostname",
              "--network": "--network", "--net": "--network", "-m": "--memory", "--memory": "--memory",
              "--cpus": "--cpus", "--entrypoint": "--entrypoint", "--stop-signal": "--stop-signal",
              "--health-cmd": "--health-cmd", "--health-interval": "--health-interval",
              "--health-timeout": "--health-timeout", "--health-retries": "--health-retries",
              "--health-start-period": "--health-start-period", "--tmpfs": "--tmpfs", "--shm-size": "--shm-size"}
FLAG_OPTS = {"--init", "--read-only", "--no-healthcheck", "-d", "--detach"}


def _duration_ns(opt: str, v: str) -> int:
    m = DURATION_RE.fullmatch(v)
    if not m:
        raise ConfigError(f"run option {opt} {v!r} is not a duration like 500ms, 5s, 2m")
    mult = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}[m.group(2)]
    return int(m.group(1)) * mult


def parse_run_options(text: str) -> dict[str, Any]:
    """``docker run`` options (a safe subset) as docker SDK ``containers.create`` keyword arguments.
    An unknown or refused option is a ConfigError naming it, so nothing half-configured is run."""
    words = split_words("run_options", text)
    kw: dict[str, Any] = {}
    env: list[str] = []
    labels: dict[str, str] = {}
    ports: dict[str, Any] = {}
    health: dict[str, Any] = {}
    tmpfs: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        opt, eq, inline = w.partition("=") if w.startswith("--") else (w, "", "")
        if opt in REFUSED:
            raise ConfigError(f"run option {opt} is refused: it gives the container the host or storage the "
                              "agent does not manage (put data on veritas volumes, in 'volumes')")
        if opt in FLAG_OPTS:
            if eq:
                raise ConfigError(f"run option {opt} takes no value")
            if opt == "--init":
                kw["init"] = True
            elif opt == "--read-only":
                kw["read_only"] = True
            elif opt == "--no-healthcheck":
                health = {"test": ["NONE"]}
            i += 1
            continue
        if opt not in VALUE_OPTS:
            raise ConfigError(f"run option {w!r} is unknown or not supported by the agent")
        if eq:
            v = inline
        else:
            if i + 1 >= len(words):
                raise ConfigError(f"run option {opt} needs a value")
            v = words[i + 1]
            i += 1
        i += 1
        o = VALUE_OPTS[opt]
        if "\0" in v or "\n" in v and o not in ("--env", "--health-cmd"):
            raise ConfigError(f"run option {opt} has a control character in its value")
        if o == "--env":
            if not ENV_RE.fullmatch(v):
                raise ConfigError(f"run option {opt} {v!r} must be NAME=VALUE")
            env.append(v)
        elif o == "--label":
            k, _, lv = v.partition("=")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}", k):
                raise ConfigError(f"run option {opt} {v!r} must be KEY=VALUE with a plain key")
            labels[k] = lv
        elif o == "--publish":
            m = PORT_RE.fullmatch(v)
            if not m or int(m.group(3)) > 65535 or (m.group(2) and int(m.group(2)) > 65535):
                raise ConfigError(f"run option {opt} {v!r} must be [IP:]HOSTPORT:PORT[/tcp|udp]")
            ip, hp, cp, proto = m.groups()
            key = f"{cp}/{proto or 'tcp'}"
            hostport = int(hp) if hp else None
            ports[key] = (ip, hostport) if ip else hostport
        elif o == "--restart":
            if not re.fullmatch(r"no|always|unless-stopped|on-failure(:[0-9]{1,4})?", v):
                raise ConfigError(f"run option --restart {v!r} must be no, always, unless-stopped or "
                                  "on-failure[:N]")
            name, _, n = v.partition(":")
            kw["restart_policy"] = {"Name": name, "MaximumRetryCount": int(n or 0)}
        elif o in ("--workdir",):
            kw["working_dir"] = check_abs_path("run option --workdir", v)
        elif o == "--user":
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}(:[A-Za-z0-9_.-]{1,32})?", v):
                raise ConfigError(f"run option --user {v!r} must be USER[:GROUP]")
            kw["user"] = v
        elif o == "--hostname":
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", v):
                raise ConfigError(f"run option --hostname {v!r} is not a host name")
            kw["hostname"] = v
        elif o == "--network":
            if not NAME_RE.fullmatch(v):
                raise ConfigError(f"run option --network {v!r} must be a network name")
            kw["network"] = v
        elif o in ("--memory", "--shm-size"):
            if not MEM_RE.fullmatch(v):
                raise ConfigError(f"run option {o} {v!r} must be a size like 256m")
            kw["mem_limit" if o == "--memory" else "shm_size"] = v
        elif o == "--cpus":
            try:
                cpus = float(v)
            except ValueError:
                raise ConfigError(f"run option --cpus {v!r} is not a number") from None
            if not 0 < cpus <= 1024:
                raise ConfigError(f"run option --cpus {v!r} is out of range")
            kw["nano_cpus"] = int(cpus * 1e9)
        elif o == "--entrypoint":
            kw["entrypoint"] = split_words("run option --entrypoint", v)
        elif o == "--stop-signal":
            if not re.fullmatch(r"(SIG)?[A-Z0-9+-]{1,16}|[0-9]{1,2}", v):
                raise ConfigError(f"run option --stop-signal {v!r} is not a signal")
            kw["stop_signal"] = v
        elif o == "--health-cmd":
            health["test"] = ["CMD-SHELL", v]  # runs inside the container, as docker run does
        elif o in ("--health-interval", "--health-timeout", "--health-start-period"):
            health[o[len("--health-"):].replace("-", "_")] = _duration_ns(o, v)
        elif o == "--health-retries":
            health["retries"] = parse_int("run option --health-retries", v, 0, 1000)
        elif o == "--tmpfs":
            path, _, topts = v.partition(":")
            tmpfs[check_abs_path("run option --tmpfs", path)] = topts
    if env:
        kw["environment"] = env
    if labels:
        kw["labels"] = labels
    if ports:
        kw["ports"] = ports
    if health:
        kw["healthcheck"] = health
    if tmpfs:
        kw["tmpfs"] = tmpfs
    return kw


class VolumeMount(Frozen):
    __slots__ = ("name", "target", "read_only")
    name: str
    target: str
    read_only: bool

    def __init__(self, name: str, target: str, read_only: bool) -> None:
        self._init(name=name, target=target, read_only=read_only)


def parse_volumes(text: str) -> list[VolumeMount]:
    out: list[VolumeMount] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ConfigError(f"volume {item!r} must be NAME:/path or NAME:/path:ro")
        name = check_name("volume name", parts[0])
        target = check_abs_path(f"mount point of volume {name}", parts[1])
        if target == "/":
            raise ConfigError(f"volume {name} cannot be mounted on /")
        out.append(VolumeMount(name, target, len(parts) == 3 and parts[2] == "ro"))
    if len({v.target for v in out}) != len(out) or len({v.name for v in out}) != len(out):
        raise ConfigError("volumes: each volume and each mount point may appear once")
    return out


class ContainerSpec(Frozen):
    """A checked DockerContainer configuration."""

    __slots__ = ("name", "image", "command", "run", "volumes", "docker_host", "stop_timeout", "start_timeout",
                 "remove_on_offline", "use_healthcheck", "check_command")
    name: str
    image: str
    command: list[str]
    run: dict[str, Any]
    volumes: list[VolumeMount]
    docker_host: str
    stop_timeout: int
    start_timeout: int
    remove_on_offline: bool
    use_healthcheck: bool
    check_command: list[str]

    def __init__(self, name: str, image: str, command: list[str], run: dict[str, Any], volumes: list[VolumeMount],
                 docker_host: str, stop_timeout: int, start_timeout: int, remove_on_offline: bool,
                 use_healthcheck: bool, check_command: list[str] | None = None) -> None:
        self._init(name=name, image=image, command=command, run=run, volumes=volumes, docker_host=docker_host,
                   stop_timeout=stop_timeout, start_timeout=start_timeout, remove_on_offline=remove_on_offline,
                   use_healthcheck=use_healthcheck, check_command=check_command or [])

    @classmethod
    def parse(cls, given: Mapping[str, str]) -> ContainerSpec:
        v = values(PARAMS, given)
        return cls(
            name=check_name("container name", v["name"]),
            image=check_image(v["image"]),
            command=split_words("command", v["command"]),
            run=parse_run_options(v["run_options"]),
            volumes=parse_volumes(v["volumes"]),
            docker_host=docker_host(v["docker_host"]),
            stop_timeout=parse_int("stop_timeout", v["stop_timeout"], 0, 3600),
            start_timeout=parse_int("start_timeout", v["start_timeout"], 1, 3600),
            remove_on_offline=parse_bool("remove_on_offline", v["remove_on_offline"]),
            use_healthcheck=parse_bool("use_healthcheck", v["use_healthcheck"]),
            check_command=split_words("check_command", v["check_command"]),
        )


def _norm_image(ref: str) -> str:
    last = ref.rsplit("/", 1)[-1]
    return ref if (":" in last or "@" in ref) else ref + ":latest"


# Docker state -> (resource state, confidence), as KVMGuest maps VM states (up 100, powering_up 60,
# paused 20, wait_for_launch 10, down offline)
STATUS_MAP: dict[str, tuple[State, int]] = {
    "running": (State.ONLINE, 100),
    "paused": (State.ONLINE, 20),
    "restarting": (State.ONLINE, 10),
    "created": (State.OFFLINE, 0),
    "exited": (State.OFFLINE, 0),
    "dead": (State.OFFLINE, 0),
    "removing": (State.OFFLINE, 0),
}
HEALTH_STARTING_CONFIDENCE = 60


def classify(attrs: Mapping[str, Any] | None, spec: ContainerSpec) -> MonitorResult:
    """The resource state of a container from its inspect document (None: no such container)."""
    if attrs is None:
        return MonitorResult.offline(f"container {spec.name} does not exist")
    img = (attrs.get("Config") or {}).get("Image") or ""
    if img and _norm_image(img) != _norm_image(spec.image):
        return MonitorResult.unknown(f"container {spec.name} runs image {img}, not the configured {spec.image}: "
                                     "it is not this resource's container")
    mounts = {m.get("Name"): m for m in attrs.get("Mounts") or [] if m.get("Type") == "volume"}
    for vm in spec.volumes:
        m = mounts.get(vm.name)
        if m is None or m.get("Driver") != "veritas" or m.get("Destination") != vm.target:
            return MonitorResult.unknown(f"container {spec.name} does not mount veritas volume {vm.name} at "
                                         f"{vm.target}: it is not this resource's container")
    st = attrs.get("State") or {}
    status = str(st.get("Status") or "")
    if status not in STATUS_MAP:
        return MonitorResult.unknown(f"container {spec.name} is in state {status!r}")
    state, conf = STATUS_MAP[status]
    if state is State.OFFLINE:
        code = st.get("ExitCode")
        extra = f" (exit code {code})" if status in ("exited", "dead") and code is not None else ""
        return MonitorResult.offline(f"container {spec.name} is {status}{extra}")
    health = (st.get("Health") or {}).get("Status") if spec.use_healthcheck else None
    if status == "running" and health == "unhealthy":
        return MonitorResult.faulted(f"container {spec.name} is running but unhealthy")
    if status == "running" and health == "starting":
        return MonitorResult.online(HEALTH_STARTING_CONFIDENCE, f"container {spec.name} is running, health "
                                    "check starting")
    what = f"running, {health}" if status == "running" and health else status
    return MonitorResult.online(conf, f"container {spec.name} is {what}")


@contextlib.contextmanager
def _api(url: str, timeout: float) -> Iterator[Any]:
    """An API client for one step, closed after it (each agent call is short; no socket is left open)."""
    docker = sdk.load()
    api = docker.APIClient(base_url=url, version=API_VERSION, timeout=max(1, int(timeout)))
    try:
        yield api
    finally:
        api.close()


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the engine did not answer (down, socket missing), not a refusal."""
    docker = sdk.load()
    import requests.exceptions  # docker's own dependency: present once load() succeeded

    if isinstance(exc, docker.errors.APIError):
        return False
    return isinstance(exc, (requests.exceptions.RequestException, OSError, docker.errors.DockerException))


class DockerContainer:
    """The agent core for one DockerContainer resource."""

    def __init__(self, resource: str, spec: ContainerSpec) -> None:
        self.resource = resource
        self.spec = spec

    def _inspect(self, timeout: float = 10) -> dict[str, Any] | None:
        return engine.inspect_container(self.spec.docker_host, self.spec.name, timeout)

    def monitor(self) -> MonitorResult:
        """The monitor entry point: observe, and adopt a container found running that the watcher does not
        follow (a probe finding it up after the cluster restarted never runs online, which registers)."""
        res = self.observe()
        if res.state is State.ONLINE and res.confidence == 100:
            rec = registry.read(self.resource)
            if rec is None or rec.get("expect") != "online" or rec.get("name") != self.spec.name \
                    or rec.get("docker_host") != self.spec.docker_host:
                self._register()
        return res

    def _register(self) -> None:
        registry.register(self.resource, KIND, "online", name=self.spec.name, docker_host=self.spec.docker_host)

    def observe(self) -> MonitorResult:
        """One inspect through the API (agents.engine: no docker SDK on this path, see there why)."""
        try:
            attrs = self._inspect()
        except engine.EngineDown as exc:  # engine down: the container is not running here (resource-agents #1916)
            return MonitorResult.offline(str(exc))
        except engine.EngineError as exc:
            return MonitorResult.unknown(f"inspect of {self.spec.name} failed: {exc}")
        res = classify(attrs, self.spec)
        if res.state is State.ONLINE and self.spec.check_command and attrs is not None \
                and (attrs.get("State") or {}).get("Status") == "running":
            try:
                with _api(self.spec.docker_host, 30) as api:
                    ex = api.exec_create(self.spec.name, self.spec.check_command, stdout=True, stderr=True)
                    out = api.exec_start(ex["Id"])
                    code = api.exec_inspect(ex["Id"]).get("ExitCode")
            except NotInstalled:
                raise
            except Exception as exc:
                return MonitorResult.unknown(f"check command in {self.spec.name} could not run: {exc}")
            if code != 0:
                tail = out.decode(errors="replace").strip()[-200:] if isinstance(out, bytes) else ""
                return MonitorResult.faulted(f"check command in {self.spec.name} exited {code}: {tail}")
        return res

    def _create_kwargs(self) -> dict[str, Any]:
        types = sdk.load().types
        mounts = [types.Mount(target=v.target, source=v.name, type="volume", read_only=v.read_only,
                        driver_config=types.DriverConfig("veritas")) for v in self.spec.volumes]
        run = dict(self.spec.run)
        labels = {**run.pop("labels", {}), LABEL: self.resource}
        return {"image": self.spec.image, "command": self.spec.command or None, "name": self.spec.name,
                "mounts": mounts, "labels": labels, "detach": True, **run}

    def online(self, timeout: float | None = None) -> ActionResult:
        """Create (if absent) and start the container, then wait until monitor says online (healthy when
        the health check decides)."""
        docker = sdk.load()
        before = self.observe()
        if before.state in (State.UNKNOWN, State.FAULTED):  # not ours, or broken: clean decides, not online
            return ActionResult(False, before.reason)
        try:
            with contextlib.closing(docker.DockerClient(base_url=self.spec.docker_host, version=API_VERSION,
                                                        timeout=60)) as client:
                try:
                    ctr = client.containers.get(self.spec.name)
                except docker.errors.NotFound:
                    try:
                        ctr = client.containers.create(**self._create_kwargs())
                    except docker.errors.ImageNotFound:
                        raise NotInstalled(f"image {self.spec.image} is not on this node's engine "
                                           f"({self.spec.docker_host}): load or pull it first") from None
                status = ctr.attrs["State"]["Status"]
                if status == "paused":
                    ctr.unpause()
                elif status != "running":
                    ctr.start()
        except (NotInstalled, AgentError):
            raise
        except docker.errors.APIError as exc:
            return ActionResult(False, f"engine refused to start {self.spec.name}: {exc.explanation or exc}")
        except Exception as exc:
            if _unreachable(exc):
                return ActionResult(False, f"engine at {self.spec.docker_host} does not answer: {exc}")
            raise
        deadline = time.monotonic() + (timeout if timeout is not None else self.spec.start_timeout)
        while True:
            res = self.observe()
            if res.state is State.ONLINE and res.confidence == 100:
                self._register()
                return ActionResult(True, res.reason)
            if res.state in (State.FAULTED, State.UNKNOWN) or (res.state is State.OFFLINE
                                                               and "does not answer" not in res.reason):
                return ActionResult(False, f"container {self.spec.name} did not come online: {res.reason}")
            if time.monotonic() > deadline:
                return ActionResult(False, f"container {self.spec.name} not online in time: {res.reason}")
            time.sleep(0.1)

    def offline(self) -> ActionResult:
        """Stop the container with its stop timeout (the engine kills it after), remove it if configured."""
        docker = sdk.load()
        registry.expect_offline(self.resource)
        before = self.observe()
        if before.state is State.UNKNOWN:
            return ActionResult(False, before.reason)
        try:
            with _api(self.spec.docker_host, self.spec.stop_timeout + 30) as api:
                try:
                    api.stop(self.spec.name, timeout=self.spec.stop_timeout)
                    if self.spec.remove_on_offline:
                        api.remove_container(self.spec.name, v=False)
                except docker.errors.NotFound:
                    pass
        except docker.errors.APIError as exc:
            return ActionResult(False, f"engine refused to stop {self.spec.name}: {exc.explanation or exc}")
        except Exception as exc:
            if _unreachable(exc):  # engine down: nothing of it runs as far as the engine can say
                return ActionResult(True, f"engine at {self.spec.docker_host} does not answer: {exc}")
            raise
        after = self.observe()
        if after.state is State.OFFLINE:
            return ActionResult(True, after.reason)
        return ActionResult(False, f"container {self.spec.name} still {after.state.value}: {after.reason}")

    def clean(self, reason: int = 0) -> ActionResult:
        """Kill and remove the container, whatever state it is in (the next online recreates it)."""
        docker = sdk.load()
        why = CLEAN_REASONS.get(reason, f"reason {reason}")
        registry.expect_offline(self.resource)
        before = self.observe()
        if before.state is State.UNKNOWN and "not this resource's container" in before.reason:
            return ActionResult(False, before.reason)
        try:
            with _api(self.spec.docker_host, 60) as api:
                api.remove_container(self.spec.name, force=True, v=False)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            return ActionResult(False, f"clean ({why}): engine refused to remove {self.spec.name}: "
                                       f"{exc.explanation or exc}")
        except Exception as exc:
            if _unreachable(exc):
                return ActionResult(True, f"clean ({why}): engine at {self.spec.docker_host} does not answer; "
                                          "its containers go with it (DockerDaemon clean)")
            raise
        return ActionResult(True, f"clean ({why}): container {self.spec.name} killed and removed")

    def validate(self) -> None:
        """Beyond the attribute checks made by parsing: the image exists, when the engine answers."""
        docker = sdk.load()
        try:
            with _api(self.spec.docker_host, 10) as api:
                api.inspect_image(self.spec.image)
        except docker.errors.ImageNotFound:
            raise NotInstalled(f"image {self.spec.image} is not on the engine at {self.spec.docker_host}") from None
        except Exception as exc:
            if not _unreachable(exc):
                raise AgentError(f"cannot check image {self.spec.image}: {exc}") from None

    def info(self) -> dict[str, str]:
        attrs = None
        try:
            attrs = self._inspect()
        except Exception:  # info is best effort
            attrs = None
        if not attrs:
            return {"Container": self.spec.name, "State": "absent"}
        st = attrs.get("State") or {}
        return {"Container": self.spec.name, "Id": str(attrs.get("Id", ""))[:12], "State": str(st.get("Status")),
                "Pid": str(st.get("Pid")), "StartedAt": str(st.get("StartedAt")),
                "Health": str((st.get("Health") or {}).get("Status", "none"))}


def from_attributes(resource: str, given: Mapping[str, str]) -> DockerContainer:
    from agents.params import check_resource

    return DockerContainer(check_resource(resource), ContainerSpec.parse(given))
