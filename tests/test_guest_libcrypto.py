"""The agent's session crypto through the guest's own libcrypto (guest_agent.libcrypto, ctypes).

The host has the same libcrypto.so.3 as the guest (OpenSSL 3), so the backend is
checked here against ``cryptography`` (the tenant's backend): handshakes and frames in
both directions, refused tags, ciphertexts and points, HKDF against RFC 5869 and
``cryptography``; that the agent's attest and session path never imports
``cryptography``; and, in a real protected guest, that the agent process uses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from guest_agent import libcrypto, session as wire
from guest_agent.libcrypto import InvalidPoint, InvalidTag, Libcrypto, LibcryptoUnavailable

from qemu_kd.tenant.session import SessionRefused, TenantSession

from protected import protected_domain

AUTH = bytes(range(32))
P384_P = 2**384 - 2**128 - 2**96 + 2**32 - 1      # the field prime


@pytest.fixture(scope="module")
def lib():
    return Libcrypto()


BACKENDS = {"libcrypto": Libcrypto, "cryptography": wire.PycaCrypto}


def handshake(guest_crypto, tenant_crypto):
    guest = wire.GuestHandshake(os.urandom(32), guest_crypto)
    tenant = wire.TenantHandshake(guest.report_data, guest.public_key, AUTH, tenant_crypto)
    guest_channel, accept = guest.accept(tenant.open_frame(), AUTH)
    guest.close()
    return guest_channel, tenant.finish(accept)


@pytest.mark.parametrize("guest_side,tenant_side", [("libcrypto", "cryptography"), ("cryptography", "libcrypto"),
                                                    ("libcrypto", "libcrypto")])
def test_backends_interoperate_in_both_directions(guest_side, tenant_side):
    guest, tenant = handshake(BACKENDS[guest_side](), BACKENDS[tenant_side]())
    for message in (b"", b"{}", os.urandom(1000), os.urandom(1 << 20)):
        assert guest.open(tenant.seal(message)) == message
        assert tenant.open(guest.seal(message)) == message
    assert (guest.recv_seq, guest.send_seq, tenant.recv_seq, tenant.send_seq) == (4, 4, 4, 4)
    guest.close()
    tenant.close()


def test_ecdh_agrees_with_cryptography(lib):
    ours, theirs = lib.generate(), wire.PycaCrypto().generate()
    assert len(ours.public) == 97 and ours.public[0] == 4
    assert ours.exchange(theirs.public) == theirs.exchange(ours.public)
    assert len(ours.exchange(theirs.public)) == 48
    assert lib.generate().public != ours.public
    ours.close()
    with pytest.raises(ValueError, match="closed"):
        ours.exchange(theirs.public)


def test_aes_gcm_matches_cryptography_byte_for_byte(lib):
    key, nonce, aad = os.urandom(32), os.urandom(12), os.urandom(36)
    aead = lib.aead(key)
    for plain in (b"", b"x", os.urandom(4097)):
        sealed = aead.seal(nonce, plain, aad)
        assert sealed == AESGCM(key).encrypt(nonce, plain, aad)
        assert aead.open(nonce, sealed, aad) == plain
    assert lib.aead(key).seal(nonce, b"no aad", b"") == AESGCM(key).encrypt(nonce, b"no aad", None)
    aead.close()
    with pytest.raises(ValueError, match="closed"):
        aead.seal(nonce, b"", aad)


def test_a_flipped_tag_ciphertext_aad_or_nonce_is_refused(lib):
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    aead = lib.aead(key)
    sealed = aead.seal(nonce, b"secret message", aad)
    for i in (0, len(sealed) - 20, len(sealed) - 1):      # ciphertext, ciphertext, tag
        tampered = bytearray(sealed)
        tampered[i] ^= 1
        with pytest.raises(InvalidTag):
            aead.open(nonce, bytes(tampered), aad)
    with pytest.raises(InvalidTag):
        aead.open(nonce, sealed, b"headeR")
    with pytest.raises(InvalidTag):
        aead.open(bytes(12), sealed, aad)
    with pytest.raises(InvalidTag):
        aead.open(nonce, sealed[-15:], aad)
    with pytest.raises(InvalidTag):
        lib.aead(os.urandom(32)).open(nonce, sealed, aad)
    assert aead.open(nonce, sealed, aad) == b"secret message"      # the context still works


def test_a_tampered_frame_raises_session_error_and_keeps_the_channel(lib):
    guest, tenant = handshake(lib, wire.PycaCrypto())
    frame = bytearray(tenant.seal(b'{"op":"ping"}'))
    for i in (wire.HEADER_SIZE, len(frame) - 1, 20):          # ciphertext, tag, header (associated data)
        bad = bytearray(frame)
        bad[i] ^= 0x40
        with pytest.raises(wire.SessionError):
            guest.open(bytes(bad))
    assert guest.recv_seq == 0
    assert guest.open(bytes(frame)) == b'{"op":"ping"}'


def bad_points(good: bytes) -> dict[str, bytes]:
    y_flipped = bytearray(good)
    y_flipped[-1] ^= 1
    x_only = bytes([2 | (good[-1] & 1)]) + good[1:49]
    return {
        "off the curve": bytes(y_flipped),
        "too short": good[:-1],
        "too long": good + b"\x00",
        "empty": b"",
        "infinity (SEC1)": b"\x00",
        "infinity padded": b"\x00" * 97,
        "zero coordinates": b"\x04" + bytes(96),
        "compressed": x_only,
        "hybrid": bytes([6 | (good[-1] & 1)]) + good[1:],
        "x = p": b"\x04" + P384_P.to_bytes(48, "big") + good[49:],
    }


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bad_peer_points_are_refused(backend):
    key = BACKENDS[backend]().generate()
    for name, point in bad_points(key.public).items():
        with pytest.raises(ValueError):
            key.exchange(point)
            pytest.fail(f"{backend} accepted a peer point that is {name}")


def test_openssl_itself_refuses_a_point_off_the_curve(lib):
    """The point check is OpenSSL's, not only the length and prefix check before it."""
    good = lib.generate().public
    for point in (good[:-1] + bytes([good[-1] ^ 1]), b"\x04" + bytes(96)):
        with pytest.raises(InvalidPoint, match="P-384"):
            lib._import_point(point)
    peer = lib._import_point(good)
    lib.EVP_PKEY_free(peer)


