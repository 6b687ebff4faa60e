"""`veritas migrate container` in a real lab (issue 11, "Offline migration"): the container moves with its
configuration and data, its volume is never mounted on two nodes at once, and every refusal changes
nothing.

One lab for the module: node1 and node2 share a site (one disk group), node3 is another site; short
leases. The MountSampler of test_failover reads every node's mount table ten times a second throughout.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_failover import IMAGE, MountSampler
from tests.cluster.test_lab import LAB, Lab, wait_for
from veritas.migrate import CONFIG_FIELDS, HOST_FIELDS

pytestmark = pytest.mark.integration

TTL, INTERVAL = 5.0, 0.5
SCRIPT = "trap 'exit 0' TERM; echo start >> /data/starts; while true; do sleep 0.1; done"


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    dir = Path(tempfile.mkdtemp(prefix="labmig-", dir="/tmp")) / "lab"
    lab = Lab(dir)
    sampler = None
    try:
        up = lab.run("up", "--nodes", "3", "--sites", "2", "--lease-ttl", f"{TTL:g}", "--lease-interval",
                     f"{INTERVAL:g}", timeout=240)
        hosts = {n["name"]: n["docker_host"] for n in json.loads(up.stdout)["nodes"]}
        sampler = MountSampler(lab).start()
        yield {"lab": lab, "hosts": hosts, "sampler": sampler}
        assert sampler.overlaps == [], sampler.overlaps
    finally:
        if sampler is not None:
            sampler.stop()
        if dir.exists():
            lab.run("down", check=False, timeout=240)
        os.rmdir(dir.parent) if dir.parent.exists() and not any(dir.parent.iterdir()) else None


def migrate(env: dict[str, Any], name: str, to: str, src: str = "node1", *extra: str) -> Any:
    return env["lab"].exec(src, "python3", "-m", "veritas.cli", "--json", "migrate", "container", name, "--to", to,
                           "--to-host", env["hosts"].get(to, "unix:///nonexistent.sock"), *extra, check=False,
                           timeout=120)


def inspect(lab: Lab, node: str, name: str) -> dict[str, Any] | None:
    r = lab.exec(node, "docker", "inspect", name, check=False)
    return json.loads(r.stdout)[0] if r.returncode == 0 else None


def carried(attrs: dict[str, Any]) -> dict[str, Any]:
    """What must be equal after a migration: the carried fields and the veritas mounts."""
    cfg, host = attrs["Config"], attrs["HostConfig"]
    return {"config": {k: cfg.get(k) for k in CONFIG_FIELDS}, "host": {k: host.get(k) for k in HOST_FIELDS},
            "mounts": sorted((m["Name"], m["Destination"], m["Driver"], m["RW"]) for m in attrs["Mounts"])}


def world(env: dict[str, Any]) -> dict[str, Any]:
    """Every node's containers (ID, state, start time) and every node's volume mounts (kernel's view)."""
    lab: Lab = env["lab"]
    out: dict[str, Any] = {}
    for node in ("node1", "node2", "node3"):
        ids = lab.exec(node, "docker", "ps", "-aq").stdout.split()
        docs = json.loads(lab.exec(node, "docker", "inspect", *ids).stdout) if ids else []
        out[node] = sorted((d["Name"], d["Id"], d["State"]["Status"], d["State"]["StartedAt"]) for d in docs)
    out["mounts"] = env["sampler"].once()
    return out


def attachment(lab: Lab, node: str, vol: str) -> Any:
    out = lab.exec(node, "docker", "volume", "inspect", "-f", "{{json .Status.attachment}}", vol).stdout.strip()
    return json.loads(out) if out and out != "<no value>" else None


def run_web(lab: Lab) -> None:
    lab.exec("node1", "docker", "volume", "create", "-d", "veritas", "-o", "size=100m", "webdata")
    lab.exec("node1", "docker", "run", "-d", "--name", "web", "--stop-timeout", "3", "-e", "A=1", "-e", "B=two words",
             "-l", "tier=web", "-l", "owner=ops", "--restart", "on-failure:3", "-p", "18080:80", "-w", "/data",
             "-u", "0:0", "-h", "webhost", "--entrypoint", "sh", "-v", "webdata:/data", "--volume-driver", "veritas",
             IMAGE, "-c", SCRIPT)


def test_migrate_moves_configuration_and_data_and_back(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    s: MountSampler = env["sampler"]
    run_web(lab)
    lab.exec("node1", "docker", "exec", "web", "sh", "-c", "echo token-1 > /data/f")
    before = inspect(lab, "node1", "web")
    assert before is not None and attachment(lab, "node1", "webdata")["node"] == "node1"
    t0 = time.time()
    r = migrate(env, "web", "node2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["from"], out["to"], out["volumes"], out["source"]) == ("node1", "node2", ["webdata"], "removed")
    assert inspect(lab, "node1", "web") is None  # removed once the target's ran
    after = inspect(lab, "node2", "web")
    assert after is not None and after["State"]["Running"] and after["Id"] != before["Id"]
    assert carried(after) == carried(before)
    got = lab.exec("node2", "docker", "exec", "web", "cat", "/data/f", "/data/starts").stdout.split()
    assert got == ["token-1", "start", "start"], got
    assert attachment(lab, "node2", "webdata")["node"] == "node2"
    # mounted on node2 only after node1 let go (the sampler fails the module on any overlap)
    off1, on2 = s.last("node1", "webdata"), s.first("node2", "webdata", t0)
    assert off1 is not None and on2 is not None and off1 < on2, (off1, on2)
    # and back, with --keep: the source's container stays, stopped and renamed
    lab.exec("node2", "docker", "exec", "web", "sh", "-c", "echo token-2 > /data/f")
    r = migrate(env, "web", "node1", "node2", "--keep")
    assert r.returncode == 0, r.stderr
    back = inspect(lab, "node1", "web")
    assert back is not None and back["State"]["Running"] and carried(back) == carried(before)
    assert lab.exec("node1", "docker", "exec", "web", "cat", "/data/f").stdout.strip() == "token-2"
    kept = [d for d in world(env)["node2"] if d[0].startswith("/web-migrated-")]
    assert len(kept) == 1 and kept[0][2] == "exited", kept
    lab.exec("node2", "docker", "rm", kept[0][1])


def refused(env: dict[str, Any], name: str, to: str, code: int, says: str, src: str = "node1") -> None:
    w0 = world(env)
    r = migrate(env, name, to, src)
    assert r.returncode == code and says in r.stderr, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("veritas: error: "), r.stderr
    assert world(env) == w0  # nothing changed, on any node


def test_unknown_container_is_refused(env: dict[str, Any]) -> None:
    refused(env, "nosuch", "node2", 3, "no container nosuch on this node's engine")


def test_a_container_without_veritas_volumes_is_refused(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    lab.exec("node1", "docker", "run", "-d", "--name", "plain", IMAGE, "sleep", "100000")
    refused(env, "plain", "node2", 2, "container plain is not veritas managed")
    lab.exec("node1", "docker", "run", "-d", "--name", "local", "-v", "mixv:/data", "--volume-driver", "veritas",
             "-v", "/tmp:/host", IMAGE, "sleep", "100000")  # a veritas volume, and a bind mount that stays here
    refused(env, "local", "node2", 2, "container local keeps data outside veritas volumes (bind /tmp at /host)")
    lab.exec("node1", "docker", "rm", "-f", "plain", "local")


def test_a_target_that_cannot_see_the_disk_group_is_refused(env: dict[str, Any]) -> None:
    refused(env, "web", "node3", 2, "node node3 holds no live lease in disk group dockerdg")  # another site
    refused(env, "web", "node9", 2, "node node9 holds no live lease")


def test_a_volume_the_target_holds_is_refused(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    lab.exec("node1", "docker", "volume", "create", "-d", "veritas", "-o", "size=100m", "heldvol")
    lab.exec("node1", "docker", "create", "--name", "held", "-v", "heldvol:/data", "--volume-driver", "veritas",
             IMAGE, "sleep", "100000")
    lab.exec("node2", "python3", "-m", "veritas.cli", "vol", "mount", "heldvol")
    wait_for(lambda: "heldvol" in env["sampler"].once().get("node2", {}), 20, "heldvol mounted on node2")
    refused(env, "held", "node2", 5, "volume heldvol is attached on node node2")
    assert attachment(lab, "node1", "heldvol")["node"] == "node2"
    lab.exec("node2", "python3", "-m", "veritas.cli", "vol", "umount", "heldvol")
    lab.exec("node1", "docker", "rm", "held")


def test_a_target_engine_without_the_image_is_refused(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    lab.exec("node1", "docker", "tag", IMAGE, "onlyhere:1")
    lab.exec("node1", "docker", "run", "-d", "--name", "lonely", "-v", "lonelyvol:/data", "--volume-driver", "veritas",
             "onlyhere:1", "sleep", "100000")
    refused(env, "lonely", "node2", 3, "image onlyhere:1 is not on node node2's engine")
    assert attachment(lab, "node1", "lonelyvol")["node"] == "node1"


def test_a_name_taken_on_the_target_is_refused(env: dict[str, Any]) -> None:
    lab: Lab = env["lab"]
    lab.exec("node2", "docker", "create", "--name", "lonely", IMAGE, "true")
    lab.exec("node2", "docker", "tag", IMAGE, "onlyhere:1")
    refused(env, "lonely", "node2", 4, "node node2's engine already has a container named lonely")
    lab.exec("node2", "docker", "rm", "lonely")


def test_a_failed_start_on_the_target_puts_the_container_back(env: dict[str, Any]) -> None:
    """node2's port 18080 is taken: the target's start fails, its container goes, the source runs again."""
    lab: Lab = env["lab"]
    lab.exec("node2", "docker", "run", "-d", "--name", "squat", "-p", "18080:80", IMAGE, "sleep", "100000")
    r = migrate(env, "web", "node2")
    assert r.returncode == 1 and "could not start on node node2" in r.stderr and "runs on this node again" in \
        r.stderr, r.stderr
    assert inspect(lab, "node2", "web") is None
    back = inspect(lab, "node1", "web")
    assert back is not None and back["State"]["Running"]
    assert attachment(lab, "node1", "webdata")["node"] == "node1"
    lab.exec("node2", "docker", "rm", "-f", "squat")


def daemon_agent(lab: Lab, node: str, x: Path, action: str, args: str = "") -> None:
    """The DockerDaemon agent's online/offline for the extra dockerd, run inside ``node``."""
    code = ("import shutil, sys; from agents.daemon import DaemonSpec, DockerDaemon; "
            f"s = DaemonSpec.parse({{'binary': shutil.which('dockerd'), 'args': {args!r}, 'socket': '{x}/d.sock', "
            f"'pidfile': '{x}/d.pid', 'logfile': '{x}/d.log'}}); r = DockerDaemon('t', s).{action}(); "
            "print(r.reason); sys.exit(0 if r.ok else 1)")
    lab.exec(node, "python3", "-c", code, timeout=120)


def test_migrate_daemon_moves_dockerd_on_its_volume_and_starts_what_ran(env: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    lab: Lab = env["lab"]
    monkeypatch.setenv("VERITAS_AGENT_STATE", str(lab.dir / "agents"))  # the agents' registry: the lab's own
    s: MountSampler = env["sampler"]
    x = lab.dir / "vxd"  # socket, pid file and exec root: the same paths on every node, as the seed's
    x.mkdir()
    veritas = ("python3", "-m", "veritas.cli")
    lab.exec("node1", *veritas, "vol", "make", "dv", "1g")
    lab.exec("node1", *veritas, "vol", "mount", "dv")
    root1 = lab.dir / "nodes" / "node1" / "mnt" / "dv_dockerdg" / "docker"
    daemon_agent(lab, "node1", x, "online", f"--data-root {root1} --exec-root {x}/exec --bridge none "
                 "--iptables=false --log-level=warn")
    d = ("docker", "-H", f"unix://{x}/d.sock")
    lab.exec("node1", "sh", "-c", f"docker save {IMAGE} | {' '.join(d)} load", timeout=120)
    lab.exec("node1", *d, "run", "-d", "--name", "c1", "--network", "none", IMAGE, "sh", "-c",
             "echo layer >> /layer; trap 'exit 0' TERM; while true; do sleep 0.1; done")
    lab.exec("node1", *d, "run", "--name", "c2", "--network", "none", IMAGE, "true")
    # refused, changing nothing: another site; a dockerd whose data root is not on a veritas volume
    r = lab.exec("node1", *veritas, "migrate", "daemon", "--to", "node3", "--pidfile", f"{x}/d.pid", check=False)
    assert r.returncode == 2 and "node node3 holds no live lease" in r.stderr, r.stderr
    r = lab.exec("node1", *veritas, "migrate", "daemon", "--to", "node2", "--pidfile",
                 str(lab.dir / "nodes" / "node1" / "docker.pid"), check=False)
    assert r.returncode == 2 and "is not on a veritas volume" in r.stderr, r.stderr
    assert lab.exec("node1", *d, "inspect", "-f", "{{.State.Running}}", "c1").stdout.strip() == "true"
    t0 = time.time()
    r = lab.exec("node1", *veritas, "--json", "migrate", "daemon", "--to", "node2", "--pidfile", f"{x}/d.pid",
                 "--logfile", f"{x}/d.log", "--via", f"{LAB} exec node2 --", check=False, timeout=240)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["arrived"]["node"] == "node2" and len(out["running"]) == 1, out
    pid = int((x / "d.pid").read_text())
    init2 = json.loads((lab.dir / "nodes" / "node2" / "pids.json").read_text())["init"][0]
    assert os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(f"/proc/{init2}/ns/mnt").st_ino  # dockerd on node2
    state = {c: lab.exec("node2", *d, "inspect", "-f", "{{.State.Status}}", c).stdout.strip() for c in ("c1", "c2")}
    assert state == {"c1": "running", "c2": "exited"}, state  # what ran runs again; what had exited stays so
    assert lab.exec("node2", *d, "exec", "c1", "cat", "/layer").stdout.split() == ["layer", "layer"]
    off1, on2 = s.last("node1", "dv"), s.first("node2", "dv", t0)
    assert off1 is not None and on2 is not None and off1 < on2, (off1, on2)
    daemon_agent(lab, "node2", x, "offline")
    lab.exec("node2", *veritas, "vol", "umount", "dv")
