"""``scripts/lab up --sites 2``: what the lab writes for the link services without bringing a lab up: the
[replication] section of every node's veritas.conf (read back by the config's own loader), the key file,
and --repl-interval refused by the config's rules before anything is made."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lab.cli import build_parser
from lab.core import RLINK_PORT, Lab, LabError, write_key
from storage.config import load_config
from storage.replication import protocol


def lab_with(tmp_path: Path, sites: int, interval: float | None = None) -> Lab:
    """A Lab as ``up`` records it (lab.json), not started."""
    lab = Lab(tmp_path / "lab")
    lab.dir.mkdir()
    lab.meta = {"nodes": [{"name": f"node{i}", "index": i, "site": f"site{i if sites > 1 else 1}"} for i in (1, 2)],
                "sites": sites, "plugin": True, "catalog": "sqlite",
                "replication": {"interval": interval or 2.0} if sites > 1 else None}
    for n in lab.nodes():
        n.base.mkdir(parents=True)
    return lab


def test_every_node_of_two_sites_gets_its_link_address_the_labs_key_and_the_interval(tmp_path: Path) -> None:
    lab = lab_with(tmp_path, 2, interval=1.5)
    write_key(lab.rlink_key)
    for n in lab.nodes():
        n.write_config()
        cfg = load_config(n.config)
        assert cfg.replication.listen == f"198.18.0.{n.index}:{RLINK_PORT}" == n.rlink_addr
        assert cfg.replication.key_file == lab.rlink_key
        assert cfg.replication.interval == 1.5
        assert cfg.state_root == lab.dir / "sites" / n.site / "state"  # each site its own disk group root
    # one key for the lab (both sites must prove the same one), as the link service reads it
    assert len(protocol.load_key(lab.rlink_key)) == 64
    assert stat.S_IMODE(os.stat(lab.rlink_key).st_mode) == 0o600


def test_the_key_is_fresh_per_lab_and_never_overwritten(tmp_path: Path) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.key"
    write_key(a)
    write_key(b)
    assert a.read_bytes() != b.read_bytes()
    before = a.read_bytes()
    with pytest.raises(FileExistsError):
        write_key(a)
    assert a.read_bytes() == before


def test_one_site_has_no_link_service_section(tmp_path: Path) -> None:
    lab = lab_with(tmp_path, 1)
    n = lab.nodes()[0]
    n.write_config()
    assert "[replication]" not in n.config.read_text()
    assert lab.replication is None


@pytest.mark.parametrize(("args", "msg"), [
    (["--nodes", "2", "--sites", "2", "--repl-interval", "0"], "must be more than 0"),
    (["--nodes", "2", "--sites", "2", "--repl-interval", "86400"], "less than a day"),
    (["--nodes", "2", "--repl-interval", "2"], "--repl-interval needs --sites 2"),
    (["--nodes", "2", "--sites", "2", "--no-plugin", "--repl-interval", "2"], "--repl-interval needs --sites 2"),
])
def test_bad_repl_interval_is_refused_before_anything_is_made(tmp_path: Path, args: list[str], msg: str) -> None:
    a = build_parser().parse_args(["up", *args])
    lab = Lab(tmp_path / "lab")
    with pytest.raises(LabError, match=msg):
        lab.up(a.nodes, a.sites, plugin=not a.no_plugin, repl_interval=a.repl_interval)
    assert not lab.dir.exists()


def test_kill_only_rlink_is_a_choice() -> None:
    assert build_parser().parse_args(["kill", "node1", "--only", "rlink"]).only == "rlink"
