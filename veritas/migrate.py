"""Offline migration of a container between nodes that share a disk group (issue 11, the seed's
"Migrating Docker containers").

Docker has no live migration: the container is stopped on the source, its veritas volumes are released
(Docker unmounts them, the plugin detaches them in the catalog), then the same configuration is created
and started on the target, whose plugin attaches and mounts the volumes. Everything that can refuse the
migration is checked before anything is stopped, so a refused migration changes nothing.

Why here (the ``veritas`` layer): it reads the storage catalog (leases, attachments) and talks to two
engines; neither the storage core nor the plugin may talk to a second node's engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agents.params import API_VERSION
from storage import diskgroup, ownership
from storage.config import Config
from storage.errors import AlreadyExists, InUse, InvalidArgument, NotFound, VeritasError
from storage.group import DiskGroup

DRIVER = "veritas"

# Config fields carried as they are (inspect's Config is what the create call takes)
CONFIG_FIELDS = ("Image", "Cmd", "Entrypoint", "Env", "Labels", "WorkingDir", "User", "Hostname", "Domainname",
                 "ExposedPorts", "StopSignal", "StopTimeout", "Healthcheck", "Tty", "OpenStdin", "StdinOnce",
                 "AttachStdin", "AttachStdout", "AttachStderr")
# HostConfig fields carried as they are; Binds, Mounts and VolumeDriver are rebuilt from the container's
# veritas mounts (carried_mounts), NetworkMode is checked against the target's networks
HOST_FIELDS = ("RestartPolicy", "PortBindings", "PublishAllPorts", "NetworkMode", "Init", "ReadonlyRootfs",
               "Memory", "MemorySwap", "MemoryReservation", "NanoCpus", "CpuShares", "CpuQuota", "CpuPeriod",
               "CpusetCpus", "PidsLimit", "Tmpfs", "ShmSize", "ExtraHosts", "Dns", "DnsOptions", "DnsSearch",
               "CapAdd", "CapDrop", "Privileged", "SecurityOpt", "Sysctls", "Ulimits", "LogConfig",
               "OomScoreAdj", "GroupAdd", "AutoRemove")
BUILTIN_NETWORKS = ("default", "bridge", "host", "none")


class MigrationRefused(InvalidArgument):
    """The migration cannot be done as asked; nothing was changed."""


class TargetCannotSee(MigrationRefused):
    """The target node holds no live lease in the disk group (another site, or its plugin is down)."""


class NotManaged(MigrationRefused):
    """The container keeps data outside veritas volumes (or has none): its data would not follow it."""


class NoSuchContainer(NotFound):
    pass


class NoImageThere(NotFound):
    pass


class MigrationFailed(VeritasError):
    """The migration started and could not finish; the message says where the container is now."""


@dataclass(frozen=True)
class VolMount:
    """One veritas volume mount of the container, from inspect's Mounts."""

    name: str
    target: str
    read_only: bool


def veritas_mounts(attrs: Mapping[str, Any]) -> list[VolMount]:
    """The container's veritas volume mounts; NotManaged if it has none, or data anywhere else (a bind
    mount, a local or other driver's volume) that would stay behind on the source."""
    name = str(attrs.get("Name", "")).lstrip("/")
    out: list[VolMount] = []
    others: list[str] = []
    for m in attrs.get("Mounts") or []:
        if m.get("Type") == "volume" and m.get("Driver") == DRIVER:
            out.append(VolMount(str(m["Name"]), str(m["Destination"]), not m.get("RW", True)))
        elif m.get("Type") != "tmpfs":
            others.append(f"{m.get('Type')} {m.get('Name') or m.get('Source')} at {m.get('Destination')}"
                          + (f" (driver {m.get('Driver')})" if m.get("Driver") else ""))
    if others:
        raise NotManaged(f"container {name} keeps data outside veritas volumes ({'; '.join(others)}): it would "
                         "not follow the container; put it on veritas volumes")
    if not out:
        raise NotManaged(f"container {name} is not veritas managed: it mounts no veritas volume")
    return out


