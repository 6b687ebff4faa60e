"""Two veritas instances that call their files by the same path, each in its own mount namespace.

A host service and a managed plugin (or two lab nodes, two DR sites) both keep their first disk image at
``<state_root>/images/dockerdg-disk1.img``; sysfs then shows each instance's loop devices with a backing
path the other instance also has. Loop devices must be told apart by backing (device, inode), never by
that path: these tests make the coincidence with ``unshare -m`` and bind mounts, without Docker.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.kernel import loop

REPO = Path(__file__).resolve().parents[2]


class Namespace:
    """A private mount namespace, kept alive by a sleeping process, in which each ``binds`` source is
    bind-mounted onto its target."""

    def __init__(self, binds: dict[Path, Path]) -> None:
        steps = [f"mount --bind {shlex.quote(str(s))} {shlex.quote(str(t))}" for s, t in binds.items()]
        script = " && ".join([*steps, "echo ready", "exec sleep 3600"])
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"namespace did not come up (got {line!r})")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "--", *argv], capture_output=True,
                              text=True, timeout=300, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def py(self, code: str) -> object:
        """Run ``code`` (which prints JSON) with this checkout's storage package, inside the namespace."""
        out = self.run("env", f"PYTHONPATH={REPO}", sys.executable, "-c", code).stdout
        return json.loads(out)

    def cli(self, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("env", f"VERITAS_CONFIG={config}", f"PYTHONPATH={REPO}", sys.executable, "-m",
                        "storage.cli", *args, check=check)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _find_in(ns: Namespace, image: Path) -> list[str]:
    found = ns.py(f"import json; from pathlib import Path; from storage.kernel import loop;"
                  f" print(json.dumps(loop.find(Path({str(image)!r}))))")
    assert isinstance(found, list)
    return [str(d) for d in found]


def _autoclear(dev: str) -> str:
    return (Path("/sys/block") / Path(dev).name / "loop" / "autoclear").read_text().strip()


def _backing_path(dev: str) -> str:
    return (Path("/sys/block") / Path(dev).name / "loop" / "backing_file").read_text().strip()


FileId = tuple[str, int]  # "major:minor" of a file's filesystem, and its inode


def _ident(path: Path) -> FileId:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", st.st_ino


def _backing() -> dict[str, FileId]:
    """Every loop device's backing file as util-linux reads it (independent of the code under test)."""
    out = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-MAJ:MIN,BACK-INO"],
                         capture_output=True, text=True, check=True).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return {d["name"]: (str(d["back-maj:min"]).strip(), int(d["back-ino"])) for d in devs}


def _loops_of(path: Path) -> list[str]:
    ident = _ident(path)
    return sorted(d for d, i in _backing().items() if i == ident)


def _release(devices: dict[str, FileId]) -> None:
    """Detach each device that is still backed by the file it was recorded with (numbers are reused),
    volumes before the disks that hold their images."""
    for dev, ident in sorted(devices.items(), key=lambda kv: not kv[1][0].startswith("7:")):
        if _backing().get(dev) == ident:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        deadline = time.monotonic() + 10  # a concurrent prober holding it open delays the detach
        while _backing().get(dev) == ident and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def namespaces() -> Iterator[list[Namespace]]:
    made: list[Namespace] = []
    try:
        yield made
    finally:
        for ns in made:
            ns.close()


