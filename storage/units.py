"""Parsing and validating user-supplied sizes and names.

Nothing from a request is ever used as a path or a shell word before it passes ``check_name``.
"""

from __future__ import annotations

import re

from storage.errors import BadName, BadSize

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

_SUFFIX = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": PiB}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$", re.IGNORECASE | re.ASCII)  # no other digits
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_size(text: str | int, what: str = "size") -> int:
    """Return a size in bytes from forms like ``1g``, ``500M``, ``1.5GiB`` or ``1048576``.

    Bare numbers are bytes. Zero, negative, malformed or fractional-byte sizes are refused.
    """
    if isinstance(text, bool):
        raise BadSize(f"invalid {what} {text!r}: expected a number with an optional k/m/g/t/p suffix")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(text.strip())
        if not m:
            raise BadSize(
                f"invalid {what} {text!r}: expected a positive number with an optional k/m/g/t/p suffix,"
                " e.g. 1g or 500m"
            )
        number, suffix = m.group(1), m.group(2).lower()
        mult = _SUFFIX[suffix]
        if "." in number:
            whole, frac = number.split(".")
            if mult == 1 and int(frac):
                raise BadSize(f"invalid {what} {text!r}: a size in bytes must be a whole number")
            value = int(whole) * mult + (int(frac) * mult) // (10 ** len(frac))
        else:
            value = int(number) * mult
    if value <= 0:
        raise BadSize(f"invalid {what} {text!r}: must be greater than zero")
    return value


def format_size(n: int, long: bool = False) -> str:
    """Human form: the largest unit that keeps one decimal honest.

    Listings use the short form (``7.9G``); messages use ``long`` (``7.9 GiB``), which reads as a
    sentence and cannot be taken for a byte count.
    """
    for unit, mult in (("P", PiB), ("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= mult:
            text = f"{n / mult:.1f}".removesuffix(".0")
            return f"{text} {unit}iB" if long else f"{text}{unit}"
    return f"{n} B" if long else f"{n}B"


def check_name(name: object, what: str = "name") -> str:
    """Validate an object name: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``, never ``..``-like."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise BadName(
            f"invalid {what} {name!r}: use 1-64 characters from letters, digits, '_', '.', '-',"
            " starting with a letter or digit (no '/', '..', spaces)"
        )
    return name


def round_up(n: int, unit: int = MiB) -> int:
    return -(-n // unit) * unit
