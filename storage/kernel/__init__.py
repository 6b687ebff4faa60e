"""Thin wrappers over kernel facilities: loop devices, filesystems, mounts, reflink, btrfs, cgroups.

Each function does one system operation; volume logic lives above, in the storage core.
"""
