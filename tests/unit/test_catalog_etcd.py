"""The etcd backend beyond the shared contract (tests/unit/test_catalog_contract.py runs that on etcd too):
node leases and attachments judged by etcd's own lease clock (2 s leases, so real sleeps stay short),
fencing of a process that lost its lease, an unreachable or restarted etcd, and the [cluster] config."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import group
from storage.catalog.base import DiskGroupRec, DiskRec, IntentRec, SubdiskRec, VolumeRec
from storage.catalog.etcd import Etcd, EtcdCatalog
from storage.catalog.etcd_store import EtcdStore
from storage.config import load_config
from storage.errors import CatalogError, InUse, InvalidArgument, NoSuchVolume
from storage.units import GiB, MiB
from tests.etcd_server import EtcdServer, free_port

DG = DiskGroupRec("testdg", "u-1", None, 1.0)
TTL = 2.0  # short, yet with room for a loaded machine between a renewal and what it must keep


def _ready(cat: EtcdCatalog) -> EtcdCatalog:
    cat.init(DG)
    cat.add_disk(DiskRec("d1", "/srv/d1.img", "file", 10 * GiB))
    for name in ("v1", "v2"):
        cat.create_volume(VolumeRec(name, 10 * MiB, "concat", "xfs"), [SubdiskRec(name, 0, "d1", MiB, MiB)],
                          IntentRec(name, "make", {}, 1.0), {"d1": GiB})
        cat.finish_intent(name)
    return cat


@pytest.fixture
def cat(etcd_server: EtcdServer) -> EtcdCatalog:
    return _ready(EtcdCatalog(Etcd([etcd_server.endpoint]), f"/vtest/{uuid.uuid4().hex}/", label="testdg"))


def _expire() -> None:
    """Let a TTL lease run out on the server (its expiry checks run every 0.5 s)."""
    time.sleep(TTL + 1.2)


def test_lease_is_an_etcd_lease_renewed_and_listed(cat: EtcdCatalog) -> None:
    assert cat.leases() == []
    first = cat.renew_lease("nodeA", TTL)
    assert first.node == "nodeA" and first.ttl == TTL and first.expires == pytest.approx(time.time() + TTL, abs=1)
    time.sleep(0.5)
    again = cat.renew_lease("nodeA", TTL)
    assert again.expires > first.expires
    (listed,) = cat.leases()
    assert listed.node == "nodeA" and listed.expires > time.time()
    _expire()
    (listed,) = cat.leases()
    assert listed.expires <= time.time()  # still recorded, but expired as the server judged it


def test_attach_is_exclusive_until_the_holders_lease_expires(cat: EtcdCatalog) -> None:
    with pytest.raises(InUse, match="node nodeA holds no live lease"):
        cat.attach("v1", "nodeA")
    cat.renew_lease("nodeA", TTL)
    cat.renew_lease("nodeB", 30)
    with pytest.raises(NoSuchVolume):
        cat.attach("nope", "nodeA")
    got = cat.attach("v1", "nodeA")
    assert (got.volume, got.node, got.wanted_by) == ("v1", "nodeA", None)
    assert cat.attach("v1", "nodeA") == got
    with pytest.raises(InUse, match="attached on node nodeA.*lease runs until"):
        cat.attach("v1", "nodeB")
    cat.want("v1", "nodeB")
    assert cat.attachments()[0].wanted_by == "nodeB"
    _expire()  # A stops renewing: its attachment goes with its lease, on the server's clock
    assert cat.attachments() == []
    took = cat.attach("v1", "nodeB")
    assert took.node == "nodeB" and took.wanted_by is None
    cat.renew_lease("nodeA", TTL)  # A comes back: it owns nothing
    with pytest.raises(InUse, match="attached on node nodeB"):
        cat.attach("v1", "nodeA")
    assert cat.detach("v1", "nodeA") is False
    assert [(a.volume, a.node) for a in cat.attachments()] == [("v1", "nodeB")]


def test_renewing_keeps_attachments_and_drop_releases_them(cat: EtcdCatalog) -> None:
    cat.renew_lease("nodeA", TTL)
    cat.attach("v1", "nodeA")
    for _ in range(4):
        time.sleep(0.5)
        cat.renew_lease("nodeA", TTL)
    assert [a.node for a in cat.attachments()] == ["nodeA"]
    cat.renew_lease("nodeA", 30)  # another TTL: a new lease, the attachment moves to it
    _expire()
    assert [a.node for a in cat.attachments()] == ["nodeA"]
    cat.drop_lease("nodeA")
    cat.drop_lease("nodeC")
    assert cat.attachments() == [] and cat.leases() == []
    cat.renew_lease("nodeB", TTL)
    assert cat.attach("v1", "nodeB").node == "nodeB"
    assert cat.detach("v1", "nodeB") is True and cat.attachments() == []
    cat.attach("v2", "nodeB")
    cat.delete_volume("v2")
    assert cat.attachments() == []


def test_a_process_that_lost_its_lease_cannot_write_under_its_locks(etcd_server: EtcdServer) -> None:
    """Fencing: a holder cut off from etcd longer than its TTL may have lost its locks to another node;
    a catalog write it still makes under them is refused, naming why, and changes nothing."""
    store = EtcdStore([etcd_server.endpoint], prefix=f"/vtest/{uuid.uuid4().hex}")
    try:
        store.create(DG).close()
        store.publish("testdg")
        cat = store.open("testdg")
        with store.locks("testdg").hold("v1"):
            cat.add_disk(DiskRec("d1", "/srv/d1.img", "file", GiB))  # fine while the lease lives
            lease = store.session.current()
            store.etcd.revoke("test: the lease runs out", lease)  # as if etcd had been away past the TTL
            with pytest.raises(CatalogError, match="lease expired while it held disk group locks"):
                cat.add_disk(DiskRec("d2", "/srv/d2.img", "file", GiB))
        assert [d.name for d in cat.disks()] == ["d1"]
        with store.locks("testdg").hold("v1"):  # a new session: holding and writing work again
            cat.add_disk(DiskRec("d2", "/srv/d2.img", "file", GiB))
    finally:
        store.close()


def test_unreachable_etcd_is_a_catalog_error_naming_the_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore([endpoint], timeout=2)
    with pytest.raises(CatalogError, match=rf"cannot reach etcd to list disk groups \({endpoint}: .*etcd_endpoints"):
        store.names()
    with pytest.raises(CatalogError, match="cannot reach etcd"):
        store.locks("testdg")


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.remove()


def test_etcd_restarted_works_again(own_etcd: EtcdServer) -> None:
    store = EtcdStore([own_etcd.endpoint], timeout=2)
    try:
        store.create(DG).close()
        store.publish("testdg")
        cat = store.open("testdg")
        cat.add_disk(DiskRec("d1", "/srv/d1.img", "file", GiB))
        own_etcd.stop()
        with pytest.raises(CatalogError, match=own_etcd.endpoint):
            cat.disks()
        with pytest.raises(CatalogError, match=own_etcd.endpoint):
            cat.add_disk(DiskRec("d2", "/srv/d2.img", "file", GiB))
        own_etcd.start()  # same data, same port
        assert [d.name for d in cat.disks()] == ["d1"]
        cat.add_disk(DiskRec("d2", "/srv/d2.img", "file", GiB))
        with store.locks("testdg").hold("v1", exclusive_dg=True):
            assert store.names() == ["testdg"]
    finally:
        store.close()


def test_second_endpoint_is_tried_when_the_first_is_down(etcd_server: EtcdServer) -> None:
    store = EtcdStore([f"http://127.0.0.1:{free_port()}", etcd_server.endpoint], prefix=f"/vtest/{uuid.uuid4().hex}")
    assert store.names() == []


# ------------------------------------------------------------------------------------------- config


def _conf(tmp_path: Path, cluster: str) -> Path:
    p = tmp_path / "v.conf"
    p.write_text(f"[storage]\nstate_root = {tmp_path}/state\nmount_root = {tmp_path}/mnt\n[cluster]\n{cluster}")
    return p


def test_config_cluster_defaults_to_sqlite(tmp_path: Path) -> None:
    cfg = load_config(_conf(tmp_path, ""))
    assert cfg.cluster.catalog == "sqlite" and cfg.cluster.etcd_endpoints == ()
    assert type(group.store_of(cfg)).__name__ == "SqliteStore"


def test_config_etcd_picks_the_etcd_store(tmp_path: Path, etcd_server: EtcdServer) -> None:
    cfg = load_config(_conf(tmp_path, f"catalog = etcd\netcd_endpoints = {etcd_server.endpoint}, http://h2:2379\n"))
    assert cfg.cluster.etcd_endpoints == (etcd_server.endpoint, "http://h2:2379")
    store = group.store_of(cfg)
    assert isinstance(store, EtcdStore) and group.store_of(cfg) is store  # one per process


@pytest.mark.parametrize("text, words", [
    ("catalog = zookeeper\n", "is not one of sqlite, etcd"),
    ("catalog = etcd\n", "needs cluster.etcd_endpoints"),
    ("catalog = etcd\netcd_endpoints = 127.0.0.1:2379\n", "not of the form http://HOST:PORT"),
    ("etcd_endpoints = http://h1\n", "not of the form http://HOST:PORT"),
    ("lease = 3\n", "unknown key 'lease'"),
])
def test_config_cluster_bad_values_are_refused(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        load_config(_conf(tmp_path, text))
