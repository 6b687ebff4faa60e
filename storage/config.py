"""Configuration: one INI file (``vxinfoscale-default.conf``) selected by --config or VERITAS_CONFIG.

Tests and benchmarks point this at a file of their own so they use their own state root, mount root
and disk group, never the host's.
"""

from __future__ import annotations

import configparser
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from storage.errors import InvalidArgument
from storage.units import check_name, parse_size

DEFAULT_CONFIG = Path("/etc/vx/docker/vxinfoscale-default.conf")
_REPO_DEFAULT = Path(__file__).resolve().parent.parent / "etc" / "vxinfoscale-default.conf"

# every section and key the file may hold: anything else is a typo, refused rather than ignored
VALID_KEYS: dict[str, tuple[str, ...]] = {
    "storage": ("diskgroup", "state_root", "mount_root", "default_disk_size", "default_disk_count"),
    "volume": ("size", "layout", "fstype", "nmirror", "ncol", "maxiops", "cache_percent", "protect",
               "provisioning"),
    "node": ("name",),
    "plugin": ("socket", "workers", "docker_host", "driver"),
    "cluster": ("catalog", "etcd_endpoints", "lease_ttl", "lease_interval", "engine_grace"),
    "replication": ("interval", "srl_size", "listen", "key_file"),
}
# defaults of make: layouts and file systems it can be given without asking (see storage.layouts)
DEFAULT_LAYOUTS = ("concat", "mirror", "stripe", "mirror-stripe", "auto")
FSTYPES = ("xfs", "ext4", "btrfs")
PROVISIONING = ("thin", "thick")  # sparse images, or allocated in full at make and grow
CATALOGS = ("sqlite", "etcd")  # SQLite in each disk group root (one host), or etcd (nodes on several hosts)
NMIRROR_RANGE = (2, 4)
NCOL_RANGE = (2, 16)


@dataclass(frozen=True)
class VolumeDefaults:
    size: int = 1024**3
    layout: str = "concat"
    fstype: str = "xfs"
    nmirror: int = 2
    ncol: int = 2
    maxiops: int = 0
    cache_percent: int = 30
    protect: bool = False
    provisioning: str = "thin"


@dataclass(frozen=True)
class PluginSettings:
    """Settings of the Docker volume plugin (read here so one file configures the whole product)."""

    socket: Path = Path("/run/docker/plugins/veritas.sock")
    workers: int = 3
    docker_host: str = "unix:///var/run/docker.sock"
    driver: str = "veritas"


@dataclass(frozen=True)
class ClusterSettings:
    """Where the catalog and locks live: ``sqlite`` (one host), or ``etcd`` at ``etcd_endpoints``.

    Leases of several nodes on one disk group (storage.lease). A node renews its lease every
    ``lease_interval`` seconds; another node may take its volumes ``lease_ttl`` seconds after its last
    renewal. A node that could not renew for ``fence_after`` seconds stops its containers and unmounts
    its volumes, so that it has stopped writing ``fence_margin`` seconds before its lease runs out."""

    catalog: str = "sqlite"
    etcd_endpoints: tuple[str, ...] = ()
    lease_ttl: float = 10.0
    lease_interval: float = 2.0
    # how long this node's dockerd may be gone (a restart) before the plugin, if another node wants a
    # volume attached here, kills the containers that used it and lets the volume go
    engine_grace: float = 5.0

    @property
    def fence_margin(self) -> float:
        """Time left for stopping containers and unmounting: half the TTL (derived, not configured, so
        that a shorter TTL can never leave the fencing less time than the renewals)."""
        return self.lease_ttl / 2

    @property
    def fence_after(self) -> float:
        return self.lease_ttl - self.fence_margin

    @property
    def mount_wait(self) -> float:
        """How long a Mount waits for a volume another node holds: until that node's lease has run out
        (it died), or its engine-gone grace has passed and it has stopped what used the volume (its
        dockerd died), and one renewal more."""
        return max(self.lease_ttl, self.engine_grace + self.lease_ttl / 4 + 1) + self.lease_interval


