"""The catalog: the record of a disk group's disks, volumes, subdisks, mounts and pending intents."""

from storage.catalog.base import (
    Catalog,
    DiskGroupRec,
    DiskRec,
    IntentRec,
    MountRec,
    SubdiskRec,
    VolumeRec,
)

__all__ = ["Catalog", "DiskGroupRec", "DiskRec", "IntentRec", "MountRec", "SubdiskRec", "VolumeRec"]
