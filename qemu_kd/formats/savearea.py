"""The protected save area (version 2): the whole vCPU state of an exited domain.

On every exit the platform reads every register QEMU's gdbstub describes for
x86-64 (its ``target.xml``), seals them into this record, encrypts the record
with the domain key at the save-area hpa and scrubs the registers in QEMU.
Resume checks the record and writes the registers back.  The register list is
pinned here (:data:`FULL_STATE`) and checked against QEMU's own description at
launch (:func:`check_target_registers`), so no register can be left out
unnoticed.

Byte format (little-endian; docs/formats.md §14)::

    0x00  4  magic "KDSA"
    0x04  u16 version (2)
    0x06  u16 register count n
    0x08  u64 exit sequence number
    0x10  u16 exit reason (1 host, 2 hypercall, 3 interval)
    0x12  u16 flags (bit 0: a hypercall frame follows the registers)
    0x14  u32 KeyID
    0x18  8  reserved (0)
    0x20  n register records: u16 gdb register number, u16 size, size value bytes
          hypercall frame (flag bit 0): u32 leaf, u32 exposed mask,
          16 x u64 general registers in x86 encoding order
          48-byte HMAC-SHA384 of everything before it (platform-only key,
          bound to KeyID and save-area hpa, see docs/formats.md)

The record (with its MAC) must fit :data:`SAVE_AREA_BYTES`; the rest of the
page is zero.  This module holds no key: the MAC is the caller's.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from qemu_kd.formats.errors import FormatError, MagicError, VersionError
from qemu_kd.formats.vcpu import GPR_NAMES
from qemu_kd.formats.vmcs import X86_GPR_ORDER

SAVE_MAGIC = b"KDSA"
SAVE_VERSION = 2
SAVE_AREA_BYTES = 4096
MAC_SIZE = 48
_HEADER = struct.Struct("<4sHHQHHI8x")
_REG_HEAD = struct.Struct("<HH")
_FRAME = struct.Struct("<II16Q")
FLAG_HYPERCALL = 1 << 0

#: Exit reasons, as the save area and the host's exit records name them.
EXIT_REASONS = {"host": 1, "hypercall": 2, "interval": 3}
EXIT_REASON_NAMES = {code: name for name, code in EXIT_REASONS.items()}


@dataclass(frozen=True)
class Register:
    """One register of QEMU's x86-64 gdb target description."""

    name: str
    number: int     # gdb remote register number
    size: int       # bytes


def _build(entries: list[tuple[str, int]]) -> tuple[Register, ...]:
    return tuple(Register(name, i, size) for i, (name, size) in enumerate(entries))


