"""What the plugin asks the Docker engine, through the docker SDK (never the CLI)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests

# the shape of container IDs and of the mount IDs Docker passes to Mount (admin mount IDs never have it)
DOCKER_ID = re.compile(r"[0-9a-f]{64}")

# states in which a container may hold a volume Docker mounted for it ("created": Mount done, start pending)
ACTIVE_STATES = ("created", "running", "paused", "restarting")


def driver_name(name: str) -> str:
    """The configured name of a volume driver: a managed plugin's name (``[REGISTRY/]NAME:TAG``)
    without registry, path and tag, e.g. ``localhost:5000/veritas:1.0`` -> ``veritas``."""
    return name.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


@dataclass(frozen=True)
class ContainerUse:
    """A container that references one of our volumes."""

    id: str
    state: str
    pid: int
    volumes: tuple[str, ...]
    cgroup_parent: str


class Engine:
    """A thin, bounded-time view of one Docker engine."""

    ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)

    def __init__(self, base_url: str, driver: str, timeout: float = 5.0) -> None:
        self.base_url = base_url
        self.driver = driver
        self.timeout = timeout
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            # the stubs say int; the SDK hands the timeout to requests, which takes seconds as a float
            self._client = docker.DockerClient(base_url=self.base_url, timeout=self.timeout,  # type: ignore[arg-type]
                                               version="auto")
        return self._client

    def reachable(self) -> bool:
        try:
            return bool(self.client.ping())
        except self.ERRORS:
            self._client = None
            return False

    def _use(self, attrs: dict[str, Any]) -> ContainerUse | None:
        vols = tuple(m["Name"] for m in attrs.get("Mounts") or []
                     if m.get("Type") == "volume" and driver_name(m.get("Driver") or "") == self.driver
                     and m.get("Name"))
        if not vols:
            return None
        state = attrs.get("State") or {}
        return ContainerUse(attrs["Id"], state.get("Status", ""), int(state.get("Pid") or 0), vols,
                            (attrs.get("HostConfig") or {}).get("CgroupParent") or "")

    def inspect(self, container_id: str) -> ContainerUse | None:
        try:
            return self._use(self.client.api.inspect_container(container_id))
        except docker.errors.NotFound:
            return None

    def users(self, volume: str | None = None, states: tuple[str, ...] | None = None) -> list[ContainerUse]:
        """Containers referencing our volumes (optionally one volume, optionally in given states)."""
        filters: dict[str, Any] = {"volume": [volume]} if volume else {}
        if states:
            filters["status"] = list(states)
        out = []
        for c in self.client.api.containers(all=True, filters=filters):
            use = self.inspect(c["Id"])
            if use is not None and (volume is None or volume in use.volumes):
                out.append(use)
        return out

    def listed(self, volume: str, states: tuple[str, ...]) -> list[ContainerUse]:
        """Containers using ``volume`` in ``states``, from the engine's container list alone.

        Safe inside a Mount request: inspect would wait on the container lock that the engine holds
        while it starts the container (and mounts its volumes). The list has no CgroupParent.
        """
        filters: dict[str, Any] = {"volume": [volume], "status": list(states)}
        out = []
        for c in self.client.api.containers(all=True, filters=filters):
            use = self._use({"Id": c["Id"], "Mounts": c.get("Mounts"), "State": {"Status": c.get("State", "")}})
            if use is not None and volume in use.volumes:
                out.append(use)
        return out

    def volumes_in_use(self, states: tuple[str, ...]) -> set[str]:
        """Names of our volumes that containers in ``states`` reference, from the container list alone.

        Never waits on a starting container (inspect would, while the start waits on a Mount).
        """
        out: set[str] = set()
        for c in self.client.api.containers(all=True, filters={"status": list(states)}):
            use = self._use({"Id": c["Id"], "Mounts": c.get("Mounts"), "State": {"Status": c.get("State", "")}})
            if use is not None:
                out.update(use.volumes)
        return out

    def start_events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Container start and destroy events (from ``since``, a Unix time), as they happen.

        Blocks; raises when the engine goes away. The stream connects at the first ``next``: pass
        ``since`` to replay what happened before that.
        """
        filters = {"type": ["container"], "event": ["start", "destroy"]}
        # no timeout: the stream waits for events (the stubs say int; requests takes None for "none")
        api = docker.APIClient(base_url=self.base_url, timeout=None, version="auto")  # type: ignore[arg-type]
        yield from api.events(since=since, filters=json.loads(json.dumps(filters)), decode=True)

