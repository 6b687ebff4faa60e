"""The VolumeDriver request check (plugin.protocol.parse_request) on raw bodies, without a server."""

from __future__ import annotations

import pytest

from plugin.protocol import SCHEMAS, error_body, parse_request
from storage.errors import InvalidArgument


@pytest.mark.parametrize("body", [b"", b"  \n", b"{}", b"null"])
def test_calls_without_arguments_take_an_empty_body(body: bytes) -> None:
    assert parse_request("VolumeDriver.List", body) == {}
    assert parse_request("Plugin.Activate", body) == {}


def test_every_endpoint_takes_its_required_fields() -> None:
    for endpoint, (required, _optional) in SCHEMAS.items():
        body = "{" + ", ".join(f'"{k}": "x"' for k in sorted(required)) + "}"
        assert parse_request(endpoint, body.encode()) == dict.fromkeys(required, "x")


def test_create_opts_null_is_no_options() -> None:
    assert parse_request("VolumeDriver.Create", b'{"Name": "v1", "Opts": null}') == {"Name": "v1", "Opts": {}}
    assert parse_request("VolumeDriver.Create", b'{"Name": "v1", "Opts": {"size": "1g"}}')["Opts"] == {"size": "1g"}


@pytest.mark.parametrize(("endpoint", "body", "words"), [
    ("VolumeDriver.Create", b'{"Name": ', "malformed JSON in VolumeDriver.Create"),
    ("VolumeDriver.Get", b"[]", "must be a JSON object, got list"),
    ("VolumeDriver.Get", b'"v1"', "must be a JSON object, got str"),
    ("VolumeDriver.Mount", b'{"Name": "v1"}', "lacks field(s) ID"),
    ("VolumeDriver.Remove", b"{}", "lacks field(s) Name"),
    ("VolumeDriver.Path", b'{"Name": "v1", "Extra": 1}', "unexpected field(s) Extra"),
    ("VolumeDriver.Path", b'{"Name": "v1", "a\\nb": 1}', "unexpected field(s) 'a\\nb'"),
    ("VolumeDriver.Get", b'{"Name": 7}', "field Name must be a string"),
    ("VolumeDriver.Unmount", b'{"Name": "v1", "ID": null}', "field ID must be a string"),
    ("VolumeDriver.Create", b'{"Name": "v1", "Opts": {"size": 1}}', "Opts must be an object of string values"),
    ("VolumeDriver.Create", b'{"Name": "v1", "Opts": ["size"]}', "Opts must be an object of string values"),
])
def test_a_bad_body_is_refused_naming_what_is_wrong(endpoint: str, body: bytes, words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_request(endpoint, body)
    assert words in str(err.value)


def test_bytes_that_are_not_utf8_are_a_typed_error_or_a_name_never_a_crash() -> None:
    assert parse_request("VolumeDriver.Get", b'{"Name": "v\xff"}') == {"Name": "v\ufffd"}
    with pytest.raises(InvalidArgument, match="malformed JSON"):
        parse_request("VolumeDriver.Get", b"\xff\xfe")


def test_the_error_body_is_docker_s_err_field() -> None:
    assert error_body("no such volume: v1") == {"Err": "no such volume: v1"}