def test_find_tells_apart_two_images_at_one_path(env, namespaces: list[Namespace]) -> None:
    """Each namespace's find() of the shared path returns its own device only; detaching in one leaves
    the other's alone; and from a third namespace a device is found by its file, whatever path sysfs shows."""
    root = env.root
    a, b, p = root / "a", root / "b", root / "p"
    for d in (a, b, p):
        d.mkdir()
    for d in (a, b):
        with open(d / "x.img", "xb") as fh:
            fh.truncate(64 << 20)
    ns1 = Namespace({a: p})
    namespaces.append(ns1)
    ns2 = Namespace({b: p})
    namespaces.append(ns2)
    image = p / "x.img"
    dev1 = ns1.run("losetup", "--find", "--show", str(image)).stdout.strip()
    devs = {dev1: _ident(a / "x.img")}
    try:
        dev2 = ns2.run("losetup", "--find", "--show", str(image)).stdout.strip()
        devs[dev2] = _ident(b / "x.img")
        assert dev1 != dev2
        # the coincidence itself: the kernel names both backing files by the same path
        assert _backing_path(dev1) == _backing_path(dev2) == str(image)

        assert _find_in(ns1, image) == [dev1]
        assert _find_in(ns2, image) == [dev2]
        assert loop.find(a / "x.img") == [dev1]  # here sysfs shows p/x.img, which is not a's path
        assert loop.find(b / "x.img") == [dev2]
        assert loop.find(image) == []  # p here is an empty directory: nothing is backed by "p/x.img"

        # attach reuses only its own device; detach_image releases only its own
        again = ns2.py(f"import json; from pathlib import Path; from storage.kernel import loop;"
                       f" print(json.dumps(loop.attach(Path({str(image)!r}))))")
        assert again == dev2
        ns2.py(f"from pathlib import Path; from storage.kernel import loop;"
               f" loop.detach_image(Path({str(image)!r})); print('null')")
        deadline = time.monotonic() + 10  # a concurrent prober holding it open delays the detach
        while _backing().get(dev2) == devs[dev2] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _backing().get(dev2) != devs[dev2], "detach_image left its own device attached"
        assert _backing().get(dev1) == devs[dev1] and _autoclear(dev1) == "0"
        assert _find_in(ns1, image) == [dev1]
    finally:
        _release(devs)


def _conf(root: Path, state: Path, mnt: Path) -> Path:
    path = root / "veritas.conf"
    path.write_text("[storage]\ndiskgroup = dockerdg\n"
                    f"state_root = {state}\nmount_root = {mnt}\n"
                    "default_disk_size = 2g\ndefault_disk_count = 1\n[node]\nname = node1\n")
    return path


def _volume_devices(ns: Namespace, conf: Path, name: str) -> list[str]:
    info = json.loads(ns.cli(conf, "--json", "vol", "info", name).stdout)
    assert info["mounted"] is True, info
    return [str(d) for d in info["devices"]]


