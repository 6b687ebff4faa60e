"""Thin against thick: fio 4k random writes (QD32, direct) on fresh 1 GiB XFS volumes of one disk group.

    python3 -m bench.provisioning [--disk SPEC] [--runs N] [--runtime S]

``--disk`` is what ``dg init`` takes (an image file ``/path/d.img=4g``, the default under the bench's own
temp root, or a block device such as a zram device you made). Each run makes a fresh thin and a fresh
thick volume (alternating which goes first), runs fio once on each (the first writes) and once more on
the same files (rewrites: nothing left to allocate anywhere), and the same on a fresh file in the disk's
own filesystem, which is the figure a loop volume is measured against. One JSON line per figure:
the median IOPS and the spread of the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import log, sh
from storage import diskgroup, volumes
from storage.config import load_config
from storage.group import DiskSpec


def _fio(path: Path, runtime: int, size: str) -> float:
    out = sh("fio", "--name=rw", f"--filename={path}", "--rw=randwrite", "--bs=4k", "--iodepth=32",
             "--direct=1", "--ioengine=libaio", "--thread", f"--size={size}", f"--runtime={runtime}",
             "--time_based", "--output-format=json", timeout=runtime + 300)
    return float(json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", help="dg init's disk (default: a 4 GiB image file under the temp root)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="768m", help="fio file size inside each 1 GiB volume")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vbench-prov-", dir="/tmp"))
    log(f"root {root}")
    conf = root / "veritas.conf"
    conf.write_text(f"[storage]\ndiskgroup = provdg\nstate_root = {root}/state\nmount_root = {root}/mnt\n"
                    "[node]\nname = bench\n")
    cfg = load_config(conf)
    disk = a.disk or f"{root}/d1.img=4g"
    dg = diskgroup.init(cfg, "provdg", [DiskSpec.parse(disk)])
    res: dict[str, list[float]] = {k: [] for k in ("thin_first", "thick_first", "thin_rewrite", "thick_rewrite",
                                                    "disk_first", "disk_rewrite")}
    try:
        dname = dg.catalog.disks()[0].name
        for i in range(a.runs):
            order = ["thin", "thick", "disk"] if i % 2 == 0 else ["disk", "thick", "thin"]
            for kind in order:
                if kind == "disk":
                    target = dg.disk_dir(dname) / f"fio-{i}.dat"
                else:
                    name = f"{kind}{i}"
                    volumes.make(dg, name, "1g", fstype="xfs", provisioning=kind)
                    target = volumes.mount(dg, name) / "fio.dat"
                res[f"{kind}_first"].append(_fio(target, a.runtime, a.size))
                res[f"{kind}_rewrite"].append(_fio(target, a.runtime, a.size))
                target.unlink()
                if kind != "disk":
                    volumes.umount(dg, name)
                    volumes.remove(dg, name)
                log(f"run {i} {kind}: first {res[f'{kind}_first'][-1]:.0f} rewrite {res[f'{kind}_rewrite'][-1]:.0f}")
        for k, xs in res.items():
            print(json.dumps({"metric": f"randwrite_4k_qd32_{k}", "value": round(statistics.median(xs)),
                              "unit": "IOPS", "spread": [round(min(xs)), round(max(xs))], "runs": len(xs),
                              "disk": "block" if a.disk and not a.disk.partition("=")[2] else "image"}),
                  flush=True)
    finally:
        for v in dg.catalog.volumes():
            volumes.umount(dg, v.name, force=True)
            volumes.remove(dg, v.name, force=True)
        diskgroup.destroy(dg, force=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
