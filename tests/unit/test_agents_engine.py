"""agents.engine, the SDK-free inspect and ping of the monitor path, against a socket server that answers
as the engine does (or does not)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import engine
from agents.errors import AgentError
from agents.params import API_VERSION

Handler = Callable[[bytes], bytes | None]  # request -> raw reply (None: say nothing, hold the connection)


class FakeEngine:
    """A unix socket server: one reply per connection, then close, as the engine does for HTTP/1.0."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path, self.handler, self.requests = path, handler, []  # type: ignore[var-annotated]
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                req = b""
                while b"\r\n\r\n" not in req:
                    b = c.recv(4096)
                    if not b:
                        break
                    req += b
                self.requests.append(req)
                reply = self.handler(req)
                if reply is None:
                    time.sleep(1.5)
                    continue
                c.sendall(reply)

    def close(self) -> None:
        """Stop answering: the blocked accept wakes (shutdown), the socket file goes."""
        self.stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        self.path.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"unix://{self.path}"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Handler], FakeEngine]]:
    made: list[FakeEngine] = []

    def make(h: Handler) -> FakeEngine:
        e = FakeEngine(tmp_path / f"e{len(made)}.sock", h)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def http(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def test_inspect_returns_the_document_and_asks_the_versioned_path(serve: Callable[[Handler], FakeEngine]) -> None:
    e = serve(lambda req: http("200 OK", b'{"Id": "abc", "State": {"Status": "running"}}'))
    assert engine.inspect_container(e.url, "web.1", 2) == {"Id": "abc", "State": {"Status": "running"}}
    assert e.requests[0].startswith(f"GET /v{API_VERSION}/containers/web.1/json HTTP/1.0\r\n".encode())


def test_absent_container_is_none_and_an_error_status_keeps_the_engines_message(
        serve: Callable[[Handler], FakeEngine]) -> None:
    e = serve(lambda req: http("404 Not Found", b'{"message": "No such container: web"}'))
    assert engine.inspect_container(e.url, "web", 2) is None
    e2 = serve(lambda req: http("500 Internal Server Error", b'{"message": "driver veritas failed"}'))
    with pytest.raises(engine.EngineError, match="500: driver veritas failed") as ei:
        engine.inspect_container(e2.url, "web", 2)
    assert ei.value.status == 500


def test_an_engine_that_says_nothing_is_down_within_the_timeout(serve: Callable[[Handler], FakeEngine]) -> None:
    e = serve(lambda req: None)
    t0 = time.monotonic()
    with pytest.raises(engine.EngineDown, match="does not answer"):
        engine.inspect_container(e.url, "web", 0.3)
    assert time.monotonic() - t0 < 1.0
    assert engine.ping(e.url, 0.3) is False


def test_missing_socket_and_non_http_answers_are_down(tmp_path: Path, serve: Callable[[Handler], FakeEngine]) -> None:
    with pytest.raises(engine.EngineDown):
        engine.inspect_container(f"unix://{tmp_path}/absent.sock", "web", 1)
    e = serve(lambda req: b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(engine.EngineDown, match="no HTTP answer"):
        engine.inspect_container(e.url, "web", 1)
    e2 = serve(lambda req: http("200 OK", b"[1, 2]"))
    with pytest.raises(engine.EngineDown, match="not an object"):
        engine.inspect_container(e2.url, "web", 1)


def test_ping(serve: Callable[[Handler], FakeEngine]) -> None:
    ok = serve(lambda req: http("200 OK", b"OK", "text/plain") if req.startswith(b"GET /_ping ") else None)
    assert engine.ping(ok.url, 1) is True
    bad = serve(lambda req: http("503 Service Unavailable", b"starting", "text/plain"))
    assert engine.ping(bad.url, 1) is False


@pytest.mark.parametrize("name", ["", "../etc", "web/json?x=1", "a b", "web\r\nHost: x", "-web"])
def test_a_name_that_is_no_container_name_is_refused_before_asking(
        name: str, serve: Callable[[Handler], FakeEngine]) -> None:
    e = serve(lambda req: http("200 OK", b"{}"))
    with pytest.raises(AgentError, match="not a valid name"):
        engine.inspect_container(e.url, name, 1)
    assert e.requests == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=st.binary(max_size=300) | st.builds(lambda s, b: http(s, b), st.sampled_from(
    ["200 OK", "404 Not Found", "409 Conflict", "500 Oops", "200"]), st.binary(max_size=200)))
def test_whatever_the_engine_sends_the_answer_is_a_document_none_or_a_typed_error(
        reply: bytes, serve: Callable[[Handler], FakeEngine]) -> None:
    e = serve(lambda req: reply)
    try:
        doc = engine.inspect_container(e.url, "web", 1)
    except (engine.EngineDown, engine.EngineError):
        return
    assert doc is None or isinstance(doc, dict)


REPO = Path(__file__).resolve().parents[2]
RUNNING = (b'{"Id": "c1", "Config": {"Image": "busybox:latest"}, "Mounts": [], '
           b'"State": {"Status": "running", "Pid": 42, "ExitCode": 0}}')


def _ocf_env(url: str) -> dict[str, str]:
    import os

    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OCF_ROOT": "/usr/lib/ocf",
            "OCF_RESOURCE_INSTANCE": "r1", "OCF_RESKEY_name": "web", "OCF_RESKEY_image": "busybox",
            "OCF_RESKEY_docker_host": url}


