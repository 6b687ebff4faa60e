"""The OS packages end to end: packaging/build-packages.sh builds the .debs and .rpms of two versions;
apt installs the .deb into a fresh Debian 12 rootfs, resolving its dependencies from Debian; there,
veritas makes, mounts and uses a volume, man veritas renders, the vx front ends run the seed's command
lines, an upgrade keeps a changed conffile, and remove and purge leave the disk groups alone. The .rpm
carries the same files and installs, scriptlets included, into a scratch root.

The tests of this module run in order on one rootfs (install, use, upgrade, remove): each checks the
state the previous left, as an administrator's sequence of commands would.
"""

from __future__ import annotations

import gzip
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.debroot import Rootfs, base_tarball, deb_files, rpm_files, unpack
from tests.integration.timeouts import overall_timeout

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build-packages.sh"
V1, V2 = "0.1.0", "0.1.1"
UNITS = ("veritas-plugin.socket", "veritas-plugin.service", "veritas-rlink.service")
CONF = "/etc/vx/docker/vxinfoscale-default.conf"
TIMINGS: dict[str, float] = {}
TEST_TIMEOUT = 600


@pytest.fixture(autouse=True)
def _overall_timeout() -> Iterator[None]:
    with overall_timeout(TEST_TIMEOUT):
        yield


@dataclass
class Built:
    dirs: dict[str, Path]

    def deb(self, version: str, name: str = "veritas") -> Path:
        return self.dirs[version] / f"{name}_{version}_all.deb"

    def rpm(self, version: str, name: str = "veritas") -> Path:
        return self.dirs[version] / f"{name}-{version}-1.noarch.rpm"


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    """Both packages of the checkout's version and of a newer one, built by the real script."""
    work = Path(tempfile.mkdtemp(prefix="vpkgs-", dir="/tmp"))
    try:
        dirs = {}
        for v, extra in ((V1, []), (V2, ["--version", V2])):
            t0 = time.monotonic()
            proc = subprocess.run(["bash", str(BUILD), "--out", str(work / v), *extra], capture_output=True,
                                  text=True, timeout=300, check=False)
            TIMINGS[f"build {v}"] = time.monotonic() - t0
            assert proc.returncode == 0, f"build-packages.sh {extra} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            dirs[v] = work / v
        b = Built(dirs)
        for v in (V1, V2):
            for name in ("veritas", "veritas-vxcompat"):
                assert b.deb(v, name).is_file() and b.rpm(v, name).is_file(), sorted(os.listdir(dirs[v]))
        yield b
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def tarball() -> Path:
    path, took = base_tarball()
    TIMINGS["rootfs tarball"] = took
    return path


