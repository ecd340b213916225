"""The guest's own OpenSSL (libcrypto.so.3) through ctypes: P-384 keys, ECDH and AES-256-GCM.

The tenant session needs a P-384 key pair, one ECDH and AES-256-GCM.  Under TCG
the ``cryptography`` package takes about half a second to import its OpenSSL
backend the first time, longer than everything else in an attestation.  The
same OpenSSL is already loaded in the agent's process (Python's ``_hashlib``
links it), so this module calls it directly.  Only OpenSSL computes: this
module marshals bytes, checks every return code and frees every object it
makes.

Errors: :class:`LibcryptoUnavailable` when the library or one of its functions
is missing (the caller falls back to ``cryptography``), :class:`LibcryptoError`
when an OpenSSL call fails, :class:`InvalidPoint` for a peer key that is not a
P-384 point, :class:`InvalidTag` for a ciphertext that does not authenticate.
"""

from __future__ import annotations

import ctypes
import weakref

SONAME = "libcrypto.so.3"
CURVE = b"P-384"
POINT_SIZE = 97                 # 0x04 ‖ X (48) ‖ Y (48)
SECRET_SIZE = 48                # the X coordinate of the shared point
KEY_SIZE = 32                   # AES-256
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_DATA = (1 << 31) - 1 - TAG_SIZE     # OpenSSL takes lengths as int

# <openssl/core.h>, <openssl/evp.h>
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_EVP_PKEY_PUBLIC_KEY = 0x86     # all parameters (0x84) | public key (0x02)
_EVP_CTRL_AEAD_GET_TAG = 0x10
_EVP_CTRL_AEAD_SET_TAG = 0x11

_P = ctypes.c_void_p
_INT, _SIZE, _CHARS = ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p
_PSIZE, _PINT, _PP = ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p)

#: name -> (restype, argtypes) of every function used.
_FUNCTIONS = {
    "ERR_get_error": (ctypes.c_ulong, []),
    "ERR_clear_error": (None, []),
    "ERR_error_string_n": (None, [ctypes.c_ulong, ctypes.c_char_p, _SIZE]),
    "EVP_PKEY_CTX_new_from_name": (_P, [_P, _CHARS, _CHARS]),
    "EVP_PKEY_CTX_new_from_pkey": (_P, [_P, _P, _CHARS]),
    "EVP_PKEY_CTX_free": (None, [_P]),
    "EVP_PKEY_CTX_set_group_name": (_INT, [_P, _CHARS]),
    "EVP_PKEY_keygen_init": (_INT, [_P]),
    "EVP_PKEY_generate": (_INT, [_P, _PP]),
    "EVP_PKEY_get_octet_string_param": (_INT, [_P, _CHARS, _P, _SIZE, _PSIZE]),
    "EVP_PKEY_fromdata_init": (_INT, [_P]),
    "EVP_PKEY_fromdata": (_INT, [_P, _PP, _INT, _P]),
    "EVP_PKEY_public_check": (_INT, [_P]),
    "EVP_PKEY_derive_init": (_INT, [_P]),
    "EVP_PKEY_derive_set_peer_ex": (_INT, [_P, _P, _INT]),
    "EVP_PKEY_derive": (_INT, [_P, _P, _PSIZE]),
    "EVP_PKEY_free": (None, [_P]),
    "EVP_aes_256_gcm": (_P, []),
    "EVP_CIPHER_CTX_new": (_P, []),
    "EVP_CIPHER_CTX_free": (None, [_P]),
    "EVP_CipherInit_ex": (_INT, [_P, _P, _P, _P, _P, _INT]),
    "EVP_CipherUpdate": (_INT, [_P, _P, _PINT, _P, _INT]),
    "EVP_CipherFinal_ex": (_INT, [_P, _P, _PINT]),
    "EVP_CIPHER_CTX_ctrl": (_INT, [_P, _INT, _INT, _P]),
}


class LibcryptoUnavailable(ImportError):
    """libcrypto.so.3 cannot be loaded, or lacks a function this module needs."""


