"""Directory disks: a directory on a reflink-capable filesystem the host already has, used as a disk with
no loop device or filesystem of its own. The host filesystem is XFS (reflink=1) on a zram device this
test creates and removes again (by the number it was given); ext4 and tmpfs directories are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import diskgroup, doctor, snapshots, volumes
from storage.config import load_config
from storage.diskgroup import DiskSpec
from storage.errors import InvalidArgument, NoSpace, SharedFailureDomain
from storage.kernel import loop, mounts
from tests.integration.conftest import Env, destroy_all, force_clean, leaks, write_config
from tests.integration.dockerstack import IMAGE

DG = "dirdg"


class Host:
    """A test root with XFS (reflink=1) on a zram device of our own mounted at ``xfs``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vdir-", dir="/tmp"))
        self.xfs = self.root / "xfs"
        self.mounted: list[Path] = []
        self.loops: list[str] = []  # loop devices this test attached for filesystems of its own
        self.zram: int | None = None

    def start(self) -> None:
        self.zram = int(Path("/sys/class/zram-control/hot_add").read_text().strip())
        assert self.zram != 0, "hot_add gave zram0, which belongs to the machine"
        Path(f"/sys/block/zram{self.zram}/disksize").write_text("3G")
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", f"/dev/zram{self.zram}"], check=True)
        self.mount(["-t", "xfs", f"/dev/zram{self.zram}"], self.xfs)

    def mount(self, args: list[str], target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(target)], check=True)
        self.mounted.append(target)

    def stop(self) -> list[str]:
        """Unmount what this host mounted and remove its zram device. Loop devices still backed by files
        on that device are this test's by construction (the device is ours): they are detached first,
        so a failed test cannot strand the zram device."""
        problems = []
        if self.zram is not None:
            num = os.stat(f"/dev/zram{self.zram}").st_rdev
            for dev in loop.attached():
                ident = loop.backing_id(dev)
                if ident is not None and ident[:2] == (os.major(num), os.minor(num)):
                    problems.append(f"loop {dev} on a file of the test's XFS left attached")
                    subprocess.run(["umount", "-l", dev], capture_output=True, check=False)
                    loop.detach(dev)
        for target in reversed(self.mounted):
            proc = subprocess.run(["umount", str(target)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                problems.append(f"umount {target}: {proc.stderr.strip()}")
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        for dev in self.loops:
            subprocess.run(["btrfs", "device", "scan", "--forget", dev], capture_output=True, check=False)
            loop.detach(dev)
        if self.zram is not None:
            for _ in range(50):  # a lazily unmounted filesystem lets go of its device a moment later
                try:
                    Path("/sys/class/zram-control/hot_remove").write_text(str(self.zram))
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                problems.append(f"zram{self.zram} could not be removed")
        return problems

    def dirs(self, *names: str) -> list[Path]:
        out = []
        for n in names:
            (self.xfs / n).mkdir(parents=True, exist_ok=True)
            out.append(self.xfs / n)
        return out


@pytest.fixture
def host() -> Iterator[tuple[Host, Env]]:
    h = Host()
    path = write_config(h.root, diskgroup=DG)
    e = Env(h.root, path, load_config(path))
    try:
        h.start()
        yield h, e
    finally:
        problems = destroy_all(e.config)
        own = {f"mount {t}" for t in h.mounted}  # the host's own filesystems, removed by h.stop
        left = [x for x in leaks(h.root) if x not in own and x.split(" -> ")[0] not in
                {f"loop {dev}" for dev in h.loops}]
        problems += h.stop()
        force_clean(h.root)
        shutil.rmtree(h.root, ignore_errors=True)
        if problems or left:
            pytest.fail("teardown found leaks or failures: " + "; ".join(problems + left))


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def ours_attached(under: Path) -> list[str]:
    return sorted(dev for dev, back in loop.attached().items() if back.startswith(str(under) + "/"))


def test_cli_init_on_two_directories_warns_and_a_mirror_across_them_needs_force(host):
    h, e = host
    d1, d2 = h.dirs("srv/d1", "srv/d2")
    proc = e.cli("dg", "init", DG, f"{d1}=1g", f"{d2}=1g")
    assert "warning" in proc.stderr and "one failure domain" in proc.stderr, proc.stderr
    assert "device" in proc.stderr and "xfs" in proc.stderr, proc.stderr
    dg = e.open(DG)
    try:
        disks = dg.catalog.disks()
        assert [(d.kind, d.source, d.size) for d in disks] == [("dir", str(d1), 1024**3), ("dir", str(d2), 1024**3)]
        for d, src in zip(disks, (d1, d2), strict=True):
            ident = json.loads((src / ".veritas-disk").read_text())
            assert ident == {"dg": DG, "dg_uuid": dg.catalog.diskgroup().uuid, "disk": d.name}
            assert (src / "vols").is_dir()
            assert mounts.mounted_at(dg.disk_dir(d.name)) is None  # no filesystem of our own
            assert not list(src.glob(".veritas-probe*")), "the reflink probe files were left behind"
        assert not ours_attached(h.xfs), "a directory disk has no loop device"
    finally:
        dg.close()
    refused = e.cli("vol", "make", "-g", DG, "m1", "200m", "layout=mirror", check=False)
    assert refused.returncode == 2, refused
    assert "failure domain" in refused.stderr and "--force" in refused.stderr, refused.stderr
    dg = e.open(DG)
    try:
        assert dg.catalog.volume("m1") is None
        assert not list((d1 / "vols").iterdir()) and not list((d2 / "vols").iterdir())
        # auto does not make a mirror that is none: it falls back to concat
        assert volumes.make(dg, "a1", "100m", layout="auto").layout == "concat"
    finally:
        dg.close()
    e.cli("vol", "make", "-g", DG, "m1", "200m", "layout=mirror", "--force")
    dg = e.open(DG)
    try:
        v = dg.catalog.volume("m1")
        assert v is not None and v.layout == "mirror"
        assert sorted(sd.disk for sd in dg.catalog.subdisks("m1")) == [d.name for d in dg.catalog.disks()]
        assert (d1 / "vols" / "m1.0.img").exists() or (d1 / "vols" / "m1.1.img").exists()
    finally:
        dg.close()


def _vol_list(e: Env) -> dict[str, dict[str, str]]:
    """`veritas vol list` read by column name: volume name -> {column: value}."""
    lines = e.cli("vol", "list", "-g", DG).stdout.splitlines()
    head = lines[0].split()
    return {row[0]: dict(zip(head, row, strict=True)) for row in (ln.split() for ln in lines[1:])}


def test_a_group_made_with_force_accepts_mirrors_in_one_domain_and_says_so(host):
    """`dg init --force` records, for the group, that its directory disks of one filesystem may hold a
    mirror's copies: vol make (no --force, as a Docker Create cannot pass one) makes the mirror with a
    warning, and vol list / vol info say its copies share one failure domain. layout=auto still makes a
    concat there, and a group made without --force keeps refusing."""
    h, e = host
    d1, d2, d3, d4 = h.dirs("a/d1", "a/d2", "b/d3", "b/d4")
    proc = e.cli("dg", "init", "--force", DG, f"{d1}=1g", f"{d2}=1g")
    assert "one failure domain" in proc.stderr and "accepts mirrors" in proc.stderr, proc.stderr
    made = e.cli("vol", "make", "-g", DG, "m1", "200m", "layout=mirror")
    assert "warning" in made.stderr and "failure domain" in made.stderr and "lost together" in made.stderr, \
        made.stderr
    assert "failure_domain: its copies share one failure domain" in made.stdout, made.stdout
    e.cli("vol", "make", "-g", DG, "c1", "100m", "layout=concat")
    dg = e.open(DG)
    try:
        assert dg.catalog.diskgroup().accept_shared_domain is True
        assert sorted(sd.disk for sd in dg.catalog.subdisks("m1")) == [d.name for d in dg.catalog.disks()]
        assert volumes.make(dg, "a1", "100m", layout="auto").layout == "concat"
        info = volumes.info(dg, "m1")
        assert info["shared_domain"].startswith("its copies share one failure domain: disks ")
        assert "xfs" in info["shared_domain"], info["shared_domain"]
        assert volumes.info(dg, "c1")["shared_domain"] is None
        volumes.mount(dg, "m1", "t")
        write_synced(dg.mountpoint("m1") / "f", b"data")
        volumes.umount(dg, "m1", "t")
    finally:
        dg.close()
    rows = _vol_list(e)
    assert rows["m1"]["COPIES"] == "shared-domain" and rows["c1"]["COPIES"] == "-", rows
    listed = json.loads(e.cli("--json", "vol", "list", "-g", DG).stdout)
    assert [r["name"] for r in listed if r["shared_domain"]] == ["m1"], listed
    # a group made without --force on directories of one filesystem refuses, as before: nothing made
    e.cli("dg", "init", "otherdg", f"{d3}=1g", f"{d4}=1g")
    refused = e.cli("vol", "make", "-g", "otherdg", "m2", "200m", "layout=mirror", check=False)
    assert refused.returncode == 2 and "--force" in refused.stderr, refused
    other = e.open("otherdg")
    try:
        assert other.catalog.diskgroup().accept_shared_domain is False
        assert other.catalog.volume("m2") is None and not list((d3 / "vols").iterdir())
    finally:
        other.close()


def test_docker_mirror_on_the_embedded_default_of_a_reflink_state_root(host):
    """The vendor's procedure, `docker volume create -d veritas -o layout=mirror`, on a host whose state
    root has reflink: the embedded default's two directory disks share its filesystem, and Docker cannot
    pass --force. The mirror is made, the plugin's log warns, and `docker volume inspect` says its
    copies share one failure domain."""
    from tests.integration.dockerstack import DockerNode, PluginProcess, share_mount_root, unshare_mount_root

    h, e = host
    node = DockerNode(h.root / "node1")
    path = h.root / "xfs-state.conf"
    path.write_text(f"[storage]\ndiskgroup = dockerdg\nstate_root = {h.xfs}/state\nmount_root = {h.root}/mnt\n"
                    "default_disk_size = 1g\ndefault_disk_count = 2\n[node]\nname = node1\n"
                    f"[plugin]\nsocket = {node.plugins}/veritas.sock\ndocker_host = {node.url}\nworkers = 2\n")
    cfg = load_config(path)
    plugin = PluginProcess(path, node.plugins / "veritas.sock", h.root / "plugin.log")
    try:
        share_mount_root(h.root / "mnt")
        node.start()
        plugin.start()
        made = node.cli("volume", "create", "-d", "veritas", "--name", "mv", "-o", "layout=mirror",
                        "-o", "size=300m", check=False)
        assert made.returncode == 0, made.stderr
        status = node.client().volumes.get("mv").attrs["Status"]
        assert status["layout"] == "mirror", status
        assert status["failure_domain"].startswith("its copies share one failure domain: disks dockerdg"), status
        log = (h.root / "plugin.log").read_text()
        assert "WARNING" in log and "accepts copies in one failure domain" in log, log[-2000:]
        out = node.cli("run", "--rm", "--network", "none", "-v", "mv:/data", IMAGE, "sh", "-c",
                       "echo hi > /data/f && cat /data/f")
        assert out.stdout.strip() == "hi"
        dg = diskgroup.DiskGroup(cfg, "dockerdg")
        try:
            assert dg.catalog.diskgroup().accept_shared_domain is True
            assert [d.kind for d in dg.catalog.disks()] == ["dir", "dir"]
        finally:
            dg.close()
        node.cli("volume", "rm", "mv")
    finally:
        node.stop()
        plugin.stop()
        unshare_mount_root(h.root / "mnt")
        assert destroy_all(cfg) == []


def test_library_mirror_refused_in_one_domain_accepted_across_two(host):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    dg = diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3), DiskSpec(d2, 1024**3)])
    try:
        with pytest.raises(SharedFailureDomain):
            volumes.make(dg, "m1", "200m", layout="mirror")
        assert dg.shared_domains() and dg.shared_domains()[0][1] == [d.name for d in dg.catalog.disks()]
        # an image-file disk is a failure domain of its own: a mirror needs no force then
        dg.add_disks([DiskSpec(e.disk_image("other"), 1024**3)])
        v = volumes.make(dg, "m1", "200m", layout="mirror")
        disks = {d.name: d.kind for d in dg.catalog.disks()}
        assert sorted(disks[sd.disk] for sd in dg.catalog.subdisks(v.name)) == ["dir", "file"]
    finally:
        dg.close()


