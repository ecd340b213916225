"""Zero records in bulk: the array paths of the bundle and of add-zero-pages give the bytes and
the errors the record-by-record paths give (no QEMU)."""

import numpy as np
import pytest

from host_vmm.vmm import zero_entries
from qemu_kd.formats.bundle import (
    ZERO_RECORD_SIZE,
    Bundle,
    ZeroPageRecord,
    _pack_zero_records,
    _unpack_zero_records,
)
from qemu_kd.formats.errors import FieldValueError, ReservedBitsError
from qemu_kd.hostport.protocol import (
    PAGE_ENTRY_DTYPE,
    HostPortBadRequestError,
    pack_zero_entries,
)

PAGE = 4096
ZEROS = [ZeroPageRecord(0x200000 + PAGE * i, PAGE * (i * 3), 1 + i % 7) for i in range(3000)]


def one_by_one(records) -> bytes:
    return b"".join(z.pack() for z in records)


def test_packing_in_bulk_gives_the_same_bytes():
    assert _pack_zero_records(ZEROS) == one_by_one(ZEROS)
    assert _pack_zero_records([]) == b""
    data = memoryview(one_by_one(ZEROS))
    assert _unpack_zero_records(data, len(ZEROS)) == ZEROS


@pytest.mark.parametrize("bad", [ZeroPageRecord(0x1001, 0, 7), ZeroPageRecord(-PAGE, 0, 7),
                                 ZeroPageRecord(PAGE, 5, 7), ZeroPageRecord(PAGE, 0, 0),
                                 ZeroPageRecord(PAGE, 0, 8), ZeroPageRecord(PAGE, 0, True),
                                 ZeroPageRecord(PAGE, 1 << 64, 7), ZeroPageRecord(PAGE * 1.0, 0, 7)])
def test_a_bad_record_gets_its_own_error(bad):
    records = [*ZEROS[:10], bad, *ZEROS[10:20]]
    try:
        expected = one_by_one(records)
    except FieldValueError as exc:
        with pytest.raises(FieldValueError) as got:
            _pack_zero_records(records)
        assert got.value.message == exc.message
    else:                                  # what record by record accepts, bulk accepts alike
        assert _pack_zero_records(records) == expected


@pytest.mark.parametrize("field, value, error", [(0, b"\x01", FieldValueError),      # hpa unaligned
                                                 (16, b"\x08", ReservedBitsError),   # perms bit 3
                                                 (16, b"\x00", FieldValueError),     # no perms
                                                 (20, b"\x01", ReservedBitsError)])  # reserved byte
def test_a_bad_record_read_gets_its_own_error(field, value, error):
    data = bytearray(one_by_one(ZEROS))
    at = 7 * ZERO_RECORD_SIZE + field
    data[at:at + 1] = value
    with pytest.raises(error) as bulk:
        _unpack_zero_records(memoryview(bytes(data)), len(ZEROS))
    with pytest.raises(error) as single:
        ZeroPageRecord.unpack(bytes(data[7 * ZERO_RECORD_SIZE:8 * ZERO_RECORD_SIZE]))
    assert bulk.value.message == single.value.message


def test_add_zero_pages_entries_as_an_array():
    bundle = Bundle(manifest=None, wrapped_key=None, pages=[], zero_pages=ZEROS)
    entries = zero_entries(bundle)
    assert pack_zero_entries(entries) == pack_zero_entries([(z.hpa, z.gpa, z.perms) for z in ZEROS])
    other = np.zeros(1, dtype=PAGE_ENTRY_DTYPE)
    other["type"] = 0
    with pytest.raises(HostPortBadRequestError, match="another type"):
        pack_zero_entries(other)
