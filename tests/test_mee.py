"""The memory-encryption engine: AES-256-XTS per 4 KiB page, tweak = data physical address."""

import mmap
import os
import re
import tracemalloc
from pathlib import Path

import cryptography_vectors
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings, strategies as st

from qemu_kd.common.errors import KdError
from qemu_kd.crypto.mee import (
    CHUNK_PAGES, DEFAULT_MASK_CACHE_BYTES, MeeError, MemoryEncryptionEngine, _BATCH_PAGES, _gf_mul_xpow,
    _xts_data_units, data_physical_address,
)
from qemu_kd.formats.addresses import HPA_MASK, KEYID_BITS, KEYID_SHIFT, MAX_KEYID, PAGE_SIZE

KEY = bytes(range(64))
OTHER_KEY = bytes(range(1, 65))
NIST_FILE = (Path(cryptography_vectors.__file__).parent
             / "ciphers" / "AES" / "XTS" / "tweak-128hexstr" / "XTSGenAES256.rsp")


def reference(key, data, dpas, encrypt=True):
    """One `cryptography` XTS cipher per page: the definition the engine must match."""
    out = []
    for i, dpa in enumerate(dpas):
        cipher = Cipher(algorithms.AES(key), modes.XTS(int(dpa).to_bytes(16, "little")))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out.append(ctx.update(bytes(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])) + ctx.finalize())
    return b"".join(out)


def pages_at(keyid, first_hpa, count):
    return [data_physical_address(keyid, first_hpa + i * PAGE_SIZE) for i in range(count)]


# --- constants and addresses


def test_address_constants():
    assert (PAGE_SIZE, KEYID_SHIFT, KEYID_BITS, MAX_KEYID) == (4096, 40, 6, 63)
    assert HPA_MASK == (1 << 40) - 1


def test_data_physical_address_layout():
    assert data_physical_address(0, 0x1234000) == 0x1234000
    assert data_physical_address(1, 0) == 1 << 40
    assert data_physical_address(63, HPA_MASK) == (1 << 46) - 1
    assert data_physical_address(np.int64(5), np.uint64(4096)) == 5 << 40 | 4096


@pytest.mark.parametrize("keyid, hpa", [(64, 0), (-1, 0), (0, 1 << 40), (0, -4096),
                                        (True, 0), (0, 1.5), ("1", 0)])
def test_data_physical_address_rejects(keyid, hpa):
    with pytest.raises(MeeError) as info:
        data_physical_address(keyid, hpa)
    assert "out of range" in str(info.value)
    assert isinstance(info.value, KdError)


# --- published vectors