def test_concat_and_mirror_volumes_mount_write_snapshot_and_doctor_is_clean(host):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    dg = diskgroup.init(e.config, DG, [DiskSpec(d1, 1200 * 1024**2), DiskSpec(d2, 1200 * 1024**2)])
    try:
        volumes.make(dg, "c1", "400m", layout="concat")
        volumes.make(dg, "m1", "200m", layout="mirror", force=True)
        assert dg.catalog.volume("c1").fstype == "xfs" and dg.catalog.volume("m1").fstype == "btrfs"
        data = {}
        for name in ("c1", "m1"):
            volumes.mount(dg, name, "t")
            data[name] = os.urandom(1 << 20)
            write_synced(dg.mountpoint(name) / "data", data[name])
        sd = dg.catalog.subdisks("c1")[0]
        img = Path(dg.catalog.disks()[[d.name for d in dg.catalog.disks()].index(sd.disk)].source) / "vols"
        assert (img / "c1.0.img").exists(), "the image lives in the directory itself"
        for name in ("c1", "m1"):
            snapshots.make(dg, name, f"{name}-s")
            write_synced(dg.mountpoint(name) / "data", b"changed")
            volumes.mount(dg, f"{name}-s", "t")
            assert (dg.mountpoint(f"{name}-s") / "data").read_bytes() == data[name]
        assert doctor.check(dg) == []
        for name in ("c1", "m1", "c1-s", "m1-s"):
            volumes.umount(dg, name, "t")
        assert doctor.check(dg) == []
    finally:
        dg.close()


