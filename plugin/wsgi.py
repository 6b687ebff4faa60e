"""gunicorn entry point: ``plugin.wsgi:app``; the configuration comes from $VERITAS_CONFIG.

gunicorn imports this in each worker as it starts (no preload), so the worker opens the disk group
here, before its first request: opening runs recovery, which thaws a source a killed worker left
frozen mid-snapshot (and finishes its other operations) at once, not when the next request comes.
A failed open is retried at the first request; it never stops the worker from booting.
"""

from __future__ import annotations

import logging
import sqlite3

from plugin.app import create_app
from plugin.docker_api import Engine
from plugin.driver import Driver
from storage.config import load_config
from storage.errors import VeritasError

logging.basicConfig(level=logging.INFO, format="%(asctime)s veritas[%(process)d] %(levelname)s %(message)s")
log = logging.getLogger("veritas.plugin")
_config = load_config()
driver = Driver(_config, Engine(_config.plugin.docker_host, _config.plugin.driver, timeout=2.0))
app = create_app(driver)
try:
    driver.dg  # noqa: B018 (opens the disk group and recovers)
except (VeritasError, OSError, sqlite3.Error) as exc:
    log.warning("worker start: cannot open the disk group yet (retried at the first request): %s", exc)
