"""load_config: explicit file, $VERITAS_CONFIG, the repository default, and refusal of bad values."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import storage.config as config_mod
from storage.config import Config, VolumeDefaults, load_config
from storage.errors import BadName, BadSize, InvalidArgument
from storage.units import GiB, MiB

REPO_DEFAULT = Path(__file__).resolve().parents[2] / "etc" / "vxinfoscale-default.conf"

FULL = """\
[storage]
diskgroup = testdg
state_root = {root}/state
mount_root = {root}/mnt
default_disk_size = 512m
default_disk_count = 3

[volume]
size = 2g
layout = mirror
fstype = ext4
nmirror = 3
ncol = 4
maxiops = 250
cache_percent = 15
protect = yes

[node]
name = node-7
"""


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERITAS_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "veritas.conf") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def minimal(tmp_path: Path, storage: str = "", volume: str = "", node: str = "") -> Path:
    root = tmp_path.as_posix()
    text = (f"[storage]\nstate_root = {root}/state\nmount_root = {root}/mnt\n{storage}\n"
            f"[volume]\n{volume}\n[node]\n{node}\n")
    return write(tmp_path, text)


def test_load_all_keys(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.format(root=tmp_path.as_posix()))
    cfg = load_config(path)
    assert cfg == Config(
        diskgroup="testdg",
        state_root=tmp_path / "state",
        mount_root=tmp_path / "mnt",
        default_disk_size=512 * MiB,
        default_disk_count=3,
        node="node-7",
        volume=VolumeDefaults(size=2 * GiB, layout="mirror", fstype="ext4", nmirror=3, ncol=4,
                              maxiops=250, cache_percent=15, protect=True),
        source=path,
    )
    assert cfg.dg_parent == tmp_path / "state" / "dg"


def test_load_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.format(root=tmp_path.as_posix()))
    assert load_config(str(path)).diskgroup == "testdg"


def test_repository_default_file_loads() -> None:
    assert REPO_DEFAULT.is_file()
    cfg = load_config(REPO_DEFAULT)
    assert cfg.source == REPO_DEFAULT
    assert cfg.diskgroup == "dockerdg"
    assert cfg.state_root == Path("/var/lib/veritas")
    assert cfg.mount_root == Path("/dockerfs")
    assert cfg.default_disk_size == 20 * GiB
    assert cfg.default_disk_count == 2
    assert cfg.node == socket.gethostname()  # empty name means the host name
    assert cfg.volume == VolumeDefaults(size=GiB, layout="concat", fstype="xfs", nmirror=2, ncol=2,
                                        maxiops=0, cache_percent=30, protect=False)


def test_without_path_or_env_falls_back_to_repository_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG", tmp_path / "absent.conf")
    assert load_config().source == REPO_DEFAULT


def test_without_path_or_env_prefers_installed_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    installed = minimal(tmp_path, storage="diskgroup = installeddg")
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG", installed)
    cfg = load_config()
    assert cfg.source == installed
    assert cfg.diskgroup == "installeddg"


def test_veritas_config_env_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = minimal(tmp_path, storage="diskgroup = envdg")
    monkeypatch.setenv("VERITAS_CONFIG", str(path))
    cfg = load_config()
    assert cfg.source == path
    assert cfg.diskgroup == "envdg"
    assert cfg.state_root == tmp_path / "state"


def test_explicit_path_beats_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = write(tmp_path, "[storage]\ndiskgroup = envdg\n", "env.conf")
    explicit = write(tmp_path, "[storage]\ndiskgroup = explicitdg\n", "explicit.conf")
    monkeypatch.setenv("VERITAS_CONFIG", str(env_file))
    assert load_config(explicit).diskgroup == "explicitdg"


def test_missing_explicit_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_config(tmp_path / "nope.conf")


def test_missing_env_file_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VERITAS_CONFIG", str(tmp_path / "nope.conf"))
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_config()


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        load_config(tmp_path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    cfg = load_config(path)
    assert cfg == Config(node=socket.gethostname(), source=path)
    assert cfg.volume == VolumeDefaults()


def test_empty_values_fall_back_to_defaults(tmp_path: Path) -> None:
    cfg = load_config(minimal(tmp_path, storage="default_disk_count =",
                              volume="layout =\nfstype =\nnmirror =\nprotect =", node="name ="))
    assert cfg.default_disk_count == 2
    assert cfg.volume.layout == "concat"
    assert cfg.volume.fstype == "xfs"
    assert cfg.volume.nmirror == 2
    assert cfg.volume.protect is False
    assert cfg.node == socket.gethostname()


def test_malformed_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        load_config(write(tmp_path, "diskgroup = nosection\n"))


@pytest.mark.parametrize("key", ["state_root", "mount_root"])
def test_relative_roots_raise(tmp_path: Path, key: str) -> None:
    roots = {"state_root": f"{tmp_path.as_posix()}/state", "mount_root": f"{tmp_path.as_posix()}/mnt"}
    roots[key] = "relative/dir"
    text = "[storage]\n" + "".join(f"{k} = {v}\n" for k, v in roots.items())
    with pytest.raises(InvalidArgument, match=key):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("value", ["two", "2.5", "0x2", "-1"])
def test_bad_nmirror_raises(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidArgument, match="nmirror"):
        load_config(minimal(tmp_path, volume=f"nmirror = {value}"))


@pytest.mark.parametrize(("section", "key"), [("storage", "default_disk_count"), ("volume", "ncol"),
                                              ("volume", "maxiops"), ("volume", "cache_percent")])
def test_other_bad_integers_raise(tmp_path: Path, section: str, key: str) -> None:
    kw = {section: f"{key} = lots"}
    with pytest.raises(InvalidArgument, match=key):
        load_config(minimal(tmp_path, **kw))


@pytest.mark.parametrize("name", ["bad/name", "..", "has space", "-dash", "x" * 65])
def test_bad_diskgroup_name_raises(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadName):
        load_config(minimal(tmp_path, storage=f"diskgroup = {name}"))


@pytest.mark.parametrize(("section", "line"), [
    ("volume", "size = huge"),
    ("volume", "size = 0"),
    ("volume", "size = -1g"),
    ("volume", "size ="),
    ("storage", "default_disk_size = 20q"),
    ("storage", "default_disk_size = 0g"),
])
def test_bad_size_raises(tmp_path: Path, section: str, line: str) -> None:
    kw = {section: line}
    with pytest.raises(BadSize):
        load_config(minimal(tmp_path, **kw))


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("true", True), ("1", True), ("on", True),
                                                 ("no", False), ("false", False), ("0", False)])
def test_protect_values(tmp_path: Path, value: str, expected: bool) -> None:
    assert load_config(minimal(tmp_path, volume=f"protect = {value}")).volume.protect is expected


def test_bad_protect_raises_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="protect"):
        load_config(minimal(tmp_path, volume="protect = maybe"))


def test_disk_count_at_least_one(tmp_path: Path) -> None:
    assert load_config(minimal(tmp_path, storage="default_disk_count = 0")).default_disk_count == 1


# ---------------------------------------------------------------- typos are refused, not ignored


@pytest.mark.parametrize(("section", "line", "key"), [
    ("volume", "fs_type = btrfs", "fs_type"),
    ("volume", "nmirrors = 3", "nmirrors"),
    ("storage", "mountroot = /srv", "mountroot"),
    ("node", "hostname = n1", "hostname"),
])
def test_unknown_key_is_refused_with_file_line_and_valid_keys(tmp_path: Path, section: str, line: str,
                                                               key: str) -> None:
    kw = {section: line} if section != "plugin" else {}
    path = minimal(tmp_path, **kw)
    expected_line = path.read_text().splitlines().index(line) + 1
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f"line {expected_line}" in message, message
    assert repr(key) in message and f"[{section}]" in message, message
    for valid in config_mod.VALID_KEYS[section]:
        assert valid in message.split("valid keys", 1)[1], (valid, message)


def test_unknown_key_in_plugin_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[plugin]\nworkers = 2\n\n# comment\nsocket_path = /run/x.sock\n")
    with pytest.raises(InvalidArgument, match=r"line 5: unknown key 'socket_path' in \[plugin\].*socket, workers"):
        load_config(path)


@pytest.mark.parametrize("header", ["[volumes]", "[Storage]", "[DEFAULT]", "[nodes]"])
def test_unknown_section_is_refused_with_file_line_and_valid_sections(tmp_path: Path, header: str) -> None:
    path = write(tmp_path, f"[storage]\ndiskgroup = dg1\n\n{header}\nsize = 2g\n")
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "line 4" in message and header in message, message
    for sec in ("[storage]", "[volume]", "[node]", "[plugin]"):
        assert sec in message.split("valid sections", 1)[1], message


def test_keys_are_matched_as_configparser_reads_them(tmp_path: Path) -> None:
    """Upper-case keys and ':' separators are the same keys to configparser, so they are valid."""
    cfg = load_config(minimal(tmp_path, volume="FSTYPE: ext4\nNcol = 3"))
    assert cfg.volume.fstype == "ext4" and cfg.volume.ncol == 3


def test_repository_default_file_has_only_valid_keys() -> None:
    load_config(REPO_DEFAULT)  # would raise on any key the loader does not know


@pytest.mark.parametrize(("line", "word"), [
    ("layout = raid7", "layout"), ("layout = raid5", "layout"), ("fstype = zfs", "fstype"),
    ("nmirror = 1", "nmirror"), ("nmirror = 5", "nmirror"), ("ncol = 1", "ncol"), ("ncol = 17", "ncol"),
])
def test_volume_defaults_out_of_range_are_refused_with_the_line(tmp_path: Path, line: str, word: str) -> None:
    path = minimal(tmp_path, volume=line)
    n = path.read_text().splitlines().index(line) + 1
    with pytest.raises(InvalidArgument, match=rf"{word}") as info:
        load_config(path)
    assert f"line {n}" in str(info.value) and str(path) in str(info.value), info.value


def test_provisioning_defaults_to_thin_and_is_read(tmp_path: Path) -> None:
    assert load_config(minimal(tmp_path)).volume.provisioning == "thin"
    assert load_config(REPO_DEFAULT).volume.provisioning == "thin"
    assert load_config(minimal(tmp_path, volume="provisioning = thick")).volume.provisioning == "thick"


@pytest.mark.parametrize("value", ["thik", "sparse", "THICK"])
def test_bad_provisioning_is_refused_with_file_and_line(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"line \d+: volume.provisioning = .* is not one of thin, thick"):
        load_config(minimal(tmp_path, volume=f"provisioning = {value}"))


def test_cluster_lease_settings_default_and_are_read(tmp_path: Path) -> None:
    from storage.config import ClusterSettings

    assert load_config(minimal(tmp_path)).cluster == ClusterSettings(lease_ttl=10.0, lease_interval=2.0)
    assert load_config(REPO_DEFAULT).cluster == ClusterSettings(lease_ttl=10.0, lease_interval=2.0)
    path = write(tmp_path, minimal(tmp_path).read_text() + "[cluster]\nlease_ttl = 6\nlease_interval = 0.5\n")
    cfg = load_config(path).cluster
    assert (cfg.lease_ttl, cfg.lease_interval, cfg.fence_after, cfg.fence_margin) == (6.0, 0.5, 3.0, 3.0)
    assert cfg.engine_grace == 5.0 and cfg.mount_wait == 5.0 + 6.0 / 4 + 1 + 0.5  # the grace, the kills, a renewal
    path = write(tmp_path, minimal(tmp_path).read_text() + "[cluster]\nlease_ttl = 20\nengine_grace = 2.5\n")
    cfg = load_config(path).cluster
    assert cfg.engine_grace == 2.5 and cfg.mount_wait == 20 + 2  # the holder's lease is the longer wait


@pytest.mark.parametrize(("lines", "words"), [
    ("lease_ttl = ten", "not a number of seconds"),
    ("lease_ttl = -5", "more than 0"),
    ("lease_interval = 0", "more than 0"),
    ("lease_ttl = 1\nlease_interval = 0.1", "too short"),
    ("lease_ttl = 10\nlease_interval = 5", "less than a quarter of cluster.lease_ttl"),
    ("lease_ttl = 10\nlease_interval = 2.5", "less than a quarter"),
    ("lease_timeout = 3", "unknown key 'lease_timeout'"),
    ("engine_grace = 0", "cluster.engine_grace = 0 must be more than 0"),
    ("engine_grace = soon", "not a number of seconds"),
])
def test_bad_cluster_lease_settings_are_refused_with_the_line(tmp_path: Path, lines: str, words: str) -> None:
    path = write(tmp_path, minimal(tmp_path).read_text() + "[cluster]\n" + lines + "\n")
    with pytest.raises(InvalidArgument, match=words) as err:
        load_config(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_replication_settings_default_and_are_read(tmp_path: Path) -> None:
    from storage.config import ReplicationSettings

    assert load_config(minimal(tmp_path)).replication == ReplicationSettings()
    assert load_config(REPO_DEFAULT).replication == ReplicationSettings()
    path = write(tmp_path, minimal(tmp_path).read_text() + "[replication]\ninterval = 2.5\nsrl_size = 256m\n"
                 "listen = 127.0.0.1:5000\nkey_file = /etc/k\n")
    assert load_config(path).replication == ReplicationSettings(2.5, 256 * MiB, "127.0.0.1:5000", Path("/etc/k"))


@pytest.mark.parametrize(("lines", "words"), [
    ("interval = 0", "replication.interval = 0 must be more than 0"),
    ("interval = often", "not a number of seconds"),
    ("srl_size = lots", "replication.srl_size"),
    ("listen = 4145", "not HOST:PORT"),
    ("listen = host:99999", "not HOST:PORT"),
    ("key_file = rlink.key", "absolute path"),
    ("port = 4145", "unknown key 'port'"),
])
def test_bad_replication_settings_are_refused_with_the_line(tmp_path: Path, lines: str, words: str) -> None:
    path = write(tmp_path, minimal(tmp_path).read_text() + "[replication]\n" + lines + "\n")
    with pytest.raises(InvalidArgument, match=words) as err:
        load_config(path)
    assert str(path) in str(err.value) and "line" in str(err.value)
