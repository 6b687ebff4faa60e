"""VVR-style replication, the data path: crash-consistent checkpoints of an RVG's volumes, the changed
extents between two checkpoints (FIEMAP), the checksummed delta stream, its atomic apply on a replica,
and the bounded log of deltas not yet acknowledged (SRL) with its change-map fallback (DCM).

The link, the RVG commands and the roles build on these (issue 12's later phases).
"""