def nist_vectors():
    text = NIST_FILE.read_text()
    vectors = []
    for section, body in re.findall(r"\[(ENCRYPT|DECRYPT)\](.*?)(?=\[|\Z)", text, re.S):
        for block in body.split("COUNT = ")[1:]:
            fields = dict(re.findall(r"(\w+) = ([0-9a-fA-F]+)", block))
            bits = int(fields["DataUnitLen"])
            key = bytes.fromhex(fields["Key"])
            if bits % 128 or len(key) != 64:
                continue
            vectors.append((section, key, bytes.fromhex(fields["i"]), bytes.fromhex(fields["PT"]),
                            bytes.fromhex(fields["CT"]), bits // 8))
    return vectors


def test_nist_xts_aes_256_vectors_both_directions():
    checked = 0
    for section, key, tweak, plain, cipher, unit in nist_vectors():
        assert _xts_data_units(key, plain, [tweak], unit, encrypt=True) == cipher, (section, checked)
        assert _xts_data_units(key, cipher, [tweak], unit, encrypt=False) == plain, (section, checked)
        checked += 1
    assert checked >= 500  # 600 vectors of 256 and 384 bits in the file


def test_units_batched_match_single_units():
    # Several units in one call go through one bulk cipher call with delta masks.
    tweaks = [os.urandom(16) for _ in range(7)]
    data = os.urandom(7 * 48)
    together = _xts_data_units(KEY, data, tweaks, 48, encrypt=True)
    one_by_one = b"".join(_xts_data_units(KEY, data[i * 48:(i + 1) * 48], [t], 48, encrypt=True)
                          for i, t in enumerate(tweaks))
    assert together == one_by_one
    assert together != _xts_data_units(KEY, data, tweaks[::-1], 48, encrypt=True)


def test_gf_multiplication_by_x_powers():
    one = 1
    assert _gf_mul_xpow(one, 127) == 1 << 127
    assert _gf_mul_xpow(one, 128) == 0x87
    assert _gf_mul_xpow(1 << 127, 1) == 0x87
    value = 0x0123456789ABCDEF_FEDCBA9876543210
    step_by_step = value
    for _ in range(300):
        step_by_step = _gf_mul_xpow(step_by_step, 1)
    assert _gf_mul_xpow(value, 300) == step_by_step


# --- pages against the per-page reference


@pytest.mark.parametrize("cache", [0, 64 << 20])
@pytest.mark.parametrize("count", [1, 3, 13, CHUNK_PAGES - 1, CHUNK_PAGES, CHUNK_PAGES + 1, 3 * CHUNK_PAGES + 5,
                                   4 * CHUNK_PAGES + 7])
def test_random_pages_match_reference(cache, count):
    rng = np.random.default_rng(count)
    dpas = [data_physical_address(int(rng.integers(0, 64)), int(rng.integers(0, 1 << 28)) * PAGE_SIZE)
            for _ in range(count)]
    plain = rng.bytes(count * PAGE_SIZE)
    expected = reference(KEY, plain, dpas)
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=cache) as engine:
        for _ in range(2):  # cold, then with whatever the cache kept
            assert engine.encrypt_pages(plain, dpas) == expected
            assert engine.decrypt_pages(expected, dpas) == plain


@pytest.mark.parametrize("cache", [0, DEFAULT_MASK_CACHE_BYTES])
def test_requests_across_mask_batches_match_reference(cache):
    # Masks are prepared for up to _BATCH_PAGES pages at once and filled chunk by chunk.
    count = _BATCH_PAGES + CHUNK_PAGES + 5
    rng = np.random.default_rng(23)
    dpas = [data_physical_address(int(rng.integers(0, 64)), int(rng.integers(0, 1 << 28)) * PAGE_SIZE)
            for _ in range(count)]
    plain = rng.bytes(count * PAGE_SIZE)
    expected = reference(KEY, plain, dpas)
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=cache) as engine:
        for _ in range(3):   # first sight, admitted, cached
            assert engine.encrypt_pages(plain, dpas) == expected
            assert engine.decrypt_pages(expected, dpas) == plain


def test_decrypt_matches_reference_decryption():
    rng = np.random.default_rng(7)
    dpas = pages_at(9, 0x40000000, 5)
    blob = rng.bytes(5 * PAGE_SIZE)
    with MemoryEncryptionEngine(KEY) as engine:
        assert engine.decrypt_pages(blob, dpas) == reference(KEY, blob, dpas, encrypt=False)


