"""Control-structure updates: new VMCS/EPT pages a guest agreed to, for the host to install.

A running key domain's VMCS and EPT change only through an update that the
guest validated and had the platform seal.  The host relays it, verifies it
(staged ``hash-kd``, ``vmread`` and ``verify-ept``) and installs it; the
platform applies it only if its integrity tag verifies, its pages decrypt to
valid structures under the domain key, it is built on the installed version
and is newer.  docs/formats.md §13 and docs/protocol.md describe the flow.

Wire format (all little-endian)::

    0x00  4   magic "KDCU"
    0x04  u16 format version (1)
    0x06  u16 reserved (0)
    0x08  u32 KeyID
    0x0C  u32 number of page-state operations (n_ops)
    0x10  u64 version          (what this update makes the installed version)
    0x18  u64 base version     (the installed version it was built on)
    0x20  u32 number of control pages (n_pages)
    0x24  u32 reserved (0)
    0x28  n_ops   x 32 bytes   operations: u8 op, u8 perms, u16 reserved, u32 count (>= 1),
                               u64 gpa, u64 old hpa, u64 new hpa (NO_HPA when unused); one
                               entry covers ``count`` pages: gpa + i*4096 from old hpa +
                               i*4096 to new hpa + i*4096
          n_pages x 16 bytes   pages: u64 hpa, u8 type (3 VMCS, 4 EPT), 7 bytes reserved
          n_pages x 4096       the pages' ciphertext, encrypted under the domain key for
                               data physical address KeyID << 40 | hpa (as in DRAM)
          48                   tag: HMAC-SHA-384 over every byte before it, under a key
                               only the platform holds

Everything but the page contents is host-visible on purpose: the host must see
which pages it gets back (UNMAP), which of its pages the guest took (ACCEPT,
MOVE) and which pages become shared (SHARE).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from qemu_kd.formats.addresses import PAGE_SIZE
from qemu_kd.formats.errors import (
    FieldValueError,
    MagicError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    VersionError,
)

MAGIC = b"KDCU"
FORMAT_VERSION = 1
TAG_SIZE = 48
NO_HPA = (1 << 64) - 1
#: At most this many operations and control pages in one update.
MAX_OPS = 1 << 18
MAX_PAGES = 1024
MAX_OP_PAGES = 1 << 20
_HEADER = struct.Struct("<4sHHIIQQII")
_OP = struct.Struct("<BBHIQQQ")
_PAGE = struct.Struct("<QB7x")
PAGE_TYPE_VMCS = 3
PAGE_TYPE_EPT = 4


class Op(enum.IntEnum):
    """What an update does to one guest page (besides the new structures)."""

    UNMAP = 1     # balloon out: gpa no longer mapped; old hpa scrubbed and FREE again
    ACCEPT = 2    # balloon in: gpa mapped to the host's new hpa, accepted as zeros
    MOVE = 3      # relocate: gpa moves from old hpa to new hpa, contents re-encrypted
    SHARE = 4     # private -> shared: gpa's page becomes SHARED (plaintext to the host)
    UNSHARE = 5   # shared -> private: gpa's page becomes PRIVATE again, zeroed


@dataclass(frozen=True)
class PageOp:
    """One operation on ``count`` consecutive guest pages (and consecutive hpas)."""

    op: Op
    gpa: int
    old_hpa: int = NO_HPA
    new_hpa: int = NO_HPA
    count: int = 1
    perms: int = 0

    def pack(self) -> bytes:
        return _OP.pack(int(self.op), self.perms, 0, self.count, self.gpa, self.old_hpa, self.new_hpa)

    def pages(self) -> list[tuple[Op, int, int, int]]:
        """(op, gpa, old hpa, new hpa) of every page it covers."""
        step = [i * PAGE_SIZE for i in range(self.count)]
        return [(self.op, self.gpa + d, self.old_hpa if self.old_hpa == NO_HPA else self.old_hpa + d,
                 self.new_hpa if self.new_hpa == NO_HPA else self.new_hpa + d) for d in step]

    def as_json(self) -> dict:
        out = {"op": self.op.name.lower(), "gpa": self.gpa, "count": self.count}
        if self.old_hpa != NO_HPA:
            out["old_hpa"] = self.old_hpa
        if self.new_hpa != NO_HPA:
            out["new_hpa"] = self.new_hpa
        return out


def compress(pages: list[tuple[Op, int, int, int]]) -> list[PageOp]:
    """Runs of (op, gpa, old hpa, new hpa) pages where all three step by one page, in order."""
    ops: list[PageOp] = []
    for op, gpa, old, new in pages:
        if ops:
            last = ops[-1]
            d = last.count * PAGE_SIZE
            if (last.op == op and last.gpa + d == gpa
                    and (old == NO_HPA) == (last.old_hpa == NO_HPA) and (new == NO_HPA) == (last.new_hpa == NO_HPA)
                    and (old == NO_HPA or last.old_hpa + d == old) and (new == NO_HPA or last.new_hpa + d == new)):
                ops[-1] = PageOp(op, last.gpa, last.old_hpa, last.new_hpa, last.count + 1)
                continue
        ops.append(PageOp(op, gpa, old, new))
    return ops


def expand(ops: list[PageOp]) -> list[tuple[Op, int, int, int]]:
    return [page for op in ops for page in op.pages()]


@dataclass(frozen=True)
class ControlPage:
    hpa: int
    page_type: int
    ciphertext: bytes


@dataclass
class ControlUpdate:
    """One sealed update (see module docstring)."""

    keyid: int
    version: int
    base_version: int
    ops: list[PageOp] = field(default_factory=list)
    pages: list[ControlPage] = field(default_factory=list)
    tag: bytes = bytes(TAG_SIZE)

    def body(self) -> bytes:
        """Every byte the tag covers."""
        out = bytearray(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, self.keyid, len(self.ops), self.version,
                                     self.base_version, len(self.pages), 0))
        for op in self.ops:
            out += op.pack()
        for page in self.pages:
            out += _PAGE.pack(page.hpa, page.page_type)
        for page in self.pages:
            out += page.ciphertext
        return bytes(out)

    def pack(self) -> bytes:
        if len(self.tag) != TAG_SIZE:
            raise FieldValueError(f"a control-update tag is {TAG_SIZE} bytes, not {len(self.tag)}")
        return self.body() + self.tag

    @classmethod
    def unpack(cls, data: bytes) -> "ControlUpdate":
        """Parse strictly; the tag is not checked here (only the platform can)."""
        data = bytes(data)
        if len(data) < _HEADER.size + TAG_SIZE:
            raise TruncatedError(f"control update of {len(data)} bytes is shorter than its header and tag")
        magic, fmt, reserved, keyid, n_ops, version, base, n_pages, reserved2 = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise MagicError("not a control update (magic is not KDCU)")
        if fmt != FORMAT_VERSION:
            raise VersionError(f"control-update format {fmt} is not supported (expected {FORMAT_VERSION})")
        if reserved or reserved2:
            raise ReservedBitsError("control update: reserved header fields are not zero")
        if n_ops > MAX_OPS or n_pages > MAX_PAGES:
            raise OversizedError(f"control update lists {n_ops} operations and {n_pages} pages "
                                 f"(at most {MAX_OPS} and {MAX_PAGES})")
        size = _HEADER.size + n_ops * _OP.size + n_pages * (_PAGE.size + PAGE_SIZE) + TAG_SIZE
        if len(data) != size:
            raise TruncatedError(f"control update is {len(data)} bytes, its header announces {size}")
        pos = _HEADER.size
        ops = []
        for _ in range(n_ops):
            code, perms, r1, count, gpa, old, new = _OP.unpack_from(data, pos)
            pos += _OP.size
            if r1:
                raise ReservedBitsError("control update: an operation's reserved field is not zero")
            if not 1 <= count <= MAX_OP_PAGES or gpa + count * PAGE_SIZE > 1 << 48:
                raise FieldValueError(f"control update: an operation covers {count} pages from gpa 0x{gpa:x}")
            try:
                op = Op(code)
            except ValueError:
                raise FieldValueError(f"control update: unknown operation {code}") from None
            if gpa % PAGE_SIZE or (old != NO_HPA and old % PAGE_SIZE) or (new != NO_HPA and new % PAGE_SIZE):
                raise FieldValueError(f"control update: {op.name} of gpa 0x{gpa:x} names an unaligned address")
            ops.append(PageOp(op, gpa, old, new, count, perms))
        heads = []
        for _ in range(n_pages):
            hpa, page_type = _PAGE.unpack_from(data, pos)
            if data[pos + 9:pos + 16] != bytes(7):
                raise ReservedBitsError("control update: a page entry's reserved bytes are not zero")
            pos += _PAGE.size
            if page_type not in (PAGE_TYPE_VMCS, PAGE_TYPE_EPT) or hpa % PAGE_SIZE:
                raise FieldValueError(f"control update: page entry hpa 0x{hpa:x} type {page_type} is not "
                                      "a page-aligned VMCS or EPT page")
            heads.append((hpa, page_type))
        pages = []
        for hpa, page_type in heads:
            pages.append(ControlPage(hpa, page_type, data[pos:pos + PAGE_SIZE]))
            pos += PAGE_SIZE
        return cls(keyid, version, base, ops, pages, data[pos:pos + TAG_SIZE])

    def summary(self) -> dict:
        """The host-visible description (no page contents)."""
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.op.name.lower()] = counts.get(op.op.name.lower(), 0) + op.count
        return {"keyid": self.keyid, "version": self.version, "base_version": self.base_version,
                "ops": counts, "vmcs_pages": sum(p.page_type == PAGE_TYPE_VMCS for p in self.pages),
                "ept_pages": sum(p.page_type == PAGE_TYPE_EPT for p in self.pages)}
