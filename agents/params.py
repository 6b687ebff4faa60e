"""Resource attributes: one table per agent type that both front ends read (OCF parameter names are the
keys, VCS attribute names the ``vcs`` field, in ArgList order), and the checks every value passes.

Nothing from a resource's configuration reaches a shell: lists are split with shlex into argument
lists, names match the house pattern, paths must be absolute and free of ``..``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from agents.errors import ConfigError
from agents.record import Frozen

# the engine API version every agent client speaks (Docker 20.10 and later): fixed, so that a client
# costs no /version round trip
API_VERSION = "1.41"

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# an image reference: [registry[:port]/]path[:tag][@sha256:...]; no leading '-', no spaces
IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}(:[0-9]{1,5}/[A-Za-z0-9._/-]{1,200})?"
                      r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?")
# resource ids as Pacemaker and VCS spell them (clones add ':N')
RESOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class Param(Frozen):
    """One attribute: OCF name, VCS name, type (string|integer|boolean), default, whether required."""

    __slots__ = ("key", "vcs", "kind", "default", "required", "short", "long")
    key: str
    vcs: str
    kind: str
    default: str
    required: bool
    short: str
    long: str

    def __init__(self, key: str, vcs: str, kind: str, default: str, required: bool, short: str,
                 long: str) -> None:
        self._init(key=key, vcs=vcs, kind=kind, default=default, required=required, short=short, long=long)


def check_resource(name: str) -> str:
    if not RESOURCE_RE.fullmatch(name or ""):
        raise ConfigError(f"resource name {name!r} is invalid: use letters, digits, '_', '.', ':' or '-'")
    return name


def check_name(what: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ConfigError(f"{what} {value!r} is invalid: 1-64 of letters, digits, '_', '.', '-', "
                          "starting with a letter or digit")
    return value


def check_image(value: str) -> str:
    if not IMAGE_RE.fullmatch(value):
        raise ConfigError(f"image {value!r} is not an image reference (like repo/name:tag)")
    return value


def check_abs_path(what: str, value: str) -> str:
    if not value.startswith("/") or "\0" in value or any(p == ".." for p in value.split("/")) \
            or any(c in value for c in "\n\r"):
        raise ConfigError(f"{what} {value!r} must be an absolute path without '..'")
    return value


def parse_int(what: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value.strip(), 10)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not a whole number of seconds") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{what} {n} is out of range {lo}-{hi}")
    return n


def parse_bool(what: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} {value!r} is not a boolean (true/false, 1/0, yes/no)")


def split_words(what: str, value: str) -> list[str]:
    """A command line as an argument list (shlex rules), never through a shell."""
    if "\0" in value:
        raise ConfigError(f"{what} contains a NUL byte")
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise ConfigError(f"{what} {value!r} cannot be split into words: {exc}") from None


def docker_host(value: str) -> str:
    """The engine's API address: only unix sockets (unix:///abs/path), so no engine is reached over TCP
    by a configuration typo and the socket is a local file the node owns."""
    if not value.startswith("unix://"):
        raise ConfigError(f"docker host {value!r} must be a unix socket URL: unix:///path/to/docker.sock")
    check_abs_path("docker host socket", value[len("unix://"):])
    return value


def values(params: list[Param], given: Mapping[str, str]) -> dict[str, str]:
    """Each attribute's value: the given one or its default; a required one missing is a ConfigError."""
    known = {p.key for p in params}
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise ConfigError(f"unknown attribute(s): {', '.join(unknown)}")
    out: dict[str, str] = {}
    for p in params:
        v = given.get(p.key, "")
        if v == "" and p.required:
            raise ConfigError(f"attribute {p.key} ({p.vcs}) is required: {p.short}")
        out[p.key] = v if v != "" else p.default
    return out
