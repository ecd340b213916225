"""Checking attestation reports, as the tenant does.

Two steps, like go-sev-guest: :func:`verify_report` checks the certificate
chain, the signature and whether an EMULATED platform is acceptable;
:func:`validate_report` compares the verified report with the values the
tenant expects.  :func:`check_report` does both, and every failure class has
its own exit code for the tenant CLI.
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import Certificate

from qemu_kd.formats.errors import (
    require_length,
)
from qemu_kd.formats.certs import ChainError, PlatformCertInfo, verify_chain
from qemu_kd.formats.policy import Policy
from cryptography import x509
from qemu_kd.formats.report import AttestationError, AttestationReport
from qemu_kd.formats.errors import FormatError
from qemu_kd.formats.report import (
    EmulatedPlatformError, HostDataMismatch, MeasurementMismatch, PolicyMismatch, REPORT_DATA_SIZE, REPORT_SIZE, ReportDataMismatch, SCALAR_SIZE, SIGNED_SIZE, SignatureError,
)
from qemu_kd.formats.errors import pad_field
from qemu_kd.formats.policy import HOST_DATA_SIZE
from qemu_kd.tenant.measure import SealError


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
                                             pad_field("report_data", report_data, REPORT_DATA_SIZE)):
        raise ReportDataMismatch("report_data does not match the expected value",
                                 "the report answers another challenge (stale or replayed)")
    if host_data is not None and not _same(report.host_data, pad_field("host_data", host_data, HOST_DATA_SIZE)):
        raise HostDataMismatch(f"host_data {report.host_data.hex()} is not the expected "
                               f"{pad_field('host_data', host_data, HOST_DATA_SIZE).hex()}")







class ReportFormatError(AttestationError):
    """The report is not a well-formed qemu-kd report, so nothing in it can be trusted."""

    exit_code = 3


def load_root(root_cert: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(root_cert, x509.Certificate):
        return root_cert
    try:
        return x509.load_pem_x509_certificate(bytes(root_cert))
    except ValueError:
        raise SealError("the root certificate is not a PEM X.509 certificate",
                        "pass the emulated manufacturer's root-ca.crt") from None


# ---------------------------------------------------------- verification

def check_report(report_bytes: bytes, root_cert: x509.Certificate | bytes, chain_pem: bytes, *,
                 measurement: bytes, policy: Policy, report_data: bytes, host_data: bytes | None = None,
                 allow_emulated: bool) -> AttestationReport:
    """Verify a report (chain, signature, EMULATED) and validate it against expectations.

    Each failure raises the attestation error class with its own exit code:
    signature 3 (also a malformed report), chain 4, measurement 5, policy 6,
    report_data 7, host_data 8, emulated platform not allowed 9.
    """
    root = root_cert if isinstance(root_cert, x509.Certificate) else load_root(root_cert)
    try:
        report = verify_report(bytes(report_bytes), chain_pem, root, allow_emulated)
    except FormatError as exc:
        raise ReportFormatError(f"the report is not a valid qemu-kd attestation report: {exc.message}",
                                "pass the report exactly as the guest obtained it") from None
    validate_report(report, measurement=measurement, policy=policy, report_data=report_data,
                    host_data=host_data)
    return report
