"""The whole VolumeDriver API against a real running plugin, by property (hypothesis).

Requests are generated for every endpoint: names (existing, fresh, hostile, not strings), option maps
(known and unknown keys, good and bad values, values that are not strings), mount IDs, missing and
extra fields, JSON that is not an object, and bytes that are not JSON. Every answer must be JSON with
Docker's content type, HTTP 200, and no traceback or internal error. Every refused call must leave the
catalog (every table), the image files, the loop devices, the mounts and the mount root exactly as they
were; an accepted call is undone through the API (Remove, Unmount, Mount) and must then leave them as
they were too, so each case starts from the same state.

At least 2,000 cases run per run, from a random seed printed at the start (set VERITAS_HYPOTHESIS_SEED
to replay one). The plugin's configuration also sets [volume] defaults, which Create must apply.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests_unixsocket
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from requests.exceptions import ConnectionError as Dropped

from plugin.protocol import CONTENT_TYPE
from storage import diskgroup, volumes
from storage.config import load_config
from storage.kernel import loop, mounts
from tests.integration import conftest
from tests.integration.dockerstack import (
    DockerNode,
    PluginProcess,
    share_mount_root,
    unshare_mount_root,
    write_plugin_config,
)

CASES = int(os.environ.get("VERITAS_HYPOTHESIS_CASES") or 2000)
SEED = int(os.environ.get("VERITAS_HYPOTHESIS_SEED") or secrets.randbits(32))
# cheap defaults, so that accepted Creates without a size stay quick; fstype is what Create must apply
VOLUME_DEFAULTS = "[volume]\nsize = 320m\nfstype = ext4\n"

# the options Create documents (README), written out: the test states the API rather than importing it
ALL_OPTIONS = ("size", "layout", "fstype", "nmirror", "ncol", "maxiops", "protect", "sourcevol", "cachesize",
               "autogrow")
ENDPOINTS = ("Plugin.Activate", "VolumeDriver.Create", "VolumeDriver.Remove", "VolumeDriver.Mount",
             "VolumeDriver.Unmount", "VolumeDriver.Path", "VolumeDriver.Get", "VolumeDriver.List",
             "VolumeDriver.Capabilities")
FIELDS = {"VolumeDriver.Create": ("Name", "Opts"), "VolumeDriver.Remove": ("Name",),
          "VolumeDriver.Mount": ("Name", "ID"), "VolumeDriver.Unmount": ("Name", "ID"),
          "VolumeDriver.Path": ("Name",), "VolumeDriver.Get": ("Name",)}
# the state every case starts from: v1 mounted once (ID keep), p1 unmounted with a limit; both protected,
# so that no generated Remove may take them
BASE = {"v1": {"size": "320m", "protect": "true"}, "p1": {"size": "320m", "protect": "yes", "maxiops": "500"}}
BASE_MOUNTS = {("v1", "keep")}
HOSTILE = ["", " ", ".", "..", "../v1", "v1/..", "/etc", "a/b", "-x", "_x", ".x", "x" * 65, "v1\n", "v1\x00",
           "$(reboot)", "v1;rm", "*", "caf\u00e9", "\u202ev1", "v1 ", "\t"]

GOOD: dict[str, list[str]] = {
    "size": ["40m", "64m", "320m", "100p", "9g", "409600k"],
    "layout": ["concat", "auto", "mirror", "stripe", "mirror-stripe", "raid5"],
    "fstype": ["ext4", "xfs", "btrfs"],
    "nmirror": ["1", "2", "3"],
    "ncol": ["1", "2", "3"],
    "maxiops": ["0", "100", "500"],
    "protect": ["false", "no", "true"],
    "sourcevol": ["v1", "p1", "nosuch"],
    "cachesize": ["10m", "96m", "1t"],
    "autogrow": ["on", "off"],
}
BAD: dict[str, list[str]] = {
    "size": ["0", "-1g", "lots", "1.5.g", "1e3", "", " ", "0x10", "1.5", "99999999999999999999999p", "1_0g"],
    "layout": ["raid7", "", "Concat", "concat "],
    "fstype": ["zfs", "", "XFS", "ntfs"],
    "nmirror": ["0", "-1", "two", "2.5", "", "99", "99999999999999999999"],
    "ncol": ["0", "-1", "x", "", "99"],
    "maxiops": ["abc", "-5", "1.5", "", "1e9", "1_000", "\u0661\u0662", "99999999999999999999", "+5"],
    "protect": ["maybe", "2", "yes!"],
    "sourcevol": ["", "../v1", "v1/", "x" * 65],
    "cachesize": ["x", "0", "-1m", ""],
    "autogrow": ["maybe", "", "2"],
}

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                              st.dictionaries(st.text(max_size=6), c, max_size=3)),
                           max_leaves=6)
not_strings = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.lists(st.text(max_size=4), max_size=2), st.dictionaries(st.text(max_size=4),
                                                                                   st.text(max_size=4), max_size=2))
fresh_names = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,12}", fullmatch=True).filter(
    lambda n: ".." not in n and n not in BASE)
# weighted by repetition (one_of picks a branch uniformly): enough valid requests that Create, Mount and
# Unmount are accepted often, and so undone and checked, not only refused
existing = st.sampled_from(sorted(BASE))
names = st.one_of(existing, existing, fresh_names, fresh_names, fresh_names, st.sampled_from(HOSTILE),
                  st.text(max_size=70), not_strings)
mount_ids = st.one_of(st.sampled_from(["keep", "m1", "m2", "a" * 64]), st.sampled_from(["m1", "m2"]),
                      st.text(max_size=80), not_strings)


def _value(key: str) -> st.SearchStrategy[Any]:
    good = st.sampled_from(GOOD.get(key, ["x"]))
    return st.one_of(good, good, good, st.sampled_from(BAD.get(key, ["x"])), st.text(max_size=12))


known_pairs = st.sampled_from(ALL_OPTIONS).flatmap(lambda k: st.tuples(st.just(k), _value(k)))
option_pairs = st.one_of(known_pairs, known_pairs, known_pairs, known_pairs,
                         st.tuples(st.text(max_size=10), st.text(max_size=10)))
opts_maps = st.lists(option_pairs, max_size=3).map(dict)
opts_values = st.one_of(opts_maps, opts_maps, opts_maps, st.none(),
                        st.dictionaries(st.sampled_from(ALL_OPTIONS), not_strings, min_size=1, max_size=2),
                        st.lists(st.text(max_size=6), max_size=2), st.text(max_size=8), st.integers())


@dataclass
class Request:
    endpoint: str
    body: bytes
    fields: dict[str, Any] | None = None  # the decoded object, when the body is one

    def __repr__(self) -> str:
        return f"POST /{self.endpoint} {self.body[:300]!r}"


@st.composite
def requests(draw: st.DrawFn) -> Request:
    endpoint = draw(st.sampled_from(ENDPOINTS))
    fields: dict[str, Any] = {}
    if endpoint in FIELDS and draw(st.integers(0, 3)) == 0:
        # well-formed and mostly acceptable: a fresh name with good options, or a base volume
        create = endpoint == "VolumeDriver.Create"
        fields["Name"] = draw(fresh_names if create else existing)
        if create:
            keys = draw(st.lists(st.sampled_from(ALL_OPTIONS), max_size=3, unique=True))
            fields["Opts"] = {k: draw(st.sampled_from(GOOD[k])) for k in keys}
        if "ID" in FIELDS[endpoint]:
            fields["ID"] = draw(st.one_of(st.sampled_from(["keep", "m1"]), st.text(max_size=80)))
        return Request(endpoint, json.dumps(fields).encode(), fields)
    for key in FIELDS.get(endpoint, ()):
        strategy = {"Name": names, "ID": mount_ids, "Opts": opts_values}[key]
        if key == "Opts" and draw(st.integers(0, 5)) == 0:
            continue  # Opts is optional
        fields[key] = draw(strategy)
    kind = draw(st.sampled_from(["fields"] * 8 + ["missing", "extra", "not-object", "raw", "truncated"]))
    if kind == "missing" and fields:
        fields.pop(draw(st.sampled_from(sorted(fields))))
    elif kind == "extra":
        fields[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    elif kind == "not-object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return Request(endpoint, json.dumps(value).encode())
    elif kind == "raw":
        return Request(endpoint, draw(st.binary(max_size=40)))
    elif kind == "truncated":
        text = json.dumps(fields).encode()
        return Request(endpoint, text[:draw(st.integers(0, max(len(text) - 1, 0)))])
    return Request(endpoint, json.dumps(fields).encode(), fields)


# ---------------------------------------------------------------- the plugin and its state


@dataclass
class Fuzz:
    stack: conftest.Stack
    session: Any = field(default_factory=requests_unixsocket.Session)
    db: sqlite3.Connection | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def dg_root(self) -> Path:
        return self.stack.env.config.dg_parent / "dockerdg"

    def post(self, endpoint: str, body: bytes) -> dict[str, Any]:
        """POST as Docker does; the answer must be a protocol answer whatever the request was."""
        url = "http+unix://" + str(self.stack.plugin.socket).replace("/", "%2F") + "/" + endpoint
        resp = self.session.post(url, data=body, headers={"Content-Type": CONTENT_TYPE}, timeout=150)
        assert resp.status_code == 200, (resp.status_code, resp.text[:500])
        assert resp.headers.get("Content-Type", "").split(";")[0].strip() == CONTENT_TYPE, resp.headers
        assert "Traceback" not in resp.text and "<html" not in resp.text.lower(), resp.text[:2000]
        out = json.loads(resp.text)
        assert isinstance(out, dict), out
        message = out.get("Err", "")
        assert isinstance(message, str), out
        assert "internal error" not in message, message
        return out

    def ok(self, endpoint: str, fields: dict[str, Any]) -> dict[str, Any]:
        out = self.post(endpoint, json.dumps(fields).encode())
        assert not out.get("Err"), (endpoint, fields, out)
        return out

    def state(self) -> dict[str, Any]:
        """Catalog (every table, read-only), images, loop devices, mounts and mount root: a few ms."""
        if self.db is None:
            self.db = sqlite3.connect(f"file:{self.dg_root / 'catalog.db'}?mode=ro", uri=True, isolation_level=None)
        tables = [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        # a mount ID undone and redone (Unmount, Mount of keep) gets a new time, so does the attachment
        # that goes and comes with it, and the lease moves on with every renewal: compare who, not when
        cols = {"mount": "volume, node, mount_id", "attachment": "volume, node, wanted_by", "lease": "node, ttl"}
        catalog = {t: sorted(map(repr, self.db.execute(f'SELECT {cols.get(t, "*")} FROM "{t}"'))) for t in tables}
        images = sorted((e.path, e.stat().st_size, e.inode()) for d in os.scandir(self.dg_root / "disks")
                        for e in os.scandir(Path(d.path) / "vols"))
        prefix = str(self.stack.env.root) + "/"
        loops = sorted(f"{dev}={b}" for dev, b in loop.attached().items() if b.startswith(prefix))
        mnts = sorted((e.target, e.major_minor) for e in mounts.table() if e.target.startswith(prefix))
        root = self.stack.env.config.mount_root
        return {"catalog": catalog, "images": images, "loops": loops, "mounts": mnts,
                "mount_root": sorted(os.listdir(root))}


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    """dockerd (own namespace) and ``veritas plugin serve`` with [volume] defaults; the base volumes."""
    root = Path(tempfile.mkdtemp(prefix="vfuzz-", dir="/tmp"))
    node = DockerNode(root / "node1")
    path = write_plugin_config(root, node, extra=VOLUME_DEFAULTS)
    plugin = PluginProcess(path, node.plugins / "veritas.sock", root / "plugin.log")
    env = conftest.Env(root, path, load_config(path))
    f = Fuzz(conftest.Stack(env, node, plugin))
    try:  # as conftest.stack: a start that fails half-way still ends the engine and the shared mount root
        share_mount_root(root / "mnt")
        node.start()
        plugin.start()
        for name, opts in BASE.items():
            f.ok("VolumeDriver.Create", {"Name": name, "Opts": opts})
        for name, mount_id in BASE_MOUNTS:
            f.ok("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
        # the plugin's lease comes with its first renewal after the disk group exists, and with it the
        # attachment of what was mounted before: the base state is the settled one
        db = f.dg_root / "catalog.db"
        deadline = time.monotonic() + 20
        while True:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                attached = {r[0] for r in c.execute("SELECT volume FROM attachment WHERE node = 'node1'")}
            if attached >= {name for name, _ in BASE_MOUNTS}:
                break
            assert time.monotonic() < deadline, f"the plugin never attached its mounted volumes: {attached}"
            time.sleep(0.2)
        yield f
    finally:
        if f.db is not None:
            f.db.close()
        node.stop()
        plugin.stop()
        unshare_mount_root(root / "mnt")
        conftest.finish(env.config, root)


def devices_aside(state: dict[str, Any]) -> dict[str, Any]:
    """The state without loop device names and device numbers: backing files and mount targets only."""
    return {**state, "loops": sorted(x.split("=", 1)[1] for x in state["loops"]),
            "mounts": sorted(target for target, _ in state["mounts"])}


def _name(req: Request) -> Any:
    return (req.fields or {}).get("Name")


def undo(f: Fuzz, req: Request, out: dict[str, Any], before: dict[str, Any]) -> None:
    """Bring an accepted call's effect back to the base state through the API itself."""
    name, mount_id = _name(req), (req.fields or {}).get("ID")
    if req.endpoint == "VolumeDriver.Create" and name not in BASE:
        got = f.ok("VolumeDriver.Get", {"Name": name})["Volume"]
        assert got["Name"] == name, got
        if got["Status"]["protect"]:  # Docker cannot remove it, by design: the administrator does
            assert "protected" in f.post("VolumeDriver.Remove", json.dumps({"Name": name}).encode())["Err"]
            f.stack.env.cli("vol", "rm", "--force", name)
        else:
            f.ok("VolumeDriver.Remove", {"Name": name})
        f.counts["created"] = f.counts.get("created", 0) + 1
    elif req.endpoint == "VolumeDriver.Remove":
        raise AssertionError(f"Remove of protected volume {name!r} was accepted: {out}")
    elif req.endpoint == "VolumeDriver.Mount":
        assert out.get("Mountpoint") == str(f.stack.env.config.mount_root / f"{name}_dockerdg"), out
        if (name, mount_id) not in BASE_MOUNTS:
            f.ok("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
        f.counts["mounted"] = f.counts.get("mounted", 0) + 1
    elif req.endpoint == "VolumeDriver.Unmount" and (name, mount_id) in BASE_MOUNTS:
        f.ok("VolumeDriver.Mount", {"Name": name, "ID": mount_id})


def show(pytestconfig: pytest.Config, line: str) -> None:
    """Print to the run's own output, past pytest's capture, so that the CI log always has the seed."""
    capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if capman is None:
        print(line, flush=True)
        return
    with capman.global_and_fixture_disabled():
        print(f"\n{line}", flush=True)


def restore(f: Fuzz) -> None:
    """Back to the base state by the library, whatever a failed case left (for the next cases)."""
    dg = diskgroup.open_dg(f.stack.env.config, "dockerdg")
    try:
        for v in sorted(dg.catalog.volumes(), key=lambda v: v.snapshot_of is None):  # snapshots first
            for m in dg.catalog.mounts(v.name):
                if (v.name, m.mount_id) not in BASE_MOUNTS:
                    volumes.umount(dg, v.name, m.mount_id, force=v.name not in BASE)
            if v.name not in BASE:
                volumes.remove(dg, v.name, force=True)
        for name, mount_id in BASE_MOUNTS:
            volumes.mount(dg, name, mount_id)
    finally:
        dg.close()


def test_volume_driver_api_by_property(fuzz: Fuzz, pytestconfig: pytest.Config) -> None:
    line = (f"hypothesis seed: {SEED} ({CASES} cases; replay with VERITAS_HYPOTHESIS_SEED={SEED}"
            f" python3 -m pytest tests/integration/test_plugin_fuzz.py::test_volume_driver_api_by_property)")
    show(pytestconfig, line)
    base = fuzz.state()
    assert base["loops"] and base["mounts"] and base["catalog"]["volume"], base  # not vacuous
    started = time.monotonic()

    @seed(SEED)
    @settings(max_examples=CASES, deadline=None, derandomize=False, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(req=requests())
    def case(req: Request) -> None:
        note(f"seed {SEED}")
        fuzz.counts["cases"] = fuzz.counts.get("cases", 0) + 1
        try:
            check(req)
        except BaseException as exc:
            failures.append(f"{req!r}: {type(exc).__name__}: {str(exc)[:1500]}")
            restore(fuzz)  # so that hypothesis's replays and shrinking start from the base state again
            raise

    failures: list[str] = []

    def check(req: Request) -> None:
        if req.endpoint == "VolumeDriver.Get" and not req.body.strip():
            # the one request left unanswered: it is how Docker retries a Get whose connection broke,
            # and any answer would make Docker forget the volume (test_plugin_serve.py covers it)
            with pytest.raises(Dropped):
                fuzz.post(req.endpoint, req.body)
            fuzz.counts["Get dropped"] = fuzz.counts.get("Get dropped", 0) + 1
            assert fuzz.state() == base, f"unanswered {req!r} changed the state"
            return
        out = fuzz.post(req.endpoint, req.body)
        verdict = f"{req.endpoint.split('.')[1]} {'refused' if out.get('Err') else 'accepted'}"
        fuzz.counts[verdict] = fuzz.counts.get(verdict, 0) + 1
        if out.get("Err"):
            fuzz.counts["refused"] = fuzz.counts.get("refused", 0) + 1
            assert out["Err"].strip() and "\n" not in out["Err"], out
            assert fuzz.state() == base, f"refused {req!r} ({out['Err']}) changed the state"
            return
        undo(fuzz, req, out, base)
        after = fuzz.state()
        if req.endpoint == "VolumeDriver.Unmount" and after != base:
            # the base mount was undone and redone: the same volume on the same images and targets, but
            # the kernel may give it another loop device; that is the base from now on
            assert devices_aside(after) == devices_aside(base), f"accepted {req!r} ({out}), undone, changed state"
            base.clear()
            base.update(after)
        assert after == base, f"accepted {req!r} ({out}), undone, left the state changed"

    try:
        case()
    finally:
        summary = f"VolumeDriver property: {fuzz.counts} in {time.monotonic() - started:.0f} s (seed {SEED})"
        if failures:
            summary += f"; first failure: {failures[0]}"
        show(pytestconfig, summary)
    assert fuzz.counts["cases"] >= CASES
    assert fuzz.counts.get("refused", 0) > CASES // 4 and fuzz.counts.get("created", 0) > 0, fuzz.counts


# ---------------------------------------------------------------- examples the property must cover


def test_failed_snapshot_create_leaves_no_volume(fuzz: Fuzz) -> None:
    """Issue 7 item 5: a snapshot with a bad maxiops used to be made, and only then the limit refused."""
    before = fuzz.state()
    out = fuzz.post("VolumeDriver.Create", json.dumps({"Name": "snapx", "Opts": {"sourcevol": "v1",
                                                                                  "maxiops": "abc"}}).encode())
    assert "maxiops" in out["Err"], out
    assert fuzz.state() == before
    assert "no such volume" in fuzz.post("VolumeDriver.Get", b'{"Name": "snapx"}')["Err"]
    # a good limit is recorded with the snapshot itself
    fuzz.ok("VolumeDriver.Create", {"Name": "snapx", "Opts": {"sourcevol": "p1", "maxiops": "300"}})
    try:
        assert fuzz.ok("VolumeDriver.Get", {"Name": "snapx"})["Volume"]["Status"]["maxiops"] == 300
        fuzz.ok("VolumeDriver.Create", {"Name": "snapx", "Opts": {"sourcevol": "p1", "maxiops": "300"}})
        message = fuzz.post("VolumeDriver.Create", json.dumps(
            {"Name": "snapx", "Opts": {"sourcevol": "p1", "maxiops": "200"}}).encode())["Err"]
        assert "maxiops=300 (asked 200)" in message, message
    finally:
        fuzz.ok("VolumeDriver.Remove", {"Name": "snapx"})
    assert fuzz.state() == before


def test_create_applies_the_configured_volume_defaults(fuzz: Fuzz) -> None:
    """Issue 7 item 13: [volume] fstype (and size) of the config file are Create's defaults."""
    fuzz.ok("VolumeDriver.Create", {"Name": "dflt"})
    try:
        status = fuzz.ok("VolumeDriver.Get", {"Name": "dflt"})["Volume"]["Status"]
        assert (status["fstype"], status["size"]) == ("ext4", "320M"), status
        # asked for explicitly, another fstype wins over the default
        fuzz.ok("VolumeDriver.Create", {"Name": "xfs1", "Opts": {"fstype": "xfs"}})
        assert fuzz.ok("VolumeDriver.Get", {"Name": "xfs1"})["Volume"]["Status"]["fstype"] == "xfs"
    finally:
        for name in ("dflt", "xfs1"):
            fuzz.post("VolumeDriver.Remove", json.dumps({"Name": name}).encode())


def test_create_messages_give_sizes_in_human_units(fuzz: Fuzz) -> None:
    """Issue 7 item 14: what is needed and what is free, in human units, never a byte count."""
    before = fuzz.state()
    message = fuzz.post("VolumeDriver.Create", b'{"Name": "huge", "Opts": {"size": "100p"}}')["Err"]
    assert message.startswith("layout concat needs 1 disk with 100 PiB free; the largest free space on a disk of"
                              " dockerdg is "), message
    assert " GiB; " in message, message
    message = fuzz.post("VolumeDriver.Create", b'{"Name": "v1", "Opts": {"size": "500m"}}')["Err"]
    assert "size=320 MiB (asked 500m)" in message, message
    message = fuzz.post("VolumeDriver.Create",
                        b'{"Name": "s9", "Opts": {"sourcevol": "v1", "cachesize": "1t"}}')["Err"]
    assert "cachesize 1 TiB is larger than the source volume (320 MiB)" in message, message
    assert fuzz.state() == before
