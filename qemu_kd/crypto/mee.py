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
  pages at once: uint64 (lo, hi) planes, the start of each 64-block group by
  steps of ``x**64``, then doubling (blocks ``L..2L-1`` are blocks ``0..L-1``
  times ``x**L``).

The engine keeps a bounded cache of delta masks, keyed by data physical
address: 4096 bytes per cached page, that is 1 GiB (plus about 3 % for the
index) per GiB of guest memory, never more than ``mask_cache_bytes`` per
engine (64 MiB by default; 0 disables the cache).  When the cache is full the
oldest entries are replaced first.  Requests with only a few pages to compute
use one XTS cipher per page, which is cheaper than the vectorised set-up.

See docs/mee.md for the layout and the measured throughput.
"""

from __future__ import annotations

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
DEFAULT_MASK_CACHE_BYTES = 64 << 20
CHUNK_PAGES = 64
# Shorter runs of consecutive cache slots are recomputed with the uncached pages.
_MIN_DIRECT_RUN = 4
# Pages whose masks are computed together (more amortises numpy's per-call cost).
_BATCH_PAGES = 4 * CHUNK_PAGES
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


def _mul_x64_planes(src_lo, src_hi, dst_lo, dst_hi, tmp) -> None:
    """``dst = src * x**64``: the low word moves up, the high word is reduced."""
    np.copyto(dst_lo, src_hi)
    for k in (1, 2, 7):
        np.left_shift(src_hi, _U64(k), out=tmp)
        np.bitwise_xor(dst_lo, tmp, out=dst_lo)
    np.copyto(dst_hi, src_lo)
    for k in (63, 62, 57):
        np.right_shift(src_hi, _U64(k), out=tmp)
        np.bitwise_xor(dst_hi, tmp, out=dst_hi)


class _MaskGenerator:
    """Computes XTS masks ``S_u * x**j`` (j < blocks) for up to ``units`` data units.

    First the start of every 64-block group, ``S_u * x**(64*g)``, then the
    blocks of all groups of all units together by doubling: rows ``L..2L-1``
    are rows ``0..L-1`` times ``x**L``.  Every step is one contiguous numpy
    operation over block-major uint64 planes; the last step writes the masks
    interleaved (lo, hi) in data order.  Owns its scratch planes.
    """

    def __init__(self, blocks: int, units: int):
        self.blocks = blocks
        self.units = units
        self.rows = min(blocks, 64)
        self.groups = -(-blocks // 64)
        columns = units * self.groups
        self._lo = np.empty((self.rows, columns), _U64)
        self._hi = np.empty((self.rows, columns), _U64)
        half = max(1, self.rows // 2)
        self._tmp_a = np.empty((half, columns), _U64)
        self._tmp_b = np.empty((half, columns), _U64)
        self._tmp_c = np.empty(units, _U64)
        ragged = blocks > 64 and blocks % 64
        self._ragged = np.empty((units, self.groups * 128), _U64) if ragged else None

    def scratch(self) -> tuple[np.ndarray, ...]:
        arrays = (self._lo, self._hi, self._tmp_a, self._tmp_b, self._tmp_c, self._ragged)
        return tuple(a for a in arrays if a is not None)

    def generate(self, start_lo, start_hi, out) -> None:
        """Fill ``out`` (n x 2*blocks uint64, one unit per row) from the starting masks."""
        n = len(start_lo)
        rows, groups = self.rows, self.groups
        columns = n * groups
        lo, hi = self._lo[:, :columns], self._hi[:, :columns]
        group_lo, group_hi = lo[0].reshape(n, groups), hi[0].reshape(n, groups)
        group_lo[:, 0] = start_lo
        group_hi[:, 0] = start_hi
        for g in range(1, groups):
            _mul_x64_planes(group_lo[:, g - 1], group_hi[:, g - 1], group_lo[:, g], group_hi[:, g],
                            self._tmp_c[:n])
        span = 1
        while span < rows:
            count = min(span, rows - span)
            _mul_xpow_planes(lo[:count], hi[:count], lo[span:span + count], hi[span:span + count],
                             span, self._tmp_a[:count, :columns], self._tmp_b[:count, :columns])
            span *= 2
        target = out if self._ragged is None else self._ragged[:n]
        words = target.reshape(n, groups, rows, 2)
        np.copyto(words[..., 0], lo.reshape(rows, n, groups).transpose(1, 2, 0))
        np.copyto(words[..., 1], hi.reshape(rows, n, groups).transpose(1, 2, 0))
        if self._ragged is not None:
            out[...] = target[:, :2 * self.blocks]


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

    def allocate(self, dpas: list[int], align: int = 1) -> list[int]:
        """Give each of ``dpas`` (distinct, at most ``capacity``) a slot, replacing
        the oldest entries; the first slot is a multiple of ``align``."""
        start = -(-self._next // align) * align
        if start + len(dpas) > self.capacity:
            start = 0
        slots = list(range(start, start + len(dpas)))
        slot_of = self.slot_of
        for old in self.dpa_in_slot[start:start + len(dpas)].tolist():
            if old != _EMPTY_SLOT:
                del slot_of[old]
        self.dpa_in_slot[start:start + len(dpas)] = dpas
        slot_of.update(zip(dpas, slots))
        self._next = (start + len(dpas)) % self.capacity
        self.touched = max(self.touched, max(slots) + 1)
        return slots

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
    ``CHUNK_PAGES``; 0 disables it).

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
        self._generator = _MaskGenerator(BLOCKS_PER_PAGE, _BATCH_PAGES)
        self._reference_lo, self._reference_hi = _words_of(self._core.reference_starts(CHUNK_PAGES))
        self._reference = np.empty((CHUNK_PAGES, WORDS_PER_PAGE), _U64)
        self._generator.generate(self._reference_lo, self._reference_hi, self._reference)
        self._positions = np.arange(_BATCH_PAGES) % CHUNK_PAGES
        self._fresh = np.empty((_BATCH_PAGES, WORDS_PER_PAGE), _U64)
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
        return self._cache.touched * PAGE_SIZE + self._cache.index_bytes() + scratch

    def _scratch(self) -> tuple[np.ndarray, ...]:
        return (self._reference, self._reference_lo, self._reference_hi, self._fresh, self._xbuf,
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
            dpa_list = addresses.tolist()
            loose = self._run_cached_runs(src_pages, dst_pages, addresses, dpa_list, encrypt)
            if sum(last - first for first, last in loose) <= _SMALL_REQUEST_PAGES:
                for first, last in loose:
                    self._run_one_by_one(src_pages, dst_pages, dpa_list, first, last, encrypt)
                return
            # Only the last ``capacity`` pages of a request could stay cached.
            remember_from = pages - self._cache.capacity
            for first, last in loose:
                for start in range(first, last, _BATCH_PAGES):
                    end = min(start + _BATCH_PAGES, last)
                    self._run_fresh(src_pages, dst_pages, addresses, dpa_list, start, end, encrypt,
                                    remember=self._cache.capacity > 0 and end > remember_from)

    def _run_cached_runs(self, src, dst, addresses: np.ndarray, dpa_list: list[int],
                         encrypt: bool) -> list[tuple[int, int]]:
        """Run every stretch of pages cached in consecutive slots straight from the
        store; return the other pages as ``(first, last)`` ranges."""
        pages = len(dpa_list)
        cache = self._cache
        if not cache.capacity:
            return [(0, pages)]
        lookup = cache.slot_of.get
        loose: list[tuple[int, int]] = []

        def add_loose(first: int, last: int) -> None:
            if loose and loose[-1][1] == first:
                first = loose.pop()[0]
            loose.append((first, last))

        core = self._core
        index = 0
        while index < pages:
            slot = lookup(dpa_list[index])
            if slot is None:
                add_loose(index, index + 1)
                index += 1
                continue
            # A run stays in consecutive slots and ends at a chunk boundary of the slots.
            limit = min(CHUNK_PAGES - slot % CHUNK_PAGES, pages - index, cache.capacity - slot)
            same = cache.dpa_in_slot[slot:slot + limit] == addresses[index:index + limit]
            count = limit if same.all() else int(np.argmin(same))
            end = index + count
            if count >= _MIN_DIRECT_RUN:
                core.apply(core.bulk(encrypt, slot % CHUNK_PAGES), src, dst, index, end,
                           cache.store[slot:slot + count], self._xbuf)
            else:
                add_loose(index, end)
            index = end
        return loose

    def _run_one_by_one(self, src, dst, dpa_list: list[int], first: int, last: int,
                        encrypt: bool) -> None:
        """A handful of pages: one XTS cipher each costs less than the vectorised set-up."""
        raw_src, raw_dst = src.view(np.uint8), dst.view(np.uint8)
        for index in range(first, last):
            cipher = self._core.page_cipher(dpa_list[index])
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            raw_dst[index] = np.frombuffer(context.update(raw_src[index]), dtype=np.uint8)

    def _run_fresh(self, src, dst, addresses: np.ndarray, dpa_list: list[int], first: int, last: int,
                   encrypt: bool, remember: bool) -> None:
        """Pages ``first..last-1`` (at most a batch) with masks computed afresh; the
        ones not cached yet are remembered if ``remember``."""
        count = last - first
        fresh = self._fresh[:count]
        self._deltas_into(addresses[first:last], self._positions[:count], fresh)
        core = self._core
        context = core.bulk(encrypt, 0)
        for start in range(0, count, CHUNK_PAGES):
            end = min(start + CHUNK_PAGES, count)
            core.apply(context, src, dst, first + start, first + end, fresh[start:end], self._xbuf)
        if remember:
            self._remember(dpa_list[first:last], fresh)

    def _remember(self, dpas: list[int], fresh: np.ndarray) -> None:
        """Cache the masks of the pages in ``dpas`` that are not cached yet; row i of
        ``fresh`` was made for reference position ``i % CHUNK_PAGES``."""
        cache = self._cache
        rows = {}
        for row, dpa in enumerate(dpas):
            if dpa not in cache.slot_of and dpa not in rows:
                rows[dpa] = row
        if not rows:
            return
        if len(rows) > cache.capacity:  # keep the newest that fit
            rows = dict(list(rows.items())[-cache.capacity:])
        everything = len(rows) == len(dpas)
        slots = cache.allocate(list(rows), align=CHUNK_PAGES if everything else 1)
        if everything and slots[0] % CHUNK_PAGES == 0:
            # Consecutive slots from a chunk boundary: positions match, store as they are.
            cache.store[slots[0]:slots[0] + len(slots)] = fresh
            return
        row_array = np.array(list(rows.values()), dtype=np.int64)
        slot_array = np.array(slots, dtype=np.int64)
        reference = self._reference
        cache.store[slot_array] = (fresh[row_array] ^ reference[row_array % CHUNK_PAGES]
                                   ^ reference[slot_array % CHUNK_PAGES])

    def _deltas_into(self, addresses: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        """Delta masks of pages at the given reference-stream positions, into ``out``.

        Multiplying by ``x**j`` is linear, so ``T*x**j ^ R_p*x**j`` is generated
        directly from the starting value ``T ^ R_p``.
        """
        tweaks = np.zeros((len(addresses), 2), _U64)
        tweaks[:, 0] = addresses
        starts = self._core.start_masks(tweaks.view(np.uint8))
        self._generator.generate(starts[:, 0] ^ self._reference_lo[positions],
                                 starts[:, 1] ^ self._reference_hi[positions], out)
