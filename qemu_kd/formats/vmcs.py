"""The key domain's VMCS page: controls, host state, read-only and guest state.

The VMCS is one 4 KiB page that the tenant encrypts with the domain key.
Every field lives in an 8-byte little-endian slot at a fixed offset; the
field table :data:`VMCS_FIELDS` gives name, Intel-style encoding, width and
offset.  Encodings follow the Intel SDM (Appendix B) where the field exists;
fields Intel does not define use encodings in unused index ranges that still
obey the encoding format (bits 14:13 width, bits 11:10 type, bits 9:1 index),
so :func:`field_class` can be read straight off the encoding:

====  ==========  =====================================================
type  class       meaning
====  ==========  =====================================================
0     control     execution controls (host may vmread)
1     readonly    VM-exit information (host may vmread)
2     guest       guest state and GPR area (never readable by the host)
3     host        host state (host may vmread)
====  ==========  =====================================================

Page layout (see docs/formats.md for the complete table)::

    0x000 u32 revision id: bits 0..15 layout version (1), bits 16..30 magic
          0x4B44 ("KD"), bit 31 shadow-VMCS indicator (0)
    0x004 u32 VMX-abort indicator (0)
    0x008 8 bytes reserved
    0x010 control area      0x100 host-state area   0x180 read-only area
    0x200 guest-state area  0x300 GPR area          rest reserved (0)
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from qemu_kd.formats.errors import (
    FieldValueError,
    MagicError,
    ReservedBitsError,
    UnknownFieldError,
    VersionError,
    require_fits,
    require_length,
)
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vcpu import VcpuState

VMCS_SIZE = 4096
VMCS_LAYOUT_VERSION = 1
VMCS_MAGIC = 0x4B44
VMCS_REVISION_ID = (VMCS_MAGIC << 16) | VMCS_LAYOUT_VERSION
VMCS_LINK_POINTER_NONE = (1 << 64) - 1

CONTROL_AREA = 0x010
HOST_AREA = 0x100
READONLY_AREA = 0x180
GUEST_AREA = 0x200
GPR_AREA = 0x300

# Encoding bits 11:10 -> class.
_TYPE_CLASS = ("control", "readonly", "guest", "host")
# Encoding bits 14:13 -> width in bits (natural width is 64 on x86-64).
_WIDTH_BITS = (16, 64, 32, 64)

# General-purpose registers in x86 instruction-encoding order; bit i of the
# exposed-register mask exposes register i (as TDX's TDG.VP.VMCALL mask does).
X86_GPR_ORDER = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
EXPOSABLE_MASK = (1 << len(X86_GPR_ORDER)) - 1
GPR_AREA_ENCODING = 0x6B00  # natural-width guest-state, index 0x180 + register number


class VmcsField(NamedTuple):
    """One VMCS field: where it lives and what class it belongs to."""

    name: str          # attribute of Vmcs, or of Vmcs.guest for guest fields
    encoding: int
    offset: int        # byte offset of its 8-byte slot in the page
    in_guest: bool     # value lives in Vmcs.guest (a VcpuState)

    @property
    def field_class(self) -> str:
        return _TYPE_CLASS[(self.encoding >> 10) & 3]

    @property
    def width(self) -> int:
        return _WIDTH_BITS[(self.encoding >> 13) & 3]


def _area(base: int, entries: list[tuple[str, int, bool]]) -> list[VmcsField]:
    return [VmcsField(name, enc, base + 8 * i, guest) for i, (name, enc, guest) in enumerate(entries)]


VMCS_FIELDS: tuple[VmcsField, ...] = tuple(
    _area(CONTROL_AREA, [
        ("ept_pointer", 0x201A, False),            # Intel: EPT pointer
        ("save_area_hpa", 0x2200, False),          # qemu-kd: protected save-area hpa
        ("exposed_register_mask", 0x2202, False),  # qemu-kd: GPRs shown to the host on exit
        ("policy", 0x2204, False),                 # qemu-kd: packed Policy as u64
        ("host_forced_exit", 0x4200, False),       # qemu-kd: 1 = host may force an exit
        ("exit_interval_ms", 0x4202, False),       # qemu-kd: host-forced exit every N ms (0 = off)
    ])
    + _area(HOST_AREA, [
        ("host_cr0", 0x6C00, False),
        ("host_cr3", 0x6C02, False),
        ("host_cr4", 0x6C04, False),
        ("host_rsp", 0x6C14, False),
        ("host_rip", 0x6C16, False),
    ])
    + _area(READONLY_AREA, [
        ("vm_instruction_error", 0x4400, False),
        ("exit_reason", 0x4402, False),
        ("exit_qualification", 0x6400, False),
    ])
    + _area(GUEST_AREA, [
        ("es", 0x0800, True), ("cs", 0x0802, True), ("ss", 0x0804, True),
        ("ds", 0x0806, True), ("fs", 0x0808, True), ("gs", 0x080A, True),
        ("vmcs_link_pointer", 0x2800, False),
        ("efer", 0x2806, True),
        ("gdtr_limit", 0x4810, True),
        ("cr0", 0x6800, True), ("cr3", 0x6802, True), ("cr4", 0x6804, True),
        ("fs_base", 0x680E, True), ("gs_base", 0x6810, True),
        ("gdtr_base", 0x6816, True),
        ("rsp", 0x681C, True), ("rip", 0x681E, True), ("rflags", 0x6820, True),
    ])
    + _area(GPR_AREA, [
        (name, GPR_AREA_ENCODING + 2 * num, True)
        for num, name in enumerate(X86_GPR_ORDER) if name != "rsp"
    ])
)

_BY_ENCODING = {f.encoding: f for f in VMCS_FIELDS}
_SLOT = struct.Struct("<Q")
_HEADER = struct.Struct("<II8x")

# Control fields the tenant chooses: measured together with the guest state.
TENANT_CONTROLS = ("exposed_register_mask", "host_forced_exit", "policy")
# Control fields the host chooses: never measured (bound by verify-ept and the XTS tweak).
HOST_CHOSEN_CONTROLS = ("ept_pointer", "save_area_hpa")
# Control fields a running guest may let the host change (docs/protocol.md): never measured,
# 0 at launch, changed only through a control update the guest agreed to.
GUEST_APPROVED_CONTROLS = ("exit_interval_ms",)

GUEST_STATE_MAGIC = b"KDGS"
GUEST_STATE_VERSION = 1


def vmcs_field(encoding: int) -> VmcsField:
    """The field with this encoding; UnknownFieldError if there is none."""
    try:
        return _BY_ENCODING[encoding]
    except (KeyError, TypeError):
        shown = f"0x{encoding:04x}" if isinstance(encoding, int) else repr(encoding)
        raise UnknownFieldError(f"no VMCS field has encoding {shown}",
                                "see the field list in docs/formats.md") from None


def field_class(encoding: int) -> str:
    """"control", "host", "readonly" or "guest" for a known field encoding."""
    return vmcs_field(encoding).field_class


def measured_fields() -> list[VmcsField]:
    """Fields covered by the launch measurement, in encoding order."""
    chosen = [f for f in VMCS_FIELDS if f.field_class == "guest" or f.name in TENANT_CONTROLS]
    return sorted(chosen, key=lambda f: f.encoding)


def exposed_register_mask(names: list[str] | tuple[str, ...]) -> int:
    """Mask value exposing the named general-purpose registers."""
    mask = 0
    for name in names:
        if name not in X86_GPR_ORDER:
            raise FieldValueError(f"{name!r} is not a general-purpose register",
                                  f"choose from {', '.join(X86_GPR_ORDER)}")
        mask |= 1 << X86_GPR_ORDER.index(name)
    return mask


def exposed_registers(mask: int) -> list[str]:
    """Names of the registers a mask exposes, in x86 encoding order."""
    return [name for i, name in enumerate(X86_GPR_ORDER) if mask >> i & 1]


@dataclass
class Vmcs:
    """Decoded VMCS page (see module docstring and docs/formats.md)."""

    guest: VcpuState = field(default_factory=VcpuState)
    ept_pointer: int = 0
    save_area_hpa: int = 0
    exposed_register_mask: int = 0
    host_forced_exit: bool = True
    exit_interval_ms: int = 0
    policy: Policy = field(default_factory=Policy)
    vmcs_link_pointer: int = VMCS_LINK_POINTER_NONE
    host_cr0: int = 0
    host_cr3: int = 0
    host_cr4: int = 0
    host_rsp: int = 0
    host_rip: int = 0
    vm_instruction_error: int = 0
    exit_reason: int = 0
    exit_qualification: int = 0

    field_class = staticmethod(field_class)

    def read_field(self, encoding: int) -> int:
        """Value of the field with this encoding, as an unsigned integer."""
        f = vmcs_field(encoding)
        value = getattr(self.guest if f.in_guest else self, f.name)
        if f.name == "policy":
            return int.from_bytes(value.pack(), "little")
        return int(value)

    def with_field(self, encoding: int, value: int) -> "Vmcs":
        """A copy with one field replaced (value checked against the field width)."""
        f = vmcs_field(encoding)
        require_fits(f"VMCS field {f.name}", value, f.width)
        converted = _from_slot(f, value, error=FieldValueError)
        if f.in_guest:
            return dataclasses.replace(self, guest=dataclasses.replace(self.guest, **{f.name: converted}))
        return dataclasses.replace(self, **{f.name: converted})

    def pack(self) -> bytes:
        page = bytearray(VMCS_SIZE)
        _HEADER.pack_into(page, 0, VMCS_REVISION_ID, 0)
        for f in VMCS_FIELDS:
            value = self.read_field(f.encoding)
            require_fits(f"VMCS field {f.name}", value, f.width)
            _check_semantics(f, value, error=FieldValueError)
            _SLOT.pack_into(page, f.offset, value)
        return bytes(page)

    @classmethod
    def unpack(cls, page: bytes) -> "Vmcs":
        require_length("VMCS page", page, VMCS_SIZE)
        page = bytes(page)
        revision, abort = _HEADER.unpack_from(page, 0)
        if revision >> 31:
            raise ReservedBitsError("VMCS: shadow-VMCS indicator (bit 31 of the revision id) is set")
        if (revision >> 16) != VMCS_MAGIC:
            raise MagicError(f"VMCS revision id 0x{revision:08x} is not a qemu-kd VMCS",
                             "the page was not sealed as a VMCS, or was decrypted with the wrong key")
        if revision & 0xFFFF != VMCS_LAYOUT_VERSION:
            raise VersionError(f"VMCS layout version {revision & 0xFFFF} is not supported "
                               f"(expected {VMCS_LAYOUT_VERSION})")
        if abort:
            raise ReservedBitsError("VMCS: VMX-abort indicator is not zero")
        used = bytearray(VMCS_SIZE)
        used[0:8] = b"\xff" * 8  # revision id and abort indicator; bytes 8..15 reserved
        values: dict[str, object] = {}
        guest: dict[str, object] = {}
        for f in VMCS_FIELDS:
            (raw,) = _SLOT.unpack_from(page, f.offset)
            used[f.offset:f.offset + 8] = b"\xff" * 8
            if raw >> f.width:
                raise ReservedBitsError(f"VMCS field {f.name} (0x{f.encoding:04x}) = 0x{raw:x} "
                                        f"exceeds its {f.width}-bit width")
            (guest if f.in_guest else values)[f.name] = _from_slot(f, raw, error=ReservedBitsError)
        for offset in range(VMCS_SIZE):
            if page[offset] and not used[offset]:
                raise ReservedBitsError(f"VMCS: reserved byte at offset 0x{offset:03x} is not zero")
        return cls(guest=VcpuState(**guest), **values)

    def guest_state_bytes(self) -> bytes:
        """Canonical bytes of everything the launch measurement covers.

        That is the guest-state area, the GPR area and the tenant-chosen
        controls (exposed-register mask, host-forced-exit, policy); host-chosen
        fields (EPT pointer, save-area hpa), host state and read-only fields are
        left out.  Layout: "KDGS", u16 version, u16 count, then per field in
        encoding order u64 encoding, u64 value.
        """
        chosen = measured_fields()
        out = bytearray(GUEST_STATE_MAGIC + struct.pack("<HH", GUEST_STATE_VERSION, len(chosen)))
        for f in chosen:
            out += struct.pack("<QQ", f.encoding, self.read_field(f.encoding))
        return bytes(out)


def _check_semantics(f: VmcsField, value: int, error: type) -> None:
    if f.name == "host_forced_exit" and value > 1:
        raise error(f"VMCS host-forced-exit control 0x{value:x}: only bit 0 is defined")
    if f.name == "exposed_register_mask" and value & ~EXPOSABLE_MASK:
        raise error(f"VMCS exposed-register mask 0x{value:x}: bits above 15 are reserved")


def _from_slot(f: VmcsField, raw: int, error: type) -> object:
    _check_semantics(f, raw, error)
    if f.name == "policy":
        return Policy.unpack(raw.to_bytes(8, "little"))
    if f.name == "host_forced_exit":
        return bool(raw)
    return raw
