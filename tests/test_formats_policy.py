import struct

import pytest
from hypothesis import given, strategies as st

from qemu_kd.formats.errors import (
    FieldValueError,
    FormatError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    VersionError,
)
from qemu_kd.formats.policy import Policy


def test_layout_is_version_reserved_flags():
    assert Policy.make(debug=True).pack() == struct.pack("<HHI", 1, 0, 1)
    assert Policy.make().pack() == bytes([1, 0, 0, 0, 0, 0, 0, 0])


def test_debug_property():
    assert Policy.make(debug=True).debug and Policy(Policy.DEBUG).debug
    assert not Policy.make().debug


@given(st.booleans())
def test_round_trip(debug):
    p = Policy.make(debug=debug)
    packed = p.pack()
    assert len(packed) == 8
    assert Policy.unpack(packed) == p


def test_restorable_property_is_bit_1_and_measured_with_the_policy():
    p = Policy.make(restorable=True)
    assert p.restorable and not p.debug and p.pack() == struct.pack("<HHI", 1, 0, 2)
    assert Policy.unpack(p.pack()) == p and not Policy.make(debug=True).restorable
    assert Policy.make(debug=True, restorable=True).describe() == "debug,restorable"


@given(st.integers(min_value=2, max_value=31))
def test_unknown_flag_bits_rejected(bit):
    with pytest.raises(ReservedBitsError):
        Policy.unpack(struct.pack("<HHI", 1, 0, 1 << bit))
    with pytest.raises(FieldValueError):
        Policy(1 << bit)


def test_negative_inputs():
    good = Policy.make(debug=True).pack()
    with pytest.raises(TruncatedError):
        Policy.unpack(good[:7])
    with pytest.raises(OversizedError):
        Policy.unpack(good + b"\0")
    with pytest.raises(VersionError):
        Policy.unpack(struct.pack("<HHI", 2, 0, 1))
    with pytest.raises(ReservedBitsError):
        Policy.unpack(struct.pack("<HHI", 1, 1, 1))
    assert issubclass(VersionError, FormatError)
