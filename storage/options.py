"""Volume and snapshot options, parsed into typed specs in one step before anything is done.

The CLI (``vol make``, ``snap make``) and the plugin's Create hand every option they were given to
these functions first: an operation that starts has all its options checked already, so a bad value
can never be found after a step that changed something (a snapshot made, then its maxiops refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from storage.catalog.base import VolumeRec
from storage.config import FSTYPES, PROVISIONING
from storage.errors import AlreadyExists, InvalidArgument, UnknownOption
from storage.layouts import LAYOUTS
from storage.units import check_name, format_size, parse_size

VOLUME_OPTIONS = ("size", "layout", "fstype", "nmirror", "ncol", "maxiops", "protect", "provisioning")
SNAPSHOT_OPTIONS = ("sourcevol", "cachesize", "autogrow", "maxiops")
ALL_OPTIONS = tuple(dict.fromkeys(VOLUME_OPTIONS + SNAPSHOT_OPTIONS))
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class VolumeSpec:
    """A volume to make. ``None`` means "not asked": the config default or the layout's own applies."""

    size: int | None = None
    layout: str | None = None
    fstype: str | None = None
    nmirror: int | None = None
    ncol: int | None = None
    maxiops: int | None = None
    protect: bool | None = None
    provisioning: str | None = None  # "thin" | "thick"


@dataclass(frozen=True)
class SnapshotSpec:
    """A snapshot to take; ``cachesize`` None is the config's percentage, ``maxiops`` None the source's."""

    source: str
    cachesize: int | None = None
    maxiops: int | None = None
    autogrow: bool | None = None  # None: not asked (off for a new snapshot)


MAX_COUNT = 2**31 - 1  # above any real IOPS limit, mirror or column count, and within every integer store


def int_option(key: str, raw: Any, allow_zero: bool = False) -> int:
    """A non-negative (or positive) integer option in ASCII digits (Python's int() also takes '1_0' and
    other scripts' digits); ``bool`` is refused although Python calls it an int."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.strip().removeprefix("-").isascii() and raw.strip().removeprefix("-").isdigit():
        value = int(raw.strip())
    else:
        raise InvalidArgument(f"option {key} must be an integer, got {raw!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"option {key} must be a {'non-negative' if allow_zero else 'positive'} integer,"
                              f" got {raw!r}")
    if value > MAX_COUNT:
        raise InvalidArgument(f"option {key} must be at most {MAX_COUNT}, got {raw!r}")
    return value


def bool_option(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgument(f"option {key} must be true or false, got {raw!r}")


def autogrow_option(raw: Any) -> bool:
    """``autogrow`` (storage.snapcache): on or off, and nothing else (not even empty)."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"option autogrow must be on or off, got {raw!r}")


def _shown(key: str) -> str:
    """An option name as a message shows it: quoted unless a plain word (it may hold a newline)."""
    return key if key.isascii() and key.replace("_", "").replace("-", "").isalnum() else repr(key)


