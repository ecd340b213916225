"""The tenant session: frames, handshake and key schedule, shared by the agent and the tenant.

The host relays session frames (base64 inside the shared-channel protocol) but
cannot read, forge, replay or open them.  ``docs/agent-protocol.md`` gives the
byte layout; in short:

* The agent makes a fresh P-384 key pair A for each ``attest`` and binds
  ``SHA-512(label ‖ len(nonce) ‖ nonce ‖ A)`` into the report's report_data.
* The tenant checks the report, then sends OPEN: its own ephemeral key T and
  ``HMAC-SHA384(K_auth, "open" ‖ transcript)``.  ``K_auth`` (the tenant
  authority key) is derived from the key-domain key, which only the tenant and
  the platform know; the agent gets it from the platform on the guest port.
* Both derive per-direction AES-256-GCM keys from ECDH(A, T) with ``K_auth`` as
  the HKDF salt.  The agent answers ACCEPT with a key-confirmation MAC.
* DATA frames carry one JSON message each, numbered per direction from 0;
  a frame is accepted only with the next number in its direction.

The public-key and AES-GCM work goes through a backend (:class:`SessionCrypto`):
``cryptography`` (:class:`PycaCrypto`, the tenant's) or the guest's own
libcrypto through ctypes (:mod:`guest_agent.libcrypto`, the agent's, which
needs no import of ``cryptography``; :func:`guest_crypto`).  HKDF and HMAC are
the standard library's.  Both backends give the same bytes on the wire.

Stdlib, ctypes and ``cryptography`` only: this module runs inside the guest.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC = b"KDSF"
VERSION = 1
OPEN, ACCEPT, DATA_T2G, DATA_G2T = 1, 2, 3, 4
FRAME_TYPES = (OPEN, ACCEPT, DATA_T2G, DATA_G2T)
HEADER = struct.Struct("<4sBBH16sQI")        # magic, version, type, reserved, session id, seq, length
HEADER_SIZE = HEADER.size                     # 36
MAX_BODY = 16 << 20                        # an exec answer with both streams full fits; one line in base64
POINT_SIZE = 97                               # uncompressed P-384 point
MAC_SIZE = 48
AUTH_KEY_SIZE = 32
GCM_TAG = 16

ATTEST_LABEL = b"qemu-kd attest v1"
TRANSCRIPT_LABEL = b"qemu-kd session v1"
KEYS_LABEL = b"qemu-kd session keys v1"


class SessionError(ValueError):
    """A frame that is malformed, unauthentic, replayed, reordered or for another session."""


@dataclass(frozen=True)
class Frame:
    """One session frame: a 36-byte header, then the body."""

    type: int
    session_id: bytes
    seq: int
    body: bytes

    def header(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.type, 0, self.session_id, self.seq, len(self.body))

    def pack(self) -> bytes:
        if self.type not in FRAME_TYPES or len(self.session_id) != 16 or not 0 <= self.seq < 1 << 64:
            raise SessionError("frame fields out of range")
        return self.header() + self.body

    @classmethod
    def unpack(cls, data: bytes) -> "Frame":
        if len(data) < HEADER_SIZE:
            raise SessionError(f"frame of {len(data)} bytes is shorter than its {HEADER_SIZE}-byte header")
        magic, version, ftype, reserved, sid, seq, length = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SessionError("not a session frame (bad magic)")
        if version != VERSION:
            raise SessionError(f"session frame version {version} is not supported")
        if ftype not in FRAME_TYPES or reserved:
            raise SessionError("session frame type or reserved field is invalid")
        if length > MAX_BODY or len(data) != HEADER_SIZE + length:
            raise SessionError("session frame length does not match its body (truncated or padded)")
        return cls(ftype, bytes(sid), seq, bytes(data[HEADER_SIZE:]))


def report_data_for(nonce: bytes, public_key: bytes) -> bytes:
    """64 bytes binding the tenant's nonce and the agent's session public key."""
    return hashlib.sha512(ATTEST_LABEL + len(nonce).to_bytes(2, "big") + nonce + public_key).digest()


def session_id_for(agent_public: bytes) -> bytes:
    return hashlib.sha256(b"qemu-kd session id" + agent_public).digest()[:16]


def transcript(report_data: bytes, agent_public: bytes, tenant_public: bytes) -> bytes:
    return hashlib.sha384(TRANSCRIPT_LABEL + report_data + agent_public + tenant_public).digest()


def open_mac(auth_key: bytes, th: bytes) -> bytes:
    return hmac.new(auth_key, b"open" + th, hashlib.sha384).digest()


def accept_mac(confirm_key: bytes, th: bytes) -> bytes:
    return hmac.new(confirm_key, b"accept" + th, hashlib.sha384).digest()


def hkdf(ikm: bytes, *, salt: bytes | None, info: bytes, length: int, hash_name: str = "sha384") -> bytes:
    """HKDF (RFC 5869): extract with ``salt`` (none: a block of zeros), expand to ``length`` bytes."""
    size = hashlib.new(hash_name).digest_size
    if not 0 < length <= 255 * size:
        raise ValueError(f"HKDF gives 1 to {255 * size} bytes")
    prk = hmac.new(salt or bytes(size), ikm, hash_name).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // size) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hash_name).digest()
        okm += block
    return okm[:length]


def derive_keys(shared: bytes, auth_key: bytes, th: bytes) -> tuple[bytes, bytes, bytes]:
    """(tenant→guest key, guest→tenant key, confirmation key), 32 bytes each."""
    okm = hkdf(shared, salt=auth_key, info=KEYS_LABEL + th, length=96)
    return okm[:32], okm[32:64], okm[64:]


# -- the crypto backends ---------------------------------------------------------------
# The interfaces below are plain classes (the typing module would cost the agent's start-up).
# PycaCrypto is ``cryptography``; guest_agent.libcrypto.Libcrypto, P384Key and AesGcm have
# the same methods without importing this module.

class KeyPair:
    """A P-384 key pair: ``public`` is its 97-byte uncompressed point."""

    public: bytes

    def exchange(self, peer_point: bytes) -> bytes:
        """ECDH: the 48-byte shared X coordinate; ValueError for a peer key that is not a P-384 point."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the private key."""
        raise NotImplementedError


