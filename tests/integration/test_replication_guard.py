"""An RVG's volumes are not removed or grown as if unreplicated, on either site, through the real CLI
and through the plugin's VolumeDriver Remove: a typed refusal naming the RVG, nothing changed, and
replication goes on as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from plugin.app import create_app
from plugin.driver import Driver
from storage import volumes
from storage.replication import rvg
from tests.integration.conftest import REPO, Env
from tests.integration.twosites import RVG, Site, digest, synced_pair, write_marker
from tests.integration.twosites import sites as sites_fixture

sites = sites_fixture


def test_cli_rm_and_grow_of_replicated_volumes_are_refused_on_both_sites(sites: tuple[Site, Site]) -> None:
    a, b = sites
    dga, dgb = a.dg(), b.dg()
    try:
        volumes.make(dga, "v1", "320m", fstype="xfs")
        b.serve()
        a.serve()
        a.cli("rvg", "createpri", RVG, "v1", "64m")
        a.cli("rvg", "addsec", RVG, a.addr, b.addr)
        a.cli("rvg", "startrep", RVG)
        synced_pair(a, b, dga, dgb)
        sd = dga.catalog.subdisks("v1")[0]
        img = dga.image(sd.disk, "v1", sd.idx)

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
    sd = dg.catalog.subdisks("v1")[0]
    img = dg.image(sd.disk, "v1", sd.idx)
    before = (dg.catalog.volume("v1"), digest(img))
    err = str(call("VolumeDriver.Remove", {"Name": "v1"})["Err"])
    assert "RVG rvg1" in err and "stoprep rvg1" in err, err
    assert (dg.catalog.volume("v1"), digest(img)) == before
    assert [v["Name"] for v in call("VolumeDriver.List", {})["Volumes"]] == ["v1"]  # type: ignore[attr-defined]
    out = call("VolumeDriver.Mount", {"Name": "v1", "ID": "c1"})
    assert out["Err"] == "", out
    assert call("VolumeDriver.Unmount", {"Name": "v1", "ID": "c1"})["Err"] == ""
