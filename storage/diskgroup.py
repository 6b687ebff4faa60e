"""Disk groups, as callers know them: the record (storage.group) and its lifecycle (storage.dglife).

Modules inside the storage core import the one they need; this module gathers both for the CLI, the
plugin and tests.
"""

from __future__ import annotations

from storage.dglife import default_dg, deport, destroy, import_dg, init, open_dg
from storage.group import DG_KEY, DISK_RESERVE, DiskGroup, DiskSpec, list_names

__all__ = ["DG_KEY", "DISK_RESERVE", "DiskGroup", "DiskSpec", "default_dg", "deport", "destroy", "import_dg", "init",
           "list_names", "open_dg"]
