"""The veritas volume driver through the real Docker CLI and the docker SDK (the book's chapter
"Automatically provision storage for Docker Containers"): create with defaults and options, ls, inspect,
run with rw and ro volumes, sharing between containers, --volumes-from, --mount, snapshots, rm.

Every container checks that its /vol really is the volume's filesystem (not a directory of the host's),
so a mount that never reached Docker's namespace cannot pass for a working volume.
"""

from __future__ import annotations

import json
import time

import docker
import pytest

from tests.integration.dockerstack import IMAGE

RUN = ("run", "--rm", "--network", "none")


def _create(stack, name: str, *opts: str) -> None:
    args = ["volume", "create", "-d", "veritas", "--name", name]
    for o in opts:
        args += ["-o", o]
    assert stack.node.cli(*args).stdout.strip() == name


def _inspect(stack, name: str) -> dict:
    out = json.loads(stack.node.cli("volume", "inspect", name).stdout)
    assert len(out) == 1
    return out[0]


def _fstype_at(mountinfo: str, target: str) -> str:
    """Filesystem type of the mount at ``target`` in a /proc/self/mountinfo text."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == target:
            return fields[fields.index("-") + 1]
    raise AssertionError(f"nothing mounted at {target}:\n{mountinfo}")


def _dg_free(stack) -> int:
    (row,) = json.loads(stack.env.cli("--json", "dg", "list").stdout)
    return int(row["free"])


def test_create_defaults_ls_inspect(stack):
    node = stack.node
    free0 = _dg_free(stack)
    _create(stack, "demovol")
    ls = node.cli("volume", "ls").stdout.splitlines()
    assert ls[0].split() == ["DRIVER", "VOLUME", "NAME"]
    assert ["veritas", "demovol"] in [line.split() for line in ls[1:]]
    assert node.cli("volume", "ls", "-q", "--filter", "driver=veritas").stdout.split() == ["demovol"]

    v = _inspect(stack, "demovol")
    assert v["Driver"] == "veritas"
    assert v["Scope"] == "global"
    assert v["Mountpoint"] == f"{stack.env.config.mount_root}/demovol_dockerdg"
    st = v["Status"]
    # defaults of the configuration file: 1g, concat (and xfs, no IOPS limit)
    assert (st["size"], st["layout"], st["fstype"], st["maxiops"]) == ("1G", "concat", "xfs", 0)
    assert st["attached"] == [] and "used" not in st  # not mounted
    assert free0 - _dg_free(stack) == 1024**3

    # the SDK sees the same volume
    sdk = node.client().volumes.get("demovol")
    assert sdk.attrs["Driver"] == "veritas" and sdk.attrs["Status"]["layout"] == "concat"

    # creating it again is a no-op (Docker answers from its own store, whatever the options); a Create
    # that reaches the plugin with other options (another node, or swarm) is refused
    _create(stack, "demovol")
    assert stack.plugin.call("VolumeDriver.Create", {"Name": "demovol", "Opts": {"size": "1g"}})["Err"] == ""
    err = stack.plugin.call("VolumeDriver.Create", {"Name": "demovol", "Opts": {"size": "2g"}})["Err"]
    assert "already exists with different options" in err

    node.cli("volume", "rm", "demovol")
    assert "demovol" not in node.cli("volume", "ls", "-q").stdout.split()
    assert _dg_free(stack) == free0


def test_create_options(stack):
    node = stack.node
    _create(stack, "mirvol", "size=1g", "layout=mirror")
    _create(stack, "iopsvol", "maxiops=10000")
    _create(stack, "extvol", "fstype=ext4", "size=512m")
    _create(stack, "twomir", "layout=mirror", "nmirror=2")
    _create(stack, "stripevol", "ncol=2", "layout=stripe")
    st = {n: _inspect(stack, n)["Status"] for n in ("mirvol", "iopsvol", "extvol", "twomir", "stripevol")}
    assert (st["mirvol"]["size"], st["mirvol"]["layout"]) == ("1G", "mirror")
    assert st["iopsvol"]["maxiops"] == 10000
    assert (st["extvol"]["fstype"], st["extvol"]["size"]) == ("ext4", "512M")
    assert st["twomir"]["layout"] == "mirror"
    assert st["stripevol"]["layout"] == "stripe"
    # the options given are what Docker remembers for the volume
    assert _inspect(stack, "stripevol")["Options"] == {"ncol": "2", "layout": "stripe"}

    # each one mounts in a container with the filesystem its options asked for
    for name, fstype in (("extvol", "ext4"), ("twomir", "btrfs"), ("stripevol", "btrfs")):
        out = node.cli(*RUN, "-v", f"{name}:/vol", IMAGE, "sh", "-c",
                       "echo ok > /vol/f && cat /vol/f && cat /proc/self/mountinfo").stdout
        assert out.startswith("ok\n")
        assert _fstype_at(out, "/vol") == fstype, name

    # nmirror alone keeps the default layout (concat), which has no mirrors: refused, naming the fix
    p = node.cli("volume", "create", "-d", "veritas", "--name", "nm", "-o", "nmirror=2", check=False)
    assert p.returncode != 0 and "layout=mirror" in p.stderr
    # the SDK, with driver options
    vol = node.client().volumes.create("sdkvol", driver="veritas", driver_opts={"size": "512m", "maxiops": "50"})
    assert vol.attrs["Driver"] == "veritas"
    assert _inspect(stack, "sdkvol")["Status"]["maxiops"] == 50


def test_bad_options_fail_clearly(stack):
    node = stack.node
    p = node.cli("volume", "create", "-d", "veritas", "--name", "demovol", "-o", "colour=red", check=False)
    assert p.returncode != 0
    assert "unknown option(s) colour" in p.stderr
    for opt in ("size", "layout", "fstype", "nmirror", "ncol", "maxiops", "sourcevol", "cachesize"):
        assert opt in p.stderr.split("valid options:")[1], p.stderr

    p = node.cli("volume", "create", "-d", "veritas", "--name", "snapx", "-o", "sourcevol=vol1", check=False)
    assert p.returncode != 0 and "no such source volume: vol1" in p.stderr

    with pytest.raises(docker.errors.APIError, match="unknown layout"):
        node.client().volumes.create("lay", driver="veritas", driver_opts={"layout": "zigzag"})
    assert node.cli("volume", "ls", "-q").stdout.split() == []


def test_run_rw_ro_persistence_and_status(stack):
    node = stack.node
    _create(stack, "demovol")
    mp = f"{stack.env.config.mount_root}/demovol_dockerdg"
    out = node.cli(*RUN, "--volume-driver", "veritas", "-v", "demovol:/vol", IMAGE, "sh", "-c",
                   "echo persisted > /vol/f && cat /proc/self/mountinfo").stdout
    assert _fstype_at(out, "/vol") == "xfs"
    st = _inspect(stack, "demovol")["Status"]
    assert st["attached"] == [] and st["mounts"] == 0 and "used" not in st  # unmounted after the container

    # data persists into a later container; read-only mounts read but refuse writes
    assert node.cli(*RUN, "-v", "demovol:/vol", IMAGE, "cat", "/vol/f").stdout == "persisted\n"
    ro = node.cli(*RUN, "-v", "demovol:/vol:ro", IMAGE, "sh", "-c", "cat /vol/f; touch /vol/g", check=False)
    assert ro.stdout == "persisted\n"
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr

    # while a container runs: attached to this node, used space shown, mounted where inspect says
    ctr = node.client().containers.run(IMAGE, ["sleep", "60"], detach=True, network_mode="none",
                                       volumes={"demovol": {"bind": "/vol", "mode": "rw"}})
    try:
        node.cli("exec", ctr.id, "dd", "if=/dev/zero", "of=/vol/big", "bs=1M", "count=20", "conv=fsync")
        st = _inspect(stack, "demovol")["Status"]
        assert st["attached"] == [stack.env.config.node] and st["mounts"] == 1
        assert st["used"].endswith("M") and float(st["used"][:-1]) >= 20
        with open("/proc/self/mountinfo") as fh:
            assert _fstype_at(fh.read(), mp) == "xfs"
        # Docker itself refuses to remove a volume a container uses
        p = node.cli("volume", "rm", "demovol", check=False)
        assert p.returncode != 0 and "volume is in use" in p.stderr and ctr.id in p.stderr
        # the plugin refuses too, should anything ask it directly
        assert "mounted on node1" in stack.plugin.call("VolumeDriver.Remove", {"Name": "demovol"})["Err"]
    finally:
        ctr.remove(force=True)
    st = _inspect(stack, "demovol")["Status"]
    assert st["attached"] == [] and "used" not in st
    node.cli("volume", "rm", "demovol")


def test_two_running_containers_share_a_volume(stack):
    node = stack.node
    _create(stack, "shared")
    reader = node.cli("run", "-d", "--network", "none", "-v", "shared:/vol", IMAGE, "sh", "-c",
                      "i=0; while ! test -f /vol/done; do sleep 0.1; i=$((i+1)); test $i -gt 300 && exit 3; done;"
                      " cat /vol/msg; sleep 30").stdout.strip()
    try:
        writer = node.cli("run", "-d", "--network", "none", "-v", "shared:/vol", IMAGE, "sh", "-c",
                          "echo from-writer > /vol/msg && touch /vol/done; sleep 30").stdout.strip()
        deadline = time.monotonic() + 30
        while node.cli("logs", reader).stdout != "from-writer\n":
            assert time.monotonic() < deadline, node.cli("logs", reader).stdout
            time.sleep(0.2)
        # both running at once, one mount, two users counted
        running = node.cli("ps", "-q", "--no-trunc", "--filter", "volume=shared").stdout.split()
        assert sorted(running) == sorted([reader, writer])
        st = _inspect(stack, "shared")["Status"]
        assert st["mounts"] == 2 and st["attached"] == [stack.env.config.node]
        node.cli("rm", "-f", writer)
        assert _inspect(stack, "shared")["Status"]["mounts"] == 1
        assert node.cli("exec", reader, "cat", "/vol/msg").stdout == "from-writer\n"  # still mounted for it
    finally:
        node.cli("rm", "-f", reader)
    assert "used" not in _inspect(stack, "shared")["Status"]


def test_volumes_from_and_mount_syntax(stack):
    node = stack.node
    node.cli("run", "--name", "datactr", "--network", "none", "--volume-driver", "veritas",
             "-v", "datavol:/vol", IMAGE, "sh", "-c", "echo data > /vol/f")
    assert _inspect(stack, "datavol")["Driver"] == "veritas"  # made on first use, with the defaults
    out = node.cli(*RUN, "--volumes-from", "datactr", IMAGE, "sh", "-c",
                   "cat /vol/f; cat /proc/self/mountinfo").stdout
    assert out.startswith("data\n") and _fstype_at(out, "/vol") == "xfs"
    node.cli("rm", "datactr")

    out = node.cli(*RUN, "--mount", "type=volume,source=mvol,target=/data,volume-driver=veritas,"
                   "volume-opt=size=512m", IMAGE, "sh", "-c",
                   "echo m > /data/f && cat /data/f && cat /proc/self/mountinfo").stdout
    assert out.startswith("m\n") and _fstype_at(out, "/data") == "xfs"
    v = _inspect(stack, "mvol")
    assert v["Driver"] == "veritas" and v["Status"]["size"] == "512M"
    out = node.cli(*RUN, "--mount", "type=volume,source=mvol,target=/data,readonly", IMAGE,
                   "sh", "-c", "cat /data/f; touch /data/x", check=False)
    assert out.stdout == "m\n" and "Read-only file system" in out.stderr


def test_snapshot_and_remove(stack):
    node = stack.node
    free0 = _dg_free(stack)
    _create(stack, "vol1", "size=1g")
    ctr = node.cli("run", "-d", "--network", "none", "-v", "vol1:/vol", IMAGE, "sleep", "120").stdout.strip()
    try:
        node.cli("exec", ctr, "sh", "-c", "echo before > /vol/f")
        # a snapshot of the mounted, in-use volume: it has the data as it was when it was taken
        _create(stack, "snapvol1", "sourcevol=vol1", "cachesize=200m")
        node.cli("exec", ctr, "sh", "-c", "echo after > /vol/f && sync")
        out = node.cli(*RUN, "-v", "snapvol1:/snap", IMAGE, "sh", "-c",
                       "cat /snap/f; cat /proc/self/mountinfo").stdout
        assert out.startswith("before\n") and _fstype_at(out, "/snap") == "xfs"
        assert node.cli("exec", ctr, "cat", "/vol/f").stdout == "after\n"
    finally:
        node.cli("rm", "-f", ctr)
    snap = _inspect(stack, "snapvol1")["Status"]
    assert snap["sourcevol"] == "vol1" and snap["cachesize"] == "200M"
    assert "cache_used" in snap and snap["size"] == "1G"
    assert _inspect(stack, "vol1")["Status"]["snapshots"] == ["snapvol1"]
    # the snapshot is a volume of its own: writable, independent of its source
    node.cli(*RUN, "-v", "snapvol1:/snap", IMAGE, "sh", "-c", "echo snapwrite > /snap/g")
    assert node.cli(*RUN, "-v", "vol1:/vol", IMAGE, "sh", "-c", "cat /vol/f; test ! -e /vol/g").stdout == "after\n"

    p = node.cli("volume", "rm", "vol1", check=False)
    assert p.returncode != 0 and "has snapshots (snapvol1)" in p.stderr
    node.cli("volume", "rm", "snapvol1")
    node.cli("volume", "rm", "vol1")
    assert node.cli("volume", "ls", "-q").stdout.split() == []
    assert _dg_free(stack) == free0
