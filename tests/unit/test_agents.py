"""The agent core's decisions and the front ends' exit codes, without a Docker engine.

State mapping (every Docker state and health -> resource state), engine down -> offline, exit-code
tables of both front ends, meta-data and Types.cf against the attribute tables, bad input refused with
a clear message before anything is touched, and property tests of attribute parsing.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import container, daemon, ocf_front, registry, vcs_front
from agents.container import ContainerSpec, DockerContainer, classify, parse_run_options, parse_volumes
from agents.daemon import DaemonSpec, DockerDaemon
from agents.errors import ConfigError
from agents.fronts import agent_type
from agents.params import NAME_RE, check_name, parse_int
from agents.result import MonitorResult, State
from agents.watch import Pacemaker, Recording, Watcher

REPO = Path(__file__).resolve().parents[2]
KINDS = ("DockerContainer", "DockerDaemon", "RVGPrimary")


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "agent-state"
    monkeypatch.setenv("VERITAS_AGENT_STATE", str(d))
    return d


def spec(**kw: str) -> ContainerSpec:
    return ContainerSpec.parse({"name": "web", "image": "localbusybox:latest", **kw})


def inspect_doc(status: str, health: str | None = None, image: str = "localbusybox", exit_code: int = 0,
                mounts: list[dict[str, str]] | None = None) -> dict[str, object]:
    st_: dict[str, object] = {"Status": status, "ExitCode": exit_code}
    if health:
        st_["Health"] = {"Status": health}
    return {"Config": {"Image": image}, "State": st_, "Mounts": mounts or []}


# (Docker status, health) -> (state, confidence) with use_healthcheck on
TABLE = [
    ("running", None, State.ONLINE, 100),
    ("running", "healthy", State.ONLINE, 100),
    ("running", "starting", State.ONLINE, 60),
    ("running", "unhealthy", State.FAULTED, 0),
    ("paused", None, State.ONLINE, 20),
    ("paused", "healthy", State.ONLINE, 20),
    ("restarting", None, State.ONLINE, 10),
    ("created", None, State.OFFLINE, 0),
    ("exited", None, State.OFFLINE, 0),
    ("exited", "unhealthy", State.OFFLINE, 0),
    ("dead", None, State.OFFLINE, 0),
    ("removing", None, State.OFFLINE, 0),
]


@pytest.mark.parametrize(("status", "health", "state", "confidence"), TABLE)
def test_state_mapping(status: str, health: str | None, state: State, confidence: int) -> None:
    r = classify(inspect_doc(status, health), spec())
    assert (r.state, r.confidence) == (state, confidence), r.reason
    assert "web" in r.reason


def test_health_ignored_when_it_does_not_decide() -> None:
    s = spec(use_healthcheck="false")
    assert classify(inspect_doc("running", "unhealthy"), s) == MonitorResult.online(100, "container web is running")
    assert classify(inspect_doc("running", "starting"), s).confidence == 100


def test_missing_container_is_offline_and_unknown_status_unknown() -> None:
    assert classify(None, spec()).state is State.OFFLINE
    assert classify(inspect_doc("bogus"), spec()).state is State.UNKNOWN


def test_exit_code_in_reason() -> None:
    assert "exit code 137" in classify(inspect_doc("exited", exit_code=137), spec()).reason


def test_other_image_or_missing_veritas_volume_is_not_ours() -> None:
    assert classify(inspect_doc("running", image="nginx:1"), spec()).state is State.UNKNOWN
    s = spec(volumes="data:/data")
    local = [{"Type": "volume", "Name": "data", "Driver": "local", "Destination": "/data"}]
    assert classify(inspect_doc("running", mounts=local), s).state is State.UNKNOWN
    ours = [{"Type": "volume", "Name": "data", "Driver": "veritas", "Destination": "/data"}]
    assert classify(inspect_doc("running", mounts=ours), s).state is State.ONLINE


def test_engine_down_is_offline_not_error(tmp_path: Path) -> None:
    """Nothing at the socket, a file that is no socket, a socket nobody accepts on: all offline."""
    sock = tmp_path / "listening-nowhere.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))  # bound, never listening: connect is refused
    try:
        (tmp_path / "plain").write_text("")
        for path in (tmp_path / "absent.sock", tmp_path / "plain", sock):
            r = DockerContainer("r1", spec(docker_host=f"unix://{path}")).monitor()
            assert r.state is State.OFFLINE and "does not answer" in r.reason, (path, r)
            env = {"OCF_RESOURCE_INSTANCE": "r1", "OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img",
                   "OCF_RESKEY_docker_host": f"unix://{path}"}
            assert ocf_front.main("DockerContainer", ["monitor"], env) == ocf_front.OCF_NOT_RUNNING
            assert ocf_front.main("DockerContainer", ["stop"], env) == ocf_front.OCF_SUCCESS
    finally:
        s.close()


def test_ocf_exit_codes() -> None:
    assert ocf_front.monitor_code(MonitorResult.online(10, "")) == 0
    assert ocf_front.monitor_code(MonitorResult.online(100, "")) == 0
    assert ocf_front.monitor_code(MonitorResult.offline("")) == 7
    assert ocf_front.monitor_code(MonitorResult.faulted("")) == 1
    assert ocf_front.monitor_code(MonitorResult.unknown("")) == 1
    assert ocf_front.ERROR_CODES == {"config": 6, "args": 2, "installed": 5, "generic": 1}


@pytest.mark.parametrize(("confidence", "code"), [(1, 101), (10, 101), (11, 102), (20, 102), (30, 103),
                                                  (60, 106), (99, 110), (100, 110)])
def test_vcs_online_confidence_codes(confidence: int, code: int) -> None:
    assert vcs_front.monitor_code(MonitorResult.online(confidence, "")) == code


def test_vcs_other_codes() -> None:
    assert vcs_front.monitor_code(MonitorResult.offline("")) == 100
    assert vcs_front.monitor_code(MonitorResult.faulted("")) == 100  # VCS faults an unexpected offline
    assert vcs_front.monitor_code(MonitorResult.unknown("")) == 99


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_lists_every_attribute(kind: str) -> None:
    proc = subprocess.run([str(REPO / "agents" / "ocf" / kind), "meta-data"], capture_output=True, text=True,
                          check=False, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring(proc.stdout.split("\n", 2)[2])  # after the XML declaration and DOCTYPE
    assert root.tag == "resource-agent" and root.get("name") == kind
    assert root.findtext("version") == "1.0"
    t = agent_type(kind)
    got = [(p.get("name"), p.get("required"), p.find("content").get("type"), p.find("content").get("default"))
           for p in root.iter("parameter")]
    assert got == [(p.key, "1" if p.required else "0", p.kind, p.default) for p in t.params]
    for p in root.iter("parameter"):
        assert p.findtext("shortdesc") and p.findtext("longdesc")
    actions = {a.get("name") for a in root.iter("action")}
    assert {"start", "stop", "monitor", "validate-all", "meta-data"} <= actions
    assert ({"migrate_to", "migrate_from"} <= actions) == (kind == "DockerContainer")


def _types_cf(kind: str) -> tuple[list[str], dict[str, tuple[str, str]]]:
    text = (REPO / "agents" / "vcs" / kind / f"{kind}Types.cf").read_text()
    assert re.search(rf"^type {kind} \($", text, re.M)
    arglist = re.search(r"static str ArgList\[\] = \{ (.*) \}", text)
    assert arglist
    decl = {m.group(2): (m.group(1), (m.group(3) or "").strip('"'))
            for m in re.finditer(r"^    (str|int|boolean) (\w+)(?: = (\S+))?$", text, re.M)}
    return [a.strip() for a in arglist.group(1).split(",")], decl


@pytest.mark.parametrize("kind", KINDS)
def test_vcs_arglist_matches_types_cf(kind: str) -> None:
    arglist, decl = _types_cf(kind)
    t = agent_type(kind)
    assert arglist == [p.vcs for p in t.params]
    vcs_type = {"string": "str", "integer": "int", "boolean": "boolean"}
    for p in t.params:
        typ, default = decl[p.vcs]
        assert typ == vcs_type[p.kind], p.vcs
        want = ("1" if p.default == "true" else "0") if p.kind == "boolean" else p.default
        assert default == want, p.vcs
    for entry in vcs_front.ENTRIES:
        script = REPO / "agents" / "vcs" / kind / entry
        assert script.is_file() and os.access(script, os.X_OK), script


def test_vcs_arglist_positions_reach_the_right_attributes() -> None:
    t = agent_type("DockerContainer")
    vals = {"ContainerName": "web", "ImageName": "img:1", "Command": "sleep 5", "RunOptions": "--init",
            "Volumes": "v1:/d", "DockerHost": "unix:///x.sock", "StopTimeout": "7", "StartTimeout": "9",
            "RemoveOnOffline": "1", "UseHealthCheck": "0", "CheckCommand": "true"}
    argv = ["res1", *[vals[p.vcs] for p in t.params]]
    c = t.build(argv[0], {p.key: v for p, v in zip(t.params, argv[1:], strict=True)})
    assert (c.spec.name, c.spec.image, c.spec.command, c.spec.docker_host) == ("web", "img:1", ["sleep", "5"],
                                                                             "unix:///x.sock")
    assert (c.spec.stop_timeout, c.spec.start_timeout, c.spec.remove_on_offline, c.spec.use_healthcheck) == \
        (7, 9, True, False)
    assert c.spec.volumes == [container.VolumeMount("v1", "/d", False)] and c.spec.check_command == ["true"]


BAD_CONTAINER = [
    ({"OCF_RESKEY_image": "img"}, "name"),  # missing name
    ({"OCF_RESKEY_name": "web"}, "image"),  # missing image
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_stop_timeout": "ten"}, "stop_timeout"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_stop_timeout": "-1"}, "stop_timeout"),
    ({"OCF_RESKEY_name": "../../etc", "OCF_RESKEY_image": "img"}, "container name"),
    ({"OCF_RESKEY_name": "web; rm -rf /", "OCF_RESKEY_image": "img"}, "container name"),
    ({"OCF_RESKEY_name": "-rf", "OCF_RESKEY_image": "img"}, "container name"),
    ({"OCF_RESKEY_name": "$(reboot)", "OCF_RESKEY_image": "img"}, "container name"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img --privileged"}, "image"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_run_options": "--privileged"}, "refused"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_run_options": "-v /:/host"}, "refused"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_run_options": "--frobnicate"}, "unknown"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_volumes": "../x:/d"}, "volume name"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_volumes": "v:relative"}, "absolute"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_docker_host": "tcp://10.0.0.1:2375"},
     "unix socket"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_remove_on_offline": "maybe"}, "boolean"),
    ({"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_command": "sh -c 'unterminated"}, "split"),
]


@pytest.mark.parametrize(("env", "word"), BAD_CONTAINER)
@pytest.mark.parametrize("action", ["validate-all", "start", "stop", "monitor", "migrate_to"])
def test_bad_container_input_is_not_configured(env: dict[str, str], word: str, action: str, _state_dir: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad attributes: OCF 6 and a message naming the problem; no engine is reached, nothing recorded."""
    sock = tmp_path / "engine.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.listen(1)
    s.setblocking(False)
    full = {"OCF_RESOURCE_INSTANCE": "r1", "OCF_RESKEY_docker_host": f"unix://{sock}",
            "OCF_RESKEY_CRM_meta_migrate_target": "n2", **env}
    try:
        assert ocf_front.main("DockerContainer", [action], full) == ocf_front.OCF_ERR_CONFIGURED
        with pytest.raises(BlockingIOError):
            s.accept()  # nobody connected to the engine
    finally:
        s.close()
    err = capsys.readouterr().err
    assert err.startswith("ocf:veritas:DockerContainer:") and word in err, err
    assert not _state_dir.exists() or not list(_state_dir.iterdir())