def test_doctor_finds_an_orphan_image_on_a_directory_disk_and_leaves_others_files_alone(host):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    dg = diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3), DiskSpec(d2, 1024**3)])
    foreign = h.xfs / "someone-else.img"  # the same filesystem, not ours
    with open(foreign, "wb") as fh:
        fh.truncate(64 * 1024**2)
    dev = subprocess.run(["losetup", "--find", "--show", str(foreign)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        volumes.make(dg, "v1", "100m")
        ghost = d2 / "vols" / "ghost.0.img"
        ghost.write_bytes(b"x")
        found = doctor.check(dg)
        assert [(f.kind, f.subject) for f in found] == [("orphan-image", str(dg.disk_dir(dg.catalog.disks()[1].name)
                                                                           / "vols" / "ghost.0.img"))], found
        doctor.check(dg, repair=True)
        assert not ghost.exists()
        assert doctor.check(dg) == []
        assert loop.owns(dev, foreign), "doctor touched a loop device on another file of the filesystem"
    finally:
        loop.detach(dev)
        dg.close()


@pytest.mark.parametrize("where", ["ext4", "tmpfs"])
def test_directory_without_reflink_is_refused_with_why_and_what_instead(host, where):
    h, e = host
    if where == "tmpfs":
        h.mount(["-t", "tmpfs", "-o", "size=64m", "tmpfs"], h.root / "tmpfs")
        d = h.root / "tmpfs" / "d1"
    else:
        d = h.root / "ext4dir"  # the test root is on the machine's ext4 root
    d.mkdir()
    proc = e.cli("dg", "init", DG, f"{d}=100m", check=False)
    assert proc.returncode == 2, proc
    msg = proc.stderr
    assert f"lies on the {where} filesystem" in msg and "no reflink" in msg, msg
    assert "XFS made with reflink=1" in msg and "btrfs" in msg and "image file" in msg, msg
    assert list(d.iterdir()) == [], "a refused directory was changed (probe files left?)"
    assert diskgroup.list_names(e.config) == []
    with pytest.raises(InvalidArgument, match="no reflink"):
        diskgroup.init(e.config, DG, [DiskSpec(d, 100 * 1024**2)])


def test_size_beyond_free_space_or_missing_is_refused(host):
    h, e = host
    (d1,) = h.dirs("d1")
    proc = e.cli("dg", "init", DG, f"{d1}=100g", check=False)
    assert proc.returncode == NoSpace.exit_code, proc
    assert "100 GiB asked" in proc.stderr and "free" in proc.stderr and "xfs filesystem" in proc.stderr, proc.stderr
    assert list(d1.iterdir()) == [] and diskgroup.list_names(e.config) == []
    proc = e.cli("dg", "init", DG, str(d1), check=False)
    assert proc.returncode == 2 and "give the space it may use" in proc.stderr, proc.stderr
    # two disks that fit one by one but not together: the second is refused, naming what is promised
    d2, d3 = h.dirs("d2", "d3")
    with pytest.raises(NoSpace, match="promised"):
        diskgroup.init(e.config, DG, [DiskSpec(d2, 2 * 1024**3), DiskSpec(d3, 2 * 1024**3)])
    assert list(d2.iterdir()) == [] and list(d3.iterdir()) == [] and diskgroup.list_names(e.config) == []


def test_deport_and_import_round_trip(host):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    dg = diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3), DiskSpec(d2, 1024**3)])
    try:
        volumes.make(dg, "v1", "100m")
        volumes.mount(dg, "v1", "t")
        write_synced(dg.mountpoint("v1") / "f", b"kept")
        volumes.umount(dg, "v1", "t")
        diskgroup.deport(dg)
        assert dg.catalog.diskgroup().imported_on is None
        assert not ours_attached(h.xfs)
    finally:
        dg.close()
    dg = diskgroup.import_dg(e.config, DG)
    try:
        assert [d.state for d in dg.catalog.disks()] == ["online", "online"]
        volumes.mount(dg, "v1", "t")
        assert (dg.mountpoint("v1") / "f").read_bytes() == b"kept"
        volumes.umount(dg, "v1", "t")
        assert doctor.check(dg) == []
    finally:
        dg.close()
    # a directory whose identity is not the disk's is not brought online
    (d2 / ".veritas-disk").write_text(json.dumps({"dg": "other", "dg_uuid": "x", "disk": "y"}))
    dg = e.open(DG)
    try:
        assert [d.state for d in dg.catalog.disks()] == ["online", "missing"]
    finally:
        dg.close()
    (d2 / ".veritas-disk").unlink()
    dg = diskgroup.DiskGroup(e.config, DG)
    try:
        ident = {"dg": DG, "dg_uuid": dg.catalog.diskgroup().uuid, "disk": dg.catalog.disks()[1].name}
    finally:
        dg.close()
    (d2 / ".veritas-disk").write_text(json.dumps(ident))
    dg = e.open(DG)
    try:
        assert [d.state for d in dg.catalog.disks()] == ["online", "online"]
    finally:
        dg.close()


