"""Signing attestation reports with the platform's attestation key (ECDSA P-384)."""

from __future__ import annotations

import os
from dataclasses import replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from qemu_kd.platform.identity import PlatformIdentity
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.report import AttestationReport, ID_SIZE, REPORT_DATA_SIZE, SCALAR_SIZE
from qemu_kd.formats.errors import pad_field
from qemu_kd.formats.policy import HOST_DATA_SIZE


def sign_report(identity: PlatformIdentity, *, policy: Policy, measurement: bytes, report_data: bytes,
                host_data: bytes, keyid: int) -> AttestationReport:
    """A report signed with the platform's attestation key (report/host data zero-padded)."""
    report = AttestationReport(
        policy=policy, measurement=bytes(measurement),
        report_data=pad_field("report_data", report_data, REPORT_DATA_SIZE),
        host_data=pad_field("host_data", host_data, HOST_DATA_SIZE),
        keyid=keyid, platform_id=identity.platform_id, report_id=os.urandom(ID_SIZE), emulated=True)
    der = identity.attestation_key.sign(report.signed_body(), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return replace(report, signature=r.to_bytes(SCALAR_SIZE, "big") + s.to_bytes(SCALAR_SIZE, "big"))