def test_cached_runs_in_every_position():
    # Consecutive, shifted, reversed, scattered and repeated requests over a cached range.
    rng = np.random.default_rng(3)
    dpas = pages_at(2, 0x100000, 200)
    plain = rng.bytes(200 * PAGE_SIZE)
    expected = reference(KEY, plain, dpas)
    page = lambda blob, i: blob[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
    with MemoryEncryptionEngine(KEY) as engine:
        assert engine.encrypt_pages(plain, dpas) == expected
        assert engine.cached_pages == 200
        for order in (list(range(10, 150)), list(range(199, -1, -1)), list(rng.permutation(200)),
                      [5] * 9 + list(range(60, 140)) + [5, 7, 11], list(range(37, 41))):
            subset = b"".join(page(plain, i) for i in order)
            sub_dpas = [dpas[i] for i in order]
            assert engine.encrypt_pages(subset, sub_dpas) == b"".join(page(expected, i) for i in order)
            assert engine.decrypt_pages(b"".join(page(expected, i) for i in order), sub_dpas) == subset


def test_partly_cached_requests_fill_the_cache():
    rng = np.random.default_rng(13)
    dpas = pages_at(6, 0x300000, 160)
    plain = rng.bytes(160 * PAGE_SIZE)
    expected = reference(KEY, plain, dpas)
    page = lambda blob, i: blob[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
    with MemoryEncryptionEngine(KEY) as engine:
        evens = list(range(0, 160, 2))
        engine.encrypt_pages(b"".join(page(plain, i) for i in evens), [dpas[i] for i in evens])
        assert engine.cached_pages == 80
        # cached pages interleaved with new ones, some twice
        order = list(range(160)) + [3, 3, 4]
        blob = b"".join(page(plain, i) for i in order)
        assert engine.encrypt_pages(blob, [dpas[i] for i in order]) == \
            b"".join(page(expected, i) for i in order)
        assert engine.cached_pages == 160
        assert engine.decrypt_pages(expected, dpas) == plain
        # The odd pages sit in consecutive slots, whose reference positions differ from the
        # rows they were computed in: one run straight from the cache.
        odds = list(range(1, 160, 2))
        assert engine.encrypt_pages(b"".join(page(plain, i) for i in odds), [dpas[i] for i in odds]) == \
            b"".join(page(expected, i) for i in odds)


def test_small_requests_use_the_same_cipher():
    # A few pages skip the vectorised set-up; the result is the same XTS.
    dpas = pages_at(8, 0x5000, 3)
    plain = os.urandom(3 * PAGE_SIZE)
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=0) as engine:
        small = engine.encrypt_pages(plain, dpas)
        large = engine.encrypt_pages(plain * 10, dpas * 10)
    assert small == reference(KEY, plain, dpas)
    assert large == small * 10


def test_small_cache_evicts_and_stays_correct():
    rng = np.random.default_rng(11)
    dpas = pages_at(4, 0, 3 * CHUNK_PAGES)
    plain = rng.bytes(len(dpas) * PAGE_SIZE)
    expected = reference(KEY, plain, dpas)
    part = lambda blob, k: blob[k * CHUNK_PAGES * PAGE_SIZE:(k + 1) * CHUNK_PAGES * PAGE_SIZE]
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=CHUNK_PAGES * PAGE_SIZE) as engine:
        assert engine.mask_cache_capacity_pages == CHUNK_PAGES
        for _ in range(3):
            assert engine.encrypt_pages(plain, dpas) == expected
            assert engine.cached_pages == CHUNK_PAGES  # the newest pages that fit
        for k in (0, 1, 0, 2, 2):  # each chunk evicts the previous one
            chunk_dpas = dpas[k * CHUNK_PAGES:(k + 1) * CHUNK_PAGES]
            assert engine.encrypt_pages(part(plain, k), chunk_dpas) == part(expected, k)
            assert engine.decrypt_pages(part(expected, k), chunk_dpas) == part(plain, k)
            assert engine.cached_pages == CHUNK_PAGES
        for i in range(0, len(dpas), 17):  # single pages, cached or not
            one = plain[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            assert engine.encrypt_pages(one, [dpas[i]]) == expected[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        assert engine.memory_bytes() < 2 * CHUNK_PAGES * PAGE_SIZE + (8 << 20)


def test_cache_wraps_around():
    rng = np.random.default_rng(17)
    capacity = CHUNK_PAGES + CHUNK_PAGES // 2
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=capacity * PAGE_SIZE) as engine:
        for k in range(4):
            dpas = pages_at(k + 1, 0, CHUNK_PAGES)
            plain = rng.bytes(CHUNK_PAGES * PAGE_SIZE)
            expected = reference(KEY, plain, dpas)
            for _ in range(2):  # the second round comes from the cache
                assert engine.encrypt_pages(plain, dpas) == expected
            assert engine.cached_pages <= capacity


def test_pages_seen_once_stay_out_of_a_full_cache():
    # A pass over new pages (the first shadow sync) does no cache work once the cache is
    # full; a page that comes back soon after joins it.
    rng = np.random.default_rng(19)
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=CHUNK_PAGES * PAGE_SIZE) as engine:
        first = pages_at(3, 0, CHUNK_PAGES)
        engine.encrypt_pages(bytes(CHUNK_PAGES * PAGE_SIZE), first)   # fills the unused slots
        assert engine.cached_pages == CHUNK_PAGES
        later = pages_at(3, 1 << 30, 2 * CHUNK_PAGES)
        plain = rng.bytes(len(later) * PAGE_SIZE)
        expected = reference(KEY, plain, later)
        assert engine.encrypt_pages(plain, later) == expected
        slots = engine._cache.slot_of
        assert all(dpa in slots for dpa in first)     # nothing seen once displaced them
        back = later[-CHUNK_PAGES:]
        assert engine.encrypt_pages(plain[-CHUNK_PAGES * PAGE_SIZE:], back) == \
            expected[-CHUNK_PAGES * PAGE_SIZE:]
        assert all(dpa in slots for dpa in back) and not any(dpa in slots for dpa in first)


