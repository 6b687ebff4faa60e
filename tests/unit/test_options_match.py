"""An idempotent Create matched against the existing volume's record (storage.options, no kernel).

Docker (and swarm, and several gunicorn workers) may send Create again for a volume that exists: the
same options succeed, and different ones are refused naming each option that differs.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import options
from storage.catalog.base import VolumeRec
from storage.errors import AlreadyExists
from storage.units import GiB, MiB

VOL = VolumeRec("v1", size=GiB, layout="mirror", fstype="btrfs", nmirror=2, ncol=1, maxiops=100, protect=True)
SNAP = VolumeRec("s1", size=GiB, layout="concat", fstype="btrfs", maxiops=300, snapshot_of="v1",
                 cachesize=40 * MiB, autogrow=True)
SAME = {"size": "1g", "layout": "mirror", "fstype": "btrfs", "nmirror": "2", "ncol": "1", "maxiops": "100",
        "protect": "true"}


def _match(v: VolumeRec, asked: dict[str, str]) -> None:
    options.require_same(v, options.parse_create(asked), asked)


def test_the_same_options_match() -> None:
    _match(VOL, SAME)
    assert options.conflicts(options.parse_create(SAME), VOL) == {}


def test_options_not_asked_match_whatever_the_volume_has() -> None:
    _match(VOL, {})
    _match(VOL, {"size": "1g"})
    _match(VOL, {"layout": "auto"})  # auto: the layout engine's choice, whichever it was


@pytest.mark.parametrize(("key", "asked", "have"), [
    ("size", "2g", "1 GiB"), ("layout", "concat", "mirror"), ("fstype", "ext4", "btrfs"), ("nmirror", "3", "2"),
    ("ncol", "2", "1"), ("maxiops", "0", "100"), ("protect", "no", "True"),
])
def test_each_different_option_is_refused_by_name(key: str, asked: str, have: str) -> None:
    with pytest.raises(AlreadyExists, match="already exists with different options") as err:
        _match(VOL, {**SAME, key: asked})
    described = str(err.value).split(": ", 1)[1].split(";")[0]
    assert described == f"{key}={have} (asked {asked})"  # that one option, and only it


def test_the_message_names_every_difference_and_what_to_do() -> None:
    with pytest.raises(AlreadyExists) as err:
        _match(VOL, {"size": "500m", "ncol": "2"})
    assert str(err.value) == ("volume v1 already exists with different options: size=1 GiB (asked 500m),"
                              " ncol=1 (asked 2); remove it first or use another name")


@pytest.mark.parametrize("spelling", ["true", "TRUE", " yes", "on", "1"])
def test_protect_spellings_of_true_match_a_protected_volume(spelling: str) -> None:
    _match(VOL, {"protect": spelling})


@pytest.mark.parametrize("spelling", ["false", "No", "off", "0", ""])
def test_protect_spellings_of_false_refuse_a_protected_volume(spelling: str) -> None:
    with pytest.raises(AlreadyExists, match=r"protect=True \(asked"):
        _match(VOL, {"protect": spelling})
    _match(VolumeRec("v2", GiB, "concat", "ext4", protect=False), {"protect": spelling})


@pytest.mark.parametrize("size", ["1g", "1G", "1024m", "1048576k", str(GiB)])
def test_a_size_in_any_unit_matches_the_same_bytes(size: str) -> None:
    _match(VOL, {"size": size})


def test_a_size_one_mebibyte_off_is_refused_in_human_units() -> None:
    with pytest.raises(AlreadyExists, match=r"size=1 GiB \(asked 1025m\)"):
        _match(VOL, {"size": "1025m"})


def test_a_snapshot_matches_its_source_cache_maxiops_and_autogrow() -> None:
    _match(SNAP, {"sourcevol": "v1"})
    _match(SNAP, {"sourcevol": "v1", "cachesize": "40m", "maxiops": "300", "autogrow": "on"})
    _match(SNAP, {"sourcevol": "v1", "cachesize": "40960k", "autogrow": "yes"})


@pytest.mark.parametrize(("key", "asked", "have"), [
    ("sourcevol", "v9", "v1"), ("cachesize", "80m", "40 MiB"), ("maxiops", "200", "300"),
    ("autogrow", "off", "True"),
])
def test_a_snapshot_with_other_options_is_refused_by_name(key: str, asked: str, have: str) -> None:
    with pytest.raises(AlreadyExists, match=rf"{key}={have} \(asked {asked}\);"):
        _match(SNAP, {"sourcevol": "v1", key: asked})


def test_a_snapshot_asked_of_a_plain_volume_is_refused() -> None:
    with pytest.raises(AlreadyExists, match=r"sourcevol=None \(asked v1\)"):
        _match(VolumeRec("s1", GiB, "concat", "btrfs"), {"sourcevol": "v1"})


def test_provisioning_is_compared_by_an_idempotent_create() -> None:
    """Create again with provisioning=thick for a thin volume is refused; the same (or none) matches."""
    thick = VolumeRec("t1", size=GiB, layout="concat", fstype="xfs", provisioning="thick")
    _match(thick, {"provisioning": "thick"})
    _match(thick, {})
    with pytest.raises(AlreadyExists, match=r"provisioning=thick \(asked thin\)"):
        _match(thick, {"provisioning": "thin"})
    with pytest.raises(AlreadyExists, match=r"provisioning=thin \(asked thick\)"):
        _match(VOL, {**SAME, "provisioning": "thick"})


# ------------------------------------------------------------- property: the comparison, option by option

_LAYOUTS = ("concat", "mirror", "stripe", "mirror-stripe")
_FSTYPES = ("xfs", "ext4", "btrfs")
_records = st.builds(
    VolumeRec, name=st.just("g1"), size=st.sampled_from([300 * MiB, 400 * MiB, GiB]),
    layout=st.sampled_from(_LAYOUTS), fstype=st.sampled_from(_FSTYPES), nmirror=st.integers(1, 3),
    ncol=st.integers(1, 3), maxiops=st.sampled_from([0, 100, 200]), protect=st.booleans(),
    provisioning=st.sampled_from(["thin", "thick"]))
# what a Create may ask, as Docker passes it (strings), each option asked or not
_asked = st.fixed_dictionaries({}, optional={
    "size": st.sampled_from(["300m", "400m", "1g", "1024m"]), "layout": st.sampled_from((*_LAYOUTS, "auto")),
    "fstype": st.sampled_from(_FSTYPES), "nmirror": st.sampled_from(["1", "2", "3"]),
    "ncol": st.sampled_from(["1", "2", "3"]), "maxiops": st.sampled_from(["0", "100", "200"]),
    "protect": st.sampled_from(["true", "no", "on", "0"]), "provisioning": st.sampled_from(["thin", "thick"])})


def _differs(key: str, asked: str, v: VolumeRec) -> bool:
    """The comparison spelled out independently: what ``asked`` means, against the record."""
    if key == "size":
        return {"300m": 300 * MiB, "400m": 400 * MiB, "1g": GiB, "1024m": GiB}[asked] != v.size
    if key == "layout":
        return asked != "auto" and asked != v.layout
    if key == "protect":
        return (asked in ("true", "on")) != v.protect
    if key in ("nmirror", "ncol", "maxiops"):
        return int(asked) != getattr(v, key)
    return bool(asked != getattr(v, key))


@settings(max_examples=300, deadline=None)
@given(v=_records, asked=_asked)
def test_a_create_matches_exactly_when_no_asked_option_differs(v: VolumeRec, asked: dict[str, str]) -> None:
    """Two Creates of one name (two nodes, or a retry) agree exactly when every option the later one asks
    has the existing volume's value (options not asked, and layout auto, match anything); otherwise
    the refusal names each differing option with the existing value and what was asked, and only those."""
    want = sorted(k for k, a in asked.items() if _differs(k, a, v))
    assert sorted(options.conflicts(options.parse_create(asked), v)) == want
    if not want:
        _match(v, asked)
        return
    with pytest.raises(AlreadyExists) as err:
        _match(v, asked)
    described = str(err.value).split(": ", 1)[1].rsplit(";", 1)[0].split(", ")
    assert sorted(d.split("=", 1)[0] for d in described) == want
    for d in described:
        key = d.split("=", 1)[0]
        assert d.endswith(f" (asked {asked[key]})"), d
