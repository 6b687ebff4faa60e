"""veritas --version: the packaged VERSION file wins, else the checkout's pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from veritas import version as vmod
from veritas.cli import main


def test_checkout_reports_pyproject_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"veritas {vmod.pyproject_version()}"
    assert vmod.pyproject_version() == "0.1.0"


def test_the_packaged_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "VERSION"
    f.write_text("0.1.1\n")
    monkeypatch.setattr(vmod, "VERSION_FILE", f)
    assert vmod.version() == "0.1.1"
    f.write_text("not a version\n")
    assert vmod.version() == "0.1.0"
