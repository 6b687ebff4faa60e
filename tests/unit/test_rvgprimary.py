"""RVGPrimary's decisions with the replication calls faked (the real ones: tests/integration/
test_rvgprimary.py): migrate when the primary answers, retried while it refuses, takeover only when it
is gone (twice) and allowed, never while it answers; offline and clean change no role; bad attributes
are not-configured errors in both front ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents import ocf_front, registry, vcs_front
from agents.rvgprimary import RVGPrimary, RvgSpec, make_primary
from storage.errors import InUse
from storage.replication.errors import AuthFailed, LinkError, OutOfDate


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "agent-state"
    monkeypatch.setenv("VERITAS_AGENT_STATE", str(d))
    return d


class FakeSite:
    """A secondary whose peer answers ``peers`` in turn (the last one repeats); migrate and takeover
    raise the next of ``migrate_errors`` / ``takeover_errors`` (None: success, the role flips). A peer
    "wrong key" answers but fails authentication (AuthFailed)."""

    def __init__(self, peers: list[str | None], migrate_errors: list[Exception | None] | None = None,
                 takeover_errors: list[Exception | None] | None = None, role: str = "secondary") -> None:
        self._role = role
        self.peers = peers
        self.migrate_errors = list(migrate_errors or [])
        self.takeover_errors = list(takeover_errors or [])
        self.calls: list[str] = []
        self.closed = False

    def role(self) -> str:
        return self._role

    def peer_role(self) -> str | None:
        self.calls.append("probe")
        if self.peers[0] == "wrong key":
            raise AuthFailed("the peer did not prove the pre-shared key")
        return self.peers.pop(0) if len(self.peers) > 1 else self.peers[0]

    def _do(self, what: str, errors: list[Exception | None]) -> dict[str, Any]:
        self.calls.append(what)
        err = errors.pop(0) if errors else None
        if err is not None:
            raise err
        self._role = "primary"
        return {"seq": 7}

    def migrate(self) -> dict[str, Any]:
        return self._do("migrate", self.migrate_errors)

    def takeover(self, autofb: bool) -> dict[str, Any]:
        return self._do(f"takeover autofb={autofb}", self.takeover_errors)

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.sleeps += 1


def spec(**kw: str) -> RvgSpec:
    return RvgSpec.parse({"rvg": "rvg1", **kw})


def run(site: FakeSite, sp: RvgSpec | None = None, deadline: float = 10.0) -> tuple[Any, Clock]:
    c = Clock()
    return make_primary(site, sp or spec(), deadline, clock=c, sleep=c.sleep), c


def test_already_primary_does_nothing() -> None:
    s = FakeSite([None], role="primary")
    res, _ = run(s)
    assert res.ok and s.calls == []


def test_primary_answering_means_migrate_never_takeover() -> None:
    s = FakeSite(["primary"])
    res, c = run(s)
    assert res.ok and "migrated" in res.reason and s.calls == ["probe", "migrate"] and c.sleeps == 0


def test_refused_migrate_is_retried_until_up_to_date() -> None:
    s = FakeSite(["primary"], migrate_errors=[OutOfDate("not up to date"), InUse("v1 is mounted"), None])
    res, c = run(s)
    assert res.ok and s.calls == ["probe", "migrate"] * 3 and c.sleeps == 2


def test_out_of_date_past_the_timeout_fails_and_never_takes_over() -> None:
    s = FakeSite(["primary"], migrate_errors=[OutOfDate("holds checkpoint 3, not 5")] * 100)
    res, c = run(s, deadline=5.0)
    assert not res.ok and "still secondary" in res.reason and "holds checkpoint 3" in res.reason
    assert not any(x.startswith("takeover") for x in s.calls) and c.t <= 5.0


def test_peer_gone_twice_means_takeover_with_autofb() -> None:
    s = FakeSite([None])
    res, c = run(s)
    assert res.ok and "took over" in res.reason
    assert s.calls == ["probe", "probe", "takeover autofb=True"] and c.sleeps == 1


def test_one_failed_probe_then_the_primary_answers_is_a_migrate() -> None:
    s = FakeSite([None, "primary"])
    res, _ = run(s)
    assert res.ok and s.calls == ["probe", "probe", "migrate"]


def test_autofb_attribute_reaches_takeover() -> None:
    s = FakeSite([None])
    res, _ = run(s, spec(autofb="false"))
    assert res.ok and s.calls[-1] == "takeover autofb=False" and "fbsync rvg1" in res.reason


def test_no_auto_takeover_fails_with_the_reason() -> None:
    s = FakeSite([None])
    res, _ = run(s, spec(auto_takeover="0"))
    assert not res.ok and "AutoTakeover is false" in res.reason and "veritas rvg takeover rvg1" in res.reason
    assert not any(x.startswith("takeover") for x in s.calls)


def test_takeover_refused_because_the_primary_answered_meanwhile_turns_into_migrate() -> None:
    s = FakeSite([None, None, "primary"], takeover_errors=[InUse("its primary answers: use migrate")])
    res, _ = run(s)
    assert res.ok and s.calls == ["probe", "probe", "takeover autofb=True", "probe", "migrate"]


def test_a_peer_with_the_wrong_key_answers_so_no_takeover() -> None:
    s = FakeSite(["wrong key"])
    res, c = run(s)
    assert not res.ok and "key does not match" in res.reason and s.calls == ["probe"] and c.sleeps == 0


def test_link_breaking_during_migrate_is_retried() -> None:
    s = FakeSite(["primary"], migrate_errors=[LinkError("link broke"), None])
    res, _ = run(s)
    assert res.ok and s.calls == ["probe", "migrate", "probe", "migrate"]


def test_both_secondary_waits_then_fails() -> None:
    s = FakeSite(["secondary"])
    res, _ = run(s, deadline=3.0)
    assert not res.ok and "secondary too" in res.reason and set(s.calls) == {"probe"}


def test_online_marks_offline_and_clean_unmark_without_touching_the_role() -> None:
    sites: list[FakeSite] = []

    def make(_spec: RvgSpec) -> FakeSite:
        sites.append(FakeSite(["primary"]))
        return sites[-1]

    a = RVGPrimary("res1", spec(wait_timeout="5"), site=make)
    assert a.online(30).ok and sites[0].closed
    rec = registry.read("res1")
    assert rec is not None and rec["expect"] == "online" and rec["kind"] == "RVGPrimary" and a._mark() is not None
    assert a.offline().ok and a._mark() is None and len(sites) == 1  # no site opened: no role change
    assert a.clean(4).ok and len(sites) == 1


@pytest.mark.parametrize(("env", "word"), [
    ({}, "rvg"),
    ({"OCF_RESKEY_rvg": "bad name"}, "invalid"),
    ({"OCF_RESKEY_rvg": "rvg1", "OCF_RESKEY_auto_takeover": "maybe"}, "boolean"),
    ({"OCF_RESKEY_rvg": "rvg1", "OCF_RESKEY_config": "etc/relative.conf"}, "absolute"),
    ({"OCF_RESKEY_rvg": "rvg1", "OCF_RESKEY_config": "/nonexistent/veritas.conf"}, "does not exist"),
    ({"OCF_RESKEY_rvg": "rvg1", "OCF_RESKEY_wait_timeout": "0"}, "out of range"),
])
@pytest.mark.parametrize("action", ["validate-all", "start", "stop", "monitor"])
def test_bad_input_is_not_configured(env: dict[str, str], word: str, action: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    full = {"OCF_RESOURCE_INSTANCE": "r1", **env}
    code = ocf_front.main("RVGPrimary", [action], full)
    err = capsys.readouterr().err
    if action == "stop" and word == "does not exist":
        assert code == ocf_front.OCF_SUCCESS  # stop reads no configuration: it changes no role
        return
    assert code == ocf_front.OCF_ERR_CONFIGURED and word in err, err


def test_vcs_bad_input_is_unknown_for_monitor_and_failure_otherwise(capsys: pytest.CaptureFixture[str]) -> None:
    assert vcs_front.main("RVGPrimary", "monitor", ["r1", "rvg1", "", "/nonexistent/v.conf"]) == 99
    assert vcs_front.main("RVGPrimary", "online", ["r1", ""]) == 1
    assert vcs_front.main("RVGPrimary", "offline", ["r1", "rvg1"]) == 0
    assert "does not exist" in capsys.readouterr().err