def create_body(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The create request that makes the same container elsewhere: the carried Config and HostConfig
    fields of its inspect document, with its veritas volumes as Mounts of the veritas driver.

    Not carried: the container's ID, state, logs and writable layer (data belongs on the volumes),
    NetworkSettings (addresses are the target network's), and per-network aliases and static IPs.
    """
    cfg = attrs.get("Config") or {}
    host = attrs.get("HostConfig") or {}
    body: dict[str, Any] = {k: cfg[k] for k in CONFIG_FIELDS if cfg.get(k) is not None}
    hc: dict[str, Any] = {k: host[k] for k in HOST_FIELDS if host.get(k) is not None}
    hc["Mounts"] = [{"Type": "volume", "Source": v.name, "Target": v.target, "ReadOnly": v.read_only,
                     "VolumeOptions": {"DriverConfig": {"Name": DRIVER}}} for v in veritas_mounts(attrs)]
    if hc.get("NetworkMode") == "host":  # the engine refuses a host name with the host's network
        body.pop("Hostname", None)
        body.pop("Domainname", None)
    body["HostConfig"] = hc
    return body


@contextlib.contextmanager
def _api(url: str, timeout: float = 60) -> Iterator[Any]:
    import docker

    api = docker.APIClient(base_url=url, version=API_VERSION, timeout=max(1, int(timeout)))
    try:
        yield api
    finally:
        api.close()


def _inspect(api: Any, name: str) -> dict[str, Any] | None:
    import docker.errors

    try:
        attrs: dict[str, Any] = api.inspect_container(name)
        return attrs
    except docker.errors.NotFound:
        return None


def _engine(url: str, what: str) -> Any:
    """A client of ``url`` that answered a ping, or MigrationRefused."""
    import docker
    import docker.errors

    try:
        api = docker.APIClient(base_url=url, version=API_VERSION, timeout=60)
        api.ping()
        return api
    except (docker.errors.DockerException, OSError, ValueError) as exc:
        raise MigrationRefused(f"the {what} engine at {url} does not answer: {exc}") from None


@dataclass
class Plan:
    """What a migration will do, once every check passed."""

    name: str
    target_node: str
    attrs: dict[str, Any]
    body: dict[str, Any]
    volumes: list[VolMount]
    was_running: bool


def _check_volumes(dg: DiskGroup, node: str, vols: Sequence[VolMount]) -> None:
    now = time.time()
    leases = ownership.leases(dg)
    for v in vols:
        if dg.catalog.volume(v.name) is None:
            raise NotManaged(f"volume {v.name} is not in disk group {dg.name}: this node cannot move it")
        held = ownership.holder(dg, v.name)
        if held is not None and held[0].node != node and held[1] > now:
            raise InUse(f"volume {v.name} is attached on node {held[0].node} (lease until "
                        f"{time.strftime('%H:%M:%S', time.localtime(held[1]))}): release it there first")
        for m in dg.catalog.mounts(v.name):
            lease = leases.get(m.node)
            if m.node != node and (lease is None or lease.expires > now):
                raise InUse(f"volume {v.name} is mounted on node {m.node} (mount ID {m.mount_id}): "
                            "unmount it there first")


def check_target(cfg: Config, dg: DiskGroup, name: str, target: str) -> None:
    """The target is another node that sees the disk group: it holds a live lease in it (its plugin
    runs there). A node of another site has its own state root, so no lease here."""
    if target == cfg.node:
        raise MigrationRefused(f"container {name} is already on node {target} (this node)")
    lease = ownership.leases(dg).get(target)
    if lease is None or lease.expires <= time.time():
        raise TargetCannotSee(f"node {target} holds no live lease in disk group {dg.name}: it cannot see the disk"
                              " group (another site, or its plugin is not running); refused")


def plan(cfg: Config, dg: DiskGroup, src: Any, dst: Any, name: str, target: str, dst_url: str) -> Plan:
    """Every refusal, before anything changes (check_target came first): the container exists and
    keeps all its data on veritas volumes nobody else holds or uses, the target engine has the image, the
    network and no container of that name."""
    attrs = _inspect(src, name)
    if attrs is None:
        raise NoSuchContainer(f"no container {name} on this node's engine")
    vols = veritas_mounts(attrs)
    body = create_body(attrs)
    _check_volumes(dg, cfg.node, vols)
    me = attrs["Id"]
    for c in src.containers():  # running ones: a volume another running container uses stays mounted here
        if c["Id"] == me:
            continue
        used = {m.get("Name") for m in c.get("Mounts") or [] if m.get("Type") == "volume"}
        both = sorted(used & {v.name for v in vols})
        if both:
            raise InUse(f"volume(s) {', '.join(both)} are also used by running container "
                        f"{(c.get('Names') or [c['Id'][:12]])[0].lstrip('/')} on this node: stop it first")
    import docker.errors

    image = body.get("Image", "")
    try:
        dst.inspect_image(image)
    except docker.errors.ImageNotFound:
        raise NoImageThere(f"image {image} is not on node {target}'s engine ({dst_url}): load it there first") from None
    mode = str(body["HostConfig"].get("NetworkMode") or "default")
    if mode.startswith("container:"):
        raise MigrationRefused(f"container {name} shares the network of {mode[10:]}: migrate that one instead")
    if mode not in BUILTIN_NETWORKS and not any(n.get("Name") == mode for n in dst.networks(names=[mode])):
        raise MigrationRefused(f"network {mode} does not exist on node {target}'s engine: create it there first")
    if _inspect(dst, name) is not None:
        raise AlreadyExists(f"node {target}'s engine already has a container named {name}: remove it first")
    return Plan(name, target, attrs, body, vols, bool((attrs.get("State") or {}).get("Running")))


def _released(dg: DiskGroup, node: str, vols: Sequence[VolMount]) -> list[str]:
    """Volumes still attached or mounted on this node (in the catalog)."""
    left = []
    for v in vols:
        held = ownership.holder(dg, v.name)
        if (held is not None and held[0].node == node) or any(m.node == node for m in dg.catalog.mounts(v.name)):
            left.append(v.name)
    return left


def _wait_running(api: Any, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        attrs = _inspect(api, name)
        st = (attrs or {}).get("State") or {}
        if st.get("Running") and not st.get("Restarting"):
            assert attrs is not None
            return attrs
        if time.monotonic() > deadline or (attrs is not None and st.get("Status") in ("exited", "dead")):
            raise MigrationFailed(f"container {name} did not run on the target: {st.get('Status')} "
                                  f"{st.get('Error') or ''}".strip())
        time.sleep(0.1)


def migrate_container(cfg: Config, name: str, target: str, target_host: str, source_host: str | None = None,
                      keep: bool = False, timeout: float = 60) -> dict[str, Any]:
    """Move container ``name`` from this node's engine to node ``target`` (engine at ``target_host``).

    The source container is removed once the target's runs (``keep``: left stopped, renamed
    NAME-migrated-TIMESTAMP, its restart policy set to "no" so a restart of the source engine does not
    try to start it; its volumes' exclusive attachment would refuse it anyway). If the target cannot
    start it, the target's container is removed and the source's started again.
    """
    src_url = source_host or cfg.plugin.docker_host
    dg = diskgroup.open_dg(cfg, cfg.diskgroup)
    try:
        check_target(cfg, dg, name, target)
        src = _engine(src_url, "source")
        try:
            dst = _engine(target_host, f"target ({target})")
        except BaseException:
            src.close()
            raise
        try:
            p = plan(cfg, dg, src, dst, name, target, target_host)
            return _move(cfg, dg, src, dst, p, keep, timeout)
        finally:
            src.close()
            dst.close()
    finally:
        dg.close()


def _move(cfg: Config, dg: DiskGroup, src: Any, dst: Any, p: Plan, keep: bool, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    stop_timeout = int(p.body.get("StopTimeout") or 10)
    src.stop(p.name, timeout=stop_timeout)
    wait = cfg.cluster.mount_wait + 5
    deadline = time.monotonic() + wait
    while (left := _released(dg, cfg.node, p.volumes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        if p.was_running:
            src.start(p.name)
        raise MigrationFailed(f"volume(s) {', '.join(left)} still attached on this node {wait:.0f} s after container"
                              f" {p.name} stopped; the container was started here again")
    stopped = time.monotonic()
    created = None
    try:
        created = dst.create_container_from_config(p.body, p.name)
        dst.start(created["Id"])
        after = _wait_running(dst, p.name, timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            if created is not None:
                dst.remove_container(created["Id"], force=True, v=False)
        back = ""
        if p.was_running:
            try:
                if _inspect(src, p.name) is None:  # AutoRemove took it: make it again
                    src.create_container_from_config(p.body, p.name)
                src.start(p.name)
                back = "; it runs on this node again"
            except Exception as exc2:
                back = f"; starting it here again failed too: {exc2}"
        detail = getattr(exc, "explanation", None) or exc
        raise MigrationFailed(f"container {p.name} could not start on node {p.target_node}: {detail}{back}") from None
    import docker.errors

    if keep:
        with contextlib.suppress(docker.errors.NotFound):
            src.update_container(p.attrs["Id"], restart_policy={"Name": "no", "MaximumRetryCount": 0})
            src.rename(p.attrs["Id"], f"{p.name}-migrated-{int(time.time())}")
    else:
        with contextlib.suppress(docker.errors.NotFound):
            src.remove_container(p.attrs["Id"], v=False)
    return {"container": p.name, "from": cfg.node, "to": p.target_node, "id": after["Id"],
            "volumes": [v.name for v in p.volumes], "source": "kept" if keep else "removed",
            "down_seconds": round(time.monotonic() - t0, 3), "start_seconds": round(time.monotonic() - stopped, 3)}