def test_destroy_gives_the_directories_back(host):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    (d1 / "user-file").write_text("mine")
    dg = diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3), DiskSpec(d2, 1024**3)])
    volumes.make(dg, "v1", "100m")
    diskgroup.destroy(dg, force=True)
    assert sorted(p.name for p in d1.iterdir()) == ["user-file"] and list(d2.iterdir()) == []
    # and they can make a disk group again, unforced
    diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3)]).close()


def test_a_directory_of_another_disk_group_is_refused_even_forced(host):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3)]).close()
    for force in (False, True):
        with pytest.raises(Exception, match=f"disk group {DG}"):
            diskgroup.init(e.config, "second", [DiskSpec(d1, 1024**3)], force=force)
    assert diskgroup.list_names(e.config) == [DG]


def test_embedded_default_uses_directory_disks_on_a_reflink_state_root(host):
    h, e = host
    path = h.root / "xfs-state.conf"
    path.write_text(f"[storage]\ndiskgroup = {DG}\nstate_root = {h.xfs}/state\nmount_root = {h.root}/mnt\n"
                    "default_disk_size = 20g\ndefault_disk_count = 2\n[node]\nname = node1\n")
    cfg = load_config(path)
    assert cfg.state_root == h.xfs / "state"
    dg = diskgroup.default_dg(cfg)
    try:
        disks = dg.catalog.disks()
        assert [d.kind for d in disks] == ["dir", "dir"]
        assert [Path(d.source) for d in disks] == [h.xfs / "state" / "disks" / f"{DG}-disk{i}" for i in (1, 2)]
        # 20g each asked, the 3G filesystem has less: an even share of its free space instead
        assert all(d.size < 1536 * 1024**2 for d in disks), disks
        assert not (h.xfs / "state" / "images").exists(), "image files were made"
        assert not ours_attached(h.xfs)
        volumes.make(dg, "v1", "100m")
        volumes.mount(dg, "v1", "t")
        write_synced(dg.mountpoint("v1") / "f", b"x")
        volumes.umount(dg, "v1", "t")
        assert doctor.check(dg) == []
    finally:
        dg.close()
    e2 = Env(h.root, path, cfg)
    assert destroy_all(e2.config) == []
    assert not (h.xfs / "state" / "disks" / f"{DG}-disk1").exists()
    # the state root on the machine's ext4 keeps image files (as before)
    dg = diskgroup.default_dg(e.config)
    try:
        assert {d.kind for d in dg.catalog.disks()} == {"file"}
    finally:
        dg.close()


