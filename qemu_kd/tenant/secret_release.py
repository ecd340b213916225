"""Tenant side of attested secret release (see ``guest_agent.secrets``).

1. The tenant sends a fresh nonce; the agent answers with a report whose
   report_data is ``SHA-512(label ‖ len(nonce) ‖ nonce ‖ agent_public_key)``.
2. The tenant verifies the report (signature, chain, measurement, policy) and
   that report_data binds its nonce and the agent's key.
3. The tenant encrypts the secret to that key (ephemeral ECDH P-384,
   HKDF-SHA384, AES-256-GCM with the destination path as associated data).
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from guest_agent.secrets import derive_secret_key, report_data_for

from qemu_kd.common.errors import KdError


class SecretReleaseError(KdError):
    exit_code = 7


def check_binding(report_data: bytes, nonce: bytes, agent_public: bytes) -> None:
    if report_data != report_data_for(nonce, agent_public):
        raise SecretReleaseError("report_data does not bind this nonce and the agent's key",
                                 "the report is stale or was produced for another session")


def encrypt_secret(secret: bytes, agent_public: bytes, path: str) -> dict:
    """Arguments of the agent's ``put_secret`` request."""
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), agent_public)
    except ValueError:
        raise SecretReleaseError("agent public key is not a P-384 point") from None
    eph = ec.generate_private_key(ec.SECP384R1())
    eph_pub = eph.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    key = derive_secret_key(eph.exchange(ec.ECDH(), peer), agent_public, eph_pub)
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, secret, path.encode())
    return {"path": path, "ephemeral_key": eph_pub.hex(), "nonce": nonce.hex(),
            "ciphertext": base64.b64encode(ciphertext).decode()}