@pytest.fixture(scope="module")
def rootfs(tarball: Path, built: Built) -> Iterator[Rootfs]:
    r = Rootfs(tarball)
    try:
        debs = r.path("/tmp/debs")
        debs.mkdir(parents=True)
        for v in (V1, V2):
            for name in ("veritas", "veritas-vxcompat"):
                shutil.copy(built.deb(v, name), debs)
        t0 = time.monotonic()
        r.run("apt-get", "update", "-q", timeout=300)
        TIMINGS["apt-get update"] = time.monotonic() - t0
        yield r
    finally:
        problems = r.close()
        print("package test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))
        assert not problems, "rootfs teardown: " + "; ".join(problems)


def control(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True).stdout


def contents(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout


def apt_install(r: Rootfs, *debs: str) -> subprocess.CompletedProcess[str]:
    return r.run("apt-get", "install", "-y", "-q", "--no-install-recommends", *[f"/tmp/debs/{d}" for d in debs],
                 timeout=600)


def enabled(r: Rootfs, unit: str) -> str:
    return r.run("systemctl", "is-enabled", unit, check=False).stdout.strip()


# ------------------------------------------------------------------ the packages as built


def test_deb_metadata_and_layout(built: Built) -> None:
    deb = built.deb(V1)
    depends = control(deb, "Depends")
    for need in ("python3 (>= 3.11)", "python3-flask", "python3-gunicorn", "python3-docker", "python3-etcd3gw",
                 "xfsprogs", "btrfs-progs", "e2fsprogs", "util-linux", "mount"):
        assert need in depends, f"Depends lacks {need}: {depends}"
    assert control(built.deb(V1, "veritas-vxcompat"), "Depends").strip() == f"veritas (= {V1})"
    files = deb_files(contents(deb))
    tops = {p.split("/")[4] for p in files if p.startswith("/usr/lib/veritas/")}
    assert tops == {"storage", "plugin", "agents", "veritas"}, tops
    assert not [p for p in files if p.endswith(".pyc") or "__pycache__" in p]
    assert {"/usr/sbin/veritas", CONF, "/usr/share/man/man8/veritas.8.gz",
            "/usr/share/bash-completion/completions/veritas", "/usr/lib/veritas/veritas/VERSION",
            "/usr/lib/ocf/resource.d/veritas/DockerContainer"} <= files
    assert {f"/lib/systemd/system/{u}" for u in UNITS} <= files
    assert not [p for p in files if "site-packages" in p or "dist-packages" in p]
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"./conffiles" in subprocess.run(["tar", "-t"], input=conffiles, capture_output=True, check=True).stdout
    assert "/usr/sbin/vxdg" in deb_files(contents(built.deb(V1, "veritas-vxcompat")))


def test_rpm_lists_the_debs_files_and_rhel_requirements(built: Built) -> None:
    """Same files modulo distribution paths: /lib/systemd → /usr/lib/systemd; Debian's changelog file is
    rpm's %changelog."""
    for name in ("veritas", "veritas-vxcompat"):
        want = {p.replace("/lib/systemd/", "/usr/lib/systemd/", 1) if p.startswith("/lib/") else p
                for p in deb_files(contents(built.deb(V1, name))) if not p.endswith("/changelog.Debian.gz")}
        assert rpm_files(built.rpm(V1, name)) == want, name
    reqs = subprocess.run(["rpm", "-qpR", str(built.rpm(V1))], capture_output=True, text=True, check=True).stdout
    names = {line.split()[0] for line in reqs.splitlines()}
    for need in ("python3", "python3-flask", "python3-gunicorn", "python3-docker", "python3-etcd3gw", "xfsprogs",
                 "btrfs-progs", "e2fsprogs", "util-linux", "systemd"):
        assert need in names, f"rpm -qpR lacks {need}: {reqs}"
    assert "python3 >= 3.11" in reqs
    log = subprocess.run(["rpm", "-qp", "--changelog", str(built.rpm(V2))], capture_output=True, text=True,
                         check=True).stdout
    assert f"- {V2}-1" in log and f"- {V1}-1" in log, log


def test_rpm_installs_into_a_scratch_root_with_its_scriptlets(built: Built, tarball: Path) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="vrpmroot-", dir="/tmp")) / "root"
    try:
        unpack(tarball, scratch)  # a root with /bin/sh and systemctl for the scriptlets, without python3
        t0 = time.monotonic()
        proc = subprocess.run(["rpm", "-i", "--nodeps", "--root", str(scratch), str(built.rpm(V1)),
                               str(built.rpm(V1, "veritas-vxcompat"))], capture_output=True, text=True, timeout=120,
                              check=False)
        TIMINGS["rpm -i"] = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        assert "scriptlet" not in proc.stderr and "warning" not in proc.stderr.lower(), proc.stderr
        for p in ("usr/sbin/veritas", "usr/sbin/vxdg", "usr/lib/veritas/veritas/cli.py",
                  "usr/lib/systemd/system/veritas-plugin.service", "etc/vx/docker/vxinfoscale-default.conf"):
            assert (scratch / p).exists(), p
        assert (scratch / "usr/lib/ocf/resource.d/veritas/RVGPrimary").is_symlink()
        for u in UNITS:  # %post enabled them
            st = subprocess.run(["systemctl", "--root", str(scratch), "is-enabled", u], capture_output=True,
                                text=True, check=False).stdout.strip()
            assert st == "enabled", (u, st)
        q = subprocess.run(["rpm", "--root", str(scratch), "-q", "veritas", "veritas-vxcompat"], capture_output=True,
                           text=True, check=True).stdout
        assert f"veritas-{V1}-1.noarch" in q
        proc = subprocess.run(["rpm", "-e", "--nodeps", "--root", str(scratch), "veritas-vxcompat", "veritas"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0 and "scriptlet" not in proc.stderr, proc.stderr
        assert not (scratch / "usr/lib/veritas").exists() and not (scratch / "usr/sbin/veritas").exists()
        assert not (scratch / "etc/systemd/system/sockets.target.wants/veritas-plugin.socket").exists()
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)


# ------------------------------------------------------------------ installed with apt, in order


def test_apt_installs_the_deb_and_veritas_works(rootfs: Rootfs) -> None:
    r = rootfs
    t0 = time.monotonic()
    apt_install(r, f"veritas_{V1}_all.deb")
    TIMINGS["apt install"] = time.monotonic() - t0
    assert r.run("veritas", "--version").stdout.strip() == f"veritas {V1}"
    assert r.run("dpkg-query", "-W", "-f", "${Status}", "python3-flask").stdout == "install ok installed"
    for u in UNITS:  # enabled, not started: nothing runs systemd here, and no veritas process runs
        assert enabled(r, u) == "enabled", u
    unit = r.path("/lib/systemd/system/veritas-plugin.service").read_text()
    assert "ExecStart=/usr/sbin/veritas plugin serve" in unit and "Before=docker.service" in unit
    assert not r.processes(), "installing started something in the rootfs"
    # a disk group on an image file, a volume, mounted, written and read back
    r.run("veritas", "dg", "init", "testdg", "/srv/disk1.img", "--size", "2g")
    r.run("veritas", "vol", "make", "-g", "testdg", "v1", "512m")
    r.run("veritas", "vol", "mount", "-g", "testdg", "v1")
    mnt = "/dockerfs/v1_testdg"
    r.run("dd", "if=/dev/urandom", f"of={mnt}/data", "bs=1M", "count=4", "status=none")
    r.run("sync")
    digest = r.run("sha256sum", f"{mnt}/data").stdout.split()[0]
    assert digest == subprocess.run(["sha256sum", str(r.path(mnt) / "data")], capture_output=True, text=True,
                                    check=True).stdout.split()[0]
    info = r.run("veritas", "--json", "vol", "info", "-g", "testdg", "v1").stdout
    assert '"mounted": true' in info, info
    (r.path("/tmp") / "v1.sha256").write_text(digest)
    # man veritas renders through man-db, with a section per command group
    page = r.run("man", "veritas", env={"MANPAGER": "cat", "MANWIDTH": "100"}).stdout
    for head in ("VERITAS(8)", "DG — disk groups", "VOL — volumes", "SNAP", "RVG", "RLINK", "PLUGIN", "FILES"):
        assert head in page, f"man veritas lacks {head!r}"
    # bash completion completes the parser's words
    comp = r.run("bash", "-c", "source /usr/share/bash-completion/completions/veritas; COMP_WORDS=(veritas vol m);"
                 " COMP_CWORD=2; _veritas; echo ${COMPREPLY[*]}").stdout.split()
    assert comp == ["make", "mount"], comp
    # an OCF agent finds the package in /usr/lib/veritas as an unprivileged user (hacluster-like)
    meta = r.run("/usr/lib/ocf/resource.d/veritas/DockerContainer", "meta-data", user="nobody:nogroup")
    assert '<resource-agent name="DockerContainer"' in meta.stdout, meta.stdout[:500]


def _serve(r: Rootfs, conf: str) -> tuple[subprocess.Popen[str], str]:
    p = r.popen("veritas", "rlink", "serve", "--listen", "127.0.0.1:0", "--interval", "1",
                env={"VERITAS_CONFIG": conf})
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 30)
    line = p.stdout.readline() if ready else ""
    if not line.startswith("listening on "):
        p.kill()
        raise AssertionError(f"rlink serve did not start: {line!r} {p.communicate(timeout=10)[1][-2000:]}")
    return p, line.split()[-1]


