"""A minimal tenant side of the agent protocol, written from docs/agent-protocol.md alone.

It shares no code with the agent or with qemu-kd's own tenant: only the
standard library and ``cryptography`` primitives.  If the two ever disagree,
either the document or the implementation is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import struct

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# §4, §5, §6
ATTEST_LABEL = b"qemu-kd attest v1"
AUTHORITY_LABEL = b"qemu-kd tenant authority v1"
SESSION_ID_LABEL = b"qemu-kd session id"
TRANSCRIPT_LABEL = b"qemu-kd session v1"
KEYS_LABEL = b"qemu-kd session keys v1"
HEADER = struct.Struct("<4sBBH16sQI")
MAGIC, VERSION = b"KDSF", 1
OPEN, ACCEPT, DATA_T2G, DATA_G2T = 1, 2, 3, 4
REPORT_SIZE = 352
REPORT_DATA_AT = 0x0B0
FILE_CHUNK = 1 << 20


class ProtocolFailure(Exception):
    """The agent, the host or the report did not do what the document says."""


# -- shared channel (§1, §2) ---------------------------------------------------------
class SharedChannel:
    """Newline-delimited JSON requests and replies over a connected stream socket."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.next_id = 1
        self.ready: dict | None = None

    def _message(self) -> dict:
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl]).rstrip(b"\r")
                del self.buf[:nl + 1]
                if not line:
                    continue
                try:
                    msg = json.loads(line.decode("utf-8"))
                except ValueError:
                    continue                      # noise, not a protocol line
                if isinstance(msg, dict):
                    return msg
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolFailure("shared channel closed")
            self.buf += chunk

    def wait_ready(self) -> dict:
        while self.ready is None:
            msg = self._message()
            if msg.get("event") == "ready":
                self.ready = msg
        return self.ready

    def call(self, cmd: str, **args) -> dict:
        req_id = self.next_id
        self.next_id += 1
        self.sock.sendall(json.dumps({"id": req_id, "cmd": cmd, **args}).encode() + b"\n")
        while True:
            msg = self._message()
            if "event" in msg or msg.get("id") != req_id:
                continue
            if msg.get("ok") is not True:
                raise ProtocolFailure(f"agent refused {cmd}: {msg.get('error')}")
            return msg["result"]


# -- attestation (§4, docs/formats.md §7, §8) ----------------------------------------------
def report_data_for(nonce: bytes, agent_public: bytes) -> bytes:
    return hashlib.sha512(ATTEST_LABEL + struct.pack(">H", len(nonce)) + nonce + agent_public).digest()


def verify_report(report: bytes, chain_pem: bytes, root_pem: bytes, *, measurement: bytes,
                  policy: bytes, nonce: bytes, agent_public: bytes) -> None:
    if len(report) != REPORT_SIZE or report[:4] != b"KDAR":
        raise ProtocolFailure("not a 352-byte KDAR report")
    root = x509.load_pem_x509_certificate(root_pem)
    platform_cert = x509.load_pem_x509_certificates(chain_pem)[0]
    root.public_key().verify(platform_cert.signature, platform_cert.tbs_certificate_bytes,
                             ec.ECDSA(platform_cert.signature_hash_algorithm))
    r = int.from_bytes(report[0x100:0x130], "big")
    s = int.from_bytes(report[0x130:0x160], "big")
    platform_cert.public_key().verify(encode_dss_signature(r, s), report[:0x100], ec.ECDSA(hashes.SHA384()))
    if report[0x060:0x090] != measurement:
        raise ProtocolFailure("measurement differs")
    if report[0x020:0x028] != policy:
        raise ProtocolFailure("policy differs")
    expected = report_data_for(nonce, agent_public)
    if not hmac.compare_digest(report[REPORT_DATA_AT:REPORT_DATA_AT + 64], expected):
        raise ProtocolFailure("report_data does not bind this nonce and the agent's key")


# -- keys (§5, §6) --------------------------------------------------------------------------
def tenant_authority_key(domain_key: bytes) -> bytes:
    return HKDF(hashes.SHA384(), 32, salt=None, info=AUTHORITY_LABEL).derive(domain_key)


def header(ftype: int, session_id: bytes, seq: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, 0, session_id, seq, length)


def parse(frame: bytes) -> tuple[int, bytes, int, bytes]:
    if len(frame) < HEADER.size:
        raise ProtocolFailure("frame shorter than its header")
    magic, version, ftype, reserved, sid, seq, length = HEADER.unpack_from(frame)
    if magic != MAGIC or version != VERSION or reserved or len(frame) != HEADER.size + length:
        raise ProtocolFailure("malformed frame")
    return ftype, sid, seq, frame[HEADER.size:]


