"""Sizes and names typed by users: parse_size, format_size, check_name, round_up."""

from __future__ import annotations

import pytest

from storage.errors import BadName, BadSize, InvalidArgument
from storage.units import GiB, KiB, MiB, TiB, check_name, format_size, parse_size, round_up


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1g", GiB),
        ("1G", GiB),
        ("500M", 500 * MiB),
        ("500m", 500 * MiB),
        ("1.5g", 3 * GiB // 2),
        ("0.5m", 512 * KiB),
        ("1GiB", GiB),
        ("1gib", GiB),
        ("1gb", GiB),
        ("1GB", GiB),
        ("2t", 2 * TiB),
        ("64k", 64 * KiB),
        ("64KiB", 64 * KiB),
        ("4096", 4096),
        ("4096b", 4096),
        ("1", 1),
        (" 2g ", 2 * GiB),
        ("10 m", 10 * MiB),
        ("2.0", 2),
        (4096, 4096),
        (GiB, GiB),
        (1, 1),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    got = parse_size(text)
    assert got == expected
    assert type(got) is int


@pytest.mark.parametrize(
    "text",
    ["abc", "0", "0g", "0.0m", "-1g", "-1", "1.5.g", "", " ", "1x", "1gg", "g", ".5g", "1.g", "1e9",
     "1 2g", "1,5g", "0x10", "1.5", "1.5b", "0.1"],
)
def test_parse_size_rejects_text(text: str) -> None:
    with pytest.raises(BadSize):
        parse_size(text)


@pytest.mark.parametrize("value", [True, False, 0, -5, -GiB])
def test_parse_size_rejects_values(value: int) -> None:
    with pytest.raises(BadSize):
        parse_size(value)


def test_bad_size_is_an_invalid_argument_naming_what_and_value() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_size("12q", "volume size")
    assert isinstance(info.value, BadSize)
    assert "volume size" in str(info.value)
    assert "12q" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (KiB, "1K"),
        (3 * KiB // 2, "1.5K"),
        (MiB, "1M"),
        (500 * MiB, "500M"),
        (GiB, "1G"),
        (3 * GiB // 2, "1.5G"),
        (20 * GiB, "20G"),
        (TiB, "1T"),
        (5 * TiB // 2, "2.5T"),
        (1024 * TiB, "1P"),
        (100 * 1024 * TiB, "100P"),
        (8 * GiB - MiB, "8G"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize("text", ["1g", "500m", "1.5g", "20g", "4k", "3t"])
def test_format_size_round_trips_through_parse_size(text: str) -> None:
    n = parse_size(text)
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize(
    "name",
    ["demovol", "a", "A", "7", "a.b-c_d", "vol_1.snap-2", "Vol9", "a" * 64, "0" + "x" * 63, "a.b.c"],
)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["a/b", "/abs", "..", ".", "a..b", "a...", "has space", "-lead", ".lead", "_lead", "a" * 65, "", None,
     5, "\u00e9", "caf\u00e9", "a\nb", "abc\n", "\nabc", "a\tb", "a\x00b", "a;b", "$(x)", "a*", b"abc"],
)
def test_check_name_rejects(name: object) -> None:
    with pytest.raises(BadName):
        check_name(name)


def test_bad_name_message_names_what() -> None:
    with pytest.raises(BadName, match="volume name"):
        check_name("a/b", "volume name")


@pytest.mark.parametrize(
    ("n", "unit", "expected"),
    [
        (0, MiB, 0),
        (1, MiB, MiB),
        (MiB, MiB, MiB),
        (MiB + 1, MiB, 2 * MiB),
        (2 * MiB - 1, MiB, 2 * MiB),
        (GiB + 1, GiB, 2 * GiB),
        (10, 4, 12),
        (12, 4, 12),
    ],
)
def test_round_up(n: int, unit: int, expected: int) -> None:
    assert round_up(n, unit) == expected


def test_round_up_defaults_to_mib() -> None:
    assert round_up(1) == MiB
    assert round_up(3 * MiB + 5) == 4 * MiB


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, "0 B"), (512, "512 B"), (300 * MiB, "300 MiB"), (8 * GiB - 100 * MiB, "7.9 GiB"),
     (100 * 1024 * TiB, "100 PiB"), (3 * TiB // 2, "1.5 TiB")],
)
def test_format_size_long_form_for_messages(n: int, expected: str) -> None:
    assert format_size(n, long=True) == expected


def test_parse_size_takes_petabytes() -> None:
    assert parse_size("100p") == 100 * 1024 * TiB


@pytest.mark.parametrize("text", ["\u0661\u0662m", "1_0g", "\uff11g"])
def test_parse_size_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(BadSize):
        parse_size(text)
