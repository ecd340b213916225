import hashlib
import json
import random
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings, strategies as st

import qemu_kd.formats.bundle as bundle_module
from qemu_kd.formats.bundle import (
    BUNDLE_MAGIC,
    Bundle,
    BundleManifest,
    ManifestError,
    PageRecord,
    ZeroPageRecord,
)
from qemu_kd.formats.errors import (
    CorruptError,
    FieldValueError,
    FormatError,
    MagicError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    VersionError,
)
from qemu_kd.formats.keywrap import wrap_key
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.policy import Policy

KAK = ec.generate_private_key(ec.SECP384R1())


def manifest(**changes):
    values = dict(platform_id=bytes(range(16)), policy=Policy.make(), measurement=b"\x11" * 48,
                  host_data=b"\x22" * 32, memory_size=64 << 20, keyid=5, host_verifiable_digest=b"\x33" * 48,
                  ept_mapping_digest=b"\x44" * 48, info={"cmdline": "console=ttyS0"})
    values.update(changes)
    return BundleManifest(**values)


def sample_bundle():
    pages = [
        PageRecord(0x100000, 0x0, PageType.IMAGE, 7, b"\xAA" * 4096),
        PageRecord(0x101000, 0x1000, PageType.IMAGE, 3, b"\xBB" * 4096, host_verifiable=True),
        PageRecord(0x200000, None, PageType.VMCS, 0, b"\xCC" * 4096, host_verifiable=True),
        PageRecord(0x201000, None, PageType.EPT, 0, b"\xDD" * 4096, host_verifiable=True),
    ]
    zeros = [ZeroPageRecord(0x102000 + 0x1000 * i, 0x2000 + 0x1000 * i, 3) for i in range(3)]
    wrapped = wrap_key(bytes(64), KAK.public_key(), Policy.make())
    return Bundle(manifest(), wrapped, pages, zeros)


def test_round_trip_through_file(tmp_path):
    b = sample_bundle()
    path = tmp_path / "guest.kdb"
    b.write(path)
    assert path.read_bytes()[:8] == BUNDLE_MAGIC
    assert Bundle.read(path) == b
    assert [p.name for p in tmp_path.iterdir()] == ["guest.kdb"]   # no temporary left behind


def test_manifest_is_readable_json():
    raw = sample_bundle().pack()
    (length,) = struct.unpack_from("<I", raw, 0x0C)
    doc = json.loads(raw[0x40:0x40 + length])
    assert doc["format"] == "qemu-kd bundle manifest"
    assert doc["measurement"] == "11" * 48 and doc["debug"] is False
    assert raw[-32:] == hashlib.sha256(raw[:-32]).digest()


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.booleans(), st.binary(min_size=48, max_size=48),
       st.integers(min_value=1, max_value=1 << 20).map(lambda n: n * 4096),
       st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3))
def test_manifest_round_trip(platform_id, debug, measurement, size, info):
    m = manifest(platform_id=platform_id, policy=Policy.make(debug), measurement=measurement,
                 memory_size=size, info=info)
    assert BundleManifest.unpack(m.pack()) == m


@settings(max_examples=30)
@given(st.integers(min_value=0, max_value=(1 << 28) - 1), st.integers(min_value=0, max_value=(1 << 40) - 1),
       st.integers(min_value=1, max_value=7), st.booleans(),
       st.binary(min_size=1, max_size=64).map(lambda b: (b * 4096)[:4096]))
def test_page_record_round_trip(hpn, gpn, perms, verifiable, data):
    r = PageRecord(hpn << 12, gpn << 12, PageType.IMAGE, perms, data, verifiable)
    assert PageRecord.unpack(r.pack()) == r
    z = ZeroPageRecord(hpn << 12, gpn << 12, perms)
    assert ZeroPageRecord.unpack(z.pack()) == z


def test_foreign_and_truncated_files(tmp_path):
    raw = sample_bundle().pack()
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"#!/bin/sh\necho hello\n")
    with pytest.raises(MagicError, match="not a qemu-kd bundle"):
        Bundle.read(foreign)
    short = tmp_path / "short"
    short.write_bytes(raw[:-100])
    with pytest.raises(TruncatedError, match="short.*truncated"):
        Bundle.read(short)
    with pytest.raises(TruncatedError):
        Bundle.unpack(raw[:20])
    with pytest.raises(OversizedError):
        Bundle.unpack(raw + b"\0")
    with pytest.raises(FormatError, match="does not exist"):
        Bundle.read(tmp_path / "missing")