def gcm_nonce(ftype: int, seq: int) -> bytes:
    return bytes([ftype, 0, 0, 0]) + struct.pack("<Q", seq)


class Session:
    """An open tenant session (§6, §7)."""

    def __init__(self, channel: SharedChannel, report_data: bytes, agent_public: bytes, k_auth: bytes):
        self.channel = channel
        self.session_id = hashlib.sha256(SESSION_ID_LABEL + agent_public).digest()[:16]
        key = ec.generate_private_key(ec.SECP384R1())
        tenant_public = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        th = hashlib.sha384(TRANSCRIPT_LABEL + report_data + agent_public + tenant_public).digest()
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), agent_public)
        z = key.exchange(ec.ECDH(), peer)
        okm = HKDF(hashes.SHA384(), 96, salt=k_auth, info=KEYS_LABEL + th).derive(z)
        self._t2g, self._g2t, confirm = AESGCM(okm[:32]), AESGCM(okm[32:64]), okm[64:]
        body = tenant_public + hmac.new(k_auth, b"open" + th, hashlib.sha384).digest()
        answer = self._relay(header(OPEN, self.session_id, 0, len(body)) + body)
        ftype, sid, seq, mac = parse(answer)
        if (ftype, sid, seq) != (ACCEPT, self.session_id, 0) or \
                not hmac.compare_digest(mac, hmac.new(confirm, b"accept" + th, hashlib.sha384).digest()):
            raise ProtocolFailure("ACCEPT does not confirm the session")
        self.send_seq = 0
        self.recv_seq = 0

    def _relay(self, frame: bytes) -> bytes:
        result = self.channel.call("session", frame=base64.b64encode(frame).decode())
        return base64.b64decode(result["frame"], validate=True)

    def call(self, op: str, **args) -> dict:
        plain = json.dumps({"op": op, **args}).encode()
        head = header(DATA_T2G, self.session_id, self.send_seq, len(plain) + 16)
        body = self._t2g.encrypt(gcm_nonce(DATA_T2G, self.send_seq), plain, head)
        answer = self._relay(head + body)
        self.send_seq += 1
        ftype, sid, seq, body = parse(answer)
        if (ftype, sid, seq) != (DATA_G2T, self.session_id, self.recv_seq):
            raise ProtocolFailure("answer frame is not the next guest-to-tenant frame of this session")
        try:
            reply = json.loads(self._g2t.decrypt(gcm_nonce(ftype, seq), body, answer[:HEADER.size]))
        except InvalidTag:
            raise ProtocolFailure("answer frame does not authenticate") from None
        self.recv_seq += 1
        if reply.get("ok") is not True:
            raise ProtocolFailure(f"{op} failed in the guest: {reply.get('error')}")
        return reply["result"]

    # §7.1 .. §7.3
    def exec(self, argv: list[str], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        r = self.call("exec", argv=argv, stdin=base64.b64encode(stdin).decode())
        return r["rc"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"])

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        for start in range(0, max(len(data), 1), FILE_CHUNK):
            self.call("put_file", path=path, data=base64.b64encode(data[start:start + FILE_CHUNK]).decode(),
                      mode=mode, append=start > 0)

    def get_file(self, path: str) -> bytes:
        out = bytearray()
        while True:
            r = self.call("get_file", path=path, offset=len(out), length=FILE_CHUNK)
            chunk = base64.b64decode(r["data"])
            out += chunk
            if not chunk or len(out) >= r["size"]:
                return bytes(out)


def attest_and_open(channel: SharedChannel, *, domain_key: bytes, chain_pem: bytes, root_pem: bytes,
                    measurement: bytes, policy: bytes) -> Session:
    """§9: attest with a fresh nonce, verify, derive K_auth, OPEN and check ACCEPT."""
    nonce = os.urandom(32)
    answer = channel.call("attest", nonce=nonce.hex())
    report = base64.b64decode(answer["report"], validate=True)
    agent_public = bytes.fromhex(answer["public_key"])
    verify_report(report, chain_pem, root_pem, measurement=measurement, policy=policy, nonce=nonce,
                  agent_public=agent_public)
    return Session(channel, report[REPORT_DATA_AT:REPORT_DATA_AT + 64], agent_public,
                   tenant_authority_key(domain_key))
