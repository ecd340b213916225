"""The guest policy a tenant seals its domain with.

Wire format (8 bytes, little-endian)::

    0x0  u16  version   (1)
    0x2  u16  reserved  (0)
    0x4  u32  flags     bit 0 DEBUG; bit 1 RESTORABLE; bits 2..31 reserved (0)

The policy is bound into the wrapped key, measured as the first launch
record, stored in the VMCS and reported in every attestation report.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qemu_kd.formats.errors import (
    FieldValueError,
    ReservedBitsError,
    VersionError,
    require_fits,
    require_length,
)

HOST_DATA_SIZE = 32  # bytes of host_data bound at create-kd and shown in reports
POLICY_VERSION = 1
POLICY_SIZE = 8
_LAYOUT = struct.Struct("<HHI")


@dataclass(frozen=True)
class Policy:
    """Guest policy flags (see module docstring for the byte layout)."""

    flags: int = 0

    DEBUG = 1 << 0
    RESTORABLE = 1 << 1
    KNOWN_FLAGS = DEBUG | RESTORABLE

    def __post_init__(self) -> None:
        require_fits("policy flags", self.flags, 32)
        if self.flags & ~self.KNOWN_FLAGS:
            raise FieldValueError(
                f"policy flags 0x{self.flags:x} set undefined bits "
                f"0x{self.flags & ~self.KNOWN_FLAGS:x}", "only DEBUG (bit 0) and RESTORABLE (bit 1) are defined")

    @classmethod
    def make(cls, debug: bool = False, restorable: bool = False) -> "Policy":
        return cls((cls.DEBUG if debug else 0) | (cls.RESTORABLE if restorable else 0))

    @property
    def debug(self) -> bool:
        """DEBUG lets the host read guest memory and registers through QMP/gdb."""
        return bool(self.flags & self.DEBUG)

    @property
    def restorable(self) -> bool:
        """RESTORABLE (a test policy) lets the platform restore one snapshot of the domain any
        number of times; without it a snapshot older than the domain's latest is refused
        (docs/snapshots.md)."""
        return bool(self.flags & self.RESTORABLE)

    def pack(self) -> bytes:
        return _LAYOUT.pack(POLICY_VERSION, 0, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> "Policy":
        require_length("policy", data, POLICY_SIZE)
        version, reserved, flags = _LAYOUT.unpack(data)
        if version != POLICY_VERSION:
            raise VersionError(f"policy version {version} is not supported (expected {POLICY_VERSION})",
                               "seal the guest again with this version of qemu-kd")
        if reserved:
            raise ReservedBitsError("policy: reserved bytes 2..3 are not zero")
        if flags & ~cls.KNOWN_FLAGS:
            raise ReservedBitsError(f"policy: undefined flag bits 0x{flags & ~cls.KNOWN_FLAGS:x} are set",
                                    "only DEBUG (bit 0) and RESTORABLE (bit 1) are defined")
        return cls(flags)

    def describe(self) -> str:
        text = "debug" if self.debug else "no-debug"
        return text + ",restorable" if self.restorable else text
