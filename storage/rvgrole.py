"""Which volumes are an RVG's secondary on this site, read from the RVG records themselves.

Mount and make sit below replication in the layers, yet must refuse a secondary's volumes (replication
writes them; a local mount would see a replica being rewritten, a local make would shadow the name).
This reads the records storage.replication.rvg writes (``repl/<rvg>/rvg.json`` in the disk group's root).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.errors import ReplicatedVolume, SecondaryVolume
from storage.group import DiskGroup


def record_path(dg: DiskGroup, rvg: str) -> Path:
    return dg.root / "repl" / rvg / "rvg.json"


def _records(dg: DiskGroup) -> list[dict[str, Any]]:
    d = dg.root / "repl"
    out = []
    for p in sorted(d.glob("*/rvg.json")) if d.is_dir() else []:
        try:
            out.append(dict(json.loads(p.read_text())))
        except (OSError, ValueError):
            continue  # removed meanwhile (writes are atomic: never torn)
    return out


def secondary_rvg(dg: DiskGroup, volume: str) -> str | None:
    """The RVG that holds ``volume`` as secondary on this site, if any."""
    for raw in _records(dg):
        if raw.get("role") == "secondary" and volume in raw.get("volumes", []):
            return str(raw.get("name"))
    return None


def refuse_secondary(dg: DiskGroup, volume: str) -> None:
    """:raises SecondaryVolume: ``volume`` is a secondary here (nothing is changed)."""
    name = secondary_rvg(dg, volume)
    if name is not None:
        raise SecondaryVolume(f"volume {volume} is the secondary of RVG {name} on this site: it cannot be"
                              f" mounted or made here while replication writes it; make this site primary"
                              f" first (veritas rvg migrate or takeover {name})")


def rvgs(dg: DiskGroup) -> list[tuple[str, str]]:
    """Every RVG recorded on this site, with this site's role in it."""
    return [(str(raw.get("name")), str(raw.get("role"))) for raw in _records(dg)]


def rvg_of(dg: DiskGroup, volume: str) -> tuple[str, str] | None:
    """The RVG holding ``volume`` on this site and this site's role in it, if any."""
    for raw in _records(dg):
        if volume in raw.get("volumes", []):
            return str(raw.get("name")), str(raw.get("role"))
    return None


def refuse_reshape(dg: DiskGroup, volume: str, what: str) -> None:
    """Refuse to remove, grow or otherwise reshape a volume of an RVG (``what``: "removed", "grown"),
    on either site: replication ships a fixed set of images of a fixed size, and the other site's copy
    would silently stop matching. The caller holds the volume's lock (createpri takes it too), and calls
    this before it changes anything.

    :raises ReplicatedVolume: on the primary; :raises SecondaryVolume: on the secondary."""
    found = rvg_of(dg, volume)
    if found is None:
        return
    name, role = found
    if role == "secondary":
        raise SecondaryVolume(f"volume {volume} is the secondary of RVG {name} on this site: it cannot be {what}"
                              f" here while replication writes it; make this site primary first (veritas rvg"
                              f" migrate or takeover {name}), and reshape it only with its RVG's replication"
                              f" stopped and the volume taken out of the RVG (veritas rvg delvol {name} {volume},"
                              f" on the primary)")
    raise ReplicatedVolume(f"volume {volume} is in RVG {name} (primary on this site): it cannot be {what} as"
                           f" if unreplicated, which would silently break replication to its secondary (an"
                           f" RVG's volumes keep their set and size while it exists); stop replication (veritas"
                           f" rvg stoprep {name}) and take the volume out of RVG {name} first (veritas rvg"
                           f" delvol {name} {volume}); nothing was changed")
