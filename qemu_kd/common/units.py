"""Sizes on the command line: ``256M``, ``1G``, ``4096``; and the guest memory sizes qemu-kd supports."""

from __future__ import annotations


from qemu_kd.common.errors import ConfigError, GuestImageError

MiB = 1 << 20
GiB = 1 << 30

#: The guest memory sizes the firmware-less boot layout supports (formats.bootlayout):
#: a multiple of 2 MiB from 64 MiB to 3 GiB.
GUEST_MEMORY_STEP = 2 * MiB
GUEST_MEMORY_MIN = 64 * MiB
GUEST_MEMORY_MAX = 3 * GiB


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``512`` (MiB) or ``268435456B`` → bytes."""
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30, "B": 1}
    t = text.strip().upper().removesuffix("IB")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t) * MiB
    except ValueError:
        raise ConfigError(f"cannot read memory size {text!r}", "write it like 256M or 1G") from None


def describe_size(size: int) -> str:
    """``256 MiB``, ``3 GiB``, or bytes when not a whole number of MiB."""
    if size % GiB == 0 and size:
        return f"{size // GiB} GiB"
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    return f"{size} bytes"


class GuestMemoryError(ConfigError, GuestImageError):
    """A guest memory size qemu-kd does not support: a usage error (exit 2), and one of the
    guest image's errors where the boot layout is built."""


def check_guest_memory(size: int) -> int:
    """``size`` if a guest may have that much memory, else a GuestMemoryError saying what is allowed."""
    if size % GUEST_MEMORY_STEP or not GUEST_MEMORY_MIN <= size <= GUEST_MEMORY_MAX:
        raise GuestMemoryError(f"guest memory size {describe_size(size)} is not supported",
                          f"use a multiple of {describe_size(GUEST_MEMORY_STEP)} from "
                          f"{describe_size(GUEST_MEMORY_MIN)} to {describe_size(GUEST_MEMORY_MAX)}")
    return size


def parse_guest_memory(text: str) -> int:
    """A guest memory size from the command line (``256M``), checked by :func:`check_guest_memory`."""
    return check_guest_memory(parse_size(text))