def test_an_open_with_a_bad_point_is_a_session_error(lib):
    guest = wire.GuestHandshake(os.urandom(32), lib)
    good = wire.PycaCrypto().generate().public
    for point in bad_points(good).values():
        if len(point) != wire.POINT_SIZE:
            continue
        th = wire.transcript(guest.report_data, guest.public_key, point)
        body = point + wire.open_mac(AUTH, th)
        with pytest.raises(wire.SessionError, match="not a P-384 point"):
            guest.accept(wire.Frame(wire.OPEN, guest.session_id, 0, body).pack(), AUTH)


# RFC 5869, appendix A, test cases 1 to 3 (HKDF-SHA-256).
RFC5869 = [
    (bytes([0x0b] * 22), bytes(range(13)), bytes(range(0xf0, 0xfa)), 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x50)), bytes(range(0x60, 0xb0)), bytes(range(0xb0, 0x100)), 82,
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09"
     "da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    (bytes([0x0b] * 22), b"", b"", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize("ikm,salt,info,length,okm", RFC5869, ids=["A.1", "A.2", "A.3"])
def test_hkdf_matches_rfc5869(ikm, salt, info, length, okm):
    assert wire.hkdf(ikm, salt=salt, info=info, length=length, hash_name="sha256").hex() == okm


@pytest.mark.parametrize("salt", [None, b"", AUTH, bytes(range(100))], ids=["none", "empty", "32", "100"])
@pytest.mark.parametrize("length", [1, 32, 48, 96, 255 * 48])
def test_hkdf_sha384_matches_cryptography(salt, length):
    ikm, info = os.urandom(48), os.urandom(64)
    theirs = HKDF(hashes.SHA384(), length, salt=salt or None, info=info).derive(ikm)
    assert wire.hkdf(ikm, salt=salt, info=info, length=length) == theirs


def test_hkdf_refuses_lengths_it_cannot_give():
    for length in (0, 255 * 48 + 1):
        with pytest.raises(ValueError):
            wire.hkdf(b"k", salt=None, info=b"", length=length)


