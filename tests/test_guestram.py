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
