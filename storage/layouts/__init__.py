"""Layout engines, by name. An explicit registry: no class lookup by string import."""

from __future__ import annotations

from storage.errors import UnknownOption, Unsupported
from storage.layouts.base import LayoutEngine, Shape
from storage.layouts.concat import ConcatEngine
from storage.layouts.raid import MirrorEngine, MirrorStripeEngine, StripeEngine

ENGINES: dict[str, LayoutEngine] = {
    e.name: e for e in (ConcatEngine(), MirrorEngine(), StripeEngine(), MirrorStripeEngine())
}
LAYOUTS = (*ENGINES, "auto", "raid5")


def engine(layout: str) -> LayoutEngine:
    if layout in ("raid5", "raid6"):
        raise Unsupported(
            f"layout {layout} is refused: btrfs parity RAID is not crash-safe (write hole) and there is no"
            " MD RAID here; use layout=mirror for redundancy or layout=stripe for throughput"
        )
    try:
        return ENGINES[layout]
    except KeyError:
        raise UnknownOption(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}") from None


__all__ = ["ENGINES", "LAYOUTS", "LayoutEngine", "Shape", "engine"]
