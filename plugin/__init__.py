"""The Docker VolumeDriver plugin: Docker's protocol translated into storage-core calls.

No storage logic lives here; errors from the core reach Docker through the ``Err`` field, translated
in plugin.protocol and nowhere else.
"""
