"""The emulated manufacturer root CA and the platform's identity (private keys).

The root CA stands for the hardware vendor.  It is generated once per
installation in the state directory; tests make throwaway roots in memory.
The certificate formats and the chain check are in :mod:`qemu_kd.formats.certs`.

Besides its two P-384 keys (attestation, key agreement) the platform holds a
*sealing root*: 48 random bytes used for nothing but deriving the guests'
sealing keys (guest-port ``derive-key``).  It is its own secret so that no
key-agreement key ever doubles as a KDF input.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from qemu_kd.common.errors import KdError
from qemu_kd.formats.certs import ChainError, EMULATED_OID, EMULATED_VALUE, KAK_OID, cert_validity, compute_platform_id, spki_der, utc_now, verify_chain
from qemu_kd.common.files import write_file_atomic

ROOT_KEY_FILE = "root-ca.key"
ROOT_CERT_FILE = "root-ca.crt"
PLATFORM_ATTESTATION_KEY_FILE = "platform-attestation.key"
PLATFORM_KAK_FILE = "platform-kak.key"
PLATFORM_CERT_FILE = "platform.crt"
PLATFORM_SEALING_ROOT_FILE = "platform-sealing-root.key"

SEALING_ROOT_SIZE = 48
SEALING_KEY_SIZE = 32
SEALING_LABEL = b"qemu-kd sealing key v1"
SNAPSHOT_LABEL = b"qemu-kd snapshot key v1"

ROOT_VALIDITY = datetime.timedelta(days=365 * 30)
PLATFORM_VALIDITY = datetime.timedelta(days=365 * 20)


class IdentityError(KdError):
    """The root CA or platform identity in the state directory is unusable."""


def _emulated_extension() -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(EMULATED_OID, EMULATED_VALUE)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / ".identity.lock", os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"{path} is not a readable PEM private key",
                            "move the state directory aside to generate a new identity") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise IdentityError(f"{path} is not a P-384 private key",
                            "move the state directory aside to generate a new identity")
    return key


def _load_sealing_root(path: Path) -> bytes:
    try:
        root = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}",
                            "check the state directory's permissions") from None
    if len(root) != SEALING_ROOT_SIZE:
        raise IdentityError(f"{path} is {len(root)} bytes, not a {SEALING_ROOT_SIZE}-byte sealing root",
                            "move the state directory aside to generate a new identity")
    return root


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise IdentityError(f"{path} is not a readable PEM certificate",
                            "move the state directory aside to generate a new identity") from None


class RootCA:
    """The emulated manufacturer root certificate authority."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate):
        self.private_key = private_key
        self.certificate = certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create_throwaway(cls) -> "RootCA":
        """A fresh root kept only in memory (for tests)."""
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qemu-kd EMULATED manufacturer"),
            x509.NameAttribute(NameOID.COMMON_NAME, "qemu-kd EMULATED root CA (not real hardware)"),
        ])
        now = utc_now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_emulated_extension(), critical=True)
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> "RootCA":
        """The installation's root from ``state_dir``, generated there on first use."""
        state_dir = Path(state_dir)
        key_path, cert_path = state_dir / ROOT_KEY_FILE, state_dir / ROOT_CERT_FILE
        with _locked(state_dir):
            if key_path.exists() and cert_path.exists():
                root = cls(_load_key(key_path), _load_cert(cert_path))
                if spki_der(root.certificate.public_key()) != spki_der(root.private_key.public_key()):
                    raise IdentityError(f"{cert_path} does not belong to {key_path}",
                                        "move the state directory aside to generate a new root")
                return root
            if key_path.exists() or cert_path.exists():
                raise IdentityError(f"half a root CA in {state_dir}: one of {ROOT_KEY_FILE}, "
                                    f"{ROOT_CERT_FILE} is missing",
                                    "move the state directory aside to generate a new root")
            root = cls.create_throwaway()
            write_file_atomic(key_path, _key_pem(root.private_key), 0o600)
            write_file_atomic(cert_path, root.certificate_pem, 0o600)
            return root

    def issue_platform_certificate(self, attestation_public: ec.EllipticCurvePublicKey,
                                   kak_public: ec.EllipticCurvePublicKey) -> x509.Certificate:
        platform_id = compute_platform_id(attestation_public, kak_public)
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qemu-kd EMULATED manufacturer"),
            x509.NameAttribute(NameOID.COMMON_NAME, "qemu-kd EMULATED platform (not real hardware)"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, platform_id.hex()),
        ])
        now = utc_now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.certificate.subject)
            .public_key(attestation_public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + PLATFORM_VALIDITY, cert_validity(self.certificate)[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.certificate.public_key()), critical=False)
            .add_extension(_emulated_extension(), critical=True)
            .add_extension(x509.UnrecognizedExtension(KAK_OID, spki_der(kak_public)), critical=False)
            .sign(self.private_key, hashes.SHA384())
        )