def test_vx_front_ends_run_the_seed_lines(rootfs: Rootfs) -> None:
    r = rootfs
    apt_install(r, f"veritas-vxcompat_{V1}_all.deb")
    key = "0123456789abcdef0123456789abcdef\n"
    for site in ("a", "b"):
        d = r.path(f"/srv/site-{site}")
        (d / "disks").mkdir(parents=True)
        for i in (1, 2, 3, 4):
            with open(d / "disks" / f"disk{i}", "wb") as fh:
                fh.truncate(16 << 30)  # sparse: what VxVM would call disk1..disk4
        (d / "rlink.key").write_text(key)
        os.chmod(d / "rlink.key", 0o600)
        extra = "" if site == "a" else (f"[storage]\nstate_root = /var/lib/veritas-{site}\n"
                                        f"mount_root = /dockerfs-{site}\n[node]\nname = site-{site}\n")
        (d / "veritas.conf").write_text(f"{extra}[replication]\nkey_file = /srv/site-{site}/rlink.key\n")
    a = {"VERITAS_CONFIG": "/srv/site-a/veritas.conf", "VXDISK_PATH": "/srv/site-a/disks"}
    b = {"VERITAS_CONFIG": "/srv/site-b/veritas.conf", "VXDISK_PATH": "/srv/site-b/disks"}

    def vx(env: dict[str, str], line: str) -> subprocess.CompletedProcess[str]:
        return r.run(*line.split(), env=env)

    # refused before anything is made, naming the veritas equivalent
    p = r.run("vxdg", "-s", "-o", "fss", "init", "dockerdg", "disk1", "disk2", "disk3", env=a, check=False)
    assert p.returncode == 2 and "veritas dg init -s" in p.stderr, p.stderr
    p = r.run("vxassist", "-g", "dockerdg", "snapshot", "dockervol", "snap1", env=a, check=False)
    assert p.returncode == 2 and "veritas snap make" in p.stderr, p.stderr
    assert "dockerdg" not in r.run("veritas", "dg", "list", env=a).stdout
    # the seed's lines, verbatim
    vx(a, "vxdg init dockerdg disk1 disk2")
    vx(a, "vxassist -g dockerdg make dockervol 1G")
    vx(a, "vxdg -s init dockdg disk3 disk4")
    vx(a, "vxassist -g dockdg make vol7 10G")
    vx(a, "vxassist -g dockerdg make voll 1G")
    vx(a, "vxassist -g dockerdg make srlvol 300m")
    listed = r.run("veritas", "--json", "vol", "list", "-g", "dockerdg", env=a).stdout
    assert all(f'"name": "{v}"' in listed for v in ("dockervol", "voll", "srlvol")), listed
    assert '"shared": true' in r.run("veritas", "--json", "dg", "info", "dockdg", env=a).stdout
    vx(b, "vxdg init dockerdg disk1 disk2")  # step 4: the secondary site's disk group
    vx(b, "vxassist -g dockerdg make voll 1G")
    vx(b, "vxassist -g dockerdg make srlvol 300m")
    sa, addr_a = _serve(r, a["VERITAS_CONFIG"])
    sb, addr_b = _serve(r, b["VERITAS_CONFIG"])
    try:
        vx(a, "vradmin -g dockerdg createpri rvg voll srlvol")
        vx(a, f"vradmin -g dockerdg addsec rvg {addr_a} {addr_b}")
        vx(a, "vradmin -g dockerdg -a startrep rvg")
        st = r.run("veritas", "--json", "rvg", "-g", "dockerdg", "repstatus", "rvg", env=a).stdout
        assert '"role": "primary"' in st and addr_b in st, st
        p = r.run("vradmin", "-g", "dockerdg", "addvol", "rvg", "dockervol", env=a, check=False)
        assert p.returncode == 2 and "veritas rvg -g DG delpri RVG" in p.stderr, p.stderr
    finally:
        for proc in (sa, sb):
            proc.send_signal(signal.SIGTERM)
        for proc in (sa, sb):
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=10)


