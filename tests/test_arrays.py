"""Distinct values and repeats by one sort (qemu_kd.common.arrays) agree with np.unique."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from qemu_kd.common.arrays import count_distinct, smallest_repeated, sorted_unique

INTS = st.lists(st.integers(0, 50), max_size=60)


@settings(max_examples=200, deadline=None)
@given(INTS, st.sampled_from([np.int64, np.uint64, np.uint8]), st.booleans())
def test_they_agree_with_np_unique(values, dtype, ascending):
    if ascending:
        values = sorted(values)
    arr = np.array(values, dtype=dtype)
    uniq, counts = np.unique(arr, return_counts=True)
    assert sorted_unique(arr).tolist() == uniq.tolist()
    assert sorted_unique(arr).dtype == arr.dtype
    assert count_distinct(arr) == uniq.size
    expected = int(uniq[np.argmax(counts > 1)]) if (counts > 1).any() else None
    assert smallest_repeated(arr) == expected


def test_edges():
    empty = np.zeros(0, dtype=np.int64)
    assert sorted_unique(empty).size == 0 and count_distinct(empty) == 0 and smallest_repeated(empty) is None
    assert smallest_repeated(np.array([7])) is None
    assert smallest_repeated(np.array([1, 2, 3, 3])) == 3          # ascending but not strictly
    assert smallest_repeated(np.array([9, 4, 9, 4])) == 4
    assert sorted_unique(np.array([[3, 1], [3, 2]])).tolist() == [1, 2, 3]


def test_the_distinct_values_are_a_new_array():
    for values in (np.array([1, 2, 5]), np.array([4]), np.array([3, 1, 3])):
        before = values.copy()
        sorted_unique(values)[:] = 99
        assert (values == before).all()
