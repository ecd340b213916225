"""Guest side of attested secret release.

The agent makes a fresh P-384 key pair, binds its public key and the
tenant's nonce into the attestation report's report_data, and later opens a
secret the tenant encrypted to that key (ECDH + HKDF-SHA384 + AES-256-GCM, the
destination path as associated data).  The secret is written to a file in
the guest and never echoed on the shared channel.
"""

from __future__ import annotations

import hashlib
import os

ATTEST_LABEL = b"qemu-kd attest v1"
SECRET_LABEL = b"qemu-kd secret v1"
ALLOWED_DIRS = ("/run/", "/tmp/")


def report_data_for(nonce: bytes, public_key: bytes) -> bytes:
    """64 bytes binding the tenant's nonce and the agent's public key."""
    return hashlib.sha512(ATTEST_LABEL + len(nonce).to_bytes(2, "big") + nonce
                          + public_key).digest()


def derive_secret_key(shared: bytes, agent_public: bytes, ephemeral_public: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA384(), 32, salt=None,
                info=SECRET_LABEL + agent_public + ephemeral_public).derive(shared)


class SecretReceiver:
    """Holds the agent's attestation key pair for one attest → put_secret exchange."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._key = ec.generate_private_key(ec.SECP384R1())
        self.public_key = self._key.public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint)

    def open(self, ephemeral_public: bytes, nonce: bytes, ciphertext: bytes, path: str) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), ephemeral_public)
        shared = self._key.exchange(ec.ECDH(), peer)
        key = derive_secret_key(shared, self.public_key, ephemeral_public)
        return AESGCM(key).decrypt(nonce, ciphertext, path.encode())


def write_secret(path: str, data: bytes) -> None:
    real = os.path.realpath(path)
    if not real.startswith(ALLOWED_DIRS) or real != os.path.normpath(path):
        raise ValueError(f"secrets may only be written under {', '.join(ALLOWED_DIRS)}")
    os.makedirs(os.path.dirname(real), mode=0o700, exist_ok=True)
    fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
