"""veritas storage core: disk groups, volumes, layouts, snapshots, IOPS limits and their catalog.

The core knows nothing of Docker or HTTP; the plugin and the agents call it as a library.
"""
