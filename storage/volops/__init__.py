"""Volume operations, one concern a module; storage.volumes is their public face."""
