import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


import pytest


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