def _unknown(opts: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    unknown = [k for k in opts if k not in valid]
    if unknown:
        raise UnknownOption(f"unknown option(s) {', '.join(map(_shown, sorted(map(str, unknown))))}; valid options: "
                            f"{', '.join(valid)}")


def parse_volume(size: str | int | None, opts: Mapping[str, Any]) -> VolumeSpec:
    """Check every option of a new volume. :raises InvalidArgument: naming the option and the valid forms."""
    _unknown(opts, VOLUME_OPTIONS)
    if size is None:
        size = opts.get("size")
    elif "size" in opts and opts["size"] is not None:
        raise InvalidArgument("size given twice (as an argument and as size=)")
    layout = opts.get("layout")
    if layout is not None:
        layout = str(layout)
        if layout not in LAYOUTS:
            raise UnknownOption(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    fstype = opts.get("fstype") or None
    if fstype is not None:
        fstype = str(fstype)
        if fstype not in (*FSTYPES, "none"):
            raise InvalidArgument(f"unknown fstype {fstype!r}; valid: {', '.join(FSTYPES)}, none")

    provisioning = opts.get("provisioning")
    if provisioning is not None:
        provisioning = str(provisioning).strip().lower()
        if provisioning not in PROVISIONING:
            raise InvalidArgument(f"option provisioning must be {' or '.join(PROVISIONING)}, got"
                                  f" {opts['provisioning']!r} (thin: sparse images, allocated as written;"
                                  " thick: allocated in full at make)")

    def num(key: str, allow_zero: bool = False) -> int | None:
        raw = opts.get(key)
        return None if raw is None else int_option(key, raw, allow_zero)

    spec = VolumeSpec(
        size=None if size is None else parse_size(size),
        layout=layout,
        fstype=fstype,
        nmirror=num("nmirror"),
        ncol=num("ncol"),
        maxiops=num("maxiops", allow_zero=True),
        protect=None if opts.get("protect") is None else bool_option("protect", opts["protect"]),
        provisioning=provisioning,
    )
    if fstype == "none":
        _check_tree(spec)
    return spec


def _check_tree(spec: VolumeSpec) -> None:
    """fstype=none (a directory on a disk's filesystem, no filesystem of its own) is one concat tree:
    no mirror or stripe of its own, and nothing to allocate ahead."""
    if spec.layout not in (None, "concat", "auto"):
        raise InvalidArgument(f"fstype=none has no filesystem of its own to spread over disks, so it takes"
                              f" layout=concat only, not layout={spec.layout}; use fstype=xfs (or btrfs) for"
                              " mirrors and stripes")
    if spec.nmirror not in (None, 1) or spec.ncol not in (None, 1):
        raise InvalidArgument("fstype=none is a directory on one disk: it has one column and no mirrors;"
                              " use fstype=xfs or btrfs with layout=mirror or stripe")
    if spec.provisioning == "thick":
        raise InvalidArgument("fstype=none is a directory held to its size by a quota: there is no image to"
                              " allocate ahead (provisioning=thick); leave provisioning out")


def parse_snapshot(source: Any, opts: Mapping[str, Any]) -> SnapshotSpec:
    """Check a snapshot's source name and every option. :raises InvalidArgument:"""
    bad = [k for k in opts if k not in SNAPSHOT_OPTIONS[1:]]
    if bad and not set(bad) - set(ALL_OPTIONS):
        raise InvalidArgument(f"a snapshot (sourcevol) takes only {', '.join(SNAPSHOT_OPTIONS)};"
                              f" drop {', '.join(sorted(bad))}")
    _unknown(opts, SNAPSHOT_OPTIONS[1:])
    cache, iops, grow = opts.get("cachesize"), opts.get("maxiops"), opts.get("autogrow")
    return SnapshotSpec(check_name(source, "source volume name"),
                        None if cache is None else parse_size(cache, "cachesize"),
                        None if iops is None else int_option("maxiops", iops, allow_zero=True),
                        None if grow is None else autogrow_option(grow))


def parse_create(opts: Mapping[str, Any]) -> VolumeSpec | SnapshotSpec:
    """The plugin's Create options: a snapshot when ``sourcevol`` is given, else a volume."""
    _unknown(opts, ALL_OPTIONS)
    if "sourcevol" in opts:
        return parse_snapshot(opts["sourcevol"], {k: v for k, v in opts.items() if k != "sourcevol"})
    for key in ("cachesize", "autogrow"):
        if key in opts:
            raise InvalidArgument(f"{key} applies only to snapshots: give sourcevol=VOLUME too")
    return parse_volume(None, opts)


def conflicts(spec: VolumeSpec | SnapshotSpec, v: VolumeRec) -> dict[str, str]:
    """The options ``spec`` asks for that the existing volume ``v`` does not have, each with ``v``'s value
    as a message shows it. Options not asked (None, layout "auto") match whatever ``v`` has."""
    wanted: dict[str, object] = {}
    have: dict[str, object] = {}
    shown: dict[str, str] = {}
    if isinstance(spec, SnapshotSpec):
        wanted["sourcevol"], have["sourcevol"] = spec.source, v.snapshot_of
        if spec.cachesize is not None:
            wanted["cachesize"], have["cachesize"] = spec.cachesize, v.cachesize
            shown["cachesize"] = format_size(v.cachesize, long=True)
        if spec.maxiops is not None:
            wanted["maxiops"], have["maxiops"] = spec.maxiops, v.maxiops
        if spec.autogrow is not None:
            wanted["autogrow"], have["autogrow"] = spec.autogrow, v.autogrow
    else:
        if spec.size is not None:
            wanted["size"], have["size"] = spec.size, v.size
            shown["size"] = format_size(v.size, long=True)
        if spec.layout not in (None, "auto"):
            wanted["layout"], have["layout"] = spec.layout, v.layout
        for key in ("fstype", "nmirror", "ncol", "maxiops", "protect", "provisioning"):
            if getattr(spec, key) is not None:
                wanted[key], have[key] = getattr(spec, key), getattr(v, key)
    return {k: shown.get(k, str(have[k])) for k in wanted if wanted[k] != have[k]}


def require_same(v: VolumeRec, spec: VolumeSpec | SnapshotSpec, asked: Mapping[str, Any]) -> None:
    """An idempotent Create: asking again for an existing volume with the options it has succeeds.

    :raises AlreadyExists: naming each option that differs, its value and what was asked (``asked``
        holds the options as given, before parsing).
    """
    diff = conflicts(spec, v)
    if diff:
        desc = ", ".join(f"{k}={have} (asked {asked[k]})" for k, have in diff.items())
        raise AlreadyExists(f"volume {v.name} already exists with different options: {desc};"
                            " remove it first or use another name")