class Aead:
    """AES-256-GCM under one 32-byte key, with 12-byte nonces."""

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Ciphertext ‖ 16-byte tag."""
        raise NotImplementedError

    def open(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        """The plaintext; ValueError unless ``data`` authenticates."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the key."""
        raise NotImplementedError


class SessionCrypto:
    """A backend: makes key pairs and AES-256-GCM ciphers."""

    name: str

    def generate(self) -> KeyPair:
        raise NotImplementedError

    def aead(self, key: bytes) -> Aead:
        raise NotImplementedError


class _PycaKey(KeyPair):
    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._key = ec.generate_private_key(ec.SECP384R1())
        self.public = self._key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def exchange(self, peer_point: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec

        if self._key is None:
            raise ValueError("this key is closed")
        # from_encoded_point takes compressed points too; the wire has only uncompressed ones.
        if len(peer_point) != POINT_SIZE or peer_point[0] != 4:
            raise ValueError(f"a P-384 public key is {POINT_SIZE} bytes starting 0x04 (uncompressed)")
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), bytes(peer_point))
        return self._key.exchange(ec.ECDH(), peer)

    def close(self) -> None:
        self._key = None


class _PycaAead(Aead):
    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(nonce, data, aad)
        except InvalidTag:
            raise ValueError("the ciphertext does not authenticate under this key") from None

    def close(self) -> None:
        self._aead = None


class PycaCrypto(SessionCrypto):
    """The ``cryptography`` package (the tenant's backend, and the agent's fallback)."""

    name = "cryptography"

    def generate(self) -> KeyPair:
        return _PycaKey()

    def aead(self, key: bytes) -> Aead:
        return _PycaAead(key)


def guest_crypto(log) -> SessionCrypto:
    """The agent's backend: the guest's libcrypto through ctypes, else ``cryptography``
    (which ``log`` is told)."""
    from .libcrypto import Libcrypto, LibcryptoUnavailable

    try:
        return Libcrypto()
    except LibcryptoUnavailable as exc:
        log(f"session crypto: {exc}; using the cryptography package instead")
        return PycaCrypto()


def gcm_nonce(ftype: int, seq: int) -> bytes:
    return bytes([ftype, 0, 0, 0]) + seq.to_bytes(8, "little")


