"""Staged guest RAM: what measure-kd and restore-kd fill before launch."""

import os

import numpy as np
import pytest

from qemu_kd.platform.guestram import StagedRam

PAGE = 4096
MiB = 1 << 20


def _ram_bytes(staged: StagedRam) -> np.ndarray:
    """The memory file's content as QEMU will see it (read through the descriptor)."""
    return np.frombuffer(os.pread(staged.ram.fd, staged.size, 0), dtype=np.uint8).reshape(-1, PAGE)


@pytest.mark.parametrize("gpns", [
    [*range(0x10, 0x30), *range(0x100, 0x101), *range(0x200, 0x240)],   # a few runs, odd lengths
    [0x3ff, 0x0, 0x17, 0x18, 0x16, 0x200],                               # unordered, runs and singles
    [0x3ff],                                                             # the last page alone
])
def test_filled_pages_land_at_their_gpns_and_nothing_else_changes(gpns):
    rng = np.random.default_rng(len(gpns))
    plain = rng.integers(1, 256, (len(gpns), PAGE), dtype=np.uint8)
    staged = StagedRam(4 * MiB)
    try:
        hpas = np.arange(len(gpns), dtype=np.uint64) * PAGE + 0x100000
        half = len(gpns) // 2
        staged.fill(np.array(gpns[:half]), hpas[:half], plain[:half])
        staged.fill(np.array(gpns[half:]), hpas[half:], plain[half:])
        expected = np.zeros((4 * MiB // PAGE, PAGE), dtype=np.uint8)
        expected[gpns] = plain
        assert np.array_equal(_ram_bytes(staged), expected)
        assert np.array_equal(np.frombuffer(staged.ram.map, dtype=np.uint8).reshape(-1, PAGE), expected)
        assert np.array_equal(staged.baseline, expected)
        order = np.argsort(gpns, kind="stable")
        got_gpns, got_hpas = staged.pages()
        assert got_gpns.tolist() == sorted(gpns) and np.array_equal(got_hpas, hpas[order])
        assert staged.matches(4 * MiB, np.array(gpns), hpas)
    finally:
        staged.close()


def test_a_strided_view_fills_as_its_rows():
    staged = StagedRam(2 * MiB)
    try:
        rows = np.arange(8 * PAGE, dtype=np.uint32).astype(np.uint8).reshape(8, PAGE)
        staged.fill(np.arange(4), np.zeros(4, dtype=np.uint64), rows[::2])
        assert np.array_equal(_ram_bytes(staged)[:4], rows[::2])
        assert not _ram_bytes(staged)[4:].any()
    finally:
        staged.close()


def test_no_fill_after_take_or_close():
    staged = StagedRam(2 * MiB)
    ram, _baseline = staged.take()
    with pytest.raises(ValueError, match="already taken or closed"):
        staged.fill(np.array([0]), np.array([0], dtype=np.uint64), np.zeros((1, PAGE), dtype=np.uint8))
    ram.close()
    closed = StagedRam(2 * MiB)
    closed.close()
    with pytest.raises(ValueError, match="already taken or closed"):
        closed.fill(np.array([0]), np.array([0], dtype=np.uint64), np.zeros((1, PAGE), dtype=np.uint8))


def test_fill_with_lets_the_producer_write_straight_into_the_baseline():
    # measure-kd decrypts each run of consecutive gpns straight into the baseline's rows; those
    # rows then go into the memory file.  Runs longer than a piece come in several pieces.
    from qemu_kd.platform.guestram import FILL_PIECE_PAGES

    long_run = list(range(0x20, 0x20 + FILL_PIECE_PAGES + 5))
    gpns = np.array([0x3, *long_run, 0x7ff, 0x10, 0x11], dtype=np.int64)
    hpas = np.arange(gpns.size, dtype=np.uint64) * PAGE + 0x200000
    rng = np.random.default_rng(11)
    plain = rng.integers(1, 256, (gpns.size, PAGE), dtype=np.uint8)
    calls = []

    def produce(rows, first, last):
        calls.append((first, last))
        assert rows.shape == (last - first, PAGE) and np.shares_memory(rows, staged.baseline)
        rows[...] = plain[first:last]

    staged = StagedRam(8 * MiB)
    try:
        filled = staged.fill_with(gpns, hpas, produce)
        assert calls == [(0, 1), (1, 1 + FILL_PIECE_PAGES), (1 + FILL_PIECE_PAGES, 1 + len(long_run)),
                         (1 + len(long_run), 2 + len(long_run)), (2 + len(long_run), gpns.size)]
        assert np.array_equal(np.concatenate(filled), plain)
        expected = np.zeros((8 * MiB // PAGE, PAGE), dtype=np.uint8)
        expected[gpns] = plain
        assert np.array_equal(_ram_bytes(staged), expected)
        assert np.array_equal(staged.baseline, expected)
        assert staged.matches(8 * MiB, gpns, hpas)
    finally:
        staged.close()


def test_fill_with_refuses_pages_outside_the_ram():
    staged = StagedRam(2 * MiB)
    try:
        for gpns in ([0x1ff, 0x200], [-1]):
            with pytest.raises(ValueError, match="outside the 2097152-byte guest RAM"):
                staged.fill_with(np.array(gpns), np.zeros(len(gpns), dtype=np.uint64),
                                 lambda rows, first, last: pytest.fail("produced a page outside the RAM"))
        assert staged.pages()[0].size == 0 and not _ram_bytes(staged).any()
    finally:
        staged.close()