@pytest.mark.parametrize(("env", "word"), [
    ({"OCF_RESKEY_binary": "dockerd"}, "absolute"),
    ({"OCF_RESKEY_args": "-H tcp://0.0.0.0:2375"}, "set by the agent"),
    ({"OCF_RESKEY_args": "--pidfile=/tmp/x"}, "set by the agent"),
    ({"OCF_RESKEY_pidfile": "/run/../etc/passwd"}, "pidfile"),
    ({"OCF_RESKEY_stop_timeout": "0"}, "stop_timeout"),
    ({"OCF_RESKEY_start_timeout": "1e9"}, "start_timeout"),
])
def test_bad_daemon_input_is_not_configured(env: dict[str, str], word: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("validate-all", "start", "stop", "monitor"):
        assert ocf_front.main("DockerDaemon", [action], {"OCF_RESOURCE_INSTANCE": "d1", **env}) == 6
        assert word in capsys.readouterr().err


def test_bad_resource_name_and_calls(capsys: pytest.CaptureFixture[str]) -> None:
    base = {"OCF_RESKEY_name": "web", "OCF_RESKEY_image": "img", "OCF_RESKEY_docker_host": "unix:///nonexistent"}
    assert ocf_front.main("DockerContainer", ["monitor"], {"OCF_RESOURCE_INSTANCE": "a/b", **base}) == 6
    assert "resource name" in capsys.readouterr().err
    ok = {"OCF_RESOURCE_INSTANCE": "r1", **base}
    assert ocf_front.main("DockerContainer", [], ok) == 2
    assert ocf_front.main("DockerContainer", ["promote"], ok) == 3
    assert ocf_front.main("DockerDaemon", ["migrate_to"], ok) == 3
    assert ocf_front.main("DockerContainer", ["migrate_to"], ok) == 2
    assert "migrate_target" in capsys.readouterr().err
    assert ocf_front.main("DockerContainer", ["migrate_from"], ok) == 2


def test_vcs_bad_input(capsys: pytest.CaptureFixture[str], _state_dir: Path) -> None:
    assert vcs_front.main("DockerContainer", "monitor", ["r1", "", "img"]) == 99
    assert "required" in capsys.readouterr().err
    assert vcs_front.main("DockerContainer", "online", ["r1", "web", "img", "", "--cap-add ALL"]) == 1
    assert "refused" in capsys.readouterr().err
    assert vcs_front.main("DockerContainer", "clean", ["r1", "9", "web", "img"]) == 1
    assert vcs_front.main("DockerContainer", "monitor", ["r1", *["x"] * 12]) == 99
    assert "ArgList" in capsys.readouterr().err
    assert vcs_front.main("DockerDaemon", "action", ["d1", "reboot"]) == 1
    assert not _state_dir.exists() or not list(_state_dir.iterdir())


def test_run_options_map_to_sdk_arguments() -> None:
    kw = parse_run_options("-e A=1 --env=B='two words' -l tier=web -p 127.0.0.1:8080:80 -p 53/udp "
                           "--restart on-failure:3 --init -w /srv -u 1000:1000 --hostname h1 --network none "
                           "-m 256m --cpus 0.5 --stop-signal SIGINT --health-cmd 'test -f /ok' "
                           "--health-interval 500ms --health-retries 2 --read-only --tmpfs /run:size=1m")
    assert kw == {"environment": ["A=1", "B=two words"], "labels": {"tier": "web"},
                  "ports": {"80/tcp": ("127.0.0.1", 8080), "53/udp": None},
                  "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 3}, "init": True,
                  "working_dir": "/srv", "user": "1000:1000", "hostname": "h1", "network": "none",
                  "mem_limit": "256m", "nano_cpus": 500_000_000, "stop_signal": "SIGINT",
                  "healthcheck": {"test": ["CMD-SHELL", "test -f /ok"], "interval": 500_000_000, "retries": 2},
                  "read_only": True, "tmpfs": {"/run": "size=1m"}}
    assert parse_run_options("--no-healthcheck")["healthcheck"] == {"test": ["NONE"]}


def test_volumes_parse() -> None:
    assert parse_volumes("a:/x, b:/y:ro\tc:/z:rw") == [container.VolumeMount("a", "/x", False),
                                                        container.VolumeMount("b", "/y", True),
                                                        container.VolumeMount("c", "/z", False)]
    for bad in ("a", "a:/x:rx", "a:/x a:/y", "a:/x b:/x", "a:/", "a:/x/../y"):
        with pytest.raises(ConfigError):
            parse_volumes(bad)


# -- properties of attribute parsing

@given(st.text(max_size=80))
def test_name_check_accepts_exactly_the_house_pattern(s: str) -> None:
    try:
        assert check_name("n", s) == s and NAME_RE.fullmatch(s)
    except ConfigError as exc:
        assert not NAME_RE.fullmatch(s) and "invalid" in str(exc)


@given(st.text(max_size=20))
def test_int_parse_is_total(s: str) -> None:
    try:
        n = parse_int("t", s, 0, 3600)
        assert 0 <= n <= 3600
    except ConfigError:
        pass


OPTION_WORDS = ["-e", "A=1", "--env", "--init", "--privileged", "-p", "80", "8080:80", "--restart", "always",
                "on-failure:x", "--cap-add", "ALL", "-v", "/:/h", "--read-only", "--network", "host", "-m", "1g",
                "--health-cmd", "true", "--health-interval", "1s", "2x", "--tmpfs", "/t", "--", "-", "=", "--x=y",
                "--user=0", "$(id)", "`id`", ";", "&&", "|", "\n", "--stop-signal", "KILL"]


REFUSED_SAMPLE = ["--privileged", "--cap-add", "-v", "--mount", "--device", "--pid", "--security-opt"]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(OPTION_WORDS), max_size=8), st.sampled_from(REFUSED_SAMPLE))
def test_run_options_parse_or_refuse(words: list[str], refused: str) -> None:
    """Any option line parses into SDK arguments or is refused with a ConfigError, never anything else;
    a refused option where an option stands (after a line that parses) refuses the whole line."""
    try:
        kw = parse_run_options(shlex.join(words))
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(kw, dict)
    with pytest.raises(ConfigError, match="refused"):
        parse_run_options(shlex.join([*words, refused, "x"]))
    with pytest.raises(ConfigError, match="refused"):
        parse_run_options(shlex.join([refused, "x", *words]))


