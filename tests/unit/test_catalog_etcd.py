"""The etcd backend beyond the shared contract (tests/unit/test_catalog_contract.py runs that, leases and
attachments included, on etcd too): what etcd's leases are bound to (2 s leases, so real sleeps stay
short), the plugin's lease thread on etcd, fencing of a process that lost its lease, an unreachable or
restarted etcd, and the [cluster] config."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.lease import LeaseKeeper
from storage import group
from storage.catalog.base import DiskGroupRec, DiskRec, IntentRec, SubdiskRec, VolumeRec
from storage.catalog.etcd import Etcd, EtcdCatalog
from storage.catalog.etcd_store import EtcdStore
from storage.config import load_config
from storage.errors import CatalogError, InvalidArgument
from storage.units import GiB, MiB
from tests.etcd_server import EtcdServer, free_port

DG = DiskGroupRec("testdg", "u-1", None, 1.0)
TTL = 2.0  # short, yet with room for a loaded machine between a renewal and what it must keep


def _ready(cat: EtcdCatalog, init: bool = True) -> EtcdCatalog:
    if init:
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


def _lease_id(cat: EtcdCatalog, node: str) -> int:
    kv = cat.etcd.get("test: read a lease record", cat._k(f"lease/{node}"))
    assert kv is not None
    return int(json.loads(kv["value"])["id"])


def test_a_node_lease_is_an_etcd_lease_and_its_attachments_are_bound_to_it(cat: EtcdCatalog) -> None:
    """What the contract (tests/unit/test_catalog_contract.py) leaves to the backend: on etcd the lease
    is the server's, renewing keeps that one lease, and an attachment vanishes when it expires."""
    cat.renew_lease("nodeA", TTL)
    cat.attach("v1", "nodeA")
    lease = _lease_id(cat, "nodeA")
    assert 0 < cat.etcd.time_to_live("test", lease) <= TTL
    for _ in range(3):
        time.sleep(TTL / 4)
        cat.renew_lease("nodeA", TTL)
    assert _lease_id(cat, "nodeA") == lease  # kept alive, not replaced
    att = cat.etcd.get("test", cat._k("attach/v1"))
    assert att is not None and att["lease"] == lease
    _expire()
    assert cat.etcd.time_to_live("test", lease) == -1
    assert cat.etcd.get("test", cat._k("attach/v1")) is None and cat.attachments() == []


def test_the_lease_thread_on_etcd_keeps_one_etcd_lease_and_the_store_uses_lease_ttl(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """[cluster] lease_ttl is the TTL of the node's lease and of the process's lock session; the
    plugin's LeaseKeeper renews one etcd lease, and when it stops, the node's attachments go at expiry."""
    dg = f"t{uuid.uuid4().hex[:12]}"
    cfg = dataclasses.replace(
        load_config(_conf(tmp_path, f"catalog = etcd\netcd_endpoints = {etcd_server.endpoint}\n"
                                    f"lease_ttl = {TTL:g}\nlease_interval = 0.4\n")),
        diskgroup=dg, node="nodeA")
    store = group.store_of(cfg)
    assert isinstance(store, EtcdStore) and store.session.ttl == TTL
    _ready(store.create(DiskGroupRec(dg, "u-2", None, 1.0)), init=False)  # type: ignore[arg-type]
    store.publish(dg)
    with store.locks(dg).hold("v1"):  # the lock session is granted with lease_ttl too
        assert 0 < store.etcd.time_to_live("test", store.session.current()) <= TTL
    keeper = LeaseKeeper(cfg)
    try:
        assert keeper.renew()
        cat = store.open(dg)
        assert isinstance(cat, EtcdCatalog)
        lease = _lease_id(cat, "nodeA")
        cat.attach("v1", "nodeA")
        for _ in range(3):
            time.sleep(TTL / 4)
            assert keeper.renew()
        assert _lease_id(cat, "nodeA") == lease and set(keeper.held) == {"v1"}
        (rec,) = cat.leases()
        assert rec.node == "nodeA" and rec.ttl == TTL and rec.expires > time.time()
        _expire()  # the keeper stopped renewing: the attachment goes with the lease
        assert cat.attachments() == [] and cat.etcd.time_to_live("test", lease) == -1
    finally:
        store.destroy(dg)


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