@dataclass(frozen=True)
class ReplicationSettings:
    """The replication link (storage.replication.link): a checkpoint every ``interval`` seconds, the
    SRL size an RVG gets when createpri names none, where ``veritas rlink serve`` listens, and the file
    holding the pre-shared key both sites authenticate with."""

    interval: float = 10.0
    srl_size: int = 1024**3
    listen: str = "0.0.0.0:4145"
    key_file: Path = Path("/etc/vx/docker/rlink.key")


def _replication_settings(sec: configparser.SectionProxy, where: Callable[[str, str], str]) -> ReplicationSettings:
    d = ReplicationSettings()
    listen = sec.get("listen", fallback="").strip() or d.listen
    host, colon, port = listen.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"config{where('replication', 'listen')}: replication.listen = {listen!r} is not"
                              " HOST:PORT")
    key_file = Path(sec.get("key_file", fallback="").strip() or d.key_file)
    if not key_file.is_absolute():
        raise InvalidArgument(f"config{where('replication', 'key_file')}: replication.key_file must be an"
                              f" absolute path, got {str(key_file)!r}")
    raw_srl = sec.get("srl_size", fallback="").strip()
    try:
        srl_size = parse_size(raw_srl, "replication.srl_size") if raw_srl else d.srl_size
    except InvalidArgument as exc:
        raise InvalidArgument(f"config{where('replication', 'srl_size')}: {exc}") from None
    return ReplicationSettings(
        interval=_seconds(sec, "interval", d.interval, where("replication", "interval")),
        srl_size=srl_size, listen=listen, key_file=key_file)


@dataclass(frozen=True)
class Config:
    diskgroup: str = "dockerdg"
    state_root: Path = Path("/var/lib/veritas")
    mount_root: Path = Path("/dockerfs")
    default_disk_size: int = 20 * 1024**3
    default_disk_count: int = 2
    node: str = field(default_factory=socket.gethostname)
    volume: VolumeDefaults = field(default_factory=VolumeDefaults)
    plugin: PluginSettings = field(default_factory=PluginSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    replication: ReplicationSettings = field(default_factory=ReplicationSettings)
    source: Path | None = None

    @property
    def dg_parent(self) -> Path:
        return self.state_root / "dg"


def _int(section: configparser.SectionProxy, key: str, default: int) -> int:
    raw = section.get(key, fallback="").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"config: {section.name}.{key} = {raw!r} is not an integer") from None
    if value < 0:
        raise InvalidArgument(f"config: {section.name}.{key} must not be negative")
    return value


def _bool(section: configparser.SectionProxy, key: str, default: bool) -> bool:
    raw = section.get(key, fallback="").strip()
    if not raw:
        return default
    if raw.lower() not in section.parser.BOOLEAN_STATES:
        raise InvalidArgument(f"config: {section.name}.{key} = {raw!r} is not a boolean (use yes or no)")
    return section.parser.BOOLEAN_STATES[raw.lower()]


def _line_numbers(path: Path) -> dict[tuple[str, str | None], int]:
    """Line of each section header and key, as configparser reads them (keys lower-cased), for messages."""
    where: dict[tuple[str, str | None], int] = {}
    section = configparser.DEFAULTSECT
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        text = line.strip()
        if not text or text[0] in "#;" or line[0].isspace():
            continue
        if text.startswith("[") and "]" in text:
            section = text[1:text.index("]")]
            where.setdefault((section, None), n)
            continue
        cut = min((i for i in (text.find("="), text.find(":")) if i > 0), default=-1)
        if cut > 0:
            where.setdefault((section, text[:cut].strip().lower()), n)
    return where