#: Every register of QEMU's ``i386-64bit.xml`` target description, in gdb order.
FULL_STATE: tuple[Register, ...] = _build(
    [(name, 8) for name in GPR_NAMES]
    + [("rip", 8), ("eflags", 4)]
    + [(name, 4) for name in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [(name, 8) for name in ("fs_base", "gs_base", "k_gs_base")]
    + [(name, 8) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
    + [(f"st{i}", 10) for i in range(8)]
    + [(name, 4) for name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
    + [(f"xmm{i}", 16) for i in range(16)]
    + [("mxcsr", 4)]
)
BY_NAME = {r.name: r for r in FULL_STATE}
#: Bytes of one ``g`` packet (all registers in gdb order).
G_PACKET_BYTES = sum(r.size for r in FULL_STATE)

_LAUNCH_PREFIX = ("cr4", "cr3", "efer", "cr0", "cs", "ss", "ds", "es", "fs", "gs",
                  "fs_base", "gs_base", "k_gs_base")
#: Restore order: the launch order (control registers, then segments, so a
#: selector's descriptor is read through the guest's own paging and CS.L is set
#: before the 64-bit registers), then the rest, RFLAGS and finally RIP.
RESTORE_ORDER: tuple[str, ...] = (
    *_LAUNCH_PREFIX,
    *(r.name for r in FULL_STATE if r.name not in _LAUNCH_PREFIX + ("eflags", "rip")),
    "eflags", "rip",
)
#: Scrub order: the reverse.  RIP, RFLAGS, the general registers and the
#: bases go while CS is still 64-bit (QEMU ignores writes to r8..r15 and to the
#: upper halves outside 64-bit mode), then the segments, then the control
#: registers (CR0 before EFER, so long mode is left cleanly).
SCRUB_ORDER: tuple[str, ...] = tuple(reversed(RESTORE_ORDER))

#: What a scrubbed register holds: zero, except fixed values QEMU forces or
#: that keep the stopped vCPU architecturally sane (RFLAGS bit 1, CR0.ET, the
#: x87 and SSE control words at their reset values).
SCRUB_VALUES: dict[str, int] = {
    **{r.name: 0 for r in FULL_STATE},
    "eflags": 0x2, "cr0": 0x10, "fctrl": 0x037F, "mxcsr": 0x1F80,
}


class SaveAreaFormatError(FormatError):
    """The save-area record is malformed."""


@dataclass
class HypercallFrame:
    """The hypercall's register file, sealed with the vCPU on a hypercall exit."""

    leaf: int
    mask: int                                   # effective exposed-register mask
    regs: dict[str, int] = field(default_factory=dict)   # every GPR, x86 order names

    def values(self) -> list[int]:
        return [int(self.regs.get(name, 0)) for name in X86_GPR_ORDER]


@dataclass
class SaveArea:
    """A decoded save-area record (without its MAC)."""

    seq: int
    reason: str
    keyid: int
    registers: dict[str, int]
    hypercall: HypercallFrame | None = None

    def pack_body(self) -> bytes:
        """The record's bytes up to (not including) the MAC."""
        if self.reason not in EXIT_REASONS:
            raise SaveAreaFormatError(f"unknown exit reason {self.reason!r}")
        flags = FLAG_HYPERCALL if self.hypercall is not None else 0
        out = bytearray(_HEADER.pack(SAVE_MAGIC, SAVE_VERSION, len(FULL_STATE), self.seq,
                                     EXIT_REASONS[self.reason], flags, self.keyid))
        for reg in FULL_STATE:
            out += _REG_HEAD.pack(reg.number, reg.size)
            out += int(self.registers[reg.name]).to_bytes(reg.size, "little")
        if self.hypercall is not None:
            out += _FRAME.pack(self.hypercall.leaf, self.hypercall.mask, *self.hypercall.values())
        if len(out) + MAC_SIZE > SAVE_AREA_BYTES:
            raise SaveAreaFormatError("save-area record does not fit its page")
        return bytes(out)

    @classmethod
    def unpack_body(cls, page: bytes) -> tuple["SaveArea", int]:
        """The record at the start of ``page`` and its body length (where the MAC starts)."""
        if len(page) < _HEADER.size:
            raise SaveAreaFormatError("save area is shorter than its header")
        magic, version, count, seq, reason, flags, keyid = _HEADER.unpack_from(page, 0)
        if magic != SAVE_MAGIC:
            raise MagicError("save area has no KDSA magic", "it was never written, or was tampered with")
        if version != SAVE_VERSION:
            raise VersionError(f"save area version {version} is not supported (expected {SAVE_VERSION})")
        if count != len(FULL_STATE) or reason not in EXIT_REASON_NAMES or flags & ~FLAG_HYPERCALL:
            raise SaveAreaFormatError("save-area header does not describe this platform's register list")
        offset = _HEADER.size
        registers: dict[str, int] = {}
        for reg in FULL_STATE:
            if offset + _REG_HEAD.size + reg.size > len(page):
                raise SaveAreaFormatError("save area ends inside its register records")
            number, size = _REG_HEAD.unpack_from(page, offset)
            if (number, size) != (reg.number, reg.size):
                raise SaveAreaFormatError(f"save-area record {reg.number} is register {number} of "
                                          f"{size} bytes, expected {reg.name} of {reg.size}")
            offset += _REG_HEAD.size
            registers[reg.name] = int.from_bytes(page[offset:offset + reg.size], "little")
            offset += reg.size
        frame = None
        if flags & FLAG_HYPERCALL:
            if offset + _FRAME.size > len(page):
                raise SaveAreaFormatError("save area ends inside its hypercall frame")
            leaf, mask, *values = _FRAME.unpack_from(page, offset)
            frame = HypercallFrame(leaf, mask, dict(zip(X86_GPR_ORDER, values)))
            offset += _FRAME.size
        return cls(seq, EXIT_REASON_NAMES[reason], keyid, registers, frame), offset


def mac_input(body: bytes, keyid: int, save_hpa: int) -> bytes:
    """What the save area's MAC covers: the record, bound to where it lives."""
    return b"KDSA-MAC" + struct.pack("<IQ", keyid, save_hpa) + body


def target_registers(documents: dict[str, bytes]) -> list[tuple[str, int]]:
    """(name, bits) of every register in a gdb target description, in order.

    ``documents`` maps each annex name (``target.xml`` and what it includes)
    to its text.  Commented-out registers do not count.
    """
    out: list[tuple[str, int]] = []

    def walk(annex: str, depth: int) -> None:
        if depth > 8 or annex not in documents:
            raise SaveAreaFormatError(f"gdb target description {annex!r} is missing or nests too deep")
        text = re.sub(r"<!--.*?-->", "", documents[annex].decode("utf-8", "replace"), flags=re.S)
        for m in re.finditer(r"<xi:include\s+href=\"([^\"]+)\"\s*/>|<reg\s([^>]*)>", text):
            if m.group(1):
                walk(m.group(1), depth + 1)
                continue
            attrs = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))
            out.append((attrs.get("name", ""), int(attrs.get("bitsize", "0"))))

    walk("target.xml", 0)
    return out


def check_target_registers(described: list[tuple[str, int]]) -> list[str]:
    """Why the pinned register list does not match QEMU's description (empty when it does)."""
    pinned = [(r.name, r.size * 8) for r in FULL_STATE]
    if described == pinned:
        return []
    missing = [f"{n} ({b} bits)" for n, b in described if (n, b) not in pinned]
    extra = [n for n, b in pinned if (n, b) not in described]
    reasons = []
    if missing:
        reasons.append("the platform cannot seal " + ", ".join(missing))
    if extra:
        reasons.append("QEMU does not describe " + ", ".join(extra))
    if not reasons:
        reasons.append("QEMU numbers its registers in another order")
    return reasons
