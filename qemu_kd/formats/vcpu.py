"""The architectural vCPU state a key domain starts from.

The boot-layout builder produces a :class:`VcpuState`; the VMCS guest-state
area and GPR area carry exactly these values; the platform loads them into
QEMU through the gdbstub.  The load order and the gdb remote register numbers
are those of QEMU's x86-64 target description.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")

# gdb remote register numbers and sizes (bytes) for QEMU's i386-64bit.xml.
GDB_REGS: dict[str, tuple[int, int]] = {
    **{name: (i, 8) for i, name in enumerate(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))},
    "rip": (16, 8),
    "rflags": (17, 4),
    "cs": (18, 4), "ss": (19, 4), "ds": (20, 4), "es": (21, 4), "fs": (22, 4), "gs": (23, 4),
    "fs_base": (24, 8), "gs_base": (25, 8), "k_gs_base": (26, 8),
    "cr0": (27, 8), "cr2": (28, 8), "cr3": (29, 8), "cr4": (30, 8), "cr8": (31, 8),
    "efer": (32, 8),
}

# Order that makes QEMU accept a direct switch into long mode:
# CR4.PAE, CR3, EFER.LME|LMA, CR0.PE|PG, then CS, the data segments,
# the general-purpose registers, RFLAGS and finally RIP.
LOAD_ORDER = (
    "cr4", "cr3", "efer", "cr0",
    "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base",
    *GPR_NAMES,
    "rflags", "rip",
)

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


@dataclass
class VcpuState:
    """Register values of one vCPU at VM entry (all unsigned integers)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rbp: int = 0
    rsp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2
    cs: int = 0
    ss: int = 0
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0
    fs_base: int = 0
    gs_base: int = 0
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    gdtr_base: int = 0
    gdtr_limit: int = 0xFFFF

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_sequence(self) -> list[tuple[str, int, int, int]]:
        """(name, gdb register number, size in bytes, value) in load order."""
        return [(name, *GDB_REGS[name], getattr(self, name)) for name in LOAD_ORDER]

    def in_long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA and self.cr0 & CR0_PG and self.cr4 & CR4_PAE)
