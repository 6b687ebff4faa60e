"""The vx front ends' translations: the seed's command lines become the veritas commands that do the
same, and what has no equivalent is refused naming the veritas command to use."""

from __future__ import annotations

from pathlib import Path

import pytest

from veritas import vxcompat
from veritas.vxcompat import HostLookup, Refused, vradmin, vxassist, vxdg


class FakeLookup:
    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes = sizes or {}

    def disk(self, name: str) -> str:
        return name if name.startswith("/") else f"/dev/vx/dmp/{name}"

    def volume_size(self, diskgroup: str | None, volume: str) -> int | None:
        return self.sizes.get(volume)


L = FakeLookup({"srlvol": 300 * 1024 * 1024})


@pytest.mark.parametrize(("line", "want"), [
    ("init dockerdg disk1 disk2", "dg init dockerdg /dev/vx/dmp/disk1 /dev/vx/dmp/disk2"),
    ("-s init dockerdg disk1 disk2 disk3", "dg init --shared dockerdg /dev/vx/dmp/disk1 /dev/vx/dmp/disk2"
     " /dev/vx/dmp/disk3"),
    ("init dockerdg hitachi_vsp0_03f1 hitachi_vsp0_03f2",
     "dg init dockerdg /dev/vx/dmp/hitachi_vsp0_03f1 /dev/vx/dmp/hitachi_vsp0_03f2"),
    ("list", "dg list"),
    ("list dockerdg", "dg info dockerdg"),
    ("-g dockerdg adddisk disk3", "dg adddisk dockerdg /dev/vx/dmp/disk3"),
    ("-g dockerdg adddisk dockerdg03=sdd", "dg adddisk dockerdg /dev/vx/dmp/sdd"),
    ("deport dockerdg", "dg deport dockerdg"),
    ("import dockerdg", "dg import dockerdg"),
    ("-C import dockerdg", "dg import dockerdg --force"),
    ("destroy dockerdg", "dg destroy dockerdg"),
])
def test_vxdg(line: str, want: str) -> None:
    assert vxdg(line.split(), L) == want.split()


@pytest.mark.parametrize(("line", "want"), [
    ("-g dockerdg make dockervol 1G", "vol make -g dockerdg dockervol 1G"),
    ("-g dockerdg make dockervol 200G", "vol make -g dockerdg dockervol 200G"),
    ("-g dockerdg make srlvol 300m", "vol make -g dockerdg srlvol 300m"),
    ("-g dockdg make vol7 10G", "vol make -g dockdg vol7 10G"),
    ("-g dg make v 2048", "vol make -g dg v 1048576"),  # VxVM: a bare length counts sectors
    ("-b -g dg make v 1g layout=mirror nmirror=3", "vol make -g dg v 1g layout=mirror nmirror=3"),
    ("-g dg make v 1g layout=stripe ncolumn=4", "vol make -g dg v 1g layout=stripe ncol=4"),
    ("-g dg growto v 2g", "vol grow -g dg v 2g"),
    ("-g dg remove volume v", "vol rm -g dg v"),
    ("make v 1g", "vol make v 1g"),
])
def test_vxassist(line: str, want: str) -> None:
    assert vxassist(line.split(), L) == want.split()


@pytest.mark.parametrize(("line", "want"), [
    ("-g dockerdg createpri rvg voll srlvol", f"rvg -g dockerdg createpri rvg voll {300 * 1024 * 1024}"),
    ("-g dockerdg createpri rvg vol1,vol2 256m", "rvg -g dockerdg createpri rvg vol1,vol2 256m"),
    ("-g dockerdg addsec rvg 10.0.0.1 10.0.0.2", "rvg -g dockerdg addsec rvg 10.0.0.1:4145 10.0.0.2:4145"),
    ("-g dockerdg addsec rvg 10.0.0.1:5000 fe80::1", "rvg -g dockerdg addsec rvg 10.0.0.1:5000 [fe80::1]:4145"),
    ("-g dockerdg -a startrep rvg", "rvg -g dockerdg startrep -a rvg"),
    ("-g dockerdg startrep rvg", "rvg -g dockerdg startrep rvg"),
    ("-g dockerdg repstatus rvg", "rvg -g dockerdg repstatus rvg"),
    ("-g dockerdg migrate rvg 10.0.0.2:4145", "rvg -g dockerdg migrate rvg 10.0.0.2:4145"),
    ("-g dockerdg takeover -autofb rvg", "rvg -g dockerdg takeover rvg --autofb"),
    ("-g dockerdg takeover rvg", "rvg -g dockerdg takeover rvg"),
    ("-g dockerdg fbsync rvg", "rvg -g dockerdg fbsync rvg"),
    ("-g dockerdg delpri rvg", "rvg -g dockerdg delpri rvg"),
])
def test_vradmin(line: str, want: str) -> None:
    assert vradmin(line.split(), L) == want.split()


