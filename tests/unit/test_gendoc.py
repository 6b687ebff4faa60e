"""packaging/gendoc.py: veritas(8) and bash completion come from the parser, so every command the parser
has is documented and completed; the rpm %changelog is the Debian changelog's entries."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from veritas.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _gendoc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gendoc", REPO / "packaging" / "gendoc.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gendoc = _gendoc()


def test_manpage_has_a_section_per_group_and_every_command() -> None:
    page = gendoc.manpage("9.9")
    assert page.startswith('.TH VERITAS 8 "') and '"veritas 9.9"' in page
    p = build_parser()
    for group, gp in gendoc.subparsers(p).items():
        assert f'.SH "{group.upper()} \\(em ' in page, group
        for cmd in gendoc.subparsers(gp):
            assert f'.SS "veritas {gendoc.roff(group)} {gendoc.roff(cmd)}"' in page, (group, cmd)
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-z", "-ww"], input=page, capture_output=True, text=True,
                          check=True)
    assert "error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("prog", ["vxdg", "vxassist", "vradmin"])
def test_vx_pages_name_each_refusal(prog: str) -> None:
    page = gendoc.vx_manpage(prog, "9.9")
    for cmd in gendoc.VX[prog][2]:
        assert f"\\fB{gendoc.roff(cmd)}\\fR" in page
    subprocess.run(["groff", "-man", "-Tutf8", "-z"], input=page, text=True, check=True)


def test_roff_escapes() -> None:
    assert gendoc.roff(".x -y \\z") == "\\&.x \\-y \\ez"


def _complete(words: list[str]) -> list[str]:
    script = gendoc.bash_completion()
    line = " ".join(f"'{w}'" for w in words)
    out = subprocess.run(["bash", "-c", f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _veritas;"
                          ' printf "%s\\n" "${COMPREPLY[@]}"'], capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.parametrize(("words", "want"), [
    (["veritas", ""], ["dg", "vol", "snap", "doctor", "plugin", "migrate", "rvg", "rlink", "--config", "--json",
                       "--version", "--help"]),
    (["veritas", "d"], ["dg", "doctor"]),
    (["veritas", "--json", "vol", "m"], ["make", "mount"]),
    (["veritas", "--config", "/x.conf", "rvg", "-g", "dg", "create"], ["createpri"]),
    (["veritas", "dg", "init", "--s"], ["--size", "--shared"]),
    (["veritas", "--config", ""], []),  # a value: bash completes files (complete -o default)
])
def test_bash_completion(words: list[str], want: list[str]) -> None:
    assert _complete(words) == want


def test_rpm_changelog() -> None:
    deb = ("veritas (0.2) unstable; urgency=medium\n\n  * Second, with 100% more\n    words.\n  * Another.\n\n"
           " -- A B <a@b>  Fri, 04 Dec 2026 10:00:00 +0000\n\n"
           "veritas (0.1) unstable; urgency=low\n\n  * First.\n\n -- A B <a@b>  Thu, 03 Dec 2026 08:00:00 +0000\n")
    assert gendoc.rpm_changelog(deb) == ("* Fri Dec 04 2026 A B <a@b> - 0.2-1\n- Second, with 100%% more words.\n"
                                         "- Another.\n\n* Thu Dec 03 2026 A B <a@b> - 0.1-1\n- First.\n")