@pytest.mark.parametrize("script,args", [("agents/ocf/DockerContainer", ["monitor"]),
                                         ("agents/vcs/DockerContainer/monitor",
                                          ["r1", "web", "busybox", "", "", "", "@URL@"])])
def test_a_monitor_imports_neither_site_packages_nor_the_docker_sdk(
        script: str, args: list[str], serve: Callable[[Handler], FakeEngine]) -> None:
    """The property the 50 ms monitor rests on: the entry script runs under -S and imports only the
    standard library and this package (checked in Python's own import log)."""
    import subprocess
    import sys

    e = serve(lambda req: http("200 OK", RUNNING))
    argv = [a.replace("@URL@", e.url) for a in args]
    r = subprocess.run([sys.executable, "-S", "-X", "importtime", str(REPO / script), *argv],
                       env=_ocf_env(e.url), capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode in (0, 110), r.stderr[-2000:]  # OCF running / VCS online at 100 %
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "agents" in imported
    assert not imported & {"docker", "requests", "urllib3", "site"}, sorted(imported)
    # nor the standard library's slow starters (agents.record says why): ~35 ms of a 50 ms budget
    assert not imported & {"typing", "dataclasses", "inspect", "pathlib", "urllib", "xml", "traceback"}, \
        sorted(imported)
    assert len(e.requests) == 1  # one inspect


def test_the_shebang_starts_without_site(tmp_path: Path) -> None:
    for f in [REPO / "agents" / "ocf" / "DockerContainer", REPO / "agents" / "ocf" / "DockerDaemon",
              *sorted((REPO / "agents" / "vcs").glob("*/[a-z]*"))]:
        assert f.read_text().splitlines()[0] == "#!/usr/bin/env -S python3 -S", f


def test_under_dash_s_an_action_that_needs_the_sdk_still_finds_it() -> None:
    import subprocess
    import sys

    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from agents import sdk; d = sdk.load(); "
            "print(d.errors.NotFound.__name__, d.types.Mount.__name__)")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.split() == ["NotFound", "Mount"], r.stderr


def test_without_the_sdk_start_is_not_installed_and_monitor_still_works(
        monkeypatch: pytest.MonkeyPatch, serve: Callable[[Handler], FakeEngine]) -> None:
    import sys

    from agents import ocf_front

    for mod in [m for m in sys.modules if m == "docker" or m.startswith("docker.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "docker", None)  # import docker -> ImportError
    e = serve(lambda req: http("200 OK", RUNNING) if b"/containers/web/json" in req else http("404 x", b"{}"))
    env = _ocf_env(e.url)
    assert ocf_front.main("DockerContainer", ["monitor"], env) == ocf_front.OCF_SUCCESS
    e2 = serve(lambda req: http("200 OK", RUNNING.replace(b"running", b"exited")))
    assert ocf_front.main("DockerContainer", ["start"], _ocf_env(e2.url)) == ocf_front.OCF_ERR_INSTALLED


def test_a_container_found_running_by_a_probe_is_adopted_for_the_watcher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[[Handler], FakeEngine]) -> None:
    """Pacemaker's probe finds the container up (the cluster restarted) and never runs start: monitor
    registers it, so the watcher follows it; an internal look (before a stop) does not."""
    from agents import registry
    from agents.container import from_attributes

    monkeypatch.setenv("VERITAS_AGENT_STATE", str(tmp_path / "reg"))
    e = serve(lambda req: http("200 OK", RUNNING))
    agent = from_attributes("r1", {"name": "web", "image": "busybox", "docker_host": e.url})
    assert registry.read("r1") is None
    agent.observe()
    assert registry.read("r1") is None
    assert agent.monitor().state.value == "online"
    rec = registry.read("r1")
    assert rec is not None and (rec["kind"], rec["expect"], rec["name"], rec["docker_host"]) == \
        ("DockerContainer", "online", "web", e.url)
    gen = rec["generation"]
    agent.monitor()
    assert registry.read("r1")["generation"] == gen  # type: ignore[index]  # unchanged: no rewrite per monitor
    registry.expect_offline("r1")
    agent.observe()
    assert registry.read("r1")["expect"] == "offline"  # type: ignore[index]


def test_a_dockerd_found_answering_is_adopted_with_its_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[[Handler], FakeEngine]) -> None:
    import subprocess
    import sys

    from agents import registry
    from agents.daemon import from_attributes

    monkeypatch.setenv("VERITAS_AGENT_STATE", str(tmp_path / "reg"))
    e = serve(lambda req: http("200 OK", b"OK", "text/plain"))
    pidfile = tmp_path / "docker.pid"
    # a stand-in dockerd: the configured binary, started with the agent's --pidfile, answering the ping
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--pidfile", str(pidfile)])
    try:
        pidfile.write_text(str(proc.pid))
        agent = from_attributes("d1", {"binary": sys.executable, "socket": str(e.path), "pidfile": str(pidfile)})
        assert agent.monitor().state.value == "online"
        rec = registry.read("d1")
        assert rec is not None and (rec["kind"], rec["expect"], rec["pid"]) == ("DockerDaemon", "online", proc.pid)
    finally:
        proc.kill()
        proc.wait()
        e.close()
    assert agent.monitor().state.value == "offline"
    assert registry.read("d1")["pid"] == proc.pid  # type: ignore[index]  # not re-registered when it is gone
