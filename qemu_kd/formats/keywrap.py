"""Wrapping the key-domain key for one platform's key-agreement key (KAK).

ECIES on P-384: the tenant makes an ephemeral P-384 key, does ECDH with the
platform's KAK public key, derives an AES-256-GCM key with HKDF-SHA-384 and
encrypts the 64-byte domain key.  The header, the policy and host_data are
the associated data, so the key opens only with the policy and host_data the
tenant chose.

Wire format (248 bytes, little-endian integers)::

    0x00  4   magic "KDWK"
    0x04  u16 version (1)
    0x06  u16 reserved (0)
    0x08  48  recipient: SHA-384 of the KAK public key (SEC1 uncompressed)
    0x38  97  ephemeral public key, SEC1 uncompressed (0x04 || X || Y)
    0x99  3   reserved (0)
    0x9C  12  AES-GCM nonce
    0xA8  80  ciphertext of the 64-byte key || 16-byte GCM tag

HKDF: salt = ephemeral public || KAK public (both SEC1 uncompressed),
info = "qemu-kd key wrap v1", length 32.  AAD = bytes 0x00..0xA7 of the
record || packed policy (8) || host_data zero-padded to 32 bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qemu_kd.common.errors import KdError
from qemu_kd.formats.errors import (
    FieldValueError,
    MagicError,
    ReservedBitsError,
    VersionError,
    require_bytes,
    require_length,
)
from qemu_kd.formats.policy import HOST_DATA_SIZE, Policy
from qemu_kd.formats.errors import pad_field

WRAP_MAGIC = b"KDWK"
WRAP_VERSION = 1
WRAPPED_KEY_SIZE = 248
DOMAIN_KEY_SIZE = 64
POINT_SIZE = 97
NONCE_SIZE = 12
CIPHERTEXT_SIZE = DOMAIN_KEY_SIZE + 16
HKDF_INFO = b"qemu-kd key wrap v1"
_LAYOUT = struct.Struct("<4sHH48s97s3s12s80s")
_AAD_END = 0xA8


class KeyUnwrapError(KdError):
    """The wrapped key does not open with this platform's key and parameters."""


def public_point(key: ec.EllipticCurvePublicKey) -> bytes:
    """SEC1 uncompressed encoding of a P-384 public key (97 bytes)."""
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def recipient_digest(kak_public: ec.EllipticCurvePublicKey) -> bytes:
    return hashlib.sha384(public_point(kak_public)).digest()


def normalize_host_data(host_data: bytes) -> bytes:
    """host_data as the 32-byte field it is everywhere (zero-padded)."""
    return pad_field("host_data", host_data, HOST_DATA_SIZE)


@dataclass(frozen=True)
class WrappedKey:
    """A key-domain key sealed for one platform (see module docstring)."""

    recipient: bytes
    ephemeral_public: bytes
    nonce: bytes
    ciphertext: bytes  # encrypted key || GCM tag

    def header(self) -> bytes:
        """The record bytes covered as associated data (0x00..0xA7)."""
        return self.pack()[:_AAD_END]

    def pack(self) -> bytes:
        require_bytes("wrapped-key recipient", self.recipient, 48)
        require_bytes("wrapped-key ephemeral public key", self.ephemeral_public, POINT_SIZE)
        require_bytes("wrapped-key nonce", self.nonce, NONCE_SIZE)
        require_bytes("wrapped-key ciphertext", self.ciphertext, CIPHERTEXT_SIZE)
        return _LAYOUT.pack(WRAP_MAGIC, WRAP_VERSION, 0, self.recipient, self.ephemeral_public,
                            bytes(3), self.nonce, self.ciphertext)

    @classmethod
    def unpack(cls, data: bytes) -> "WrappedKey":
        require_length("wrapped key", data, WRAPPED_KEY_SIZE)
        magic, version, reserved, recipient, point, reserved2, nonce, ct = _LAYOUT.unpack(bytes(data))
        if magic != WRAP_MAGIC:
            raise MagicError("this is not a qemu-kd wrapped key (bad magic)",
                             "pass the wrapped key from a sealed bundle")
        if version != WRAP_VERSION:
            raise VersionError(f"wrapped-key version {version} is not supported (expected {WRAP_VERSION})")
        if reserved or any(reserved2):
            raise ReservedBitsError("wrapped key: reserved bytes are not zero")
        if point[0] != 0x04:
            raise FieldValueError("wrapped key: the ephemeral public key is not an uncompressed SEC1 point")
        return cls(recipient, point, nonce, ct)


def _kek(shared: bytes, ephemeral_point: bytes, kak_point: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA384(), length=32, salt=ephemeral_point + kak_point,
                info=HKDF_INFO).derive(shared)


def _aad(header: bytes, policy: Policy, host_data: bytes) -> bytes:
    return header + policy.pack() + normalize_host_data(host_data)


def wrap_key(key: bytes, platform_kak_public: ec.EllipticCurvePublicKey, policy: Policy,
             host_data: bytes = b"") -> WrappedKey:
    """Seal a 64-byte domain key for the platform owning ``platform_kak_public``."""
    require_bytes("domain key", key, DOMAIN_KEY_SIZE)
    if not isinstance(platform_kak_public.curve, ec.SECP384R1):
        raise FieldValueError("the platform key-agreement key must be on P-384")
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    eph_point = public_point(ephemeral.public_key())
    kak_point = public_point(platform_kak_public)
    kek = _kek(ephemeral.exchange(ec.ECDH(), platform_kak_public), eph_point, kak_point)
    nonce = os.urandom(NONCE_SIZE)
    shell = WrappedKey(hashlib.sha384(kak_point).digest(), eph_point, nonce, bytes(CIPHERTEXT_SIZE))
    ciphertext = AESGCM(kek).encrypt(nonce, bytes(key), _aad(shell.header(), policy, host_data))
    return WrappedKey(shell.recipient, eph_point, nonce, ciphertext)


def unwrap_key(wrapped: WrappedKey, platform_kak_private: ec.EllipticCurvePrivateKey, policy: Policy,
               host_data: bytes = b"") -> bytes:
    """Open a wrapped key with the platform's KAK; KeyUnwrapError if it does not open."""
    failure = KeyUnwrapError(
        "wrapped key does not open with this platform's key-agreement key "
        "(sealed for another platform, or policy/host_data changed)",
        "seal the guest again for this platform's certificate with the same policy and host_data")
    kak_point = public_point(platform_kak_private.public_key())
    if wrapped.recipient != hashlib.sha384(kak_point).digest():
        raise failure
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), wrapped.ephemeral_public)
        kek = _kek(platform_kak_private.exchange(ec.ECDH(), ephemeral), wrapped.ephemeral_public, kak_point)
        return AESGCM(kek).decrypt(wrapped.nonce, wrapped.ciphertext,
                                   _aad(wrapped.header(), policy, host_data))
    except (InvalidTag, ValueError):
        raise failure from None
