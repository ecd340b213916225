"""Scrubbing a large buffer of plaintext before it is freed.

``array.fill(0)`` writes every page of the buffer, so pages the process never
touched (still unmapped, reading as zeros) get allocated only to be zeroed and
freed again: for a 256 MiB shadow of guest RAM that is most of a domain's
teardown.  :func:`scrub` leaves the buffer the same (all zeros) but writes only
the pages that can hold data: those mapped into memory (``mincore``) and not
already zero.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
#: Pages checked per step (bounds the temporary arrays).
STEP_PAGES = 4096


def _mincore(address: int, length: int) -> np.ndarray | None:
    """One byte per page of [address, address + length) (bit 0: resident), or None
    when the kernel cannot tell."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    mincore.restype = ctypes.c_int
    vec = np.zeros(length // PAGE, dtype=np.uint8)
    if mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec.ctypes.data_as(ctypes.c_void_p)):
        return None
    return vec


def scrub(array: np.ndarray) -> None:
    """Set every byte of the C-contiguous ``array`` to zero, writing only pages that hold memory."""
    flat = array.reshape(-1).view(np.uint8)
    start = flat.ctypes.data
    head = min(-start % PAGE, flat.size)              # bytes before the first whole page
    pages = (flat.size - head) // PAGE
    resident = _mincore(start + head, pages * PAGE) if pages else None
    if resident is None:
        flat.fill(0)
        return
    flat[:head] = 0
    flat[head + pages * PAGE:] = 0
    whole = flat[head:head + pages * PAGE].view(np.uint64).reshape(pages, PAGE // 8)
    mapped = np.flatnonzero(resident & 1)
    for lo in range(0, mapped.size, STEP_PAGES):
        idx = mapped[lo:lo + STEP_PAGES]
        rows = whole[idx]
        whole[idx[rows.any(axis=1)]] = 0
