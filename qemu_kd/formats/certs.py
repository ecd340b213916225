"""The platform certificate chain as a verifier sees it.

The root CA (ECDSA P-384, self-signed X.509) stands for the hardware vendor.
The platform certificate, signed by the root, carries the attestation key as
its subject key and the key-agreement key (KAK) in an extension.  Both
certificates are marked EMULATED twice: the word EMULATED in the subject, and
a *critical* extension that generic X.509 verifiers do not know and therefore
reject.

Object identifiers live under a UUID arc (ITU-T X.667, no registration)::

    2.25.156426713027210048517456594735752687714       qemu-kd
                                               .1      EMULATED marker (critical),
                                                       value DER UTF8String "EMULATED"
                                               .2      KAK public key, value DER
                                                       SubjectPublicKeyInfo (P-384)

platform_id = first 16 bytes of SHA-384(DER SPKI of the attestation key ||
DER SPKI of the KAK); it also appears in hex as the subject serialNumber.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qemu_kd.common.errors import KdError

QEMU_KD_ARC = "2.25.156426713027210048517456594735752687714"
EMULATED_OID = x509.ObjectIdentifier(QEMU_KD_ARC + ".1")
KAK_OID = x509.ObjectIdentifier(QEMU_KD_ARC + ".2")
EMULATED_VALUE = b"\x0c\x08EMULATED"  # DER UTF8String "EMULATED"
PLATFORM_ID_SIZE = 16
_CHAIN_HINT = "pass the root CA that certified this platform, or take the chain from its platform-info"


class ChainError(KdError):
    """The platform certificate chain does not lead to the trusted root."""

    exit_code = 4


@dataclass(frozen=True)
class PlatformCertInfo:
    """What a verified platform certificate says."""

    attestation_public_key: ec.EllipticCurvePublicKey
    kak_public_key: ec.EllipticCurvePublicKey
    platform_id: bytes
    emulated: bool
    certificate: x509.Certificate


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def compute_platform_id(attestation_public: ec.EllipticCurvePublicKey,
                        kak_public: ec.EllipticCurvePublicKey) -> bytes:
    return hashlib.sha384(spki_der(attestation_public) + spki_der(kak_public)).digest()[:PLATFORM_ID_SIZE]


def cert_validity(cert: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) as aware UTC datetimes."""
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    utc = datetime.timezone.utc
    return cert.not_valid_before.replace(tzinfo=utc), cert.not_valid_after.replace(tzinfo=utc)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _is_emulated(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_oid(EMULATED_OID)
    except x509.ExtensionNotFound:
        return "EMULATED" in cert.subject.rfc4514_string()
    return True


def verify_chain(chain_pem: bytes, root_cert: x509.Certificate) -> PlatformCertInfo:
    """Check that the PEM chain (platform certificate first) is issued by ``root_cert``."""
    if not bytes(chain_pem).strip():
        raise ChainError("the certificate chain is empty", "pass the chain from platform-info unchanged")
    try:
        certs = x509.load_pem_x509_certificates(bytes(chain_pem))
    except ValueError:
        raise ChainError("the certificate chain is not a list of PEM certificates",
                         "pass the chain from platform-info unchanged") from None
    leaf, rest = certs[0], certs[1:]
    root_der = root_cert.public_bytes(serialization.Encoding.DER)
    for extra in rest:
        if extra.public_bytes(serialization.Encoding.DER) != root_der:
            raise ChainError("the certificate chain comes from another root CA",
                             _CHAIN_HINT)
    if leaf.issuer != root_cert.subject:
        raise ChainError("the platform certificate was not issued by the trusted root CA",
                         _CHAIN_HINT)
    try:
        root_key = root_cert.public_key()
        if not isinstance(root_key, ec.EllipticCurvePublicKey):
            raise ChainError("the root CA key is not an EC key")
        root_key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise ChainError("the platform certificate's signature does not verify under the trusted root CA",
                         "the chain comes from another root or was altered") from None
    not_before, not_after = cert_validity(leaf)
    if not not_before <= utc_now() <= not_after:
        raise ChainError(f"the platform certificate is not valid now (valid "
                         f"{not_before:%Y-%m-%d} to {not_after:%Y-%m-%d})")
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ChainError("the platform certificate is a CA certificate, not a platform certificate")
    except x509.ExtensionNotFound:
        pass
    attestation_key = leaf.public_key()
    if not isinstance(attestation_key, ec.EllipticCurvePublicKey) or \
            not isinstance(attestation_key.curve, ec.SECP384R1):
        raise ChainError("the platform attestation key is not a P-384 key")
    try:
        kak_der = leaf.extensions.get_extension_for_oid(KAK_OID).value.value
        kak = serialization.load_der_public_key(kak_der)
    except x509.ExtensionNotFound:
        raise ChainError("the platform certificate carries no key-agreement key extension") from None
    except ValueError:
        raise ChainError("the platform certificate's key-agreement key extension is malformed") from None
    if not isinstance(kak, ec.EllipticCurvePublicKey) or not isinstance(kak.curve, ec.SECP384R1):
        raise ChainError("the platform key-agreement key is not a P-384 key")
    platform_id = compute_platform_id(attestation_key, kak)
    serials = leaf.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if serials and serials[0].value != platform_id.hex():
        raise ChainError("the platform certificate's serialNumber does not match its keys")
    return PlatformCertInfo(attestation_key, kak, platform_id,
                            _is_emulated(leaf) or _is_emulated(root_cert), leaf)
