"""An RVG's volumes are not removed or grown as if unreplicated, on either site, through the real CLI
and through the plugin's VolumeDriver Remove: a typed refusal naming the RVG, nothing changed, and
replication goes on as before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from plugin.app import create_app
from plugin.driver import Driver
from storage import rvgcli, volumes
from storage.replication import checkpoint, rvg
from tests.integration.conftest import REPO, Env
from tests.integration.twosites import RVG, Site, digest, live, poll, replicating_pair, synced_pair, write_marker
from tests.integration.twosites import sites as sites_fixture

sites = sites_fixture


def test_cli_rm_and_grow_of_replicated_volumes_are_refused_on_both_sites(sites: tuple[Site, Site]) -> None:
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        replicating_pair(a, b, dga)
        synced_pair(a, b, dga, dgb)
        img = live(dga)

        def state() -> tuple[object, ...]:
            return (dga.catalog.volume("v1"), dga.catalog.subdisks("v1"), os.stat(img).st_size,
                    rvg.get(dga, RVG), rvg.get(dgb, RVG), dgb.catalog.volume("v1"))
        before = state()
        for site, args, msg in (
                (a, ("vol", "rm", "v1"), "stoprep rvg1"),
                (a, ("vol", "rm", "--force", "v1"), "stoprep rvg1"),
                (a, ("vol", "grow", "v1", "640m"), "stoprep rvg1"),
                (b, ("vol", "rm", "v1"), "secondary of RVG rvg1"),
                (b, ("vol", "grow", "v1", "640m"), "secondary of RVG rvg1")):
            p = site.cli(*args, check=False, text=True)
            assert p.returncode == 5, (args, p.returncode, p.stderr)
            assert "RVG rvg1" in p.stderr and msg in p.stderr, (args, p.stderr)
            assert "Traceback" not in p.stderr
            assert state() == before, args
        # replication still works: a write on the primary reaches the secondary
        mnt = volumes.mount(dga, "v1")
        try:
            write_marker(mnt, "after-refusals")
        finally:
            volumes.umount(dga, "v1")
        synced_pair(a, b, dga, dgb)
    finally:
        dga.close()
        dgb.close()


def test_plugin_remove_of_a_replicated_volume_is_refused(env: Env) -> None:
    """VolumeDriver.Remove through the plugin's HTTP app (what `docker volume rm` sends), on the real disk
    group: a clear Err naming the RVG, and the volume, its image and its mountability stay."""
    drv = Driver(env.config)
    http = create_app(drv).test_client()

    def call(endpoint: str, body: dict[str, str]) -> dict[str, object]:
        return dict(http.post(f"/{endpoint}", data=json.dumps(body)).get_json())
    assert call("VolumeDriver.Create", {"Name": "v1", "Opts": {"size": "320m", "fstype": "xfs"}})["Err"] == ""
    p = subprocess.run([sys.executable, "-m", "veritas.cli", "rvg", "createpri", RVG, "v1", "64m"], cwd=REPO,
                       env={**os.environ, "VERITAS_CONFIG": str(env.config_path)}, capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    dg = drv.dg
    img = live(dg)
    before = (dg.catalog.volume("v1"), digest(img))
    err = str(call("VolumeDriver.Remove", {"Name": "v1"})["Err"])
    assert "RVG rvg1" in err and "stoprep rvg1" in err, err
    assert (dg.catalog.volume("v1"), digest(img)) == before
    assert [v["Name"] for v in call("VolumeDriver.List", {})["Volumes"]] == ["v1"]  # type: ignore[attr-defined]
    out = call("VolumeDriver.Mount", {"Name": "v1", "ID": "c1"})
    assert out["Err"] == "", out
    assert call("VolumeDriver.Unmount", {"Name": "v1", "ID": "c1"})["Err"] == ""


def test_takeover_refuses_a_primary_that_answers_wrongly_and_goes_on_only_by_force(sites: tuple[Site, Site]) -> None:
    """The real CLI on the secondary, the primary's link service running: a wrong key is a refusal
    (not "the primary is gone"), as is a primary answering with the right key, even with --force;
    nothing changes. --force then passes the wrong-key peer: the administrator vouches it is no primary."""
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        replicating_pair(a, b, dga)
        synced_pair(a, b, dga, dgb)
        wrong = b.root / "wrong.key"
        wrong.write_text("fedcba9876543210fedcba9876543210\n")

        def state() -> tuple[object, ...]:
            return (rvg.get(dga, RVG), rvg.get(dgb, RVG), dgb.catalog.volume("v1"),
                    [c.seq for c in checkpoint.list_checkpoints(dgb, RVG)])
        before = state()
        for args, key, code, msg in (
                (("takeover", RVG), wrong, 11, "takeover refused"),
                (("takeover", RVG), None, 5, "answers: use migrate"),
                (("takeover", RVG, "--force"), None, 5, "answers: use migrate")):
            p = b.cli("rvg", *args, key=key, check=False)
            assert p.returncode == code and msg in p.stderr, (args, p.returncode, p.stderr)
            assert state() == before, args
        p = b.cli("rvg", "takeover", RVG, key=wrong, check=False)
        assert "pre-shared key" in p.stderr and "--force" in p.stderr, p.stderr
        out = json.loads(b.cli("rvg", "takeover", RVG, "--force", key=wrong).stdout)
        assert rvg.get(dgb, RVG).role == "primary" and out["old_primary"] == a.addr
    finally:
        dga.close()
        dgb.close()


def test_repstatus_in_a_loop_while_the_service_switches_to_dcm_and_recovers(sites: tuple[Site, Site]) -> None:
    """repstatus (in-process and the real CLI) in a loop beside the primary's running service, through a
    link cut, the SRL's overflow into the DCM, and the resync once the secondary's service is back: no
    read fails, and none disturbs the service (it logs no error)."""
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    stop = threading.Event()
    errors: list[str] = []
    seen: list[dict[str, object]] = []
    try:
        volumes.make(dga, "v1", "320m", fstype="xfs")
        mnt = volumes.mount(dga, "v1")
        b.serve()
        a.serve(interval=0.3)
        a.cli("rvg", "createpri", RVG, "v1", "2m")
        a.cli("rvg", "addsec", RVG, a.addr, b.addr)
        a.cli("rvg", "startrep", RVG)
        synced_pair(a, b, dga, dgb)

        def in_process() -> None:
            dg = a.dg()
            try:
                while not stop.is_set():
                    try:
                        seen.append(rvgcli.status(dg, RVG))
                    except Exception as exc:  # the point of the test: report whatever it is
                        errors.append(f"status: {exc!r}")
            finally:
                dg.close()

        def by_cli() -> None:
            while not stop.is_set():
                p = a.cli("rvg", "repstatus", RVG, check=False)
                if p.returncode != 0:
                    errors.append(f"repstatus CLI: {p.stderr}")
        loops = [threading.Thread(target=in_process), threading.Thread(target=by_cli)]
        for t in loops:
            t.start()
        port = int(b.addr.rsplit(":", 1)[1])
        b.kill(b.procs[-1], signal.SIGTERM)  # the link is cut
        for i in range(6):  # more than the SRL holds, over several checkpoints
            write_marker(mnt, f"m{i}")
            (mnt / f"big{i}").write_bytes(os.urandom(1 << 20))
            os.sync()
            time.sleep(0.4)
        poll("the SRL to overflow into the DCM", lambda: any(s.get("dcm") for s in seen[-50:]), 20)
        b.serve(port=port)
        poll("the DCM resync", lambda: bool(seen) and seen[-1].get("dcm") is False
             and seen[-1].get("link") == "connected", 30)
        synced_pair(a, b, dga, dgb)
        stop.set()
        for t in loops:
            t.join(60)
        assert not errors, errors[:5]
        assert len(seen) > 100 and any(s["dcm"] for s in seen) and not seen[-1]["dcm"], len(seen)
        assert all(s["srl_used"] == 0 for s in seen if s["dcm"]), "entries counted beside the DCM"
        log = a.log()
        assert "No such file" not in log and "Traceback" not in log, log[-3000:]
    finally:
        stop.set()
        volumes.umount(dga, "v1", force=True)
        dga.close()
        dgb.close()