names = st.from_regex(NAME_RE, fullmatch=True)
paths = st.lists(st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True), min_size=1, max_size=3).map(
    lambda p: "/" + "/".join(p))


@given(st.lists(st.tuples(names, paths, st.booleans()), max_size=4, unique_by=(lambda t: t[0], lambda t: t[1])))
def test_volumes_round_trip(vols: list[tuple[str, str, bool]]) -> None:
    text = ", ".join(f"{n}:{p}{':ro' if ro else ''}" for n, p, ro in vols)
    assert parse_volumes(text) == [container.VolumeMount(n, p, ro) for n, p, ro in vols]


# -- the daemon's identity, by the kernel's word

def test_daemon_identity_by_inode_and_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "d.pid"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--pidfile", str(pidfile)])
    try:
        pidfile.write_text(f"{proc.pid}\n")
        good = {"binary": os.path.realpath(sys.executable), "pidfile": str(pidfile),
                "socket": str(tmp_path / "none.sock"), "start_timeout": "1"}
        d = DockerDaemon("d1", DaemonSpec.parse(good))
        assert d.pid() == proc.pid
        r = d.monitor()
        assert r.state is State.ONLINE and r.confidence == daemon.STARTING_CONFIDENCE, r
        time.sleep(1.1)
        assert d.monitor().state is State.FAULTED  # alive past its start timeout, API silent: hung
        assert DockerDaemon("d1", DaemonSpec.parse({**good, "binary": "/bin/sleep"})).pid() is None
        other = tmp_path / "other.pid"
        other.write_text(f"{proc.pid}\n")
        assert DockerDaemon("d1", DaemonSpec.parse({**good, "pidfile": str(other)})).pid() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = DockerDaemon("d1", DaemonSpec.parse(good)).monitor()
    assert r.state is State.OFFLINE and "stale" in r.reason