@pytest.mark.parametrize(("fn", "line", "names"), [
    (vxdg, "-s -o fss init dockerdg d1 d2 d3", "veritas dg init -s"),
    (vxdg, "-o noreonline init dockerdg d1", "veritas dg --help"),
    (vxdg, "-g dockerdg rmdisk disk1", "veritas dg destroy"),
    (vxdg, "split dg1 dg2 vol", "make volumes in the disk group"),
    (vxdg, "frobnicate", "veritas dg --help"),
    (vxdg, "-s list", "veritas dg init -s"),
    (vxassist, "-g dg snapshot v snap", "veritas snap make -g DG SOURCE NAME"),
    (vxassist, "-g dg mirror v", "veritas vol make -g DG VOL SIZE layout=mirror"),
    (vxassist, "-g dg growby v 1g", "veritas vol grow -g DG VOL NEWSIZE"),
    (vxassist, "-g dg make v 1g logtype=dco", "veritas vol make -g DG VOL SIZE KEY=VALUE"),
    (vxassist, "-g dg make v 1x", "k, m, g or t suffix"),
    (vxassist, "-g dg remove v", "veritas vol rm -g DG VOL"),
    (vxassist, "-g dg frob v", "veritas vol --help"),
    (vradmin, "-g dg addvol rvg v2", "veritas rvg -g DG delpri RVG"),
    (vradmin, "-g dg printrvg rvg", "veritas rvg -g DG repstatus RVG"),
    (vradmin, "-g dg -a addsec rvg a b", "goes with startrep"),
    (vradmin, "-g dg createpri rvg voll nosuchvol", "veritas rvg createpri RVG VOLS 300m"),
    (vradmin, "-g dg frob rvg", "veritas rvg --help"),
    (vradmin, "-g dg -autofb startrep rvg", "goes with takeover"),
])
def test_refused_naming_the_equivalent(fn: vxcompat.Translator, line: str, names: str) -> None:
    with pytest.raises(Refused) as err:
        fn(line.split(), L)
    assert names in str(err.value)
    assert err.value.exit_code == 2


def test_disk_names_are_found_on_the_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "disk1").write_bytes(b"")
    (a / "disk2").write_bytes(b"")
    monkeypatch.setenv("VXDISK_PATH", f"{a}:{b}")
    look = HostLookup()
    assert vxdg("init dockerdg disk1 disk2".split(), look) == ["dg", "init", "dockerdg", str(b / "disk1"),
                                                                str(a / "disk2")]
    with pytest.raises(Refused, match="disk3 not found in .*veritas dg init DG /path/to/disk3.img=SIZE"):
        vxdg("init dockerdg disk3".split(), look)
    assert look.disk("/dev/sdb") == "/dev/sdb"


def test_a_refusal_runs_nothing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import veritas.cli

    monkeypatch.setattr(veritas.cli, "main", lambda argv: pytest.fail(f"veritas ran: {argv}"))
    assert vxcompat.run("vxassist", vxassist, ["-g", "dg", "snapshot", "v", "s"]) == 2
    assert "vxassist: error: vxassist snapshot is not supported: veritas snap make" in capsys.readouterr().err


def test_a_translation_runs_veritas_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import veritas.cli

    seen: list[list[str]] = []
    monkeypatch.setattr(veritas.cli, "main", lambda argv: seen.append(list(argv)) or 0)
    assert vxcompat.run("vxassist", vxassist, ["-g", "dockerdg", "make", "dockervol", "1G"]) == 0
    assert seen == [["vol", "make", "-g", "dockerdg", "dockervol", "1G"]]


@pytest.mark.parametrize(("fn", "line"), [
    (vxdg, "-s init dockerdg disk1 disk2"), (vxdg, "-g dockerdg adddisk disk3"), (vxdg, "-C import dockerdg"),
    (vxassist, "-g dockerdg make dockervol 1G layout=mirror nmirror=2"), (vxassist, "-g dg growto v 2g"),
    (vxassist, "-g dg remove volume v"), (vradmin, "-g dockerdg createpri rvg voll srlvol"),
    (vradmin, "-g dockerdg addsec rvg 10.0.0.1 10.0.0.2"), (vradmin, "-g dockerdg -a startrep rvg"),
    (vradmin, "-g dockerdg takeover -autofb rvg"), (vradmin, "-g dockerdg delsec rvg"),
])
def test_translations_parse_with_the_veritas_parser(fn: vxcompat.Translator, line: str) -> None:
    """Every translation is a command line the real veritas parser accepts (no drift between the two)."""
    import veritas.cli

    args = veritas.cli.build_parser().parse_args(fn(line.split(), L))
    assert callable(args.fn)
