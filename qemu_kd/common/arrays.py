"""Distinct values and repeats of integer arrays, by one sort.

``np.unique`` does the same and more (counts, inverse indices), but it costs more
per call and, on its first call, imports ``numpy.ma`` (10-30 ms in a fresh process):
the platform daemon and the CLI need neither on their way to serving or sealing.
"""

from __future__ import annotations

import numpy as np


def in_ascending_order(values: np.ndarray) -> np.ndarray:
    """``values`` flattened and in ascending order (not sorted again if they already are)."""
    flat = np.asarray(values).reshape(-1)
    return flat if (flat[1:] >= flat[:-1]).all() else np.sort(flat)


def page_span(addresses: np.ndarray) -> tuple[int, int]:
    """(lowest address, pages from its page to the highest address's, inclusive) of a
    non-empty uint64 array of addresses."""
    low, high = int(addresses.min()), int(addresses.max())
    return low, ((high - low) >> 12) + 1


def page_table(addresses: np.ndarray, low: int, pages: int) -> np.ndarray:
    """``pages`` booleans, True at the page of each of ``addresses`` (page-aligned uint64,
    each within the ``pages`` pages from ``low``): a lookup table of one byte a page."""
    table = np.zeros(pages, dtype=bool)
    table[(addresses - np.uint64(low)) >> np.uint64(12)] = True
    return table


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values of ``values`` (any shape, flattened), in ascending order."""
    ordered = in_ascending_order(values)
    if ordered.size < 2:
        return ordered.copy()
    first = np.empty(ordered.size, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def count_distinct(values: np.ndarray) -> int:
    """How many distinct values ``values`` holds."""
    ordered = in_ascending_order(values)
    if not ordered.size:
        return 0
    return 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))


def smallest_repeated(values: np.ndarray) -> int | None:
    """The smallest value that occurs more than once in ``values``, or None if none does."""
    flat = np.asarray(values).reshape(-1)
    if (flat[1:] > flat[:-1]).all():     # ascending (as alloc hands out pages): no sort needed
        return None
    ordered = np.sort(flat)
    repeated = ordered[1:] == ordered[:-1]
    if not repeated.any():
        return None
    return int(ordered[1:][np.argmax(repeated)])
