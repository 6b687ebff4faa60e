"""The version ``veritas --version`` reports, from one source of truth: pyproject.toml's.

A package build (packaging/build-packages.sh) writes it into a VERSION file beside this module; a
checkout reads pyproject.toml; a pip install asks the installed distribution's metadata.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

_HERE = Path(__file__).resolve().parent
VERSION_FILE = _HERE / "VERSION"  # written by packaging/build-packages.sh, never committed
_PYPROJECT = _HERE.parent / "pyproject.toml"


def pyproject_version(path: Path = _PYPROJECT) -> str | None:
    """The [project] version of a pyproject.toml, or None when there is none."""
    try:
        import tomllib

        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, ValueError):
        return None
    v = data.get("project", {}).get("version")
    return v if isinstance(v, str) else None


def version() -> str:
    """This installation's version: the packaged file, the checkout's pyproject, or pip's metadata."""
    try:
        text = VERSION_FILE.read_text().strip()
    except OSError:
        text = ""
    if re.fullmatch(r"[0-9][A-Za-z0-9.+~-]*", text):
        return text
    found = pyproject_version()
    if found:
        return found
    try:
        return metadata.version("veritas")
    except metadata.PackageNotFoundError:
        return "unknown"
