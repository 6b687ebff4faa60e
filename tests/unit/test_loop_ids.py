"""loop_info64.lo_device holds the kernel's huge_encode_dev() form: decoding it must give the same
(major, minor) as os.stat of the backing file, or find() would never recognise a device as ours."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from storage.kernel import loop


def _huge_encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev (include/linux/kdev_t.h), which huge_encode_dev is."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@given(st.integers(0, 0xFFF), st.integers(0, 0xFFFFF))
def test_decode_dev_inverts_the_kernels_encoding(major: int, minor: int) -> None:
    assert loop._decode_dev(_huge_encode_dev(major, minor)) == (major, minor)


def test_decode_dev_of_common_devices() -> None:
    assert loop._decode_dev(_huge_encode_dev(7, 300)) == (7, 300)  # /dev/loop300
    assert loop._decode_dev(_huge_encode_dev(254, 0)) == (254, 0)  # a virtio disk
    assert loop._decode_dev(_huge_encode_dev(0, 52)) == (0, 52)  # btrfs, overlay: anonymous devices
