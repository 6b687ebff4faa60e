"""What `veritas migrate container` carries from a container's inspect document to the create request on
the target (veritas.migrate.create_body), and which containers it refuses before touching anything."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veritas.migrate import CONFIG_FIELDS, DRIVER, HOST_FIELDS, NotManaged, create_body, veritas_mounts

VALUES = st.one_of(st.text(max_size=8), st.integers(), st.booleans(),
                   st.lists(st.text(max_size=5), max_size=3),
                   st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=3))
NOT_CARRIED_CONFIG = ("Volumes", "OnBuild", "MacAddress", "ArgsEscaped")
NOT_CARRIED_HOST = ("Binds", "VolumeDriver", "VolumesFrom", "ContainerIDFile", "Links", "Mounts")
NAMES = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


def vmount(name: str, dest: str, rw: bool = True, driver: str = DRIVER) -> dict[str, Any]:
    return {"Type": "volume", "Name": name, "Source": f"/mnt/{name}", "Destination": dest, "Driver": driver,
            "Mode": "z", "RW": rw, "Propagation": ""}


@st.composite
def inspect_docs(draw: st.DrawFn) -> dict[str, Any]:
    cfg = draw(st.dictionaries(st.sampled_from(CONFIG_FIELDS + NOT_CARRIED_CONFIG), VALUES))
    host = draw(st.dictionaries(st.sampled_from(HOST_FIELDS + NOT_CARRIED_HOST), VALUES))
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    rws = draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    mounts = [vmount(n, f"/d/{n}", rw) for n, rw in zip(names, rws, strict=True)]
    if draw(st.booleans()):
        mounts.append({"Type": "tmpfs", "Destination": "/run/t"})
    return {"Id": "f" * 64, "Name": "/c1", "State": {"Running": True}, "Image": "sha256:" + "a" * 64,
            "NetworkSettings": {"IPAddress": "198.19.1.2"}, "Config": cfg, "HostConfig": host, "Mounts": mounts}


@given(inspect_docs())
def test_carries_the_listed_fields_exactly_and_rebuilds_the_veritas_mounts(doc: dict[str, Any]) -> None:
    body = create_body(doc)
    hc = body.pop("HostConfig")
    host_mode = doc["HostConfig"].get("NetworkMode") == "host"
    want = {k: v for k, v in doc["Config"].items() if k in CONFIG_FIELDS and v is not None}
    if host_mode:
        want.pop("Hostname", None)
        want.pop("Domainname", None)
    assert body == want
    mounts = hc.pop("Mounts")
    assert hc == {k: v for k, v in doc["HostConfig"].items() if k in HOST_FIELDS and v is not None}
    vols = [m for m in doc["Mounts"] if m["Type"] == "volume"]
    assert mounts == [{"Type": "volume", "Source": m["Name"], "Target": m["Destination"], "ReadOnly": not m["RW"],
                       "VolumeOptions": {"DriverConfig": {"Name": DRIVER}}} for m in vols]
    for k in ("Id", "State", "NetworkSettings", "Name"):
        assert k not in body  # the source container's identity and state stay behind
    assert body.get("Image") == doc["Config"].get("Image")  # the name it was made from, not the source's ID


def test_a_full_docker_run_configuration_is_carried() -> None:
    doc = {"Name": "/web", "Mounts": [vmount("webdata", "/data"), vmount("conf", "/etc/app", rw=False)],
           "Config": {"Image": "localbusybox:latest", "Cmd": ["sh", "-c", "sleep 1000"], "Entrypoint": ["/bin/env"],
                      "Env": ["A=1", "PATH=/bin"], "Labels": {"tier": "web"}, "WorkingDir": "/data",
                      "User": "1000:1000", "Hostname": "webhost", "ExposedPorts": {"80/tcp": {}},
                      "StopSignal": "SIGINT",
                      "Volumes": {"/data": {}}},
           "HostConfig": {"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3},
                          "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "18080"}]}, "NetworkMode": "mynet",
                          "Binds": ["webdata:/data", "conf:/etc/app:ro"], "VolumeDriver": "veritas"}}
    body = create_body(doc)
    assert body["Image"] == "localbusybox:latest" and body["Entrypoint"] == ["/bin/env"]
    assert body["Cmd"] == ["sh", "-c", "sleep 1000"] and body["Env"] == ["A=1", "PATH=/bin"]
    assert (body["Labels"], body["WorkingDir"], body["User"], body["Hostname"]) == \
        ({"tier": "web"}, "/data", "1000:1000", "webhost")
    hc = body["HostConfig"]
    assert hc["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert hc["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": "18080"}]} and hc["NetworkMode"] == "mynet"
    assert "Binds" not in hc and "VolumeDriver" not in hc and "Volumes" not in body
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in hc["Mounts"]] == \
        [("webdata", "/data", False), ("conf", "/etc/app", True)]


def test_host_network_drops_the_host_name_the_engine_would_refuse() -> None:
    doc = {"Mounts": [vmount("v", "/d")], "Config": {"Image": "i", "Hostname": "thehost"},
           "HostConfig": {"NetworkMode": "host"}}
    assert "Hostname" not in create_body(doc)


@pytest.mark.parametrize("mounts, says", [
    ([], "not veritas managed"),
    ([{"Type": "tmpfs", "Destination": "/t"}], "not veritas managed"),
    ([vmount("v", "/d"), {"Type": "bind", "Source": "/srv", "Destination": "/srv"}], "bind /srv at /srv"),
    ([vmount("v", "/d"), vmount("l", "/l", driver="local")], "driver local"),
    ([vmount("l", "/l", driver="local")], "outside veritas volumes"),
])
def test_containers_whose_data_would_stay_behind_are_refused(mounts: list[dict[str, Any]], says: str) -> None:
    doc = {"Name": "/c", "Mounts": mounts, "Config": {"Image": "i"}, "HostConfig": {}}
    with pytest.raises(NotManaged, match=says):
        veritas_mounts(doc)
    with pytest.raises(NotManaged):
        create_body(doc)


def test_dockerd_arguments_lose_host_and_pidfile_and_the_data_root_moves() -> None:
    from veritas.migrate_daemon import split_argv, with_data_root

    argv = ["--data-root", "/n1/mnt/dv_dg/docker", "-H", "unix:///run/d.sock", "--pidfile=/run/d.pid",
            "--exec-root", "/run/dx", "--host=tcp://0:1", "-p", "/x.pid", "--bridge", "none"]
    args, hosts = split_argv(argv)
    assert args == ["--data-root", "/n1/mnt/dv_dg/docker", "--exec-root", "/run/dx", "--bridge", "none"]
    assert hosts == ["unix:///run/d.sock", "tcp://0:1"]
    assert with_data_root(args, "/n2/mnt/dv_dg/docker") == \
        ["--data-root", "/n2/mnt/dv_dg/docker", "--exec-root", "/run/dx", "--bridge", "none"]
    assert with_data_root(["--data-root=/a", "--debug"], "/b") == ["--data-root=/b", "--debug"]
