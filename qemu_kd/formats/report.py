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

import struct
from dataclasses import dataclass


from qemu_kd.common.errors import KdError
from qemu_kd.formats.errors import (
    FieldValueError,
    MagicError,
    ReservedBitsError,
    VersionError,
    require_bytes,
    require_length,
)
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.policy import HOST_DATA_SIZE
from qemu_kd.formats.addresses import MAX_KEYID

REPORT_MAGIC = b"KDAR"
REPORT_VERSION = 1
REPORT_SIZE = 0x160
SIGNED_SIZE = 0x100
SIG_ALGO_ECDSA_P384_SHA384 = 1
FLAG_EMULATED = 1 << 0
EMULATED_MARKER = b"QEMU-KD EMULATED"
MEASUREMENT_SIZE = 48
REPORT_DATA_SIZE = 64
ID_SIZE = 16
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
