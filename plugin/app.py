"""The Flask app: one view per VolumeDriver call, one error handler, Docker's content type."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from plugin.driver import Driver
from plugin.protocol import CONTENT_TYPE, SCHEMAS, error_body, parse_request
from storage.errors import NoSuchVolume, VeritasError
from storage.units import check_name

log = logging.getLogger("veritas.plugin")

# How long Get waits for a disk group that cannot be read yet before it drops the connection unanswered
# (Docker gives Get a minute). Docker takes every answered Get error for "no such volume", forgets the
# volume and may make a local one of that name; a dropped connection is a transport error to it, which
# it reports (after its retries) without deciding anything.
GET_PATIENCE = 20.0


class NotReady(Exception):
    """The plugin cannot tell now whether a volume exists: the call gets no answer at all."""


def _drop_connection(why: str) -> Response:
    """Close the client's connection without an answer (under gunicorn; the reply is for other servers)."""
    log.warning("%s: %s; closing the connection unanswered so Docker does not take it for a missing volume",
                request.path, why)
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return _reply(error_body(f"veritas plugin not ready: {why}"), 503)


def _reply(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype=CONTENT_TYPE)


def _patient_get(driver: Driver, name: str) -> dict[str, Any]:
    """Get answers "no such volume" only when the catalog says so; until it can be read, it waits."""
    check_name(name, "volume name")
    deadline = time.monotonic() + GET_PATIENCE
    warned = False
    while True:
        try:
            return driver.get(name)
        except NoSuchVolume:
            raise
        except Exception as exc:  # any answered error would deny the volume to Docker
            if time.monotonic() >= deadline:
                raise NotReady(f"cannot read volume {name}: {exc}") from exc
            if not warned:
                log.warning("Get %s waits: %s", name, exc)
                warned = True
            time.sleep(0.2)


View = Callable[[dict[str, Any]], dict[str, Any]]


def _views(driver: Driver) -> dict[str, View]:
    """Each VolumeDriver call as a function of its checked request, answering Docker's reply body."""

    def create(r: dict[str, Any]) -> dict[str, Any]:
        driver.create(r["Name"], r.get("Opts") or {})
        return {"Err": ""}

    def remove(r: dict[str, Any]) -> dict[str, Any]:
        driver.remove(r["Name"])
        return {"Err": ""}

    def unmount(r: dict[str, Any]) -> dict[str, Any]:
        driver.unmount(r["Name"], r["ID"])
        return {"Err": ""}

    views: dict[str, View] = {
        "Plugin.Activate": lambda r: {"Implements": ["VolumeDriver"]},
        "VolumeDriver.Create": create,
        "VolumeDriver.Remove": remove,
        "VolumeDriver.Mount": lambda r: {"Mountpoint": driver.mount(r["Name"], r["ID"]), "Err": ""},
        "VolumeDriver.Unmount": unmount,
        "VolumeDriver.Path": lambda r: {"Mountpoint": driver.path(r["Name"]), "Err": ""},
        "VolumeDriver.Get": lambda r: {"Volume": _patient_get(driver, r["Name"]), "Err": ""},
        "VolumeDriver.List": lambda r: {"Volumes": driver.list(), "Err": ""},
        "VolumeDriver.Capabilities": lambda r: {"Capabilities": {"Scope": "global"}},
    }
    if views.keys() != SCHEMAS.keys():  # a check that must survive python -O
        raise RuntimeError(f"endpoints without a schema or view: {sorted(views.keys() ^ SCHEMAS.keys())}")
    return views


def _http_view(endpoint: str, handle: View) -> Callable[[], Response]:
    """The Flask view of one endpoint: the body checked against its schema, then ``handle``."""

    def view() -> Response:
        body = request.get_data()
        if endpoint == "VolumeDriver.Get" and not body.strip():
            # Docker's retry of a Get whose connection broke resends an empty body: unanswerable,
            # and an answered error would make Docker forget the volume
            return _drop_connection("Get with an empty body (Docker's retry of a lost request)")
        req = parse_request(endpoint, body)
        return _reply(handle(req))

    view.__name__ = endpoint.replace(".", "_")
    return view


def _error_handlers(app: Flask) -> None:
    """Every failure becomes Docker's Err reply, except NotReady, which gets no answer at all."""

    @app.errorhandler(NotReady)
    def not_ready(exc: NotReady) -> Response:
        return _drop_connection(str(exc))

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


def create_app(driver: Driver) -> Flask:
    app = Flask("veritas")
    for endpoint, handle in _views(driver).items():
        app.add_url_rule(f"/{endpoint}", view_func=_http_view(endpoint, handle), methods=["POST"])
    _error_handlers(app)
    return app
