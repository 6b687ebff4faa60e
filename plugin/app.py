"""The Flask app: one view per VolumeDriver call, one error handler, Docker's content type."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from plugin.driver import Driver
from plugin.protocol import CONTENT_TYPE, SCHEMAS, error_body, parse_request
from storage.errors import VeritasError

log = logging.getLogger("veritas.plugin")


def _reply(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype=CONTENT_TYPE)


def create_app(driver: Driver) -> Flask:
    app = Flask("veritas")

    views: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "Plugin.Activate": lambda r: {"Implements": ["VolumeDriver"]},
        "VolumeDriver.Create": lambda r: (driver.create(r["Name"], r.get("Opts") or {}), {"Err": ""})[1],
        "VolumeDriver.Remove": lambda r: (driver.remove(r["Name"]), {"Err": ""})[1],
        "VolumeDriver.Mount": lambda r: {"Mountpoint": driver.mount(r["Name"], r["ID"]), "Err": ""},
        "VolumeDriver.Unmount": lambda r: (driver.unmount(r["Name"], r["ID"]), {"Err": ""})[1],
        "VolumeDriver.Path": lambda r: {"Mountpoint": driver.path(r["Name"]), "Err": ""},
        "VolumeDriver.Get": lambda r: {"Volume": driver.get(r["Name"]), "Err": ""},
        "VolumeDriver.List": lambda r: {"Volumes": driver.list(), "Err": ""},
        "VolumeDriver.Capabilities": lambda r: {"Capabilities": {"Scope": "global"}},
    }
    if views.keys() != SCHEMAS.keys():  # a check that must survive python -O
        raise RuntimeError(f"endpoints without a schema or view: {sorted(views.keys() ^ SCHEMAS.keys())}")

    def make_view(endpoint: str) -> Callable[[], Response]:
        def view() -> Response:
            req = parse_request(endpoint, request.get_data())
            return _reply(views[endpoint](req))
        view.__name__ = endpoint.replace(".", "_")
        return view

    for endpoint in views:
        app.add_url_rule(f"/{endpoint}", view_func=make_view(endpoint), methods=["POST"])

    @app.errorhandler(VeritasError)
    def veritas_error(exc: VeritasError) -> Response:
        log.info("%s: %s", request.path, exc)
        return _reply(error_body(str(exc)))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _reply(error_body(f"{request.method} {request.path}: {exc.description}"), exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("%s failed", request.path)
        return _reply(error_body(f"internal error in veritas plugin ({type(exc).__name__}: {exc});"
                                 " the plugin log has the details"))

    return app