class LibcryptoError(RuntimeError):
    """An OpenSSL call failed (the message names it and OpenSSL's reason)."""


class InvalidPoint(ValueError):
    """A peer's public key that is not a valid P-384 point."""


class InvalidTag(ValueError):
    """A ciphertext or its tag that does not authenticate under the key."""


class _Param(ctypes.Structure):
    """``OSSL_PARAM``."""

    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


def _wipe(buf) -> None:
    ctypes.memset(buf, 0, ctypes.sizeof(buf))


class Libcrypto:
    """libcrypto.so.3 with the functions above bound; makes keys and ciphers."""

    name = "libcrypto"

    def __init__(self, soname: str = SONAME):
        try:
            lib = ctypes.CDLL(soname)
        except OSError as exc:
            raise LibcryptoUnavailable(f"cannot load {soname}: {exc}") from None
        for fname, (restype, argtypes) in _FUNCTIONS.items():
            try:
                func = getattr(lib, fname)
            except AttributeError:
                raise LibcryptoUnavailable(f"{soname} has no {fname} (OpenSSL 3 is needed)") from None
            func.restype, func.argtypes = restype, argtypes
            setattr(self, fname, func)
        self.soname = soname

    # -- errors --------------------------------------------------------------------
    def _reason(self) -> str:
        """OpenSSL's first queued error (and clear the queue)."""
        code = self.ERR_get_error()
        self.ERR_clear_error()
        if not code:
            return "no reason given"
        buf = ctypes.create_string_buffer(256)
        self.ERR_error_string_n(code, buf, len(buf))
        return buf.value.decode("ascii", "replace")

    def _check(self, rc: int, what: str) -> None:
        if rc != 1:
            raise LibcryptoError(f"{what} failed: {self._reason()}")

    def _made(self, ptr, what: str):
        if not ptr:
            raise LibcryptoError(f"{what} failed: {self._reason()}")
        return ptr

    # -- P-384 ---------------------------------------------------------------------
    def generate(self) -> "P384Key":
        """A fresh P-384 key pair from OpenSSL's random generator."""
        ctx = self._made(self.EVP_PKEY_CTX_new_from_name(None, b"EC", None), "EVP_PKEY_CTX_new_from_name")
        pkey = ctypes.c_void_p()
        try:
            self._check(self.EVP_PKEY_keygen_init(ctx), "EVP_PKEY_keygen_init")
            self._check(self.EVP_PKEY_CTX_set_group_name(ctx, CURVE), "EVP_PKEY_CTX_set_group_name")
            self._check(self.EVP_PKEY_generate(ctx, ctypes.byref(pkey)), "EVP_PKEY_generate")
        except BaseException:
            if pkey.value:
                self.EVP_PKEY_free(pkey)
            raise
        finally:
            self.EVP_PKEY_CTX_free(ctx)
        return P384Key(self, pkey.value)        # owns (and frees) the key from here on

    def _public_point(self, pkey) -> bytes:
        buf = ctypes.create_string_buffer(POINT_SIZE)
        size = ctypes.c_size_t()
        self._check(self.EVP_PKEY_get_octet_string_param(pkey, b"pub", buf, POINT_SIZE, ctypes.byref(size)),
                    "EVP_PKEY_get_octet_string_param(pub)")
        point = buf.raw[:size.value]
        if len(point) != POINT_SIZE or point[0] != 4:
            raise LibcryptoError("OpenSSL gave the public key in a form other than an uncompressed point")
        return point

    def _import_point(self, point: bytes):
        """The peer's EVP_PKEY (the caller frees it), after OpenSSL's full public-key check:
        on the curve, not the point at infinity, of the group's order."""
        point = bytes(point)
        if len(point) != POINT_SIZE or point[0] != 4:
            raise InvalidPoint(f"a P-384 public key is {POINT_SIZE} bytes starting 0x04 (uncompressed)")
        raw = ctypes.create_string_buffer(point, POINT_SIZE)
        group = ctypes.create_string_buffer(CURVE)
        params = (_Param * 3)(
            _Param(b"group", _OSSL_PARAM_UTF8_STRING, ctypes.cast(group, ctypes.c_void_p), len(CURVE), 0),
            _Param(b"pub", _OSSL_PARAM_OCTET_STRING, ctypes.cast(raw, ctypes.c_void_p), POINT_SIZE, 0),
            _Param(None, 0, None, 0, 0))
        peer = ctypes.c_void_p()
        try:
            ctx = self._made(self.EVP_PKEY_CTX_new_from_name(None, b"EC", None), "EVP_PKEY_CTX_new_from_name")
            try:
                self._check(self.EVP_PKEY_fromdata_init(ctx), "EVP_PKEY_fromdata_init")
                if self.EVP_PKEY_fromdata(ctx, ctypes.byref(peer), _EVP_PKEY_PUBLIC_KEY, params) != 1:
                    raise InvalidPoint(f"not a point on P-384 ({self._reason()})")
            finally:
                self.EVP_PKEY_CTX_free(ctx)
            # The import already refuses points off the curve; check the whole key anyway (on the
            # curve, not infinity, order n), as EVP_PKEY_derive_set_peer would.
            check = self._made(self.EVP_PKEY_CTX_new_from_pkey(None, peer, None), "EVP_PKEY_CTX_new_from_pkey")
            try:
                if self.EVP_PKEY_public_check(check) != 1:
                    raise InvalidPoint(f"not a valid P-384 public key ({self._reason()})")
            finally:
                self.EVP_PKEY_CTX_free(check)
        except BaseException:
            if peer.value:
                self.EVP_PKEY_free(peer)
            raise
        return peer

    def _derive(self, pkey, point: bytes) -> bytes:
        peer = self._import_point(point)
        try:
            ctx = self._made(self.EVP_PKEY_CTX_new_from_pkey(None, pkey, None), "EVP_PKEY_CTX_new_from_pkey")
            secret = ctypes.create_string_buffer(SECRET_SIZE)
            try:
                self._check(self.EVP_PKEY_derive_init(ctx), "EVP_PKEY_derive_init")
                # The peer passed EVP_PKEY_public_check in _import_point: OpenSSL need not repeat it
                # (a second scalar multiplication).
                self._check(self.EVP_PKEY_derive_set_peer_ex(ctx, peer, 0), "EVP_PKEY_derive_set_peer_ex")
                size = ctypes.c_size_t(SECRET_SIZE)
                self._check(self.EVP_PKEY_derive(ctx, secret, ctypes.byref(size)), "EVP_PKEY_derive")
                if size.value != SECRET_SIZE:
                    raise LibcryptoError(f"ECDH gave {size.value} bytes, not {SECRET_SIZE}")
                return secret.raw
            finally:
                _wipe(secret)
                self.EVP_PKEY_CTX_free(ctx)
        finally:
            self.EVP_PKEY_free(peer)

    # -- AES-256-GCM ---------------------------------------------------------------
    def aead(self, key: bytes) -> "AesGcm":
        return AesGcm(self, key)