def test_two_instances_with_one_state_path(env, namespaces: list[Namespace]) -> None:
    """The reported failure, without Docker: instance 1 runs its embedded default disk group with a
    mounted volume; instance 2, with the same configuration (the same paths) in another namespace, makes
    its own default disk group and volume. Before the fix instance 2 took instance 1's disk device for its
    own, ran mkfs.xfs on it ("Device or resource busy") and its rollback left that device autoclear.
    Neither instance may touch the other's devices, and doctor --repair in one leaves the other alone."""
    root = env.root
    state, mnt = root / "state-path", root / "mnt-path"
    dirs = {n: root / n for n in ("a", "b", "ma", "mb")}
    for d in (state, mnt, *dirs.values()):
        d.mkdir()
    conf = _conf(root, state, mnt)  # one file: both instances are configured identically
    ns1 = Namespace({dirs["a"]: state, dirs["ma"]: mnt})
    namespaces.append(ns1)
    ns2 = Namespace({dirs["b"]: state, dirs["mb"]: mnt})
    namespaces.append(ns2)
    disk_a = dirs["a"] / "images" / "dockerdg-disk1.img"
    disk_b = dirs["b"] / "images" / "dockerdg-disk1.img"
    recorded: dict[str, FileId] = {}
    try:
        ns1.cli(conf, "vol", "make", "v1", "400m")
        ns1.cli(conf, "vol", "mount", "v1")
        ns1.run("sh", "-c", f"echo one > {mnt}/v1_dockerdg/f")
        (dev_a,) = _loops_of(disk_a)
        recorded[dev_a] = _ident(disk_a)
        vol_a = _volume_devices(ns1, conf, "v1")
        recorded.update({d: _backing()[d] for d in vol_a})

        made = ns2.cli(conf, "vol", "make", "v2", "400m", check=False)
        if disk_b.exists():
            recorded.update({d: _ident(disk_b) for d in _loops_of(disk_b)})
        assert made.returncode == 0, f"instance 2 could not make its volume: {made.stderr}"
        assert _autoclear(dev_a) == "0", f"instance 2 marked instance 1's disk {dev_a} for detach"
        ns2.cli(conf, "vol", "mount", "v2")
        ns2.run("sh", "-c", f"echo two > {mnt}/v2_dockerdg/f")
        devs_b = _loops_of(disk_b)
        vol_b = _volume_devices(ns2, conf, "v2")
        recorded.update({d: _backing()[d] for d in vol_b})

        assert len(devs_b) == 1 and devs_b[0] != dev_a
        assert not set(vol_a) & set(vol_b)
        # doctor (and its repair) in instance 2 finds nothing wrong and drops nothing of instance 1
        for ns in (ns2, ns1):
            report = ns.cli(conf, "doctor", check=False)
            assert "no problems found" in report.stdout, report.stdout + report.stderr
        ns2.cli(conf, "doctor", "--repair")
        for dev in [dev_a, *vol_a]:
            assert _backing().get(dev) == recorded[dev], f"instance 1's {dev} was detached"
            assert _autoclear(dev) == "0", f"instance 1's {dev} was marked for detach"
        assert ns1.run("cat", f"{mnt}/v1_dockerdg/f").stdout.strip() == "one"
        assert ns2.run("cat", f"{mnt}/v2_dockerdg/f").stdout.strip() == "two"
        assert _volume_devices(ns1, conf, "v1") == vol_a

        # each tears its own down; the other's disk is still in use meanwhile
        for ns, name in ((ns2, "v2"), (ns1, "v1")):
            ns.cli(conf, "vol", "umount", name)
            ns.cli(conf, "dg", "destroy", "dockerdg", "--force")
        assert not disk_a.exists() and not disk_b.exists()
        left = _backing()
        assert [d for d, i in recorded.items() if left.get(d) == i] == [], "destroy left loop devices"
    finally:
        for ns in namespaces:
            ns.close()
        _release(recorded)


def test_failed_mount_leaves_a_device_it_found_attached(env, dg) -> None:
    """A device already attached to the volume's image (its mount in another namespace, say) is reused
    by mount; when that mount then fails, its rollback detaches only what it attached itself."""
    from storage import volumes

    volumes.make(dg, "v1", "400m")
    (img,) = volumes.images(dg, dg.catalog.volume("v1"))
    dev = subprocess.run(["losetup", "--find", "--show", "--sector-size=4096", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    ident = _ident(img)
    mp = dg.mountpoint("v1")
    mp.parent.mkdir(parents=True, exist_ok=True)
    mp.write_text("in the way")  # the mount fails after the attach step
    try:
        with pytest.raises(OSError):
            volumes.mount(dg, "v1")
        assert _backing().get(dev) == ident, "the failed mount detached a device it had not attached"
        assert _autoclear(dev) == "0"
        assert dg.catalog.mounts("v1") == [] and dg.catalog.intents() == []
    finally:
        mp.unlink()
        _release({dev: ident})
    volumes.mount(dg, "v1")
    assert volumes.is_mounted(dg, "v1")
    volumes.umount(dg, "v1")


def test_init_refuses_a_mounted_block_device_under_another_name(env) -> None:
    """A block device is known by its number: mounted as /dev/loopN, it is refused as a disk even when
    named through a symlink, and even with --force (which overwrites a filesystem, not a mounted one)."""
    from storage import diskgroup
    from storage.diskgroup import DiskSpec
    from storage.errors import InUse

    img = env.root / "blk.img"
    with open(img, "xb") as fh:
        fh.truncate(400 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    ident = _ident(img)
    mnt = env.root / "blk-mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.xfs", "-q", dev], check=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        (mnt / "keep").write_text("data")
        link = env.root / "disk-link"
        link.symlink_to(dev)
        with pytest.raises(InUse, match="is mounted"):
            diskgroup.init(env.config, "blkdg", [DiskSpec(link)], force=True)
        assert diskgroup.list_names(env.config) == []
        assert (mnt / "keep").read_text() == "data"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        _release({dev: ident})
