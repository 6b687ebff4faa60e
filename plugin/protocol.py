"""The VolumeDriver wire protocol: request schemas, the content type, and the one error translation."""

from __future__ import annotations

import json
from typing import Any

from storage.errors import InvalidArgument

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"

# endpoint -> (required fields, optional fields); Docker's JSON keys exactly
SCHEMAS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "Plugin.Activate": (frozenset(), frozenset()),
    "VolumeDriver.Create": (frozenset({"Name"}), frozenset({"Opts"})),
    "VolumeDriver.Remove": (frozenset({"Name"}), frozenset()),
    "VolumeDriver.Mount": (frozenset({"Name", "ID"}), frozenset()),
    "VolumeDriver.Unmount": (frozenset({"Name", "ID"}), frozenset()),
    "VolumeDriver.Path": (frozenset({"Name"}), frozenset()),
    "VolumeDriver.Get": (frozenset({"Name"}), frozenset()),
    "VolumeDriver.List": (frozenset(), frozenset()),
    "VolumeDriver.Capabilities": (frozenset(), frozenset()),
}


def parse_request(endpoint: str, body: bytes) -> dict[str, Any]:
    """Decode and check a request body: a JSON object with exactly the endpoint's fields.

    Docker sends an empty body (or ``{}``/``null``) to the calls that take no arguments.
    """
    required, optional = SCHEMAS[endpoint]
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        data: Any = {}
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"malformed JSON in {endpoint} request: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{endpoint} request must be a JSON object, got {type(data).__name__}")
    missing = required - data.keys()
    if missing:
        raise InvalidArgument(f"{endpoint} request lacks field(s) {', '.join(sorted(missing))}")
    extra = data.keys() - required - optional
    if extra:
        raise InvalidArgument(f"{endpoint} request has unexpected field(s) {', '.join(map(shown, sorted(extra)))}")
    for key in ("Name", "ID"):
        if key in data and not isinstance(data[key], str):
            raise InvalidArgument(f"{endpoint}: field {key} must be a string")
    if "Opts" in data:
        opts = data["Opts"]
        if opts is None:
            data["Opts"] = {}
        elif not isinstance(opts, dict) or not all(isinstance(v, str) for v in opts.values()):
            raise InvalidArgument(f"{endpoint}: Opts must be an object of string values")
    return data


def shown(key: str) -> str:
    """A key of the sender's as a message shows it: quoted unless a plain word (it may hold a newline)."""
    return key if key.isascii() and key.replace("_", "").replace("-", "").isalnum() else repr(key)


def error_body(message: str) -> dict[str, str]:
    return {"Err": message}