@pytest.mark.parametrize("point", ["adddisk.recorded", "adddisk.dir"])
def test_adddisk_killed_is_rolled_back_and_the_directory_can_be_added_again(host, point):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3)]).close()
    proc = e.cli("dg", "adddisk", DG, f"{d2}=500m", check=False, env={"VERITAS_CRASH_AT": point})
    assert proc.returncode == -9, proc
    if point == "adddisk.dir":
        assert (d2 / ".veritas-disk").exists(), "killed before the identity was written"
    dg = e.open(DG)  # recovery rolls the half-added disk back
    try:
        assert [d.source for d in dg.catalog.disks()] == [str(d1)]
        assert list(d2.iterdir()) == [], "the rolled-back directory still holds veritas files"
        assert sorted(p.name for p in (dg.root / "disks").iterdir()) == [dg.catalog.disks()[0].name]
        dg.add_disks([DiskSpec(d2, 500 * 1024**2)])  # unforced: nothing of the killed attempt is left
        assert [d.state for d in dg.catalog.disks()] == ["online", "online"]
    finally:
        dg.close()


def test_repair_puts_the_lost_copy_outside_the_survivors_failure_domain(host):
    h, e = host
    d1, d2 = h.dirs("d1", "d2")
    dg = diskgroup.init(e.config, DG, [DiskSpec(d1, 1024**3), DiskSpec(d2, 1024**3),
                                       DiskSpec(e.disk_image("f3"), 1024**3)])
    try:
        names = [d.name for d in dg.catalog.disks()]
        volumes.make(dg, "m1", "200m", layout="mirror")
        assert sorted(sd.disk for sd in dg.catalog.subdisks("m1")) == [names[0], names[2]]
        volumes.mount(dg, "m1", "t")
        data = os.urandom(4 << 20)
        write_synced(dg.mountpoint("m1") / "data", data)
        volumes.umount(dg, "m1", "t")
        # the image-file disk dies: its filesystem, loop device and image gone
        lost = dg.catalog.disks()[2]
        subprocess.run(["umount", str(dg.disk_dir(lost.name))], check=True)
        loop.detach_image(Path(lost.source))
        os.unlink(lost.source)
    finally:
        dg.close()
    dg = e.open(DG)
    try:
        assert volumes.info(dg, "m1")["health"] == "degraded"
        # the only disk with room is a directory on the survivor's filesystem: no redundancy there
        with pytest.raises(SharedFailureDomain, match="failure domain"):
            volumes.repair(dg, "m1")
        assert sorted(sd.disk for sd in dg.catalog.subdisks("m1")) == [names[0], names[2]]
        assert not (d2 / "vols" / "m1.1.img").exists() and not (d2 / "vols" / "m1.0.img").exists()
        (new,) = dg.add_disks([DiskSpec(e.disk_image("f4"), 1024**3)])
        volumes.repair(dg, "m1")
        assert sorted(sd.disk for sd in dg.catalog.subdisks("m1")) == sorted([names[0], new])
        assert volumes.info(dg, "m1")["health"] == "ok"
        volumes.mount(dg, "m1", "t")
        assert (dg.mountpoint("m1") / "data").read_bytes() == data
        volumes.umount(dg, "m1", "t")
        assert doctor.check(dg) == []
    finally:
        dg.close()