def _check_names(parser: configparser.ConfigParser, chosen: Path, lines: dict[tuple[str, str | None], int]) -> None:
    """Refuse unknown sections and keys, naming the file, the line and what is valid there."""
    sections = [configparser.DEFAULTSECT] * bool(parser.defaults()) + parser.sections()
    for sec in sections:
        if sec not in VALID_KEYS:
            raise InvalidArgument(f"config file {chosen}, line {lines.get((sec, None), '?')}: unknown section"
                                  f" [{sec}]; valid sections: {', '.join(f'[{v}]' for v in VALID_KEYS)}")
        for key in parser[sec]:
            if key not in VALID_KEYS[sec]:
                raise InvalidArgument(f"config file {chosen}, line {lines.get((sec, key), '?')}: unknown key {key!r} in"
                                      f" [{sec}]; valid keys there: {', '.join(VALID_KEYS[sec])}")


def _choice(section: configparser.SectionProxy, key: str, default: str, valid: tuple[str, ...],
            where: str) -> str:
    value = section.get(key, fallback="").strip() or default
    if value not in valid:
        raise InvalidArgument(f"config{where}: {section.name}.{key} = {value!r} is not one of {', '.join(valid)}")
    return value


def _ranged(section: configparser.SectionProxy, key: str, default: int, bounds: tuple[int, int],
            where: str) -> int:
    value = _int(section, key, default)
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidArgument(f"config{where}: {section.name}.{key} = {value} must be from {bounds[0]} to"
                              f" {bounds[1]}")
    return value


def _plugin_settings(plug: configparser.SectionProxy) -> PluginSettings:
    p = PluginSettings()
    return PluginSettings(
        socket=Path(plug.get("socket", fallback="").strip() or p.socket),
        workers=max(1, _int(plug, "workers", p.workers)),
        docker_host=plug.get("docker_host", fallback="").strip() or p.docker_host,
        driver=check_name(plug.get("driver", fallback="").strip() or p.driver, "plugin driver name"),
    )


def _volume_defaults(vol: configparser.SectionProxy, where: Callable[[str, str], str]) -> VolumeDefaults:
    d = VolumeDefaults()
    return VolumeDefaults(
        size=parse_size(vol.get("size", fallback="1g"), "config volume.size"),
        layout=_choice(vol, "layout", d.layout, DEFAULT_LAYOUTS, where("volume", "layout")),
        fstype=_choice(vol, "fstype", d.fstype, FSTYPES, where("volume", "fstype")),
        nmirror=_ranged(vol, "nmirror", d.nmirror, NMIRROR_RANGE, where("volume", "nmirror")),
        ncol=_ranged(vol, "ncol", d.ncol, NCOL_RANGE, where("volume", "ncol")),
        maxiops=_int(vol, "maxiops", d.maxiops),
        cache_percent=_int(vol, "cache_percent", d.cache_percent),
        protect=_bool(vol, "protect", False),
        provisioning=_choice(vol, "provisioning", d.provisioning, PROVISIONING, where("volume", "provisioning")),
    )


def _seconds(section: configparser.SectionProxy, key: str, default: float, where: str) -> float:
    raw = section.get(key, fallback="").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"config{where}: {section.name}.{key} = {raw!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise InvalidArgument(f"config{where}: {section.name}.{key} = {raw} must be more than 0 and less than"
                              " a day (seconds)")
    return value


def _etcd_settings(sec: configparser.SectionProxy, where: Callable[[str, str], str]) -> tuple[str, tuple[str, ...]]:
    catalog = _choice(sec, "catalog", "sqlite", CATALOGS, where("cluster", "catalog"))
    raw = [e.strip() for e in sec.get("etcd_endpoints", fallback="").split(",") if e.strip()]
    for ep in raw:
        u = urlsplit(ep)
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path.strip("/"):
            raise InvalidArgument(f"config{where('cluster', 'etcd_endpoints')}: cluster.etcd_endpoints: {ep!r} is"
                                  " not of the form http://HOST:PORT")
    if catalog == "etcd" and not raw:
        raise InvalidArgument(f"config{where('cluster', 'catalog')}: cluster.catalog = etcd needs"
                              " cluster.etcd_endpoints = http://HOST:PORT[,...]")
    return catalog, tuple(e.rstrip("/") for e in raw)


