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

Stdlib and ``cryptography`` only: this module runs inside the guest.
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


def derive_keys(shared: bytes, auth_key: bytes, th: bytes) -> tuple[bytes, bytes, bytes]:
    """(tenant→guest key, guest→tenant key, confirmation key), 32 bytes each."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(hashes.SHA384(), 96, salt=auth_key, info=KEYS_LABEL + th).derive(shared)
    return okm[:32], okm[32:64], okm[64:]


def gcm_nonce(ftype: int, seq: int) -> bytes:
    return bytes([ftype, 0, 0, 0]) + seq.to_bytes(8, "little")


class Channel:
    """One established session, from one side's point of view."""

    def __init__(self, session_id: bytes, send_key: bytes, recv_key: bytes, send_type: int, recv_type: int):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.session_id = session_id
        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self.send_type, self.recv_type = send_type, recv_type
        self.send_seq = 0
        self.recv_seq = 0

    def seal(self, plaintext: bytes) -> bytes:
        size = len(plaintext) + GCM_TAG
        head = Frame(self.send_type, self.session_id, self.send_seq, bytes(size))
        body = self._send.encrypt(gcm_nonce(self.send_type, self.send_seq), plaintext, head.header())
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
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._recv.decrypt(gcm_nonce(frame.type, frame.seq), frame.body, frame.header())
        except InvalidTag:
            raise SessionError("frame does not authenticate under this session's key") from None
        self.recv_seq += 1
        return plain


def p384_keypair():
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = ec.generate_private_key(ec.SECP384R1())
    return key, key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def ecdh(private_key, peer_public: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), peer_public)
    except ValueError:
        raise SessionError("the peer's key is not a P-384 point") from None
    return private_key.exchange(ec.ECDH(), peer)


class GuestHandshake:
    """The agent's pending attestation key, waiting for the tenant's OPEN."""

    def __init__(self, nonce: bytes):
        self._key, self.public_key = p384_keypair()
        self.report_data = report_data_for(nonce, self.public_key)
        self.session_id = session_id_for(self.public_key)

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
        channel = Channel(self.session_id, g2t, t2g, DATA_G2T, DATA_T2G)
        reply = Frame(ACCEPT, self.session_id, 0, accept_mac(confirm, th)).pack()
        return channel, reply


class TenantHandshake:
    """The tenant's side: build OPEN for a verified attestation, then check ACCEPT."""

    def __init__(self, report_data: bytes, agent_public: bytes, auth_key: bytes):
        self._key, self.public_key = p384_keypair()
        self.agent_public = agent_public
        self.session_id = session_id_for(agent_public)
        self._th = transcript(report_data, agent_public, self.public_key)
        self._auth_key = auth_key
        self._keys = derive_keys(ecdh(self._key, agent_public), auth_key, self._th)

    def open_frame(self) -> bytes:
        body = self.public_key + open_mac(self._auth_key, self._th)
        return Frame(OPEN, self.session_id, 0, body).pack()

    def finish(self, data: bytes) -> Channel:
        frame = Frame.unpack(data)
        t2g, g2t, confirm = self._keys
        if frame.type != ACCEPT or frame.session_id != self.session_id or frame.seq != 0 or \
                not hmac.compare_digest(frame.body, accept_mac(confirm, self._th)):
            raise SessionError("the guest's ACCEPT does not confirm this session")
        return Channel(self.session_id, t2g, g2t, DATA_T2G, DATA_G2T)
