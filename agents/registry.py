"""Registrations for event-driven detection (the counterpart of the vendor's IMF registration).

An agent that brings a resource online registers it here (expect=online); before it takes the resource
offline or cleans it, it marks it expect=offline. The watcher reads these files and reports a death only
of a resource still expected online, so an intended stop is never reported as a failure. One JSON file
per resource under the state directory (VERITAS_AGENT_STATE, default /run/veritas/agents), replaced
atomically.
"""

from __future__ import annotations

import json
import os
import time

TYPE_CHECKING = False  # pathlib and typing are ~17 ms of a monitor process, which reads this (agents.record)
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    PathArg: TypeAlias = "str | os.PathLike[str]"

DEFAULT_STATE_DIR = "/run/veritas/agents"


def state_dir() -> str:
    return os.environ.get("VERITAS_AGENT_STATE") or DEFAULT_STATE_DIR


def _path(resource: str, root: PathArg | None = None) -> str:
    return os.path.join(root or state_dir(), f"{resource}.json")


def register(resource: str, kind: str, expect: str, root: PathArg | None = None, **info: Any) -> None:
    """Record what the watcher needs to follow ``resource``; a new generation each call."""
    d = os.fspath(root or state_dir())
    os.makedirs(d, exist_ok=True)
    rec = {"resource": resource, "kind": kind, "expect": expect, "generation": time.time_ns(), **info}
    tmp = os.path.join(d, f".{resource}.json.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(rec))
    os.replace(tmp, _path(resource, d))


def expect_offline(resource: str, root: PathArg | None = None) -> None:
    """Mark ``resource`` as going offline on purpose (before stopping it); keeps what was registered."""
    rec = read(resource, root)
    if rec is not None and rec.get("expect") != "offline":
        info = {k: v for k, v in rec.items() if k not in ("resource", "kind", "expect", "generation")}
        register(resource, str(rec["kind"]), "offline", root, **info)


def read(resource: str, root: PathArg | None = None) -> dict[str, Any] | None:
    try:
        with open(_path(resource, root)) as f:
            rec = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def read_all(root: PathArg | None = None) -> list[dict[str, Any]]:
    d = os.fspath(root or state_dir())
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("."))
    except OSError:
        return []
    out = []
    for n in names:
        rec = read(n[: -len(".json")], d)
        if rec is not None:
            out.append(rec)
    return out