class Channel:
    """One established session, from one side's point of view."""

    def __init__(self, session_id: bytes, send_key: bytes, recv_key: bytes, send_type: int, recv_type: int,
                 crypto: SessionCrypto):
        self.session_id = session_id
        self._send = crypto.aead(send_key)
        try:
            self._recv = crypto.aead(recv_key)
        except BaseException:
            self._send.close()
            raise
        self.send_type, self.recv_type = send_type, recv_type
        self.send_seq = 0
        self.recv_seq = 0

    def seal(self, plaintext: bytes) -> bytes:
        size = len(plaintext) + GCM_TAG
        head = Frame(self.send_type, self.session_id, self.send_seq, bytes(size))
        body = self._send.seal(gcm_nonce(self.send_type, self.send_seq), plaintext, head.header())
        self.send_seq += 1
        return Frame(self.send_type, self.session_id, head.seq, body).pack()

    def open(self, data: bytes) -> bytes:
        """The plaintext of the next frame in the receiving direction; state moves only on success."""
        frame = Frame.unpack(data)
        if frame.type != self.recv_type:
            raise SessionError("frame goes the wrong way (reflected) or is not a data frame")
        if frame.session_id != self.session_id:
            raise SessionError("frame belongs to another session")
        if frame.seq != self.recv_seq:
            raise SessionError(f"frame number {frame.seq} is not the expected {self.recv_seq} "
                               "(replayed, reordered or dropped)")
        try:
            plain = self._recv.open(gcm_nonce(frame.type, frame.seq), frame.body, frame.header())
        except ValueError:
            raise SessionError("frame does not authenticate under this session's key") from None
        self.recv_seq += 1
        return plain

    def close(self) -> None:
        """Free both keys (the session is over)."""
        self._send.close()
        self._recv.close()


def ecdh(key: KeyPair, peer_public: bytes) -> bytes:
    try:
        return key.exchange(peer_public)
    except ValueError:
        raise SessionError("the peer's key is not a P-384 point") from None


class GuestHandshake:
    """The agent's pending attestation key, waiting for the tenant's OPEN."""

    def __init__(self, nonce: bytes, crypto: SessionCrypto):
        self._crypto = crypto
        self._key = crypto.generate()
        self.public_key = self._key.public
        self.report_data = report_data_for(nonce, self.public_key)
        self.session_id = session_id_for(self.public_key)

    def close(self) -> None:
        """Free the attestation key (used once, or replaced by a newer attestation)."""
        self._key.close()

    def accept(self, data: bytes, auth_key: bytes) -> tuple[Channel, bytes]:
        """Check an OPEN frame; on success the new channel and the ACCEPT frame to send back."""
        frame = Frame.unpack(data)
        if frame.type != OPEN:
            raise SessionError("expected an OPEN frame")
        if frame.session_id != self.session_id or frame.seq != 0:
            raise SessionError("OPEN is for another attestation (stale, replayed or cross-domain)")
        if len(frame.body) != POINT_SIZE + MAC_SIZE:
            raise SessionError("OPEN body has the wrong size")
        tenant_public, mac = frame.body[:POINT_SIZE], frame.body[POINT_SIZE:]
        th = transcript(self.report_data, self.public_key, tenant_public)
        if not hmac.compare_digest(mac, open_mac(auth_key, th)):
            raise SessionError("OPEN is not authorised by this domain's tenant")
        t2g, g2t, confirm = derive_keys(ecdh(self._key, tenant_public), auth_key, th)
        channel = Channel(self.session_id, g2t, t2g, DATA_G2T, DATA_T2G, self._crypto)
        reply = Frame(ACCEPT, self.session_id, 0, accept_mac(confirm, th)).pack()
        return channel, reply


class TenantHandshake:
    """The tenant's side: build OPEN for a verified attestation, then check ACCEPT."""

    def __init__(self, report_data: bytes, agent_public: bytes, auth_key: bytes,
                 crypto: SessionCrypto | None = None):
        self._crypto = PycaCrypto() if crypto is None else crypto
        self.agent_public = agent_public
        self.session_id = session_id_for(agent_public)
        self._auth_key = auth_key
        key = self._crypto.generate()
        try:
            self.public_key = key.public
            self._th = transcript(report_data, agent_public, self.public_key)
            self._keys = derive_keys(ecdh(key, agent_public), auth_key, self._th)
        finally:
            key.close()             # an ephemeral key: one ECDH, then gone

    def open_frame(self) -> bytes:
        body = self.public_key + open_mac(self._auth_key, self._th)
        return Frame(OPEN, self.session_id, 0, body).pack()

    def finish(self, data: bytes) -> Channel:
        frame = Frame.unpack(data)
        t2g, g2t, confirm = self._keys
        if frame.type != ACCEPT or frame.session_id != self.session_id or frame.seq != 0 or \
                not hmac.compare_digest(frame.body, accept_mac(confirm, self._th)):
            raise SessionError("the guest's ACCEPT does not confirm this session")
        return Channel(self.session_id, t2g, g2t, DATA_T2G, DATA_G2T, self._crypto)
