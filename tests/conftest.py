import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


import pytest

# Run alone, after the rest (scripts/test's second pass, without xdist): these bound a latency or race
# a lease, fencing or failure-detection timer against the clock, and must not share two CPUs with other
# tests' disk and CPU load. The host engine's closing check runs there too, after every Docker test.
SERIAL_MODULES = (
    "tests/integration/test_leases.py",            # fenced before the lease ends; engine-gone grace bounds
    "tests/integration/test_etcd_recovery.py",     # a dead holder's operation rolled back within TTL + 2.5 s
    "tests/cluster/test_failover.py",              # leases and self-fencing across lab nodes
    "tests/cluster/test_lab_pacemaker.py",         # fencing a partitioned node
    "tests/cluster/test_pacemaker_failover.py",    # failover within Pacemaker's timeouts
    "tests/cluster/test_lab_replication.py",       # a cut link seen within its limit
)
SERIAL_TESTS = (
    "tests/integration/test_agents.py::test_unhealthy_faults_and_kill_is_reported_within_a_second",
    "tests/integration/test_plugin_serve.py::test_restart_with_a_container_start_in_flight_is_quick",  # < 3 s
    "tests/integration/test_host_engine.py::test_host_engine_after_docker_tests",  # after every Docker test
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "serial: runs alone, after the parallel pass (see tests/conftest.py)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.nodeid.split("::")[0]
        if path in SERIAL_MODULES or item.nodeid in SERIAL_TESTS:
            item.add_marker(pytest.mark.serial)


@pytest.fixture(scope="session")
def etcd_server():  # returns a tests.etcd_server.EtcdServer
    """One real etcd for the session (127.0.0.1, free ports, temp data dir), ended by its PID. Tests
    keep apart by key prefix."""
    from tests.etcd_server import EtcdServer

    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()
