import stat

import pytest
from cryptography.hazmat.primitives import serialization

from qemu_kd.formats.certs import EMULATED_OID, KAK_OID, ChainError, verify_chain
from qemu_kd.platform.identity import IdentityError, PlatformIdentity, RootCA
from qemu_kd.formats.keywrap import unwrap_key, wrap_key
from qemu_kd.formats.policy import Policy


def spki_der(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_root_load_or_create_is_stable_and_private(tmp_path):
    state = tmp_path / "state"
    a = RootCA.load_or_create(state)
    b = RootCA.load_or_create(state)
    assert a.certificate_pem == b.certificate_pem
    assert spki_der(a.private_key.public_key()) == spki_der(b.private_key.public_key())
    files = sorted(p.name for p in state.iterdir())
    assert "root-ca.key" in files and "root-ca.crt" in files
    for p in state.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_platform_load_or_create_is_stable(tmp_path):
    root = RootCA.load_or_create(tmp_path)
    a = PlatformIdentity.load_or_create(tmp_path, root)
    b = PlatformIdentity.load_or_create(tmp_path, root)
    assert a.platform_id == b.platform_id and len(a.platform_id) == 16
    assert a.chain_pem() == b.chain_pem()
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # A new root re-issues the certificate but keeps the keys (sealed bundles stay valid).
    other_root = RootCA.create_throwaway()
    c = PlatformIdentity.load_or_create(tmp_path, other_root)
    assert c.platform_id == a.platform_id
    assert verify_chain(c.chain_pem(), other_root.certificate).platform_id == a.platform_id


def test_half_written_state_is_a_clear_error(tmp_path):
    RootCA.load_or_create(tmp_path)
    (tmp_path / "root-ca.crt").unlink()
    with pytest.raises(IdentityError, match="half a root CA"):
        RootCA.load_or_create(tmp_path)
    (tmp_path / "root-ca.key").write_bytes(b"garbage")
    (tmp_path / "root-ca.crt").write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="not a readable PEM private key"):
        RootCA.load_or_create(tmp_path)


def test_certificates_are_marked_emulated():
    root = RootCA.create_throwaway()
    ident = PlatformIdentity.create_throwaway(root)
    for cert in (root.certificate, ident.certificate):
        ext = cert.extensions.get_extension_for_oid(EMULATED_OID)
        assert ext.critical
        assert "EMULATED" in cert.subject.rfc4514_string()
    kak_ext = ident.certificate.extensions.get_extension_for_oid(KAK_OID)
    assert serialization.load_der_public_key(kak_ext.value.value).public_numbers() == \
        ident.kak_private.public_key().public_numbers()


def test_verify_chain_returns_both_keys():
    root = RootCA.create_throwaway()
    ident = PlatformIdentity.create_throwaway(root)
    info = verify_chain(ident.chain_pem(), root.certificate)
    assert info.emulated
    assert info.platform_id == ident.platform_id
    assert spki_der(info.attestation_public_key) == spki_der(ident.attestation_key.public_key())
    # The KAK from the certificate is the one the platform unwraps with.
    w = wrap_key(bytes(64), info.kak_public_key, Policy.make())
    assert unwrap_key(w, ident.kak_private, Policy.make()) == bytes(64)
    # The leaf alone (without the root appended) verifies too.
    leaf_only = ident.certificate.public_bytes(serialization.Encoding.PEM)
    assert verify_chain(leaf_only, root.certificate).platform_id == ident.platform_id


def test_chain_from_another_root_rejected():
    root, other = RootCA.create_throwaway(), RootCA.create_throwaway()
    ident = PlatformIdentity.create_throwaway(other)
    with pytest.raises(ChainError) as err:
        verify_chain(ident.chain_pem(), root.certificate)
    assert err.value.exit_code == 4
    leaf_only = ident.certificate.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ChainError, match="does not verify"):
        verify_chain(leaf_only, root.certificate)


def test_garbage_chain_rejected():
    root = RootCA.create_throwaway()
    with pytest.raises(ChainError):
        verify_chain(b"not pem", root.certificate)
    with pytest.raises(ChainError, match="empty"):
        verify_chain(b"", root.certificate)


# -- the sealing root: the guests' sealing keys have a root of their own ------------------

def _guest_port_key(identity, measurement: bytes, policy: Policy, label: str) -> bytes:
    """The key the platform's guest port answers derive-key with, for a launched domain."""
    from types import SimpleNamespace

    from qemu_kd.platform.runtime import DomainRuntime

    domain = SimpleNamespace(keyid=1, measurement=SimpleNamespace(digest=measurement), policy=policy)
    return bytes.fromhex(DomainRuntime(domain, identity)._derive_key({"label": label})["key"])


def test_sealing_root_is_private_persistent_and_the_only_kdf_input(tmp_path):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    root = RootCA.load_or_create(tmp_path)
    ident = PlatformIdentity.load_or_create(tmp_path, root)
    path = tmp_path / "platform-sealing-root.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sealing_root = path.read_bytes()
    assert len(sealing_root) == 48
    measurement, policy = bytes(range(48)), Policy.make(debug=False)
    key = _guest_port_key(ident, measurement, policy, "disk")
    # derive-key is HKDF over the sealing root and nothing else of the platform's.
    info = b"qemu-kd sealing key v1" + measurement + policy.pack() + b"disk"
    assert key == HKDF(hashes.SHA384(), 32, salt=None, info=info).derive(sealing_root)
    assert _guest_port_key(ident, measurement, policy, "other") != key
    assert _guest_port_key(ident, measurement, Policy.make(debug=True), "disk") != key
    # Reloaded: the same root, the same keys.
    again = PlatformIdentity.load_or_create(tmp_path, root)
    assert _guest_port_key(again, measurement, policy, "disk") == key
    # A new key-agreement key changes nothing about the sealing keys.
    new_kak = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "platform-kak.key").write_bytes(new_kak.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    rekeyed = PlatformIdentity.load_or_create(tmp_path, root)
    assert rekeyed.kak_private.private_numbers() == new_kak.private_numbers()
    assert _guest_port_key(rekeyed, measurement, policy, "disk") == key


def test_state_dir_without_a_sealing_root_gets_one(tmp_path):
    root = RootCA.load_or_create(tmp_path)
    PlatformIdentity.load_or_create(tmp_path, root)
    path = tmp_path / "platform-sealing-root.key"
    path.unlink()       # a state directory from before the sealing root
    ident = PlatformIdentity.load_or_create(tmp_path, root)
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    key = _guest_port_key(ident, bytes(48), Policy.make(), "x")
    assert _guest_port_key(PlatformIdentity.load_or_create(tmp_path, root), bytes(48), Policy.make(), "x") == key
    path.write_bytes(b"short")
    with pytest.raises(IdentityError, match="not a 48-byte sealing root"):
        PlatformIdentity.load_or_create(tmp_path, root)


def test_throwaway_identities_have_distinct_sealing_roots():
    root = RootCA.create_throwaway()
    a, b = PlatformIdentity.create_throwaway(root), PlatformIdentity.create_throwaway(root)
    assert _guest_port_key(a, bytes(48), Policy.make(), "x") != _guest_port_key(b, bytes(48), Policy.make(), "x")
