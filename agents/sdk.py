"""The docker SDK, imported when an action needs it: never on the monitor path (see agents.engine).

The entry scripts start Python with -S, because site's start-up (every .pth file of site-packages) is
most of a monitor's time. So site-packages joins the path only when an action needs the SDK: load()
turns site on then, once, and imports the SDK, or says what to install (NotInstalled: OCF 5).
"""

from __future__ import annotations

import sys
from types import ModuleType

from agents.errors import NotInstalled


def enable_site() -> None:
    """Add site-packages to the path (what -S left out), unless it is there already."""
    import site  # under -S importing it adds nothing by itself

    if not set(site.getsitepackages()) & set(sys.path):
        site.main()


def load() -> ModuleType:
    """The ``docker`` package, with its errors and types modules loaded."""
    enable_site()
    try:
        import docker
        import docker.errors
        import docker.types
    except ImportError:
        raise NotInstalled(f"the docker Python SDK is not installed for {sys.executable} "
                           "(pip install docker, or the distribution's python3-docker)") from None
    return docker
