"""Volumes: make, list, info, grow, mount, unmount, remove, repair, IOPS limits (the public face).

Each operation lives in its own module under storage.volops, on the shared steps of storage.steps;
this module gathers them for callers (the CLI, the plugin, the disk group's destroy, tests).

Every multi-step operation records an intent in the catalog before it touches the kernel, passes
named crash points, and on failure undoes its own steps; storage.recovery finishes what a killed
process left. Each volume's operations are serialised by its lock stripe.
"""

from __future__ import annotations

from storage import options, steps
from storage.recovery import check_free
from storage.steps import devices, ensure_identity, health, images, is_mounted, reserve_growth, shape_of, teardown
from storage.volops.grow import grow
from storage.volops.iops import apply_maxiops, set_maxiops
from storage.volops.make import make
from storage.volops.mount import ADMIN_MOUNT_ID, mount, umount
from storage.volops.query import info, list_volumes
from storage.volops.remove import remove
from storage.volops.repair import repair

MAKE_OPTIONS = options.VOLUME_OPTIONS

# names from before the split into storage.volops and storage.steps, kept for their callers
_detach = steps.detach
_drop_writeback = steps.drop_writeback
_get = steps.get
_ready = steps.ready

__all__ = [
    "ADMIN_MOUNT_ID", "MAKE_OPTIONS", "_detach", "_drop_writeback", "_get", "_ready", "apply_maxiops",
    "check_free", "devices", "ensure_identity", "grow", "health", "images", "info", "is_mounted",
    "list_volumes", "make", "mount", "remove", "repair", "reserve_growth", "set_maxiops", "shape_of", "teardown",
    "umount",
]
