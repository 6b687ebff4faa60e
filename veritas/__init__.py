"""The ``veritas`` command: the storage CLI plus the plugin and (later) agent commands."""
