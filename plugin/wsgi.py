"""gunicorn entry point: ``plugin.wsgi:app``; the configuration comes from $VERITAS_CONFIG."""

from __future__ import annotations

import logging

from plugin.app import create_app
from plugin.docker_api import Engine
from plugin.driver import Driver
from storage.config import load_config

logging.basicConfig(level=logging.INFO, format="%(asctime)s veritas[%(process)d] %(levelname)s %(message)s")
_config = load_config()
app = create_app(Driver(_config, Engine(_config.plugin.docker_host, _config.plugin.driver, timeout=2.0)))
