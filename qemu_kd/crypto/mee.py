"""The memory-encryption engine (MEE): AES-256-XTS over 4 KiB pages.

Every private page of a key domain is one XTS data unit.  Its tweak is the
page's *data physical address* (``KeyID << 40 | hpa``) as a 128-bit
little-endian number, so ciphertext only decrypts at its own address and only
under its own domain's 64-byte key.  A page encrypted here is byte-identical to
``cryptography``'s ``Cipher(AES(key), XTS(dpa.to_bytes(16, "little")))`` on
that page.

The engine is vectorised; it never builds a cipher object per page:

* The tweaks of all pages of a request are encrypted with the tweak key K2 in
  one AES-ECB call, giving each page's starting mask ``T = AES_K2(dpa)``.
* The bulk cipher is one AES-XTS call per chunk of pages, the whole chunk as
  a single data unit under a fixed *reference* tweak (zero).  That call applies
  the reference masks ``R_i = AES_K2(0) * x**i`` around AES with the data key
  K1.  XORing each page with its delta mask ``D = mask ^ R`` before and after
  the call turns it into exact per-page XTS.  (One XTS call runs about twice
  as fast as AES-ECB on CPUs with vector AES, and ECB would need the same two
  XORs.)
* The delta masks of block ``j`` of every page, ``(T ^ R_p) * x**j`` in
  GF(2**128) (multiplying by ``x**j`` is linear), come from numpy over all
  pages at once.  Masks eight blocks apart differ by ``* x**8``, a one-byte
  shift plus a fold of the byte that falls out, so the masks of each residue
  ``j % 8`` are 16-byte windows of one byte stream (``_MaskGenerator``).

The engine keeps a bounded cache of delta masks, keyed by data physical
address: 4096 bytes per cached page, never more than ``mask_cache_bytes`` per
engine (8 MiB by default; 0 disables the cache).  A page joins the cache when
it is encrypted again soon after (a small table of recently seen addresses
tells), or while the cache still has slots it never used, so a pass over many
pages seen once (the first shadow sync after boot) costs no cache work.  When
the cache is full the oldest entries are replaced first.  Requests with only a
few pages to compute use one XTS cipher per page, which is cheaper than the
vectorised set-up.

See docs/mee.md for the layout and the measured throughput.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qemu_kd.common.errors import KdError
from qemu_kd.formats.addresses import data_physical_address as checked_dpa, is_int, PAGE_SIZE, KEYID_SHIFT, MAX_KEYID, DPA_LIMIT


KEY_SIZE = 64
BLOCK_SIZE = 16
BLOCKS_PER_PAGE = PAGE_SIZE // BLOCK_SIZE
WORDS_PER_PAGE = PAGE_SIZE // 8
DEFAULT_MASK_CACHE_BYTES = 8 << 20
CHUNK_PAGES = 64
# Shorter runs of consecutive cache slots are recomputed with the uncached pages.
_MIN_DIRECT_RUN = 4
# Pages whose masks are computed together (more amortises numpy's per-call cost).
_BATCH_PAGES = 16 * CHUNK_PAGES
# Requests with at most this many pages to compute afresh use one cipher per page.
_SMALL_REQUEST_PAGES = 12

_U64 = np.uint64
_MASK128 = (1 << 128) - 1
_MASK64 = (1 << 64) - 1
# OpenSSL limits one XTS data unit to 2**20 blocks (IEEE 1619).
_MAX_UNIT_BLOCKS = 1 << 20
_REFERENCE_TWEAK = bytes(16)
# Never a data physical address (those are page-aligned).
_EMPTY_SLOT = (1 << 64) - 1
# The admission filter remembers this many addresses per cache slot (at least _MIN_SEEN).
_SEEN_PER_SLOT = 4
_MIN_SEEN = 1024
# Fibonacci hashing of page numbers into the admission filter.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class MeeError(KdError):
    """Bad input to the memory-encryption engine (key, buffer, address)."""


def data_physical_address(keyid: int, hpa: int) -> int:
    """Return ``keyid << 40 | hpa`` after checking both fit the address space."""
    return checked_dpa(keyid, hpa, MeeError)


def _hex(value: Any) -> str:
    return hex(value) if is_int(value) else repr(value)


# --- GF(2**128) arithmetic, XTS convention (little-endian, x**128 = x**7+x**2+x+1)


def _gf_mul_xpow(value: int, exponent: int) -> int:
    """``value * x**exponent`` for one 128-bit value held in a Python int."""
    while exponent:
        step = min(exponent, 64)
        value <<= step
        high = value >> 128
        value = (value & _MASK128) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
        exponent -= step
    return value


def _mul_xpow_planes(src_lo, src_hi, dst_lo, dst_hi, shift: int, tmp_a, tmp_b) -> None:
    """``dst = src * x**shift`` elementwise, for 1 <= shift <= 57 (no double reduction)."""
    up, down = _U64(shift), _U64(64 - shift)
    np.right_shift(src_hi, down, out=tmp_a)  # bits leaving the top: reduce them
    np.left_shift(src_hi, up, out=dst_hi)
    np.right_shift(src_lo, down, out=tmp_b)
    np.bitwise_or(dst_hi, tmp_b, out=dst_hi)
    np.left_shift(src_lo, up, out=dst_lo)
    np.bitwise_xor(dst_lo, tmp_a, out=dst_lo)
    for k in (1, 2, 7):
        np.left_shift(tmp_a, _U64(k), out=tmp_b)
        np.bitwise_xor(dst_lo, tmp_b, out=dst_lo)


# The byte-wise step of the mask chain: multiplying a mask by x**8 shifts it up one byte and
# folds the byte that falls out, t, back in as t * (x**7 + x**2 + x + 1), a 15-bit value.
_FOLD = np.arange(256, dtype=np.uint32)
_FOLD = _FOLD ^ (_FOLD << 1) ^ (_FOLD << 2) ^ (_FOLD << 7)
# t -> low byte of the fold is a bijection of bytes; its inverse seeds each byte stream.
_FOLD_LOW_INVERSE = np.empty(256, np.uint8)
_FOLD_LOW_INVERSE[(_FOLD & 0xFF).astype(np.uint8)] = np.arange(256, dtype=np.uint8)
_U8 = np.uint8
# Masks that keep the low k bits (_BYTES_LOW_k) or the high k bits (_BYTES_HIGH_k) of every byte.
_BYTES_LOW_1, _BYTES_LOW_2, _BYTES_LOW_7 = (_U64(((1 << k) - 1) * 0x0101010101010101) for k in (1, 2, 7))
_BYTES_HIGH_7, _BYTES_HIGH_6, _BYTES_HIGH_1 = (_U64((0xFF ^ ((1 << (8 - k)) - 1)) * 0x0101010101010101)
                                               for k in (7, 6, 1))
# How many new stream bytes one step computes: a byte depends on the bytes 15 and 16 after it.
_STREAM_STEP = 15


class _MaskGenerator:
    """Computes XTS masks ``S_u * x**j`` (j < blocks) for up to ``units`` data units.

    Masks of one residue ``r = j % 8`` follow each other by ``* x**8``: the mask
    moves up one byte and the byte ``t`` that falls out comes back as
    ``t * (x**7 + x**2 + x + 1)`` into its two lowest bytes.  So bytes 1..15 of
    the masks ``j = r, r + 8, r + 16, ...`` are windows of a single byte stream
    that grows by one byte per step, ``u_{k+1} = low(u_{k-15}) ^ high(u_{k-14})``
    (``low``/``high``: the bytes of the fold), and byte 0 is the stream byte
    before the window XOR ``high(u_{k-14})``.

    :meth:`prepare` works on the streams, a few dozen bytes per unit:

    1. ``S * x**r`` for r < 8 (shifts over uint64 planes);
    2. the 8 byte streams of every unit, ``_STREAM_STEP`` bytes per numpy call,
       position-major (row = stream position, column = 8 * unit + r), so every
       call is one contiguous operation; the ``high`` bytes are kept, they are
       the corrections of byte 0;
    3. an 8 x 8 byte transpose of every block of 8 positions and 8 residues
       (three SWAR stages over uint64 words), then one copy of whole words,
       gives the streams stream-major.

    :meth:`fill` then writes the masks of some units: one copy of every 16-byte
    window (a ``V16`` view of the streams with a stride of minus one byte) and
    one XOR of the corrections into byte 0, so a caller can fill a chunk right
    before it uses it, while it is in the CPU cache.  Owns its scratch arrays.
    """

    def __init__(self, blocks: int, units: int):
        self.blocks = blocks
        self.units = units
        self.steps = -(-blocks // 8)                   # masks per residue
        self.groups = -(-(self.steps + 16) // 8)       # 8-byte words per stream
        length = 8 * self.groups
        self._count = 0
        self._first_lo = np.empty((8, units), _U64)    # S * x**r, residue-major
        self._first_hi = np.empty((8, units), _U64)
        self._tmp64 = np.empty((8, units), _U64)
        self._tmp64b = np.empty((8, units), _U64)
        self._stream = np.zeros((length, units, 8), _U8)            # position-major
        self._swap = np.empty((self.groups, 4, units), _U64)
        self._streams = np.empty((units, 8, self.groups), _U64)     # stream-major
        self._high = np.empty((self.steps, units, 8), _U8)          # position-major
        self._fix = np.empty((units, self.steps), _U64)             # bytes (unit, k, r)
        self._tmp64s = np.empty((_STREAM_STEP, units), _U64)
        whole = blocks == 8 * self.steps
        self._full = None if whole else np.empty((units, 16 * self.steps), _U64)

    def scratch(self) -> tuple[np.ndarray, ...]:
        arrays = (self._first_lo, self._first_hi, self._tmp64, self._tmp64b, self._stream,
                  self._swap, self._streams, self._high, self._fix, self._tmp64s, self._full)
        return tuple(a for a in arrays if a is not None)

    def generate(self, start_lo, start_hi, out) -> None:
        """Fill ``out`` (n x 2*blocks uint64, one unit per row) from the starting masks."""
        self.prepare(start_lo, start_hi)
        self.fill(out, 0, len(start_lo))

    def prepare(self, start_lo, start_hi) -> None:
        """Compute the streams of ``len(start_lo)`` units from their starting masks."""
        n = self._count = len(start_lo)
        steps = self.steps
        lo, hi = self._first_lo[:, :n], self._first_hi[:, :n]
        lo[0], hi[0] = start_lo, start_hi
        span = 1
        while span < 8:   # rows span..2*span-1 are rows 0..span-1 times x**span
            _mul_xpow_planes(lo[:span], hi[:span], lo[span:2 * span], hi[span:2 * span], span,
                             self._tmp64[:span, :n], self._tmp64b[:span, :n])
            span *= 2
        # Seed: positions steps..steps+14 hold bytes 1..15 of S * x**r, position steps+15 the
        # byte whose fold gives byte 0.  Position p holds u_{steps - p}.
        stream = self._stream[:, :n]
        seed = stream[steps:steps + 16]
        lo_bytes = lo.view(_U8).reshape(8, n, 8)
        hi_bytes = hi.view(_U8).reshape(8, n, 8)
        seed[:7] = lo_bytes[:, :, 1:].transpose(2, 1, 0)
        seed[7:15] = hi_bytes.transpose(2, 1, 0)
        np.take(_FOLD_LOW_INVERSE, lo_bytes[:, :, 0].T, out=seed[15])
        # One uint64 word holds a unit's 8 residues at one position: byte-wise shifts are
        # word shifts with the bits that cross into the next byte masked off.
        words, highs = stream.view(_U64).reshape(-1, n), self._high[:, :n].view(_U64).reshape(steps, n)
        end = steps
        while end > 0:
            begin = max(0, end - _STREAM_STEP)
            older, old = words[begin + 16:end + 16], words[begin + 15:end + 15]
            new, high, tmp = words[begin:end], highs[begin:end], self._tmp64s[:end - begin, :n]
            np.right_shift(old, _U64(7), out=high)          # high(t) = t >> 7 ^ t >> 6 ^ t >> 1
            np.bitwise_and(high, _BYTES_LOW_1, out=high)
            for shift, keep in ((6, _BYTES_LOW_2), (1, _BYTES_LOW_7)):
                np.right_shift(old, _U64(shift), out=tmp)
                np.bitwise_and(tmp, keep, out=tmp)
                np.bitwise_xor(high, tmp, out=high)
            np.bitwise_xor(older, high, out=new)            # low(t) = t ^ t << 1 ^ t << 2 ^ t << 7
            for shift, keep in ((1, _BYTES_HIGH_7), (2, _BYTES_HIGH_6), (7, _BYTES_HIGH_1)):
                np.left_shift(older, _U64(shift), out=tmp)
                np.bitwise_and(tmp, keep, out=tmp)
                np.bitwise_xor(new, tmp, out=new)
            end = begin
        # high at position p corrects mask k = steps - 1 - p.
        np.copyto(self._fix[:n], highs[::-1].T)
        np.copyto(self._streams[:n], self._transpose_blocks(n).transpose(2, 1, 0))

    def fill(self, out, first: int, last: int) -> None:
        """Masks of the prepared units ``first..last-1`` into ``out`` (one unit per row)."""
        if not 0 <= first <= last <= self._count:
            raise ValueError(f"units {first}..{last} were not prepared")
        n, steps, length = last - first, self.steps, 8 * self.groups
        # Mask k of residue r is the 16 bytes from stream position steps - 1 - k.
        source = np.ndarray((n, steps, 8), dtype="V16", buffer=self._streams,
                            offset=first * 8 * length + steps - 1, strides=(8 * length, -1, length))
        target = out if self._full is None else self._full[:n]
        target.view("V16").reshape(n, steps, 8)[...] = source
        first_bytes = target.view(_U8).reshape(n, 8 * steps, 16)[..., 0]
        np.bitwise_xor(first_bytes, self._fix[first:last].view(_U8).reshape(n, 8 * steps), out=first_bytes)
        if self._full is not None:
            out[...] = target[:, :2 * self.blocks]

    def _transpose_blocks(self, n: int) -> np.ndarray:
        """Transpose the bytes of every 8 x 8 block (8 positions, a unit's 8 residues) in place;
        returns the stream words as (group, residue, unit)."""
        words = self._stream[:, :n].view(_U64).reshape(self.groups, 8, n)
        # Row i of a block swaps its bytes with row i ^ h: byte blocks of h rows and h columns.
        for half, keep in ((4, 0x00000000FFFFFFFF), (2, 0x0000FFFF0000FFFF), (1, 0x00FF00FF00FF00FF)):
            pairs = words.reshape(self.groups, 8 // (2 * half), 2, half, n)
            upper, lower = pairs[:, :, 0], pairs[:, :, 1]
            t = self._swap[:, :, :n].reshape(self.groups, 8 // (2 * half), half, n)
            bits = _U64(8 * half)
            np.right_shift(upper, bits, out=t)
            np.bitwise_xor(t, lower, out=t)
            np.bitwise_and(t, _U64(keep), out=t)
            np.bitwise_xor(lower, t, out=lower)
            np.left_shift(t, bits, out=t)
            np.bitwise_xor(upper, t, out=upper)
        return words


def _words_of(start_values: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([v & _MASK64 for v in start_values], dtype=_U64)
    hi = np.array([v >> 64 for v in start_values], dtype=_U64)
    return lo, hi


class _XtsCore:
    """The vectorised XTS transform for one 64-byte key, without any cache.

    Data units pass through one bulk XTS call under a *reference* tweak; the
    caller supplies each unit's delta mask (its own mask XOR the reference
    mask at its position in the call).  ``bulk(encrypt, offset)`` gives a
    context whose reference stream starts ``offset`` units in, so a run of
    units can start at any position of the reference stream.
    """

    def __init__(self, key: bytes, unit_blocks: int):
        self._key = key
        self._aes = algorithms.AES(key)
        self.unit_blocks = unit_blocks
        tweak_key = algorithms.AES(key[32:])
        self._tweak_cipher = Cipher(tweak_key, modes.ECB()).encryptor()
        self._tweak_decipher = Cipher(tweak_key, modes.ECB()).decryptor()
        self._bulk: dict[tuple[bool, int], Any] = {}
        start = self.start_masks(np.zeros((1, 2), _U64).view(np.uint8))
        self.reference_start = int(start[0, 0]) | int(start[0, 1]) << 64

    def start_masks(self, tweaks_u8: np.ndarray) -> np.ndarray:
        """AES_K2 of each 16-byte tweak, in one ECB call: an (n, 2) uint64 array."""
        raw = self._tweak_cipher.update(tweaks_u8.reshape(-1))
        return np.frombuffer(raw, dtype=_U64).reshape(-1, 2)

    def reference_starts(self, units: int) -> list[int]:
        """The reference stream's starting mask of each unit position."""
        starts = []
        value = self.reference_start
        for _ in range(units):
            starts.append(value)
            value = _gf_mul_xpow(value, self.unit_blocks)
        return starts

    def bulk(self, encrypt: bool, offset: int):
        """The XTS context whose reference stream starts at unit ``offset``."""
        context = self._bulk.get((encrypt, offset))
        if context is None:
            if offset:
                start = _gf_mul_xpow(self.reference_start, offset * self.unit_blocks)
                tweak = self._tweak_decipher.update(start.to_bytes(16, "little"))
            else:
                tweak = _REFERENCE_TWEAK
            cipher = Cipher(algorithms.AES(self._key), modes.XTS(tweak))
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            self._bulk[(encrypt, offset)] = context
        return context

    def page_cipher(self, tweak: int) -> Cipher:
        """A plain XTS cipher for one unit (for requests too small to vectorise)."""
        return Cipher(self._aes, modes.XTS(tweak.to_bytes(16, "little")))

    @staticmethod
    def apply(context, src, dst, first: int, last: int, delta, xbuf) -> None:
        """Run units ``first..last-1`` of ``src`` into ``dst`` ((units, words) uint64
        arrays, ``dst`` may be ``src``) through ``context``; ``delta`` holds their
        delta masks.

        The first XOR writes straight into ``dst``, so the chunk's memory traffic
        happens in one pass; the cipher and the second XOR then work on it while it
        is still in the CPU cache.  The cipher call needs 15 spare bytes after its
        output, which the next unit provides; the last chunk goes through ``xbuf``.
        """
        n, words = delta.shape
        if last < len(dst):
            out = dst[first:last]
            np.bitwise_xor(src[first:last], delta, out=out)
            raw = dst[first:last + 1].view(np.uint8).reshape(-1)
            context.update_into(raw[:n * words * 8], raw)
            np.bitwise_xor(out, delta, out=out)
            return
        x = xbuf[:n * words].reshape(n, words)
        np.bitwise_xor(src[first:last], delta, out=x)
        raw = xbuf.view(np.uint8)
        context.update_into(raw[:n * words * 8], raw)
        np.bitwise_xor(x, delta, out=dst[first:last])

    def close(self) -> None:
        self._key = b""
        self._aes = None
        self._tweak_cipher = self._tweak_decipher = None
        self._bulk.clear()


