"""Attestation reports: signed by the platform, checked by the tenant.

Report layout (352 bytes, little-endian integers; bytes 0x000..0x0FF are
signed)::

    0x000  4   magic "KDAR"
    0x004  u32 version (1)
    0x008  u32 flags: bit 0 EMULATED; other bits reserved (0)
    0x00C  u32 signature algorithm (1 = ECDSA P-384 with SHA-384)
    0x010  16  marker: ASCII "QEMU-KD EMULATED" when EMULATED, else 16 zero bytes
    0x020  8   policy (see policy.py)
    0x028  u8  KeyID of the domain (1..63)
    0x029  7   reserved (0)
    0x030  16  report id (random, unique per report)
    0x040  16  platform id
    0x050  16  reserved (0)
    0x060  48  launch measurement
    0x090  32  host_data
    0x0B0  64  report_data
    0x0F0  16  reserved (0)
    0x100  48  signature r, big-endian
    0x130  48  signature s, big-endian

The verifier works in two steps, like go-sev-guest: :func:`verify_report`
(signature, certificate chain, EMULATED acceptance) then
:func:`validate_report` (expected values).  Every failure class has its own
exit code for the tenant CLI.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509 import Certificate

from .errors import KdError
from .formats_errors import (
    FieldValueError, MagicError, ReservedBitsError, VersionError, require_bytes, require_length,
)
from .identity import ChainError, PlatformCertInfo, PlatformIdentity, verify_chain
from .policy import Policy

__all__ = [
    "AttestationReport", "sign_report", "verify_report", "validate_report",
    "AttestationError", "SignatureError", "ChainError", "EmulatedPlatformError",
    "MeasurementMismatch", "PolicyMismatch", "ReportDataMismatch", "HostDataMismatch",
]

REPORT_MAGIC = b"KDAR"
REPORT_VERSION = 1
REPORT_SIZE = 0x160
SIGNED_SIZE = 0x100
SIG_ALGO_ECDSA_P384_SHA384 = 1
FLAG_EMULATED = 1 << 0
EMULATED_MARKER = b"QEMU-KD EMULATED"
MEASUREMENT_SIZE = 48
REPORT_DATA_SIZE = 64
HOST_DATA_SIZE = 32
ID_SIZE = 16
MAX_KEYID = 63
SCALAR_SIZE = 48
_BODY = struct.Struct("<4sIII16s8sB7s16s16s16s48s32s64s16s")


class AttestationError(KdError):
    """A report failed verification or validation."""


class SignatureError(AttestationError):
    exit_code = 3


class EmulatedPlatformError(AttestationError):
    exit_code = 9


class MeasurementMismatch(AttestationError):
    exit_code = 5


class PolicyMismatch(AttestationError):
    exit_code = 6


class ReportDataMismatch(AttestationError):
    exit_code = 7


class HostDataMismatch(AttestationError):
    exit_code = 8


def _pad(what: str, value: bytes, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) > size:
        raise FieldValueError(f"{what} must be at most {size} bytes")
    return bytes(value).ljust(size, b"\0")


@dataclass(frozen=True)
class AttestationReport:
    """A signed statement of what runs in a key domain (see module docstring)."""

    policy: Policy
    measurement: bytes
    report_data: bytes
    host_data: bytes
    keyid: int
    platform_id: bytes
    report_id: bytes
    emulated: bool = True
    version: int = REPORT_VERSION
    signature: bytes = bytes(2 * SCALAR_SIZE)

    def signed_body(self) -> bytes:
        """Bytes 0x000..0x0FF, the part the signature covers."""
        if self.version != REPORT_VERSION:
            raise FieldValueError(f"report version {self.version} cannot be written (only {REPORT_VERSION})")
        require_bytes("report measurement", self.measurement, MEASUREMENT_SIZE)
        require_bytes("report report_data", self.report_data, REPORT_DATA_SIZE)
        require_bytes("report host_data", self.host_data, HOST_DATA_SIZE)
        require_bytes("report platform id", self.platform_id, ID_SIZE)
        require_bytes("report id", self.report_id, ID_SIZE)
        if not isinstance(self.keyid, int) or not 0 <= self.keyid <= MAX_KEYID:
            raise FieldValueError(f"report KeyID {self.keyid!r} is not 0..{MAX_KEYID}")
        return _BODY.pack(
            REPORT_MAGIC, self.version, FLAG_EMULATED if self.emulated else 0, SIG_ALGO_ECDSA_P384_SHA384,
            EMULATED_MARKER if self.emulated else bytes(16), self.policy.pack(), self.keyid, bytes(7),
            self.report_id, self.platform_id, bytes(16), self.measurement, self.host_data,
            self.report_data, bytes(16))

    def pack(self) -> bytes:
        require_bytes("report signature", self.signature, 2 * SCALAR_SIZE)
        return self.signed_body() + self.signature

    @classmethod
    def unpack(cls, data: bytes) -> "AttestationReport":
        require_length("attestation report", data, REPORT_SIZE)
        data = bytes(data)
        (magic, version, flags, algo, marker, policy, keyid, reserved1, report_id, platform_id,
         reserved2, measurement, host_data, report_data, reserved3) = _BODY.unpack_from(data)
        if magic != REPORT_MAGIC:
            raise MagicError("this is not a qemu-kd attestation report (bad magic)",
                             "pass the report exactly as the guest obtained it")
        if version != REPORT_VERSION:
            raise VersionError(f"attestation report version {version} is not supported "
                               f"(expected {REPORT_VERSION})")
        if flags & ~FLAG_EMULATED or any(reserved1) or any(reserved2) or any(reserved3):
            raise ReservedBitsError("attestation report: reserved bits or bytes are set")
        if algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise FieldValueError(f"attestation report signature algorithm {algo} is not supported")
        emulated = bool(flags & FLAG_EMULATED)
        if marker != (EMULATED_MARKER if emulated else bytes(16)):
            raise MagicError("attestation report: the EMULATED marker does not match the EMULATED flag")
        if keyid > MAX_KEYID:
            raise FieldValueError(f"attestation report KeyID {keyid} is above {MAX_KEYID}")
        return cls(policy=Policy.unpack(policy), measurement=measurement, report_data=report_data,
                   host_data=host_data, keyid=keyid, platform_id=platform_id, report_id=report_id,
                   emulated=emulated, version=version, signature=data[SIGNED_SIZE:])


def sign_report(identity: PlatformIdentity, *, policy: Policy, measurement: bytes, report_data: bytes,
                host_data: bytes, keyid: int) -> AttestationReport:
    """A report signed with the platform's attestation key (report/host data zero-padded)."""
    report = AttestationReport(
        policy=policy, measurement=bytes(measurement),
        report_data=_pad("report_data", report_data, REPORT_DATA_SIZE),
        host_data=_pad("host_data", host_data, HOST_DATA_SIZE),
        keyid=keyid, platform_id=identity.platform_id, report_id=os.urandom(ID_SIZE), emulated=True)
    der = identity.attestation_key.sign(report.signed_body(), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return replace(report, signature=r.to_bytes(SCALAR_SIZE, "big") + s.to_bytes(SCALAR_SIZE, "big"))


def verify_report(report: AttestationReport | bytes, chain_pem: bytes, root_cert: Certificate,
                  allow_emulated: bool) -> AttestationReport:
    """Check chain and signature of a report; return the parsed report.

    Given raw bytes, the signature is checked over the raw signed bytes
    before anything is parsed, so any change to them is a SignatureError.
    """
    info: PlatformCertInfo = verify_chain(chain_pem, root_cert)
    raw = report.pack() if isinstance(report, AttestationReport) else bytes(report)
    require_length("attestation report", raw, REPORT_SIZE)
    r = int.from_bytes(raw[SIGNED_SIZE:SIGNED_SIZE + SCALAR_SIZE], "big")
    s = int.from_bytes(raw[SIGNED_SIZE + SCALAR_SIZE:], "big")
    try:
        info.attestation_public_key.verify(encode_dss_signature(r, s), raw[:SIGNED_SIZE],
                                           ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise SignatureError("the attestation report's signature does not verify with the platform's "
                             "attestation key", "the report was altered or made by another platform") from None
    parsed = report if isinstance(report, AttestationReport) else AttestationReport.unpack(raw)
    if parsed.platform_id != info.platform_id:
        raise ChainError("the report's platform id does not match the platform certificate")
    if (parsed.emulated or info.emulated) and not allow_emulated:
        raise EmulatedPlatformError("the report comes from an EMULATED platform, not real hardware",
                                    "pass --allow-emulated to accept emulated platforms")
    return parsed


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(bytes(a), bytes(b))


def validate_report(report: AttestationReport, *, measurement: bytes | None = None,
                    policy: Policy | None = None, report_data: bytes | None = None,
                    host_data: bytes | None = None) -> None:
    """Compare a verified report with the values the tenant expects."""
    if measurement is not None and not _same(report.measurement, measurement):
        raise MeasurementMismatch(
            f"launch measurement {report.measurement.hex()} is not the expected {bytes(measurement).hex()}",
            "the guest image, VMCS guest state or policy differs from what was sealed")
    if policy is not None and report.policy != policy:
        raise PolicyMismatch(f"report policy is {report.policy.describe()} "
                             f"(0x{report.policy.flags:x}), expected {policy.describe()} (0x{policy.flags:x})")
    if report_data is not None and not _same(report.report_data,
                                             _pad("report_data", report_data, REPORT_DATA_SIZE)):
        raise ReportDataMismatch("report_data does not match the expected value",
                                 "the report answers another challenge (stale or replayed)")
    if host_data is not None and not _same(report.host_data, _pad("host_data", host_data, HOST_DATA_SIZE)):
        raise HostDataMismatch(f"host_data {report.host_data.hex()} is not the expected "
                               f"{_pad('host_data', host_data, HOST_DATA_SIZE).hex()}")