def test_daemon_data_root_from_args() -> None:
    assert DaemonSpec.parse({}).data_root() == "/var/lib/docker"
    assert DaemonSpec.parse({"args": "--data-root /d1 --exec-root /e"}).data_root() == "/d1"
    assert DaemonSpec.parse({"args": "--data-root=/d2"}).data_root() == "/d2"


# -- the watcher's decisions

def test_watcher_notifies_once_and_only_when_expected_online(_state_dir: Path) -> None:
    rec = Recording()
    w = Watcher(rec, _state_dir)
    url = "unix:///x.sock"
    die = {"Action": "die", "Actor": {"Attributes": {"name": "web", "exitCode": "137"}}}
    registry.register("r1", "DockerContainer", "online", name="web", docker_host=url)
    w._on_event("unix:///other.sock", die)  # same name on another engine: not ours
    w._on_event(url, {"Action": "start", "Actor": {"Attributes": {"name": "web"}}})
    assert rec.calls == []
    w._on_event(url, die)
    w._on_event(url, die)
    assert [(r, why) for r, why, _ in rec.calls] == [("r1", "container web died (exit code 137)")]
    registry.expect_offline("r1")
    w._on_event(url, die)  # an intended stop
    assert len(rec.calls) == 1
    registry.register("r1", "DockerContainer", "online", name="web", docker_host=url)  # a new online
    w._on_event(url, {"Action": "health_status: unhealthy", "Actor": {"Attributes": {"name": "web"}}})
    assert rec.calls[-1][:2] == ("r1", "container web became unhealthy")


