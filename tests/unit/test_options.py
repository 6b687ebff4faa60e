"""Options parsed into a typed spec in one step, and placement messages in human units (pure functions)."""

from __future__ import annotations

import pytest

from storage import options
from storage.config import VolumeDefaults
from storage.errors import BadSize, InvalidArgument, NoSpace, UnknownOption
from storage.layouts import ENGINES
from storage.layouts.base import LayoutEngine, Shape
from storage.units import GiB, MiB, TiB


def test_create_spec_of_a_snapshot_checks_maxiops_before_anything() -> None:
    with pytest.raises(InvalidArgument, match="maxiops"):
        options.parse_create({"sourcevol": "v1", "maxiops": "abc"})
    spec = options.parse_create({"sourcevol": "v1", "maxiops": "300", "cachesize": "10m"})
    assert spec == options.SnapshotSpec("v1", 10 * MiB, 300)


@pytest.mark.parametrize(("opts", "exc", "word"), [
    ({"size": "lots"}, BadSize, "size"), ({"layout": "raid7"}, UnknownOption, "layout"),
    ({"fstype": "zfs"}, InvalidArgument, "fstype"), ({"nmirror": "0"}, InvalidArgument, "nmirror"),
    ({"ncol": "two"}, InvalidArgument, "ncol"), ({"maxiops": "-1"}, InvalidArgument, "maxiops"),
    ({"protect": "maybe"}, InvalidArgument, "protect"), ({"colour": "red"}, UnknownOption, "colour"),
    ({"cachesize": "1g"}, InvalidArgument, "sourcevol"), ({"sourcevol": "v1", "size": "1g"}, InvalidArgument, "size"),
    ({"sourcevol": "../x"}, InvalidArgument, "name"), ({"sourcevol": "v1", "cachesize": "x"}, BadSize, "cachesize"),
])
def test_every_bad_option_is_refused_by_the_parse(opts: dict[str, str], exc: type[Exception], word: str) -> None:
    with pytest.raises(exc, match=word):
        options.parse_create(opts)


@pytest.mark.parametrize("raw", ["1_000", "\u0661\u0662", "+5", "1e3", " ", "99999999999999999999", "5.0"])
def test_integer_options_are_plain_ascii_digits_within_range(raw: str) -> None:
    with pytest.raises(InvalidArgument, match="maxiops"):
        options.parse_create({"maxiops": raw})


def test_volume_spec_leaves_unasked_options_open() -> None:
    assert options.parse_create({}) == options.VolumeSpec()
    assert options.parse_create({"size": "1g", "layout": "mirror", "nmirror": "3", "protect": "yes"}) == \
        options.VolumeSpec(size=GiB, layout="mirror", nmirror=3, protect=True)


@pytest.mark.parametrize(("layout", "defaults", "size", "expected"), [
    ("concat", VolumeDefaults(fstype="ext4"), GiB, Shape("ext4", 1, 1)),
    ("concat", VolumeDefaults(fstype="btrfs"), GiB, Shape("btrfs", 1, 1)),
    ("concat", VolumeDefaults(fstype="xfs"), 100 * MiB, Shape("ext4", 1, 1)),  # below XFS's minimum
    ("mirror", VolumeDefaults(fstype="ext4", nmirror=3), GiB, Shape("btrfs", 3, 1)),
    ("stripe", VolumeDefaults(ncol=3, nmirror=3), GiB, Shape("btrfs", 1, 3)),
    ("mirror-stripe", VolumeDefaults(ncol=3, nmirror=3), GiB, Shape("btrfs", 2, 3)),
])
def test_config_defaults_apply_to_the_layouts_that_take_them(layout: str, defaults: VolumeDefaults, size: int,
                                                             expected: Shape) -> None:
    assert ENGINES[layout].shape_for(size, None, None, None, defaults) == expected


def test_asked_options_beat_config_defaults() -> None:
    d = VolumeDefaults(fstype="btrfs", nmirror=3, ncol=4)
    assert ENGINES["concat"].shape_for(GiB, "xfs", None, None, d) == Shape("xfs", 1, 1)
    assert ENGINES["mirror"].shape_for(GiB, None, 2, None, d) == Shape("btrfs", 2, 1)
    assert ENGINES["stripe"].shape_for(GiB, None, None, 2, d) == Shape("btrfs", 1, 2)


def test_no_space_message_is_in_human_units_and_says_what_is_free() -> None:
    free = {"d1": 8 * GiB - 100 * MiB, "d2": 3 * GiB}
    with pytest.raises(NoSpace) as info:
        LayoutEngine.place([100 * 1024 * TiB], free, "concat", "dockerdg")
    assert str(info.value) == ("layout concat needs 1 disk with 100 PiB free; the largest free space on a disk"
                               " of dockerdg is 7.9 GiB; choose a smaller size or add disks")
    with pytest.raises(NoSpace) as info:
        LayoutEngine.place([5 * GiB, 5 * GiB], free, "mirror", "dockerdg")
    assert str(info.value) == ("layout mirror needs 2 disks with 5 GiB free each; 1 disk of dockerdg has that"
                               " much (free: d1 7.9 GiB, d2 3 GiB); choose a smaller size or add disks")
    with pytest.raises(NoSpace, match="layout stripe needs 3 disks, dockerdg has 2 online"):
        LayoutEngine.place([GiB] * 3, free, "stripe", "dockerdg")


@pytest.mark.parametrize(("raw", "expected"), [("thin", "thin"), ("thick", "thick"), ("THICK", "thick"),
                                               (" thin ", "thin")])
def test_provisioning_is_thin_or_thick(raw: str, expected: str) -> None:
    assert options.parse_create({"provisioning": raw}) == options.VolumeSpec(provisioning=expected)
    assert options.parse_volume("1g", {"provisioning": raw}).provisioning == expected


@pytest.mark.parametrize("raw", ["thickish", "", "fat", "sparse", "1"])
def test_bad_provisioning_is_refused_naming_the_valid_values(raw: str) -> None:
    with pytest.raises(InvalidArgument, match="provisioning must be thin or thick"):
        options.parse_create({"provisioning": raw})


def test_a_snapshot_takes_no_provisioning_of_its_own() -> None:
    """A snapshot shares its source's extents whatever the source's provisioning: asking is an error."""
    with pytest.raises(InvalidArgument, match="drop provisioning"):
        options.parse_create({"sourcevol": "v1", "provisioning": "thick"})
