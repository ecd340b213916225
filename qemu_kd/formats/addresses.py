"""Physical addresses: pages, KeyIDs and data physical addresses.

A data physical address (DPA) is ``KeyID << 40 | hpa``: MAXPHYADDR 46, of
which the top 6 bits select the key.  KeyID 0 is the host's own view (no
encryption); KeyIDs 1..63 belong to key domains.  Every module that deals in
pages or addresses takes these numbers from here.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from qemu_kd.common.errors import KdError

PAGE_SIZE = 4096
PAGE_SHIFT = 12
KEYID_BITS = 6
KEYID_SHIFT = 40
MAX_KEYID = (1 << KEYID_BITS) - 1
HPA_LIMIT = 1 << KEYID_SHIFT
HPA_MASK = HPA_LIMIT - 1
DPA_LIMIT = 1 << (KEYID_SHIFT + KEYID_BITS)
#: A gpa_to_hpa entry of a gpa that maps no page (a control update ballooned it out).
UNMAPPED = np.uint64((1 << 64) - 1)


class AddressError(KdError):
    """An address, KeyID or address list is out of range or malformed."""


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, never for bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def data_physical_address(keyid: int, hpa: int, error: type[KdError] = AddressError) -> int:
    """Return ``keyid << 40 | hpa`` after checking that both fit the address space."""
    if not is_int(keyid) or not 0 <= keyid <= MAX_KEYID:
        raise error(f"KeyID {keyid!r} is out of range", f"a KeyID is an integer from 0 to {MAX_KEYID}")
    if not is_int(hpa) or not 0 <= hpa <= HPA_MASK:
        shown = hex(hpa) if is_int(hpa) else repr(hpa)
        raise error(f"host-physical address {shown} is out of range",
                    f"host-physical addresses are integers below 2**{KEYID_SHIFT}")
    return int(keyid) << KEYID_SHIFT | int(hpa)


def u64_array(values: Iterable[int] | np.ndarray, what: str,
              error: type[KdError] = AddressError) -> np.ndarray:
    """A flat uint64 array from integers, refusing negatives, non-integers and values past 64 bits."""
    if isinstance(values, np.ndarray):
        if values.size and values.dtype.kind not in "iu":
            raise error(f"{what} values must be integers")
        if values.dtype.kind == "i" and values.size and (values < 0).any():
            raise error(f"negative {what} in the list")
        return values.astype(np.uint64, copy=False).reshape(-1)
    items = list(values)
    for v in items:
        if not is_int(v) or v < 0 or int(v) >> 64:
            raise error(f"{what} {v!r} is not an unsigned 64-bit integer")
    return np.array(items, dtype=np.uint64)