def test_pacemaker_notifier_argv() -> None:
    assert Pacemaker("node2").argv("grp-web") == ["crm_resource", "--fail", "--resource", "grp-web", "--node",
                                                  "node2"]


def test_watcher_reports_a_registered_daemon_process_exit_at_once(_state_dir: Path) -> None:
    """The daemon side of the watcher: a pidfd on the registered PID, read as soon as the process dies."""
    rec = Recording()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        registry.register("d1", "DockerDaemon", "online", pid=proc.pid, binary=os.path.realpath(sys.executable))
        with Watcher(rec, _state_dir, rescan=0.05):
            time.sleep(0.3)  # armed
            assert rec.calls == []
            t0 = time.monotonic()
            proc.kill()
            hit = rec.wait_for("d1", 5)
        assert hit is not None and f"pid {proc.pid} exited" in hit[1]
        assert hit[2] - t0 < 0.5
    finally:
        proc.kill()
        proc.wait()


def test_create_arguments_are_what_the_sdk_sends() -> None:
    """The container the agent creates, as the engine will get it: veritas volumes through the veritas
    driver, the owner label, the run options in the host config."""
    from docker.models.containers import _create_container_args

    s = spec(volumes="v1:/d:ro", command="sleep 5", run_options="--init -p 8080:80 --restart always -m 1g")
    kw = DockerContainer("r1", s)._create_kwargs()
    assert kw.pop("detach") is True
    args = _create_container_args({**kw, "version": "1.41"})
    hc = args["host_config"]
    assert hc["Mounts"] == [{"Target": "/d", "Source": "v1", "Type": "volume", "ReadOnly": True,
                             "VolumeOptions": {"DriverConfig": {"Name": "veritas"}}}]
    assert (hc["Init"], hc["Memory"], hc["RestartPolicy"]["Name"]) == (True, 1 << 30, "always")
    assert hc["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}
    assert args["labels"] == {"com.veritas.agent.resource": "r1"} and args["command"] == ["sleep", "5"]


def test_daemon_refuses_an_engine_that_is_not_its_own(tmp_path: Path) -> None:
    """Something answers pings on the configured socket but is not the pid file's dockerd: monitor says
    unknown and online, offline and clean refuse, starting and killing nothing."""
    import http.server
    import socketserver
    import threading

    class Ping(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a: object) -> None:
            pass

    class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def get_request(self):  # type: ignore[no-untyped-def]
            conn, _ = super().get_request()
            return conn, ("local", 0)

    sock = tmp_path / "foreign.sock"
    srv = UnixServer(str(sock), Ping)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        d = DockerDaemon("d1", DaemonSpec.parse({"socket": str(sock), "pidfile": str(tmp_path / "d.pid"),
                                                 "logfile": str(tmp_path / "d.log")}))
        r = d.monitor()
        assert r.state is State.UNKNOWN and "not the dockerd" in r.reason
        for res in (d.online(), d.offline(), d.clean(0)):
            assert not res.ok and "not the dockerd" in res.reason
        assert not (tmp_path / "d.log").exists()  # no dockerd was started
    finally:
        srv.shutdown()
        srv.server_close()
