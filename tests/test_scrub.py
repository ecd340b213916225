"""Scrubbing plaintext buffers: every byte ends zero, and pages never touched stay unmapped."""

import mmap

import numpy as np
import pytest

from qemu_kd.common import scrub as scrub_module
from qemu_kd.common.scrub import PAGE, _mincore, scrub

PAGES = 4096     # 16 MiB


@pytest.fixture
def buffer():
    """A private anonymous mapping (no huge pages), as a (pages, 4096) array."""
    m = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(m, dtype=np.uint8).reshape(PAGES, PAGE)
    return arr       # the mapping goes with the array


def resident(arr) -> np.ndarray:
    vec = _mincore(arr.ctypes.data, arr.nbytes)
    assert vec is not None
    return (vec & 1).astype(bool)


def test_scrub_zeroes_what_was_written_and_maps_nothing_new(buffer):
    written = np.arange(3, PAGES, 7)
    buffer[written] = 0xA5
    _ = buffer[written[:50] + 1].sum()             # read, never written: the zero page
    assert resident(buffer).sum() < PAGES // 2
    before = resident(buffer)
    scrub(buffer)
    # No page that was unmapped got mapped just to be zeroed (fill(0) maps them all) ...
    assert not (resident(buffer) & ~before).any()
    # ... and every byte reads zero.
    assert not buffer.any()


def test_scrub_without_mincore_falls_back_to_writing_everything(buffer, monkeypatch):
    buffer[::5] = 1
    monkeypatch.setattr(scrub_module, "_mincore", lambda *a: None)
    scrub(buffer)
    assert not buffer.any()


@pytest.mark.parametrize("offset", [0, 1, 100, PAGE - 1])
def test_scrub_an_array_that_does_not_start_on_a_page(offset):
    raw = np.full(PAGE * 9 + 333, 0x5A, dtype=np.uint8)
    part = raw[offset:]
    scrub(part)
    assert not part.any() and (raw[:offset] == 0x5A).all()