class P384Key:
    """A P-384 private key held by OpenSSL (freed, and so cleared, by :meth:`close`)."""

    def __init__(self, lib: Libcrypto, pkey: int):
        self._lib = lib
        self._pkey = pkey
        self._free = weakref.finalize(self, lib.EVP_PKEY_free, pkey)
        try:
            self.public = lib._public_point(pkey)
        except BaseException:
            self.close()
            raise

    def exchange(self, peer_point: bytes) -> bytes:
        """ECDH: the 48-byte X coordinate of our scalar times the peer's (validated) point."""
        if not self._free.alive:
            raise ValueError("this key is closed")
        return self._lib._derive(self._pkey, peer_point)

    def close(self) -> None:
        self._free()


class AesGcm:
    """AES-256-GCM under one key, with 12-byte nonces and 16-byte tags.

    The key lives only in OpenSSL's cipher context, which :meth:`close` frees
    (OpenSSL clears it).
    """

    def __init__(self, lib: Libcrypto, key: bytes):
        if len(key) != KEY_SIZE:
            raise ValueError(f"an AES-256-GCM key is {KEY_SIZE} bytes")
        self._lib = lib
        ctx = lib._made(lib.EVP_CIPHER_CTX_new(), "EVP_CIPHER_CTX_new")
        self._ctx = ctx
        self._free = weakref.finalize(self, lib.EVP_CIPHER_CTX_free, ctx)
        try:
            cipher = lib._made(lib.EVP_aes_256_gcm(), "EVP_aes_256_gcm")
            lib._check(lib.EVP_CipherInit_ex(ctx, cipher, None, bytes(key), None, 1), "EVP_CipherInit_ex(key)")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._free()

    def _start(self, nonce: bytes, aad: bytes, encrypt: bool, size: int) -> None:
        if not self._free.alive:
            raise ValueError("this cipher is closed")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"an AES-GCM nonce here is {NONCE_SIZE} bytes")
        if size > MAX_DATA or len(aad) > MAX_DATA:
            raise ValueError("message too large for one AES-GCM call")
        lib = self._lib
        lib._check(lib.EVP_CipherInit_ex(self._ctx, None, None, None, bytes(nonce), int(encrypt)),
                   "EVP_CipherInit_ex(nonce)")
        if aad:
            n = ctypes.c_int()
            lib._check(lib.EVP_CipherUpdate(self._ctx, None, ctypes.byref(n), bytes(aad), len(aad)),
                       "EVP_CipherUpdate(aad)")

    def _update(self, out, data: bytes) -> int:
        if not data:
            return 0
        n = ctypes.c_int()
        self._lib._check(self._lib.EVP_CipherUpdate(self._ctx, out, ctypes.byref(n), data, len(data)),
                         "EVP_CipherUpdate")
        if n.value != len(data):
            raise LibcryptoError(f"AES-GCM gave {n.value} bytes for {len(data)}")
        return n.value

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Ciphertext ‖ tag."""
        plaintext = bytes(plaintext)
        self._start(nonce, aad, True, len(plaintext))
        out = ctypes.create_string_buffer(len(plaintext) + TAG_SIZE)
        lib = self._lib
        done = self._update(out, plaintext)
        n = ctypes.c_int()
        lib._check(lib.EVP_CipherFinal_ex(self._ctx, ctypes.byref(out, done), ctypes.byref(n)),
                   "EVP_CipherFinal_ex")
        if n.value:
            raise LibcryptoError("AES-GCM produced bytes at its end")
        lib._check(lib.EVP_CIPHER_CTX_ctrl(self._ctx, _EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, ctypes.byref(out, done)),
                   "EVP_CIPHER_CTX_ctrl(get tag)")
        return out.raw

    def open(self, nonce: bytes, data: bytes, aad: bytes = b"") -> bytes:
        """The plaintext of ciphertext ‖ tag; :class:`InvalidTag` unless it authenticates."""
        data = bytes(data)
        if len(data) < TAG_SIZE:
            raise InvalidTag("shorter than a tag")
        body, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        self._start(nonce, aad, False, len(body))
        lib = self._lib
        out = ctypes.create_string_buffer(max(len(body), 1))
        try:
            self._update(out, body)
            lib._check(lib.EVP_CIPHER_CTX_ctrl(self._ctx, _EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, tag),
                       "EVP_CIPHER_CTX_ctrl(set tag)")
            n = ctypes.c_int()
            if lib.EVP_CipherFinal_ex(self._ctx, ctypes.byref(out, len(body)) if body else out,
                                      ctypes.byref(n)) != 1:
                lib.ERR_clear_error()
                raise InvalidTag("the ciphertext does not authenticate under this key")
            return out.raw[:len(body)]
        except BaseException:
            _wipe(out)          # never leave unauthenticated plaintext behind
            raise
