"""The lab: several Docker nodes on one machine (``scripts/lab``), for tests, benchmarks and people.

Each node has its own network, mount and UTS namespace, its own dockerd and its own veritas plugin;
a switch namespace links the nodes on 198.18.0.0/15. Nothing here runs in, or changes, the host's
network namespace or its Docker engine. The storage core never imports this package.
"""
