import dataclasses
import struct

import pytest
from hypothesis import given, settings, strategies as st

from qemu_kd.formats.report import (
    EMULATED_MARKER,
    REPORT_SIZE,
    SIGNED_SIZE,
    AttestationReport,
    EmulatedPlatformError,
    HostDataMismatch,
    MeasurementMismatch,
    PolicyMismatch,
    ReportDataMismatch,
    SignatureError,
)
from qemu_kd.formats.certs import ChainError
from qemu_kd.platform.attestation import sign_report
from qemu_kd.tenant.verify import validate_report, verify_report
from qemu_kd.formats.errors import (
    FieldValueError,
    MagicError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    VersionError,
)
from qemu_kd.platform.identity import PlatformIdentity, RootCA
from qemu_kd.formats.policy import Policy

ROOT = RootCA.create_throwaway()
IDENT = PlatformIdentity.create_throwaway(ROOT)
MEASUREMENT = bytes(range(48))
REPORT_DATA = b"nonce-" + bytes(58)


def make_report(**changes):
    args = dict(policy=Policy.make(), measurement=MEASUREMENT, report_data=REPORT_DATA,
                host_data=b"host", keyid=5)
    args.update(changes)
    return sign_report(IDENT, **args)


def test_sign_and_verify():
    report = make_report()
    raw = report.pack()
    assert len(raw) == REPORT_SIZE
    assert raw[0x10:0x20] == EMULATED_MARKER == b"QEMU-KD EMULATED"
    parsed = verify_report(raw, IDENT.chain_pem(), ROOT.certificate, allow_emulated=True)
    assert parsed == report
    assert parsed.platform_id == IDENT.platform_id and parsed.keyid == 5
    assert parsed.host_data == b"host" + bytes(28)
    validate_report(parsed, measurement=MEASUREMENT, policy=Policy.make(), report_data=REPORT_DATA,
                    host_data=b"host")
    assert verify_report(report, IDENT.chain_pem(), ROOT.certificate, allow_emulated=True) == report


def test_report_ids_are_unique():
    assert make_report().report_id != make_report().report_id


def test_every_flipped_byte_in_signed_body_is_a_signature_error():
    raw = make_report().pack()
    for offset in range(SIGNED_SIZE):
        bad = bytearray(raw)
        bad[offset] ^= 0x01
        with pytest.raises(SignatureError) as err:
            verify_report(bytes(bad), IDENT.chain_pem(), ROOT.certificate, allow_emulated=True)
        assert err.value.exit_code == 3


def test_altered_fields_and_signature_rejected():
    report = make_report()
    for change in ({"measurement": bytes(48)}, {"keyid": 6}, {"policy": Policy.make(True)},
                   {"report_data": bytes(64)}, {"host_data": bytes(32)}):
        with pytest.raises(SignatureError):
            verify_report(dataclasses.replace(report, **change), IDENT.chain_pem(), ROOT.certificate, True)
    sig = bytearray(report.signature)
    sig[-1] ^= 1
    with pytest.raises(SignatureError):
        verify_report(dataclasses.replace(report, signature=bytes(sig)), IDENT.chain_pem(),
                      ROOT.certificate, True)


def test_report_from_another_platform():
    other = PlatformIdentity.create_throwaway(ROOT)
    report = make_report()
    # Right root, but the chain of another platform: its key did not sign this report.
    with pytest.raises(SignatureError):
        verify_report(report, other.chain_pem(), ROOT.certificate, True)


def test_chain_from_another_root():
    other_root = RootCA.create_throwaway()
    with pytest.raises(ChainError) as err:
        verify_report(make_report(), IDENT.chain_pem(), other_root.certificate, True)
    assert err.value.exit_code == 4


def test_emulated_needs_explicit_acceptance():
    with pytest.raises(EmulatedPlatformError) as err:
        verify_report(make_report(), IDENT.chain_pem(), ROOT.certificate, allow_emulated=False)
    assert err.value.exit_code == 9


@pytest.mark.parametrize("kwargs,error,code", [
    ({"measurement": bytes(48)}, MeasurementMismatch, 5),
    ({"policy": Policy.make(debug=True)}, PolicyMismatch, 6),
    ({"report_data": b"other nonce"}, ReportDataMismatch, 7),
    ({"host_data": b"other host"}, HostDataMismatch, 8),
])
def test_validate_mismatches(kwargs, error, code):
    report = make_report()
    with pytest.raises(error) as err:
        validate_report(report, **kwargs)
    assert err.value.exit_code == code


def test_exit_codes_are_distinct():
    from qemu_kd.common.errors import ConfigError
    classes = [ConfigError, SignatureError, ChainError, MeasurementMismatch, PolicyMismatch,
               ReportDataMismatch, HostDataMismatch, EmulatedPlatformError]
    assert [c.exit_code for c in classes] == [2, 3, 4, 5, 6, 7, 8, 9]


@settings(max_examples=50)
@given(st.booleans(), st.binary(min_size=48, max_size=48), st.binary(min_size=64, max_size=64),
       st.binary(min_size=32, max_size=32), st.integers(min_value=0, max_value=63),
       st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.booleans(),
       st.binary(min_size=96, max_size=96))
def test_round_trip(debug, measurement, report_data, host_data, keyid, platform_id, report_id,
                    emulated, signature):
    r = AttestationReport(Policy.make(debug), measurement, report_data, host_data, keyid, platform_id,
                          report_id, emulated, signature=signature)
    assert AttestationReport.unpack(r.pack()) == r


def test_negative_inputs():
    raw = make_report().pack()
    with pytest.raises(TruncatedError):
        AttestationReport.unpack(raw[:-1])
    with pytest.raises(OversizedError):
        AttestationReport.unpack(raw + b"\0")
    with pytest.raises(MagicError):
        AttestationReport.unpack(b"XXXX" + raw[4:])
    with pytest.raises(VersionError):
        AttestationReport.unpack(raw[:4] + struct.pack("<I", 2) + raw[8:])
    with pytest.raises(ReservedBitsError):
        AttestationReport.unpack(raw[:8] + struct.pack("<I", 3) + raw[12:])     # undefined flag
    for offset in (0x029, 0x050, 0x0F0):                                         # reserved bytes
        with pytest.raises(ReservedBitsError):
            AttestationReport.unpack(raw[:offset] + b"\x01" + raw[offset + 1:])
    with pytest.raises(MagicError):
        AttestationReport.unpack(raw[:0x10] + b"X" + raw[0x11:])                 # marker
    with pytest.raises(FieldValueError):
        AttestationReport.unpack(raw[:0x28] + b"\x40" + raw[0x29:])              # KeyID 64
    with pytest.raises(FieldValueError):
        AttestationReport.unpack(raw[:0x0C] + struct.pack("<I", 2) + raw[0x10:])  # signature algo
    with pytest.raises(TruncatedError):
        verify_report(raw[:-1], IDENT.chain_pem(), ROOT.certificate, True)
    with pytest.raises(FieldValueError):
        make_report(report_data=bytes(65))