def test_default_cache_is_bounded_well_under_the_guest():
    # 32 MiB of pages encrypted twice: the engine holds its budget and scratch, no more.
    pages = 8192
    dpas = np.arange(pages, dtype=np.uint64) * PAGE_SIZE | np.uint64(7 << KEYID_SHIFT)
    data = np.zeros(pages * PAGE_SIZE, dtype=np.uint8)
    with MemoryEncryptionEngine(KEY) as engine:
        for _ in range(2):
            engine.encrypt_into(data, data, dpas)
        assert engine.mask_cache_capacity_pages * PAGE_SIZE == DEFAULT_MASK_CACHE_BYTES <= 8 << 20
        assert engine.cached_pages <= engine.mask_cache_capacity_pages
        assert engine.memory_bytes() < DEFAULT_MASK_CACHE_BYTES + (8 << 20)


def test_requests_without_cached_pages_make_no_object_per_page():
    # The first pass and the no-cache path work on the address array: the memory a request
    # allocates on the way (traced peak) does not grow with its number of pages.
    def peak(pages):
        dpas = np.arange(pages, dtype=np.uint64) * np.uint64(PAGE_SIZE) | np.uint64(7 << KEYID_SHIFT)
        data = np.zeros(pages * PAGE_SIZE, dtype=np.uint8)
        with MemoryEncryptionEngine(KEY, mask_cache_bytes=0) as engine:
            engine.encrypt_into(data, data, dpas)     # scratch touched
            tracemalloc.start()
            try:
                engine.encrypt_into(data, data, dpas)
                engine.decrypt_into(data, data, dpas)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    small, large = _BATCH_PAGES * 4, _BATCH_PAGES * 12
    assert peak(large) - peak(small) < 8 * (large - small)


def test_masks_go_straight_into_their_cache_slots():
    # A first pass fills the cache's never used slots: no temporary copy of the masks.
    count = 2 * _BATCH_PAGES
    dpas = np.arange(count, dtype=np.uint64) * np.uint64(PAGE_SIZE) | np.uint64(3 << KEYID_SHIFT)
    data = np.zeros(count * PAGE_SIZE, dtype=np.uint8)
    expected = reference(KEY, bytes(count * PAGE_SIZE), dpas.tolist())
    with MemoryEncryptionEngine(KEY) as engine:
        tracemalloc.start()
        try:
            engine.encrypt_into(data, data, dpas)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert engine.cached_pages == count
        assert data.tobytes() == expected
        assert engine.encrypt_pages(bytes(count * PAGE_SIZE), dpas) == expected    # from the cache
    assert peak < _BATCH_PAGES * PAGE_SIZE // 2


def test_cache_size_zero_holds_no_masks():
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=0) as engine:
        engine.encrypt_pages(bytes(4 * PAGE_SIZE), pages_at(1, 0, 4))
        assert engine.cached_pages == 0
        assert engine.mask_cache_capacity_pages == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, MAX_KEYID), st.integers(0, 300)), min_size=1, max_size=90),
       st.sampled_from([0, 96 * PAGE_SIZE]))
def test_property_round_trip_matches_reference(pages, cache):
    dpas = [data_physical_address(keyid, frame * PAGE_SIZE) for keyid, frame in pages]
    plain = os.urandom(len(dpas) * PAGE_SIZE)
    with MemoryEncryptionEngine(KEY, mask_cache_bytes=cache) as engine:
        sealed = engine.encrypt_pages(plain, dpas)
        assert sealed == reference(KEY, plain, dpas)
        assert engine.decrypt_pages(sealed, dpas) == plain


