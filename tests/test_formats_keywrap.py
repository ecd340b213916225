import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings, strategies as st

from qemu_kd.formats.errors import (
    FieldValueError,
    MagicError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    VersionError,
)
from qemu_kd.formats.keywrap import WRAPPED_KEY_SIZE, KeyUnwrapError, WrappedKey, unwrap_key, wrap_key
from qemu_kd.formats.policy import Policy

KAK = ec.generate_private_key(ec.SECP384R1())
OTHER_KAK = ec.generate_private_key(ec.SECP384R1())
KEY = bytes(range(64))


def test_wrap_unwrap():
    w = wrap_key(KEY, KAK.public_key(), Policy.make(), host_data=b"host")
    assert len(w.pack()) == WRAPPED_KEY_SIZE
    assert unwrap_key(WrappedKey.unpack(w.pack()), KAK, Policy.make(), host_data=b"host") == KEY
    assert KEY not in w.pack()


def test_fresh_ephemeral_key_and_nonce_each_time():
    a, b = (wrap_key(KEY, KAK.public_key(), Policy.make()) for _ in range(2))
    assert a.ephemeral_public != b.ephemeral_public and a.nonce != b.nonce
    assert a.recipient == b.recipient


@pytest.mark.parametrize("kak,policy,host_data", [
    (OTHER_KAK, Policy.make(), b""),           # sealed for another platform
    (KAK, Policy.make(debug=True), b""),       # policy changed
    (KAK, Policy.make(), b"other"),            # host_data changed
])
def test_unwrap_fails_with_clear_error(kak, policy, host_data):
    w = wrap_key(KEY, KAK.public_key(), Policy.make())
    with pytest.raises(KeyUnwrapError, match="does not open with this platform's key-agreement key"):
        unwrap_key(w, kak, policy, host_data)


@settings(max_examples=30)
@given(st.integers(min_value=0x08, max_value=WRAPPED_KEY_SIZE - 1), st.integers(min_value=1, max_value=255))
def test_tampering_is_detected(offset, xor):
    raw = bytearray(wrap_key(KEY, KAK.public_key(), Policy.make()).pack())
    raw[offset] ^= xor
    try:
        w = WrappedKey.unpack(bytes(raw))
    except (ReservedBitsError, FieldValueError):
        return
    with pytest.raises(KeyUnwrapError):
        unwrap_key(w, KAK, Policy.make())


@settings(max_examples=30)
@given(st.binary(min_size=48, max_size=48), st.binary(min_size=96, max_size=96),
       st.binary(min_size=12, max_size=12), st.binary(min_size=80, max_size=80))
def test_round_trip(recipient, point, nonce, ct):
    w = WrappedKey(recipient, b"\x04" + point, nonce, ct)
    assert WrappedKey.unpack(w.pack()) == w


def test_negative_inputs():
    raw = wrap_key(KEY, KAK.public_key(), Policy.make()).pack()
    with pytest.raises(TruncatedError):
        WrappedKey.unpack(raw[:-1])
    with pytest.raises(OversizedError):
        WrappedKey.unpack(raw + b"\0")
    with pytest.raises(MagicError):
        WrappedKey.unpack(b"XXXX" + raw[4:])
    with pytest.raises(VersionError):
        WrappedKey.unpack(raw[:4] + b"\x02\x00" + raw[6:])
    with pytest.raises(ReservedBitsError):
        WrappedKey.unpack(raw[:6] + b"\x01\x00" + raw[8:])
    with pytest.raises(ReservedBitsError):
        WrappedKey.unpack(raw[:0x99] + b"\x01" + raw[0x9A:])
    with pytest.raises(FieldValueError):
        wrap_key(KEY[:32], KAK.public_key(), Policy.make())
    with pytest.raises(FieldValueError):
        wrap_key(KEY, KAK.public_key(), Policy.make(), host_data=bytes(33))