class PlatformIdentity:
    """The platform's attestation key, key-agreement key, sealing root and certificate."""

    def __init__(self, attestation_key: ec.EllipticCurvePrivateKey, kak_private: ec.EllipticCurvePrivateKey,
                 certificate: x509.Certificate, root_certificate: x509.Certificate,
                 sealing_root: bytes):
        if len(sealing_root) != SEALING_ROOT_SIZE:
            raise IdentityError(f"the sealing root must be {SEALING_ROOT_SIZE} bytes")
        self.attestation_key = attestation_key
        self.kak_private = kak_private
        self.certificate = certificate
        self.root_certificate = root_certificate
        self._sealing_root = bytes(sealing_root)
        self.platform_id = compute_platform_id(attestation_key.public_key(), kak_private.public_key())

    def sealing_key(self, measurement: bytes, policy_bytes: bytes, label: bytes) -> bytes:
        """A guest's sealing key: the same for the same image, policy and label on this platform.

        HKDF-SHA-384(ikm = sealing root, no salt, info = "qemu-kd sealing key v1" ||
        measurement (48) || policy (8) || label, length 32).  Neither key pair enters it.
        """
        if len(measurement) != 48 or len(policy_bytes) != 8:
            raise ValueError("a sealing key needs the 48-byte measurement and the 8-byte policy")
        info = SEALING_LABEL + bytes(measurement) + bytes(policy_bytes) + bytes(label)
        return HKDF(hashes.SHA384(), SEALING_KEY_SIZE, salt=None, info=info).derive(self._sealing_root)

    def snapshot_key(self, measurement: bytes, policy_bytes: bytes, domain_id: bytes, purpose: bytes) -> bytes:
        """A key for one domain's snapshots on this platform (platform/snapshot.py).

        HKDF-SHA-384(ikm = sealing root, no salt, info = "qemu-kd snapshot key v1" || purpose
        (8) || measurement (48) || policy (8) || domain id (16), length 32).  Its info never
        equals a guest's sealing-key info, so no guest can ask for it on the guest port.
        """
        if len(measurement) != 48 or len(policy_bytes) != 8 or len(domain_id) != 16 or len(purpose) != 8:
            raise ValueError("a snapshot key needs the measurement, policy, domain id and an 8-byte purpose")
        info = SNAPSHOT_LABEL + bytes(purpose) + bytes(measurement) + bytes(policy_bytes) + bytes(domain_id)
        return HKDF(hashes.SHA384(), SEALING_KEY_SIZE, salt=None, info=info).derive(self._sealing_root)

    @property
    def kak_public(self) -> ec.EllipticCurvePublicKey:
        return self.kak_private.public_key()

    @classmethod
    def create_throwaway(cls, root: RootCA) -> "PlatformIdentity":
        attestation = ec.generate_private_key(ec.SECP384R1())
        kak = ec.generate_private_key(ec.SECP384R1())
        cert = root.issue_platform_certificate(attestation.public_key(), kak.public_key())
        return cls(attestation, kak, cert, root.certificate, os.urandom(SEALING_ROOT_SIZE))

    @classmethod
    def load_or_create(cls, state_dir: Path, root: RootCA) -> "PlatformIdentity":
        """The platform keys from ``state_dir`` (generated on first use).

        The keys are kept for good, so sealed bundles stay valid; the
        certificate is issued again if it no longer chains to ``root``.  A
        state directory from before the sealing root existed gets one.
        """
        state_dir = Path(state_dir)
        att_path = state_dir / PLATFORM_ATTESTATION_KEY_FILE
        kak_path = state_dir / PLATFORM_KAK_FILE
        cert_path = state_dir / PLATFORM_CERT_FILE
        sealing_path = state_dir / PLATFORM_SEALING_ROOT_FILE
        with _locked(state_dir):
            if att_path.exists() != kak_path.exists():
                raise IdentityError(f"half a platform identity in {state_dir}: one of "
                                    f"{PLATFORM_ATTESTATION_KEY_FILE}, {PLATFORM_KAK_FILE} is missing",
                                    "move the state directory aside to generate a new identity")
            if att_path.exists():
                attestation, kak = _load_key(att_path), _load_key(kak_path)
            else:
                attestation = ec.generate_private_key(ec.SECP384R1())
                kak = ec.generate_private_key(ec.SECP384R1())
                write_file_atomic(att_path, _key_pem(attestation), 0o600)
                write_file_atomic(kak_path, _key_pem(kak), 0o600)
            if sealing_path.exists():
                sealing_root = _load_sealing_root(sealing_path)
            else:
                sealing_root = os.urandom(SEALING_ROOT_SIZE)
                write_file_atomic(sealing_path, sealing_root, 0o600)
            cert = _load_cert(cert_path) if cert_path.exists() else None
            identity = cls(attestation, kak, cert, root.certificate, sealing_root) if cert else None
            if identity is None or not identity._certificate_current():
                cert = root.issue_platform_certificate(attestation.public_key(), kak.public_key())
                write_file_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o600)
                identity = cls(attestation, kak, cert, root.certificate, sealing_root)
            return identity

    def _certificate_current(self) -> bool:
        try:
            info = verify_chain(self.chain_pem(), self.root_certificate)
        except ChainError:
            return False
        return (info.platform_id == self.platform_id
                and spki_der(info.attestation_public_key) == spki_der(self.attestation_key.public_key()))

    def chain_pem(self) -> bytes:
        """Platform certificate then root certificate, PEM."""
        return (self.certificate.public_bytes(serialization.Encoding.PEM)
                + self.root_certificate.public_bytes(serialization.Encoding.PEM))