def test_into_buffers_in_place_and_mmap():
    rng = np.random.default_rng(5)
    count = CHUNK_PAGES + 9
    dpas = np.array(pages_at(7, 0x2000000, count), dtype=np.uint64)
    plain = rng.bytes(count * PAGE_SIZE)
    expected = reference(KEY, plain, dpas.tolist())
    with MemoryEncryptionEngine(KEY) as engine:
        with mmap.mmap(-1, count * PAGE_SIZE) as ram:
            engine.encrypt_into(memoryview(ram), plain, dpas)
            assert ram[:] == expected
            engine.decrypt_into(ram, ram, dpas)  # in place
            assert ram[:] == plain
        buf = bytearray(plain)
        engine.encrypt_into(buf, buf, dpas)
        assert bytes(buf) == expected
        words = np.frombuffer(expected, dtype=np.uint64).copy()  # any bytes-like input
        assert engine.decrypt_pages(words, dpas) == plain


def test_address_sequences_of_any_integer_kind():
    dpas = pages_at(2, 0x9000, 20)
    plain = os.urandom(20 * PAGE_SIZE)
    expected = reference(KEY, plain, dpas)
    with MemoryEncryptionEngine(KEY) as engine:
        for form in (dpas, tuple(dpas), np.array(dpas, dtype=object), np.array(dpas, dtype=np.int64),
                     np.array(dpas, dtype=np.uint64), [np.uint64(d) for d in dpas]):
            assert engine.encrypt_pages(plain, form) == expected


def test_units_of_any_length():
    for blocks in (1, 5, 64, 80, 200):
        tweaks = [os.urandom(16) for _ in range(3)]
        data = os.urandom(3 * 16 * blocks)
        expected = b"".join(
            Cipher(algorithms.AES(KEY), modes.XTS(t)).encryptor().update(data[i * 16 * blocks:(i + 1) * 16 * blocks])
            for i, t in enumerate(tweaks))
        assert _xts_data_units(KEY, data, tweaks, 16 * blocks, encrypt=True) == expected
    assert _xts_data_units(KEY, b"", [], 32, encrypt=True) == b""


def test_empty_request():
    with MemoryEncryptionEngine(KEY) as engine:
        assert engine.encrypt_pages(b"", []) == b""
        engine.decrypt_into(bytearray(), b"", np.zeros(0, dtype=np.uint64))


# --- separation: address and key


def test_ciphertext_is_bound_to_address_and_key():
    plain = os.urandom(2 * PAGE_SIZE)
    dpa = data_physical_address(3, 0x7000000)
    with MemoryEncryptionEngine(KEY) as engine, MemoryEncryptionEngine(OTHER_KEY) as other:
        sealed = engine.encrypt_pages(plain, [dpa, dpa + PAGE_SIZE])
        assert sealed[:PAGE_SIZE] != plain[:PAGE_SIZE]
        assert engine.decrypt_pages(sealed, [dpa, dpa + PAGE_SIZE]) == plain
        # moved to the next frame, swapped pages, another KeyID, another key
        assert engine.decrypt_pages(sealed[:PAGE_SIZE], [dpa + PAGE_SIZE]) != plain[:PAGE_SIZE]
        assert engine.decrypt_pages(sealed, [dpa + PAGE_SIZE, dpa])[:PAGE_SIZE] != plain[:PAGE_SIZE]
        assert engine.decrypt_pages(sealed[:PAGE_SIZE], [data_physical_address(4, 0x7000000)]) \
            != plain[:PAGE_SIZE]
        assert other.decrypt_pages(sealed, [dpa, dpa + PAGE_SIZE]) != plain
        # the same plaintext at two addresses gives unrelated ciphertext
        twice = engine.encrypt_pages(plain[:PAGE_SIZE] * 2, [dpa, dpa + PAGE_SIZE])
        assert twice[:PAGE_SIZE] != twice[PAGE_SIZE:]


# --- errors


