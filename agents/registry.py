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
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = "/run/veritas/agents"


def state_dir() -> Path:
    return Path(os.environ.get("VERITAS_AGENT_STATE") or DEFAULT_STATE_DIR)


def _path(resource: str, root: Path | None = None) -> Path:
    return (root or state_dir()) / f"{resource}.json"


def register(resource: str, kind: str, expect: str, root: Path | None = None, **info: Any) -> None:
    """Record what the watcher needs to follow ``resource``; a new generation each call."""
    d = root or state_dir()
    d.mkdir(parents=True, exist_ok=True)
    rec = {"resource": resource, "kind": kind, "expect": expect, "generation": time.time_ns(), **info}
    tmp = d / f".{resource}.json.{os.getpid()}"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, _path(resource, d))


def expect_offline(resource: str, root: Path | None = None) -> None:
    """Mark ``resource`` as going offline on purpose (before stopping it); keeps what was registered."""
    rec = read(resource, root)
    if rec is not None and rec.get("expect") != "offline":
        info = {k: v for k, v in rec.items() if k not in ("resource", "kind", "expect", "generation")}
        register(resource, str(rec["kind"]), "offline", root, **info)


def read(resource: str, root: Path | None = None) -> dict[str, Any] | None:
    try:
        rec = json.loads(_path(resource, root).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def read_all(root: Path | None = None) -> list[dict[str, Any]]:
    d = root or state_dir()
    out = []
    try:
        names = sorted(p.name for p in d.glob("*.json") if not p.name.startswith("."))
    except OSError:
        return []
    for n in names:
        rec = read(n[: -len(".json")], d)
        if rec is not None:
            out.append(rec)
    return out