def _xts_data_units(key: bytes, data: bytes, tweaks: Sequence[bytes], unit_size: int,
                    encrypt: bool) -> bytes:
    """XTS over equal data units with an explicit 16-byte tweak per unit (no cache).

    The same vectorised machinery as the page path, for any unit size that is
    a multiple of 16 bytes; used to check the engine against published
    XTS-AES-256 vectors.
    """
    key = _check_key(key)
    if unit_size <= 0 or unit_size % BLOCK_SIZE or unit_size // BLOCK_SIZE > _MAX_UNIT_BLOCKS:
        raise MeeError(f"data unit size {unit_size} is not a positive multiple of 16 bytes")
    if len(data) != len(tweaks) * unit_size:
        raise MeeError(f"{len(data)} bytes of data do not make {len(tweaks)} units of {unit_size}")
    if any(len(t) != 16 for t in tweaks):
        raise MeeError("every XTS tweak must be 16 bytes")
    n = len(tweaks)
    if n == 0:
        return b""
    blocks = unit_size // BLOCK_SIZE
    words = unit_size // 8
    per_call = max(1, min(n, _MAX_UNIT_BLOCKS // blocks))
    core = _XtsCore(key, blocks)
    try:
        generator = _MaskGenerator(blocks, per_call)
        reference = np.empty((per_call, words), _U64)
        generator.generate(*_words_of(core.reference_starts(per_call)), reference)
        starts = core.start_masks(np.frombuffer(b"".join(tweaks), dtype=np.uint8))
        src = np.frombuffer(bytes(data), dtype=np.uint8).view(_U64).reshape(n, words)
        dst = np.empty((n, words), _U64)
        delta = np.empty((per_call, words), _U64)
        xbuf = np.empty(per_call * words + 2, _U64)
        context = core.bulk(encrypt, 0)
        for first in range(0, n, per_call):
            part = slice(first, min(n, first + per_call))
            d = delta[:part.stop - first]
            generator.generate(starts[part, 0].copy(), starts[part, 1].copy(), d)
            np.bitwise_xor(d, reference[:len(d)], out=d)
            core.apply(context, src, dst, part.start, part.stop, d, xbuf)
        return dst.tobytes()
    finally:
        core.close()


def _check_key(key: Any) -> bytes:
    try:
        key = bytes(memoryview(key))
    except TypeError:
        raise MeeError("the key-domain key must be a bytes-like object",
                       f"pass {KEY_SIZE} bytes") from None
    if len(key) != KEY_SIZE:
        raise MeeError(f"the key-domain key is {len(key)} bytes, not {KEY_SIZE}",
                       "AES-256-XTS takes two 32-byte keys, data key then tweak key")
    if key[:32] == key[32:]:
        raise MeeError("the two halves of the key-domain key are equal",
                       "XTS needs distinct data and tweak keys; generate the key at random")
    return key


def _as_u8(buffer: Any, what: str, writable: bool = False) -> np.ndarray:
    try:
        view = memoryview(buffer)
    except TypeError:
        raise MeeError(f"{what} must be a bytes-like object, not {type(buffer).__name__}") from None
    if not view.c_contiguous:
        raise MeeError(f"{what} is not a contiguous buffer", "pass bytes, bytearray or a contiguous memoryview")
    if writable and view.readonly:
        raise MeeError(f"{what} is read-only", "pass a writable buffer such as a bytearray or mmap view")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return np.frombuffer(view, dtype=np.uint8)


def _as_dpas(dpas: Any) -> np.ndarray:
    try:
        arr = np.asarray(dpas)
    except (TypeError, ValueError, OverflowError):
        raise MeeError("data physical addresses must be a sequence of integers") from None
    if arr.ndim != 1:
        raise MeeError("data physical addresses must be a flat sequence, one per page")
    if arr.dtype.kind == "O":
        if not all(is_int(v) for v in arr):
            raise MeeError("data physical addresses must be integers")
        bad = next((v for v in arr if not 0 <= v < DPA_LIMIT), None)
        if bad is not None:
            raise _dpa_range_error(bad)
        arr = arr.astype(_U64)
    elif arr.dtype.kind not in "iu":
        if arr.size == 0:
            return np.zeros(0, _U64)
        raise MeeError(f"data physical addresses must be integers, not {arr.dtype}")
    if arr.size:
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise _dpa_range_error(int(arr.min()))
        if arr.max() >= DPA_LIMIT:
            raise _dpa_range_error(int(arr.max()))
    arr = arr.astype(_U64, copy=False)
    misaligned = np.flatnonzero(arr & _U64(PAGE_SIZE - 1))
    if misaligned.size:
        raise MeeError(f"data physical address {hex(int(arr[misaligned[0]]))} is not page-aligned",
                       f"each page's address is a multiple of {PAGE_SIZE}")
    return arr


def _dpa_range_error(value: int) -> MeeError:
    return MeeError(
        f"data physical address {_hex(value)} is out of range",
        f"a data physical address is KeyID (0..{MAX_KEYID}) << {KEYID_SHIFT} | hpa (< 2**{KEYID_SHIFT})",
    )


class _SeenFilter:
    """Which pages were encrypted recently: a direct-mapped table of data physical addresses.

    A page's masks are cached only when it comes back (see ``MemoryEncryptionEngine``), so
    a pass over pages seen once, such as the first shadow sync after boot, costs no cache
    work and leaves the cache to the pages that change often.  A newer address takes the
    entry of an older one that hashes alike; a forgotten page just waits one more pass.
    """

    def __init__(self, capacity_pages: int):
        wanted = max(_MIN_SEEN, _SEEN_PER_SLOT * capacity_pages)
        entries = 1 << (wanted - 1).bit_length() if capacity_pages else 0   # a power of two
        self._bits = _U64(64 - max(1, entries.bit_length() - 1))
        self.table = np.full(entries, _EMPTY_SLOT, dtype=_U64)

    def seen_then_note(self, addresses: np.ndarray) -> np.ndarray:
        """Which of ``addresses`` were noted before; notes all of them."""
        if not self.table.size:
            return np.zeros(len(addresses), dtype=bool)
        index = ((addresses >> _U64(12)) * _GOLDEN) >> self._bits
        seen = self.table[index] == addresses
        self.table[index] = addresses
        return seen

    def clear(self) -> None:
        self.table = np.zeros(0, dtype=_U64)


class _MaskCache:
    """Bounded map from data physical address to a slot of 4096 bytes of masks.

    Slot ``s`` holds the page's masks XOR the reference stream at position
    ``s % CHUNK_PAGES``, so a run of consecutive slots feeds the bulk call
    directly.  The slot array is only touched as it fills; replacement is
    first-in first-out, which keeps pages cached together in consecutive slots.
    """

    def __init__(self, capacity_pages: int):
        self.capacity = capacity_pages
        try:
            self.store = np.empty((capacity_pages, WORDS_PER_PAGE), _U64) if capacity_pages else None
        except MemoryError:
            raise MeeError(f"cannot reserve {capacity_pages * PAGE_SIZE >> 20} MiB for the mask cache",
                           "pass a smaller mask_cache_bytes") from None
        self.slot_of: dict[int, int] = {}
        # The address each slot holds (_EMPTY_SLOT if none): a run of cached
        # pages is recognised with one vector compare.
        self.dpa_in_slot = np.full(capacity_pages, _EMPTY_SLOT, dtype=_U64)
        self._next = 0
        self.touched = 0

    def allocate(self, dpas: list[int], align: int = 1) -> int:
        """Give ``dpas`` (distinct, at most ``capacity``) consecutive slots, replacing
        the oldest entries; returns the first, a multiple of ``align``."""
        start = -(-self._next // align) * align
        if start + len(dpas) > self.capacity:
            start = 0
        slot_of = self.slot_of
        for old in self.dpa_in_slot[start:start + len(dpas)].tolist():
            if old != _EMPTY_SLOT:
                del slot_of[old]
        self.dpa_in_slot[start:start + len(dpas)] = dpas
        slot_of.update(zip(dpas, range(start, start + len(dpas))))
        self._next = (start + len(dpas)) % self.capacity
        self.touched = max(self.touched, start + len(dpas))
        return start

    def index_bytes(self) -> int:
        """Approximate memory of the address -> slot index (the dict, its int
        keys and values, the slot array)."""
        return sys.getsizeof(self.slot_of) + 64 * len(self.slot_of) + self.dpa_in_slot.nbytes

    def clear(self) -> None:
        if self.store is not None:
            self.store[:self.touched].fill(0)
        self.store = None
        self.slot_of.clear()
        self.dpa_in_slot = np.zeros(0, dtype=_U64)
        self.capacity = self.touched = 0


class MemoryEncryptionEngine:
    """AES-256-XTS page encryption for one key domain.

    ``key`` is 64 bytes: the data key K1 then the tweak key K2 (the two halves
    must differ).  Each 4 KiB page is one data unit whose tweak is its data
    physical address as a 128-bit little-endian number.  ``mask_cache_bytes``
    bounds the per-page mask cache (whole pages, at least one chunk of
    ``CHUNK_PAGES``; 0 disables it); a page joins it when it is encrypted
    again soon after, so the cache holds the pages that change often.

    Calls are serialised by a lock.  ``close()`` forgets the key and every
    cached mask; the engine cannot be used afterwards.
    """

    def __init__(self, key: bytes, *, mask_cache_bytes: int = DEFAULT_MASK_CACHE_BYTES):
        key = _check_key(key)
        if not is_int(mask_cache_bytes) or mask_cache_bytes < 0:
            raise MeeError(f"mask cache size {mask_cache_bytes!r} is not a non-negative integer")
        capacity = int(mask_cache_bytes) // PAGE_SIZE
        if capacity:
            capacity = max(capacity, CHUNK_PAGES)
        self._lock = threading.Lock()
        self._core: _XtsCore | None = _XtsCore(key, BLOCKS_PER_PAGE)
        self._cache = _MaskCache(capacity)
        self._seen = _SeenFilter(capacity)
        self._generator = _MaskGenerator(BLOCKS_PER_PAGE, _BATCH_PAGES)
        self._reference_lo, self._reference_hi = _words_of(self._core.reference_starts(CHUNK_PAGES))
        self._reference = np.empty((CHUNK_PAGES, WORDS_PER_PAGE), _U64)
        self._generator.generate(self._reference_lo, self._reference_hi, self._reference)
        self._positions = np.arange(_BATCH_PAGES) % CHUNK_PAGES
        self._chunk = np.empty((CHUNK_PAGES, WORDS_PER_PAGE), _U64)
        self._xbuf = np.empty(CHUNK_PAGES * WORDS_PER_PAGE + 2, _U64)

    # --- public API

    def encrypt_pages(self, data: Any, dpas: Any) -> bytes:
        """Encrypt ``len(dpas)`` pages; page i uses tweak ``dpas[i]``."""
        return self._run_to_bytes(data, dpas, encrypt=True)

    def decrypt_pages(self, data: Any, dpas: Any) -> bytes:
        """Decrypt ``len(dpas)`` pages; page i uses tweak ``dpas[i]``."""
        return self._run_to_bytes(data, dpas, encrypt=False)

    def encrypt_into(self, out: Any, data: Any, dpas: Any) -> None:
        """Like :meth:`encrypt_pages`, writing into ``out`` (which may be ``data`` itself)."""
        self._run(out, data, dpas, encrypt=True)

    def decrypt_into(self, out: Any, data: Any, dpas: Any) -> None:
        """Like :meth:`decrypt_pages`, writing into ``out`` (which may be ``data`` itself)."""
        self._run(out, data, dpas, encrypt=False)

    def close(self) -> None:
        """Forget the key, the reference stream and every cached mask."""
        with self._lock:
            if self._core is None:
                return
            self._core.close()
            self._core = None
            self._cache.clear()
            self._seen.clear()
            for buf in self._scratch():
                buf.fill(0)

    def __enter__(self) -> MemoryEncryptionEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cached_pages(self) -> int:
        """Pages whose masks are in the cache now."""
        return len(self._cache.slot_of)

    @property
    def mask_cache_capacity_pages(self) -> int:
        """How many pages' masks the cache can hold."""
        return self._cache.capacity

    def memory_bytes(self) -> int:
        """Memory the engine holds now: touched cache slots, the cache index, scratch."""
        scratch = sum(buf.nbytes for buf in self._scratch())
        return (self._cache.touched * PAGE_SIZE + self._cache.index_bytes() + self._seen.table.nbytes
                + scratch)

    def _scratch(self) -> tuple[np.ndarray, ...]:
        return (self._reference, self._reference_lo, self._reference_hi, self._chunk, self._xbuf,
                *self._generator.scratch())

    # --- the work

    def _run_to_bytes(self, data: Any, dpas: Any, encrypt: bool) -> bytes:
        src = _as_u8(data, "the input data")
        out = bytearray(src.size)
        self._run(out, src, dpas, encrypt)
        return bytes(out)

    def _run(self, out: Any, data: Any, dpas: Any, encrypt: bool) -> None:
        src = _as_u8(data, "the input data")
        dst = _as_u8(out, "the output buffer", writable=True)
        addresses = _as_dpas(dpas)
        pages = len(addresses)
        if src.size % PAGE_SIZE:
            raise MeeError(f"the input is {src.size} bytes, not a whole number of {PAGE_SIZE}-byte pages")
        if src.size != pages * PAGE_SIZE:
            raise MeeError(f"the input holds {src.size // PAGE_SIZE} pages but {pages} addresses were given",
                           "pass exactly one data physical address per page")
        if dst.size != src.size:
            raise MeeError(f"the output buffer is {dst.size} bytes; it must be {src.size}")
        if pages and np.may_share_memory(src, dst) and src.ctypes.data != dst.ctypes.data:
            raise MeeError("the output buffer partly overlaps the input",
                           "write in place (same buffer) or into separate memory")
        with self._lock:
            if self._core is None:
                raise MeeError("this memory-encryption engine is closed")
            if not pages:
                return
            src_pages = src.view(_U64).reshape(pages, WORDS_PER_PAGE)
            dst_pages = dst.view(_U64).reshape(pages, WORDS_PER_PAGE)
            # Addresses become Python ints only where a dict or a cipher needs them: a request
            # that finds nothing cached (a first pass, no cache) makes no object per page.
            loose = self._run_cached_runs(src_pages, dst_pages, addresses, encrypt)
            if sum(last - first for first, last in loose) <= _SMALL_REQUEST_PAGES:
                for first, last in loose:
                    self._run_one_by_one(src_pages, dst_pages, addresses, first, last, encrypt)
                return
            # Only the last ``capacity`` pages of a request could stay cached.
            remember_from = pages - self._cache.capacity
            for first, last in loose:
                for start in range(first, last, _BATCH_PAGES):
                    end = min(start + _BATCH_PAGES, last)
                    self._run_fresh(src_pages, dst_pages, addresses, start, end, encrypt,
                                    remember=self._cache.capacity > 0 and end > remember_from)

    def _run_cached_runs(self, src, dst, addresses: np.ndarray, encrypt: bool) -> list[tuple[int, int]]:
        """Run every stretch of pages cached in consecutive slots straight from the
        store; return the other pages as ``(first, last)`` ranges."""
        pages = len(addresses)
        cache = self._cache
        if not cache.slot_of:
            return [(0, pages)]
        slots = np.fromiter(map(cache.slot_of.get, addresses.tolist(), itertools.repeat(-1, pages)),
                            dtype=np.int64, count=pages)
        hit = slots >= 0
        if not hit.any():
            return [(0, pages)]
        # A run stays in consecutive slots and ends at a chunk boundary of the slots.
        follows = np.zeros(pages, dtype=bool)
        follows[1:] = hit[1:] & hit[:-1] & (slots[1:] == slots[:-1] + 1) & (slots[1:] % CHUNK_PAGES != 0)
        breaks = np.flatnonzero(~follows)
        starts = np.flatnonzero(hit & ~follows)
        ends = np.append(breaks, pages)[np.searchsorted(breaks, starts, side="right")]
        loose: list[tuple[int, int]] = []
        done = 0
        core = self._core
        for first, last in zip(starts.tolist(), ends.tolist()):
            if last - first < _MIN_DIRECT_RUN:
                continue        # recomputed with the pages around it
            if first > done:
                loose.append((done, first))
            slot = int(slots[first])
            core.apply(core.bulk(encrypt, slot % CHUNK_PAGES), src, dst, first, last,
                       cache.store[slot:slot + last - first], self._xbuf)
            done = last
        if done < pages:
            loose.append((done, pages))
        return loose

    def _run_one_by_one(self, src, dst, addresses: np.ndarray, first: int, last: int,
                        encrypt: bool) -> None:
        """A handful of pages: one XTS cipher each costs less than the vectorised set-up."""
        raw_src, raw_dst = src.view(np.uint8), dst.view(np.uint8)
        for index in range(first, last):
            cipher = self._core.page_cipher(int(addresses[index]))
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            raw_dst[index] = np.frombuffer(context.update(raw_src[index]), dtype=np.uint8)

    def _run_fresh(self, src, dst, addresses: np.ndarray, first: int, last: int,
                   encrypt: bool, remember: bool) -> None:
        """Pages ``first..last-1`` (at most a batch) with masks computed afresh; if
        ``remember``, the ones encrypted recently before (and not cached) join the cache,
        or any of them while the cache still has slots it never used.

        The masks of a chunk are written right before the chunk goes through the
        cipher, so they are still in the CPU cache when it reads them."""
        count = last - first
        self._prepare_deltas(addresses[first:last], self._positions[:count])
        core = self._core
        context = core.bulk(encrypt, 0)
        for start in range(0, count, CHUNK_PAGES):
            end = min(start + CHUNK_PAGES, count)
            delta = self._chunk[:end - start]
            self._generator.fill(delta, start, end)
            core.apply(context, src, dst, first + start, first + end, delta, self._xbuf)
        if remember:
            admit = self._seen.seen_then_note(addresses[first:last])
            if self._cache.touched < self._cache.capacity:
                admit[:] = True     # slots never used yet cost nothing to fill
            if admit.any():
                self._remember(addresses[first:last].tolist(), admit)

    def _remember(self, dpas: list[int], admit: np.ndarray) -> None:
        """Cache the masks of the admitted pages in ``dpas`` (the prepared batch) that
        are not cached yet; row i was prepared for reference position ``i % CHUNK_PAGES``."""
        cache = self._cache
        rows = {}
        for row in np.flatnonzero(admit).tolist():
            dpa = dpas[row]
            if dpa not in cache.slot_of and dpa not in rows:
                rows[dpa] = row
        if not rows:
            return
        if len(rows) > cache.capacity:  # keep the newest that fit
            rows = dict(list(rows.items())[-cache.capacity:])
        everything = len(rows) == len(dpas)
        first_slot = cache.allocate(list(rows), align=CHUNK_PAGES if everything else 1)
        # The masks are written straight into their (consecutive) slots, consecutive rows together.
        masks = cache.store[first_slot:first_slot + len(rows)]
        row_array = np.array(list(rows.values()), dtype=np.int64)
        breaks = np.flatnonzero(np.diff(row_array) != 1) + 1
        for run_start, run_end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(row_array)]):
            first_row = int(row_array[run_start])
            self._generator.fill(masks[run_start:run_end], first_row, first_row + run_end - run_start)
        slots = np.arange(first_slot, first_slot + len(rows))
        moved = (row_array - slots) % CHUNK_PAGES != 0
        if moved.any():   # the slot's reference position differs from the row's
            reference = self._reference
            masks[moved] ^= reference[row_array[moved] % CHUNK_PAGES] ^ reference[slots[moved] % CHUNK_PAGES]

    def _prepare_deltas(self, addresses: np.ndarray, positions: np.ndarray) -> None:
        """Prepare the generator for the delta masks of pages at the given reference-stream
        positions.

        Multiplying by ``x**j`` is linear, so ``T*x**j ^ R_p*x**j`` is generated
        directly from the starting value ``T ^ R_p``.
        """
        tweaks = np.zeros((len(addresses), 2), _U64)
        tweaks[:, 0] = addresses
        starts = self._core.start_masks(tweaks.view(np.uint8))
        self._generator.prepare(starts[:, 0] ^ self._reference_lo[positions],
                                starts[:, 1] ^ self._reference_hi[positions])