@pytest.mark.parametrize("key, words", [
    (bytes(32), "32 bytes, not 64"),
    (bytes(65), "65 bytes, not 64"),
    (bytes(64), "halves"),
    (b"\x01" * 32 + b"\x01" * 32, "halves"),
    ("0" * 64, "bytes-like"),
])
def test_bad_keys(key, words):
    with pytest.raises(MeeError) as info:
        MemoryEncryptionEngine(key)
    assert words in str(info.value)


def test_bad_cache_size():
    with pytest.raises(MeeError, match="mask cache size"):
        MemoryEncryptionEngine(KEY, mask_cache_bytes=-1)


@pytest.mark.parametrize("data, dpas, words", [
    (bytes(100), [0], "not a whole number"),
    (bytes(PAGE_SIZE), [0, PAGE_SIZE], "holds 1 pages but 2 addresses"),
    (bytes(2 * PAGE_SIZE), [0], "holds 2 pages but 1 addresses"),
    (bytes(PAGE_SIZE), [1 << 46], "out of range"),
    (bytes(PAGE_SIZE), [64 << 40], "out of range"),
    (bytes(PAGE_SIZE), [-PAGE_SIZE], "out of range"),
    (bytes(PAGE_SIZE), [1 << 70], "out of range"),
    (bytes(PAGE_SIZE), [0x1234], "not page-aligned"),
    (bytes(PAGE_SIZE), [1.5], "integers"),
    (bytes(PAGE_SIZE), ["0"], "integers"),
    (bytes(PAGE_SIZE), [[0]], "flat sequence"),
    (bytes(2 * PAGE_SIZE), [[0], 0], "sequence of integers"),
    (bytes(2 * PAGE_SIZE), [1 << 70, "0"], "integers"),
    (bytes(PAGE_SIZE), np.array([64 << 40], dtype=np.uint64), "out of range"),
    ("text", [0], "bytes-like"),
])
def test_bad_requests(data, dpas, words):
    with MemoryEncryptionEngine(KEY) as engine:
        with pytest.raises(MeeError) as info:
            engine.encrypt_pages(data, dpas)
        assert words in str(info.value)


def test_bad_output_buffers():
    data = bytes(2 * PAGE_SIZE)
    dpas = pages_at(1, 0, 2)
    with MemoryEncryptionEngine(KEY) as engine:
        with pytest.raises(MeeError, match="must be 8192"):
            engine.encrypt_into(bytearray(PAGE_SIZE), data, dpas)
        with pytest.raises(MeeError, match="read-only"):
            engine.encrypt_into(bytes(2 * PAGE_SIZE), data, dpas)
        shared = bytearray(3 * PAGE_SIZE)
        with pytest.raises(MeeError, match="partly overlaps"):
            engine.encrypt_into(memoryview(shared)[PAGE_SIZE:], memoryview(shared)[:2 * PAGE_SIZE], dpas)
        strided = memoryview(bytearray(4 * PAGE_SIZE))[::2]
        with pytest.raises(MeeError, match="contiguous"):
            engine.encrypt_into(strided, data, dpas)


def test_close_forgets_everything():
    engine = MemoryEncryptionEngine(KEY)
    engine.encrypt_pages(bytes(CHUNK_PAGES * PAGE_SIZE), pages_at(1, 0, CHUNK_PAGES))
    assert engine.cached_pages == CHUNK_PAGES
    engine.close()
    assert engine.cached_pages == 0
    with pytest.raises(MeeError, match="closed"):
        engine.encrypt_pages(bytes(PAGE_SIZE), [0])
    engine.close()  # idempotent
    with MemoryEncryptionEngine(KEY) as scoped:
        scoped.decrypt_pages(bytes(PAGE_SIZE), [0])
    with pytest.raises(MeeError, match="closed"):
        scoped.decrypt_pages(bytes(PAGE_SIZE), [0])


@pytest.mark.parametrize("unit, tweaks, data, words", [
    (40, [bytes(16)], bytes(40), "multiple of 16"),
    (32, [bytes(16)], bytes(48), "do not make"),
    (32, [bytes(15)], bytes(32), "16 bytes"),
])
def test_units_reject_bad_input(unit, tweaks, data, words):
    with pytest.raises(MeeError) as info:
        _xts_data_units(KEY, data, tweaks, unit, encrypt=True)
    assert words in str(info.value)