def test_upgrade_keeps_a_changed_conffile(rootfs: Rootfs) -> None:
    r = rootfs
    conf = r.path(CONF)
    changed = conf.read_text().replace("workers = 3", "workers = 5")
    assert "workers = 5" in changed
    conf.write_text(changed)
    apt_install(r, f"veritas_{V2}_all.deb", f"veritas-vxcompat_{V2}_all.deb")
    assert r.run("veritas", "--version").stdout.strip() == f"veritas {V2}"
    assert conf.read_text() == changed
    log = gzip.decompress(r.path("/usr/share/doc/veritas/changelog.Debian.gz").read_bytes()).decode()
    assert log.startswith(f"veritas ({V2})") and f"veritas ({V1})" in log
    for u in UNITS:
        assert enabled(r, u) == "enabled", u
    assert "v1" in r.run("veritas", "vol", "list", "-g", "testdg").stdout
    digest = (r.path("/tmp") / "v1.sha256").read_text()
    assert r.run("sha256sum", "/dockerfs/v1_testdg/data").stdout.split()[0] == digest


def _state(r: Rootfs) -> dict[str, int]:
    """Every file under the state roots (catalogs, disk images, volume images) with its size."""
    out: dict[str, int] = {}
    for top in (r.path("/var/lib/veritas"), r.path("/var/lib/veritas-b")):
        for dirpath, _dirs, files in os.walk(top):
            for f in files:
                p = Path(dirpath) / f
                if p.is_file() and "/tmp/" not in str(p.relative_to(r.root)):
                    out[str(p.relative_to(r.root))] = p.stat().st_size
    return out


def test_remove_and_purge_leave_the_disk_groups(rootfs: Rootfs) -> None:
    r = rootfs
    before = _state(r)
    catalogs = [p for p in before if p.startswith("var/lib/veritas/dg/testdg/") and "catalog" in p]
    images = [p for p in before if p.endswith(".img")]
    assert catalogs and images, sorted(before)[:40]
    r.run("apt-get", "remove", "-y", "-q", "veritas", "veritas-vxcompat")
    assert not r.path("/usr/sbin/veritas").exists() and not r.path("/usr/lib/veritas").exists()
    assert r.path(CONF).is_file(), "remove must keep the conffile"
    assert _state(r) == before
    digest = (r.path("/tmp") / "v1.sha256").read_text()
    assert r.run("sha256sum", "/dockerfs/v1_testdg/data").stdout.split()[0] == digest
    r.run("apt-get", "purge", "-y", "-q", "veritas", "veritas-vxcompat")
    assert not r.path(CONF).exists() and not r.path("/etc/vx/docker").exists()
    assert not list(r.path("/etc/systemd/system").rglob("veritas-*")), "purge left unit state"
    assert "veritas" not in r.run("dpkg-query", "-W", "-f", "${Package}\\n", check=False).stdout.split()
    assert _state(r) == before
