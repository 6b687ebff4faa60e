"""The catalog: the record of a disk group's disks, volumes, subdisks, mounts and pending intents;
and the catalog store, which knows which disk groups exist and hands out their catalogs and locks."""

from storage.catalog.base import (
    Catalog,
    CatalogStore,
    DiskGroupRec,
    DiskRec,
    IntentRec,
    MountRec,
    SubdiskRec,
    VolumeRec,
)

__all__ = ["Catalog", "CatalogStore", "DiskGroupRec", "DiskRec", "IntentRec", "MountRec", "SubdiskRec", "VolumeRec"]
