"""Sizes on the command line: ``256M``, ``1G``, ``4096``."""

from __future__ import annotations


from qemu_kd.common.errors import ConfigError

MiB = 1 << 20


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