def test_an_unloadable_library_is_named_and_the_agent_falls_back(monkeypatch):
    with pytest.raises(LibcryptoUnavailable, match="cannot load libcrypto-missing.so.3"):
        Libcrypto("libcrypto-missing.so.3")
    with pytest.raises(LibcryptoUnavailable, match="has no ERR_get_error"):
        Libcrypto("libc.so.6")

    def unavailable():
        raise LibcryptoUnavailable("cannot load libcrypto.so.3: gone")

    monkeypatch.setattr(libcrypto, "Libcrypto", unavailable)
    logged = []
    crypto = wire.guest_crypto(logged.append)
    assert crypto.name == "cryptography"
    assert logged == ["session crypto: cannot load libcrypto.so.3: gone; using the cryptography package instead"]
    guest, tenant = handshake(crypto, wire.PycaCrypto())
    assert guest.open(tenant.seal(b"still works")) == b"still works"


# The agent's attest and session requests, as the shared channel delivers them, in a fresh
# interpreter: the platform's answers are canned, the tenant's frames are made with libcrypto.
AGENT_PATH = textwrap.dedent("""
    import base64, json, sys
    from guest_agent import session
    from guest_agent.agent import Agent
    from guest_agent.libcrypto import Libcrypto

    AUTH = bytes(range(32))

    class CannedPlatform(Agent):
        def platform_call(self, cmd, answer_within=None, **args):
            return {"report": {"report": "AA=="}, "tenant-key": {"key": AUTH.hex()}}[cmd]

    agent = CannedPlatform(None)
    answer = agent.do_attest({"nonce": "11" * 32})
    tenant = session.TenantHandshake(bytes.fromhex(answer["report_data"]), bytes.fromhex(answer["public_key"]),
                                     AUTH, Libcrypto())
    accept = agent.do_session({"frame": base64.b64encode(tenant.open_frame()).decode()})
    channel = tenant.finish(base64.b64decode(accept["frame"]))
    reply = agent.do_session({"frame": base64.b64encode(channel.seal(b'{"op":"ping"}')).decode()})
    print(json.dumps({"ping": json.loads(channel.open(base64.b64decode(reply["frame"]))),
                      "loaded": sorted(m for m in sys.modules
                                       if m.split(".")[0] in ("cryptography", "_cffi_backend"))}))
""")


def test_the_agents_attest_and_session_path_never_imports_cryptography():
    out = subprocess.run([sys.executable, "-c", AGENT_PATH], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout)
    assert result["ping"]["ok"] and result["ping"]["result"]["session_crypto"] == "libcrypto"
    assert result["loaded"] == []


@pytest.fixture(scope="module")
def protected(guest_artifacts, tmp_path_factory):
    with protected_domain(tmp_path_factory.mktemp("libcrypto"), guest_artifacts) as dom:
        yield dom


AGENT_MAPS = 'tr "\\0" " " < /proc/$PPID/cmdline; echo; cat /proc/$PPID/maps'


def agent_maps(session: TenantSession) -> str:
    """The memory map of the agent process (the parent of the commands it runs)."""
    done = session.exec(["sh", "-c", AGENT_MAPS])
    assert done["rc"] == 0, done["stderr"]
    cmdline, maps = done["stdout"].decode().split("\n", 1)
    assert "guest_agent" in cmdline            # the command's parent is the agent itself
    assert "libcrypto.so.3" in maps
    return maps


@pytest.mark.qemu
def test_the_agent_in_a_protected_guest_attests_without_cryptography(protected):
    """Attest and open the session (twice); the agent process maps no part of the
    cryptography package (its extension modules), and says which backend it uses."""
    first = protected.session()
    assert first.ping()["session_crypto"] == "libcrypto"
    maps = agent_maps(first)
    assert "/cryptography/" not in maps and "_cffi_backend" not in maps

    second = TenantSession(protected.relay, protected.attest(), protected.secret.key)
    assert second.ping()["session_crypto"] == "libcrypto"
    with pytest.raises(SessionRefused):
        first.ping()                        # the new session replaced the old one
    maps = agent_maps(second)
    assert "/cryptography/" not in maps and "_cffi_backend" not in maps
