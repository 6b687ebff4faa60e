"""Which volumes are an RVG's secondary on this site, read from the RVG records themselves.

Mount and make sit below replication in the layers, yet must refuse a secondary's volumes (replication
writes them; a local mount would see a replica being rewritten, a local make would shadow the name).
This reads the records storage.replication.rvg writes (``repl/<rvg>/rvg.json`` in the disk group's root).
"""

from __future__ import annotations

import json
from pathlib import Path

from storage.errors import SecondaryVolume
from storage.group import DiskGroup


def record_path(dg: DiskGroup, rvg: str) -> Path:
    return dg.root / "repl" / rvg / "rvg.json"


def secondary_rvg(dg: DiskGroup, volume: str) -> str | None:
    """The RVG that holds ``volume`` as secondary on this site, if any."""
    d = dg.root / "repl"
    if not d.is_dir():
        return None
    for p in sorted(d.glob("*/rvg.json")):
        try:
            raw = json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # removed meanwhile, or being replaced (writes are atomic: never torn)
        if raw.get("role") == "secondary" and volume in raw.get("volumes", []):
            return str(raw.get("name", p.parent.name))
    return None


def refuse_secondary(dg: DiskGroup, volume: str) -> None:
    """:raises SecondaryVolume: ``volume`` is a secondary here (nothing is changed)."""
    name = secondary_rvg(dg, volume)
    if name is not None:
        raise SecondaryVolume(f"volume {volume} is the secondary of RVG {name} on this site: it cannot be"
                              f" mounted or made here while replication writes it; make this site primary"
                              f" first (veritas rvg migrate or takeover {name})")