def _cluster_settings(sec: configparser.SectionProxy, where: Callable[[str, str], str]) -> ClusterSettings:
    d = ClusterSettings()
    catalog, endpoints = _etcd_settings(sec, where)
    ttl = _seconds(sec, "lease_ttl", d.lease_ttl, where("cluster", "lease_ttl"))
    interval = _seconds(sec, "lease_interval", d.lease_interval, where("cluster", "lease_interval"))
    if ttl < 2:
        raise InvalidArgument(f"config{where('cluster', 'lease_ttl')}: cluster.lease_ttl = {ttl:g} is too short:"
                              " at least 2 seconds, so that a node can stop its containers before its lease ends")
    if interval >= ttl / 4:
        raise InvalidArgument(f"config{where('cluster', 'lease_interval')}: cluster.lease_interval = {interval:g}"
                              f" must be less than a quarter of cluster.lease_ttl ({ttl:g} / 4 = {ttl / 4:g}):"
                              " a node fences itself after half the TTL without a renewal, and must have"
                              " tried to renew at least twice by then")
    grace = _seconds(sec, "engine_grace", d.engine_grace, where("cluster", "engine_grace"))
    return ClusterSettings(catalog=catalog, etcd_endpoints=endpoints, lease_ttl=ttl, lease_interval=interval,
                           engine_grace=grace)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration from ``path``, $VERITAS_CONFIG, /etc/vx/docker, or the repository copy."""
    candidates: list[Path]
    if path is not None:
        candidates = [Path(path)]
    elif os.environ.get("VERITAS_CONFIG"):
        candidates = [Path(os.environ["VERITAS_CONFIG"])]
    else:
        candidates = [DEFAULT_CONFIG, _REPO_DEFAULT]
    chosen = next((p for p in candidates if p.is_file()), None)
    if chosen is None:
        if path is not None or os.environ.get("VERITAS_CONFIG"):
            raise InvalidArgument(f"config file {candidates[0]} does not exist")
        return Config()
    parser = configparser.ConfigParser()
    try:
        parser.read(chosen)
    except configparser.Error as exc:
        raise InvalidArgument(f"config file {chosen} is malformed: {exc}") from None
    lines = _line_numbers(chosen)
    _check_names(parser, chosen, lines)

    def where(sec: str, key: str) -> str:
        n = lines.get((sec, key))
        return f" file {chosen}, line {n}" if n else f" file {chosen}"
    for sec in ("storage", "volume", "node", "plugin", "cluster", "replication"):
        if not parser.has_section(sec):
            parser.add_section(sec)
    st, vol, node, plug = parser["storage"], parser["volume"], parser["node"], parser["plugin"]
    plugin = _plugin_settings(plug)
    cluster = _cluster_settings(parser["cluster"], where)
    defaults = _volume_defaults(vol, where)
    state_root = Path(st.get("state_root", fallback="/var/lib/veritas"))
    mount_root = Path(st.get("mount_root", fallback="/dockerfs"))
    for path, key in ((state_root, "state_root"), (mount_root, "mount_root")):
        if not path.is_absolute():
            raise InvalidArgument(f"config: storage.{key} must be an absolute path, got {str(path)!r}")
    return Config(
        diskgroup=check_name(st.get("diskgroup", fallback="dockerdg").strip(), "disk group name"),
        state_root=state_root,
        mount_root=mount_root,
        default_disk_size=parse_size(st.get("default_disk_size", fallback="20g"), "default_disk_size"),
        default_disk_count=max(1, _int(st, "default_disk_count", 2)),
        node=node.get("name", fallback="").strip() or socket.gethostname(),
        volume=defaults,
        plugin=plugin,
        cluster=cluster,
        replication=_replication_settings(parser["replication"], where),
        source=chosen,
    )