def _with_checksum(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_header_checks():
    raw = sample_bundle().pack()
    body = bytearray(raw[:-32])
    assert struct.unpack_from("<H", raw, 8) == (2,)
    bad = bytearray(body); bad[8] = 3
    with pytest.raises(VersionError):
        Bundle.unpack(_with_checksum(bytes(bad)))
    bad = bytearray(body); bad[0x30] = 1
    with pytest.raises(ReservedBitsError):
        Bundle.unpack(_with_checksum(bytes(bad)))
    bad = bytearray(raw); bad[len(raw) // 2] ^= 1
    with pytest.raises(CorruptError):
        Bundle.unpack(bytes(bad))


def test_a_version_1_bundle_is_refused_in_one_line(tmp_path):
    """Version 1 ended in a SHA-384 checksum; such a file is refused by its version, not
    misread as damaged."""
    body = bytearray(sample_bundle().pack()[:-32]); body[8] = 1
    path = tmp_path / "old.kd"
    path.write_bytes(bytes(body) + hashlib.sha384(body).digest())
    with pytest.raises(VersionError) as caught:
        Bundle.read(path)
    assert "old.kd" in str(caught.value) and "bundle version 1 is not supported (expected 2)" in str(caught.value)
    assert "\n" not in str(caught.value) and "seal the guest again" in caught.value.hint


def test_the_file_write_writes_is_the_bytes_pack_gives(tmp_path):
    b = sample_bundle()
    path = tmp_path / "guest.kd"
    for durable in (True, False):
        b.write(path, durable=durable)
        raw = path.read_bytes()
        assert raw == b.pack()
        assert raw[-32:] == hashlib.sha256(raw[:-32]).digest()


def test_a_damaged_file_is_reported_as_damaged_whatever_else_the_damage_broke():
    """The checksum is hashed while the records are checked: a record the damage made
    invalid still gives the checksum's error, and a checksum that matches the damage the
    record's own error."""
    raw = sample_bundle().pack()
    (length,) = struct.unpack_from("<I", raw, 0x0C)
    first_record = 0x40 + length + 248
    bad = bytearray(raw); bad[first_record + 0x14] = 1          # a reserved byte of page record 0
    with pytest.raises(CorruptError, match="checksum does not match"):
        Bundle.unpack(bytes(bad))
    with pytest.raises(ReservedBitsError):
        Bundle.unpack(_with_checksum(bytes(bad[:-32])))
    bad = bytearray(raw); bad[0x40] = ord("[")                   # the manifest is no JSON object
    with pytest.raises(CorruptError):
        Bundle.unpack(bytes(bad))


def test_record_checks():
    good = PageRecord(0x1000, 0x0, PageType.IMAGE, 3, bytes(4096)).pack()
    with pytest.raises(TruncatedError):
        PageRecord.unpack(good[:-1])
    with pytest.raises(OversizedError):
        PageRecord.unpack(good + b"\0")
    with pytest.raises(ReservedBitsError):
        PageRecord.unpack(good[:0x12] + b"\x02" + good[0x13:])          # undefined flag
    with pytest.raises(ReservedBitsError):
        PageRecord.unpack(good[:0x14] + b"\x01" + good[0x15:])
    with pytest.raises(FieldValueError):
        PageRecord.unpack(good[:0x10] + b"\x09" + good[0x11:])          # unknown page type
    with pytest.raises(FieldValueError):
        PageRecord(0x1000, 0x0, PageType.VMCS, 3, bytes(4096)).pack()  # VMCS is not mapped
    with pytest.raises(FieldValueError):
        PageRecord(0x1000, 0x0, PageType.ZERO, 3, bytes(4096)).pack()
    with pytest.raises(FieldValueError):
        PageRecord(0x1001, 0x0, PageType.IMAGE, 3, bytes(4096)).pack()
    z = ZeroPageRecord(0x1000, 0x2000, 3).pack()
    with pytest.raises(ReservedBitsError):
        ZeroPageRecord.unpack(z[:-1] + b"\x01")
    with pytest.raises(TruncatedError):
        ZeroPageRecord.unpack(z[:-1])


def test_duplicate_hpas_or_gpas_rejected():
    b = sample_bundle()
    b.zero_pages.append(ZeroPageRecord(0x100000, 0x90000, 3))
    with pytest.raises(FieldValueError, match="same hpa"):
        b.pack()
    b = sample_bundle()
    b.zero_pages.append(ZeroPageRecord(0x300000, 0x1000, 3))
    with pytest.raises(FieldValueError, match="same gpa"):
        b.pack()


def test_manifest_checks():
    good = json.loads(manifest().pack())
    def unpack(doc):
        return BundleManifest.unpack(json.dumps(doc).encode())
    with pytest.raises(MagicError):
        unpack({**good, "format": "something else"})
    with pytest.raises(VersionError):
        unpack({**good, "version": 2})
    with pytest.raises(ManifestError, match="unknown"):
        unpack({**good, "extra": 1})
    with pytest.raises(ManifestError, match="missing"):
        unpack({k: v for k, v in good.items() if k != "measurement"})
    with pytest.raises(ManifestError, match="measurement"):
        unpack({**good, "measurement": "abcd"})
    with pytest.raises(ManifestError, match="disagrees"):
        unpack({**good, "debug": True})
    with pytest.raises(ReservedBitsError):
        unpack({**good, "policy": "0100000004000000"})
    for bad_keyid in (0, 64, True, "5", None):
        with pytest.raises(ManifestError, match="keyid"):
            unpack({**good, "keyid": bad_keyid})
    assert unpack(good).keyid == 5
    with pytest.raises(FieldValueError, match="keyid"):
        manifest(keyid=0).pack()
    with pytest.raises(ManifestError):
        BundleManifest.unpack(b"\xff\xfe")


def test_manifest_parsing_is_strict():
    text = manifest().pack().decode()
    good = json.loads(text)
    assert BundleManifest.unpack(text.encode()) == manifest()

    def unpack_text(t):
        return BundleManifest.unpack(t.encode())

    # A key named twice is refused, not "the last one wins" - at the top and inside info.
    twice = text.replace('"measurement":', f'"measurement": "{"ab" * 48}",\n "measurement":', 1)
    with pytest.raises(ManifestError, match="names the key 'measurement' twice"):
        unpack_text(twice)
    nested = text.replace('"cmdline":', '"cmdline": "a",\n  "cmdline":', 1)
    with pytest.raises(ManifestError, match="names the key 'cmdline' twice"):
        unpack_text(nested)
    # Byte strings are lowercase hex, nothing else.
    def unpack(doc):
        return BundleManifest.unpack(json.dumps(doc).encode())
    for name in ("measurement", "platform_id", "host_data", "host_verifiable_digest",
                 "ept_mapping_digest", "policy"):
        upper = good[name].upper() if good[name].upper() != good[name] else "A" + good[name][1:]
        with pytest.raises(ManifestError, match=f"{name} is not lowercase hex"):
            unpack({**good, name: upper})
        for bad in ("0x" + good[name][2:], " " + good[name][1:], good[name][:-2], 7):
            with pytest.raises(ManifestError, match=name):
                unpack({**good, name: bad})
    with pytest.raises(ManifestError, match="not JSON"):
        unpack_text(text.replace('"memory_size": 67108864', '"memory_size": NaN'))


def _duplicates_cases():
    rng = random.Random(7)
    dense = [0x100000 + 0x1000 * i for i in range(2000)]
    yield dense                                                   # a table, no repeat
    yield dense + [dense[1234]]                                   # a table, one repeat
    yield [dense[0], dense[-1], dense[0]]                         # the repeat at either end
    yield [0, (1 << 64) - 0x1000]                                 # too wide for a table
    yield [0, (1 << 64) - 0x1000, 0]
    yield [0x1000, 0x1001, 0x2000]                                # not page-aligned: sorted
    yield [0x1001, 0x2000, 0x1001]
    for _ in range(20):
        values = [rng.randrange(0, 1 << 12) * 0x1000 for _ in range(rng.randrange(2, 300))]
        yield values
        yield [rng.choice([v, v + rng.randrange(1, 0x1000)]) for v in values]


def test_duplicate_addresses_are_found_whatever_their_spread():
    for values in _duplicates_cases():
        array = np.array(values, dtype=np.uint64)
        assert bundle_module._has_duplicates(array) == (len(set(values)) < len(values)), values
