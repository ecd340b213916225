"""The tenant authority key: how a guest tells its tenant from its host.

``K_auth = HKDF-SHA384(ikm = key-domain key, salt = none, info = "qemu-kd
tenant authority v1", length = 32)``.

The tenant chose the 64-byte key-domain key and wrapped it for the platform;
the host never sees it.  So only the tenant and the platform can compute
K_auth.  The platform hands it to the guest on the guest port (which the
host cannot read), and the guest accepts a tenant session only when its
OPEN frame carries a MAC under K_auth.  A host that opens a session of its
own cannot make that MAC.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

AUTHORITY_LABEL = b"qemu-kd tenant authority v1"
AUTHORITY_KEY_SIZE = 32


def tenant_authority_key(domain_key: bytes) -> bytes:
    if len(domain_key) != 64:
        raise ValueError("the key-domain key is 64 bytes")
    return HKDF(hashes.SHA384(), AUTHORITY_KEY_SIZE, salt=None, info=AUTHORITY_LABEL).derive(bytes(domain_key))