def test_directories_in_two_subvolumes_of_one_btrfs_are_one_failure_domain(host):
    h, e = host
    img = h.root / "btrfs.img"
    with open(img, "wb") as fh:
        fh.truncate(1024**3)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    h.loops.append(dev)
    subprocess.run(["mkfs.btrfs", "-q", "-f", dev], check=True)
    h.mount(["-t", "btrfs", dev], h.root / "btrfs")
    for sv in ("sv1", "sv2"):
        subprocess.run(["btrfs", "subvolume", "create", str(h.root / "btrfs" / sv)], capture_output=True, check=True)
    d1, d2 = h.root / "btrfs" / "sv1", h.root / "btrfs" / "sv2"
    assert os.stat(d1).st_dev != os.stat(d2).st_dev  # what a device-number test alone would call apart
    proc = e.cli("dg", "init", DG, f"{d1}=300m", f"{d2}=300m")
    assert "one failure domain" in proc.stderr and "btrfs filesystem" in proc.stderr, proc.stderr
    dg = e.open(DG)
    try:
        with pytest.raises(SharedFailureDomain):
            volumes.make(dg, "m1", "200m", layout="mirror")
        volumes.make(dg, "c1", "100m")  # a volume on btrfs's reflink works as on XFS
        snapshots.make(dg, "c1", "s1")
        assert doctor.check(dg) == []
    finally:
        dg.close()
