"""Extended page tables: real x86 4-level EPT pages, built and walked.

Entry format (64 bits, little-endian; Intel SDM vol. 3, "EPT translation")::

    bit 0       read          bit 1  write          bit 2  execute
    bits 3..5   memory type   (leaf entries only: 0 UC, 1 WC, 4 WT, 5 WP, 6 WB)
    bit 6       ignore PAT    (leaf entries only)
    bit 7       large page    (PDPTE: 1 GiB, PDE: 2 MiB; reserved elsewhere)
    bits 12..45 physical address (MAXPHYADDR 46); bits 40..45 are the KeyID
                bits and must be 0 here: the platform applies the domain KeyID
    all other bits reserved (0) for qemu-kd

An entry with bits 0..2 clear is not present and must be all zero.  Write
without read is an EPT misconfiguration.  Non-leaf entries carry RWX, and
the effective permission of a page is the AND over all levels.

EPTP: bits 0..2 memory type (6 WB or 0 UC), bits 3..5 page-walk length - 1
(3), bits 12..45 PML4 address (KeyID bits 40..45 zero), everything else
reserved (accessed/dirty enable is not supported).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from qemu_kd.common.arrays import count_distinct
from qemu_kd.common.errors import KdError
from qemu_kd.formats.errors import FieldValueError, ReservedBitsError, require_length
from qemu_kd.formats.addresses import u64_array, PAGE_SIZE, KEYID_SHIFT, HPA_LIMIT

ENTRIES_PER_TABLE = 512
MAXPHYADDR = 46
GPA_LIMIT = 1 << 48  # 4-level EPT translates 48-bit guest-physical addresses

EPT_READ = 1 << 0
EPT_WRITE = 1 << 1
EPT_EXEC = 1 << 2
EPT_PERMS = EPT_READ | EPT_WRITE | EPT_EXEC
EPT_MEMTYPE_SHIFT = 3
EPT_IGNORE_PAT = 1 << 6
EPT_LARGE = 1 << 7
ADDRESS_MASK = ((1 << MAXPHYADDR) - 1) & ~(PAGE_SIZE - 1)
KEYID_ADDRESS_BITS = ((1 << MAXPHYADDR) - 1) & ~((1 << KEYID_SHIFT) - 1)

MEMTYPE_UC = 0
MEMTYPE_WB = 6
LEAF_MEMORY_TYPES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}
EPTP_MEMORY_TYPES = {MEMTYPE_UC: "UC", MEMTYPE_WB: "WB"}
PAGE_WALK_LENGTH = 4

LEVEL_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
# Bytes of guest-physical space one entry covers at each level.
LEVEL_SPAN = {4: 1 << 39, 3: 1 << 30, 2: 1 << 21, 1: 1 << 12}


class EptError(KdError):
    """The EPT cannot be built from the given mappings and table pages."""


def _perm_text(perms: int) -> str:
    return "".join(c if perms & b else "-" for c, b in (("r", EPT_READ), ("w", EPT_WRITE), ("x", EPT_EXEC)))


@dataclass(frozen=True)
class EptMapping:
    """One 4 KiB guest-physical page mapped to a host-physical page."""

    gpa: int
    hpa: int
    perms: int

    def __str__(self) -> str:
        return f"gpa 0x{self.gpa:x} -> hpa 0x{self.hpa:x} {_perm_text(self.perms)}"


@dataclass(frozen=True)
class EptEntry:
    """One decoded EPT entry (see module docstring for the bit layout)."""

    address: int = 0
    perms: int = 0
    memory_type: int = 0
    ignore_pat: bool = False
    large: bool = False

    @property
    def present(self) -> bool:
        return bool(self.perms)

    def pack(self) -> bytes:
        return struct.pack("<Q", self.raw())

    def raw(self) -> int:
        for name, value, bits in (("perms", self.perms, 3), ("memory type", self.memory_type, 3)):
            if not 0 <= value < 1 << bits:
                raise FieldValueError(f"EPT entry {name} {value!r} does not fit in {bits} bits")
        if self.address & ~ADDRESS_MASK or self.address < 0:
            raise FieldValueError(f"EPT entry address 0x{self.address:x} is not a page-aligned "
                                  f"{MAXPHYADDR}-bit physical address")
        return (self.address | self.perms | self.memory_type << EPT_MEMTYPE_SHIFT
                | (EPT_IGNORE_PAT if self.ignore_pat else 0) | (EPT_LARGE if self.large else 0))

    @classmethod
    def unpack(cls, data: bytes, level: int = 1) -> "EptEntry":
        """Decode one 8-byte entry of a table at ``level`` (4 = PML4 .. 1 = PT), strictly."""
        require_length("EPT entry", data, 8)
        (raw,) = struct.unpack("<Q", data)
        entry, problems = decode_entry(raw, level)
        for kind, message in problems:
            raise (ReservedBitsError if kind == "reserved" else FieldValueError)(f"EPT entry: {message}")
        return entry


def decode_entry(raw: int, level: int) -> tuple[EptEntry, list[tuple[str, str]]]:
    """Decode an entry; return it with (kind, message) problems, kind "reserved" or "value"."""
    if level not in LEVEL_NAMES:
        raise ValueError(f"EPT level must be 1..4, got {level}")
    problems: list[tuple[str, str]] = []
    perms = raw & EPT_PERMS
    large = bool(raw & EPT_LARGE) and level in (2, 3)
    leaf = level == 1 or large
    entry = EptEntry(address=raw & ADDRESS_MASK, perms=perms,
                     memory_type=(raw >> EPT_MEMTYPE_SHIFT) & 7 if leaf else 0,
                     ignore_pat=bool(raw & EPT_IGNORE_PAT) and leaf, large=large)
    if not perms:
        if raw:
            problems.append(("reserved", f"not-present entry has bits set (0x{raw:016x})"))
        return entry, problems
    allowed = EPT_PERMS | ADDRESS_MASK
    if leaf:
        allowed |= 7 << EPT_MEMTYPE_SHIFT | EPT_IGNORE_PAT
    if large:
        allowed |= EPT_LARGE
        allowed &= ~(LEVEL_SPAN[level] - 1) | (PAGE_SIZE - 1)  # address bits below the page size
    if raw & ~allowed:
        problems.append(("reserved", f"reserved bits 0x{raw & ~allowed:016x} are set in 0x{raw:016x}"))
    if raw & KEYID_ADDRESS_BITS:
        problems.append(("reserved", f"address 0x{raw & ADDRESS_MASK:x} has KeyID bits "
                                     f"{KEYID_SHIFT}..{MAXPHYADDR - 1} set"))
    if perms & EPT_WRITE and not perms & EPT_READ:
        problems.append(("value", f"write without read ({_perm_text(perms)}) is an EPT misconfiguration"))
    if leaf and entry.memory_type not in LEAF_MEMORY_TYPES:
        problems.append(("value", f"memory type {entry.memory_type} is reserved"))
    return entry, problems


@dataclass(frozen=True)
class Eptp:
    """The EPT pointer (VMCS field 0x201A)."""

    pml4_hpa: int
    memory_type: int = MEMTYPE_WB
    walk_length: int = PAGE_WALK_LENGTH

    def raw(self) -> int:
        if self.memory_type not in EPTP_MEMORY_TYPES:
            raise FieldValueError(f"EPTP memory type {self.memory_type} is not UC (0) or WB (6)")
        if self.walk_length != PAGE_WALK_LENGTH:
            raise FieldValueError(f"EPTP page-walk length {self.walk_length} is not 4")
        if self.pml4_hpa < 0 or self.pml4_hpa & ~ADDRESS_MASK or self.pml4_hpa >= HPA_LIMIT:
            raise FieldValueError(f"EPTP PML4 address 0x{self.pml4_hpa:x} is not a page-aligned hpa")
        return self.pml4_hpa | self.memory_type | (self.walk_length - 1) << 3

    def pack(self) -> bytes:
        return struct.pack("<Q", self.raw())

    @classmethod
    def from_raw(cls, raw: int) -> "Eptp":
        eptp, problems = decode_eptp(raw)
        for message in problems:
            raise ReservedBitsError(f"EPTP: {message}")
        return eptp

    @classmethod
    def unpack(cls, data: bytes) -> "Eptp":
        require_length("EPTP", data, 8)
        return cls.from_raw(struct.unpack("<Q", data)[0])


def decode_eptp(raw: int) -> tuple[Eptp, list[str]]:
    """Decode an EPTP value, returning it with a list of problems."""
    problems = []
    allowed = 7 | 7 << 3 | (ADDRESS_MASK & ~KEYID_ADDRESS_BITS)
    if raw & ~allowed:
        problems.append(f"reserved bits 0x{raw & ~allowed:016x} are set in 0x{raw:016x}")
    memory_type = raw & 7
    walk_length = ((raw >> 3) & 7) + 1
    if memory_type not in EPTP_MEMORY_TYPES:
        problems.append(f"memory type {memory_type} is not UC (0) or WB (6)")
    if walk_length != PAGE_WALK_LENGTH:
        problems.append(f"page-walk length {walk_length} is not 4")
    return Eptp(raw & ADDRESS_MASK & ~KEYID_ADDRESS_BITS, memory_type, walk_length), problems


def ept_table_pages_needed(gpas: Iterable[int]) -> int:
    """Number of table pages (PML4 + PDPTs + PDs + PTs) that map these 4 KiB gpas."""
    ordered = np.sort(u64_array(gpas if isinstance(gpas, np.ndarray) else list(gpas), "gpa", EptError))
    if not ordered.size:
        return 1
    distinct = (1 + int(np.count_nonzero(np.diff(ordered >> np.uint64(shift)))) for shift in (39, 30, 21))
    return 1 + sum(distinct)


def _check_mapping(m: EptMapping) -> None:
    if m.gpa < 0 or m.gpa % PAGE_SIZE or m.gpa >= GPA_LIMIT:
        raise EptError(f"gpa 0x{m.gpa:x} is not a page-aligned 48-bit guest-physical address")
    if m.hpa < 0 or m.hpa % PAGE_SIZE or m.hpa >= HPA_LIMIT:
        raise EptError(f"hpa 0x{m.hpa:x} is not a page-aligned host-physical address below 1 TiB")
    if not 0 < m.perms <= EPT_PERMS:
        raise EptError(f"{m}: permissions must be a non-empty combination of EPT_READ/WRITE/EXEC")
    if m.perms & EPT_WRITE and not m.perms & EPT_READ:
        raise EptError(f"{m}: write without read is an EPT misconfiguration")


def build_ept(mappings: Iterable[EptMapping], table_hpas: Sequence[int]) -> tuple[int, dict[int, bytes]]:
    """Build 4-level EPT pages mapping every gpa to its hpa with 4 KiB leaves.

    Table pages are taken from ``table_hpas`` in order: the PML4 first, then,
    walking the mappings in gpa order, each PDPT, PD and PT when first needed
    (the same order :func:`walk_ept` reports them in).  Leaves use memory type
    WB; non-leaf entries grant RWX.  Returns ``(eptp, {table_hpa: page})``.
    """
    ordered = sorted(mappings, key=lambda m: m.gpa)
    for m in ordered:
        _check_mapping(m)
    return build_ept_arrays([m.gpa for m in ordered], [m.hpa for m in ordered],
                            [m.perms for m in ordered], table_hpas)


def build_ept_arrays(gpas, hpas, perms, table_hpas: Sequence[int]) -> tuple[int, dict[int, bytes]]:
    """:func:`build_ept` for parallel arrays of gpas, hpas and perms (any order).

    The same checks and the same output as :func:`build_ept`, vectorised, so a
    256 MiB guest (65 536 mappings) takes milliseconds rather than a second.
    """
    gpa_arr, hpa_arr = u64_array(gpas, "gpa", EptError), u64_array(hpas, "hpa", EptError)
    perm_arr = u64_array(perms, "perms", EptError)
    if not gpa_arr.size == hpa_arr.size == perm_arr.size:
        raise EptError("gpa, hpa and perms lists have different lengths")
    order = np.argsort(gpa_arr, kind="stable")
    gpa_arr, hpa_arr, perm_arr = gpa_arr[order], hpa_arr[order], perm_arr[order]

    def first_bad(mask: np.ndarray) -> EptMapping:
        i = int(np.argmax(mask))
        return EptMapping(int(gpa_arr[i]), int(hpa_arr[i]), int(perm_arr[i]))

    page = np.uint64(PAGE_SIZE - 1)
    bad = ((gpa_arr & page) != 0) | (gpa_arr >= np.uint64(GPA_LIMIT))
    if bad.any():
        raise EptError(f"gpa 0x{first_bad(bad).gpa:x} is not a page-aligned 48-bit guest-physical address")
    bad = ((hpa_arr & page) != 0) | (hpa_arr >= np.uint64(HPA_LIMIT))
    if bad.any():
        raise EptError(f"hpa 0x{first_bad(bad).hpa:x} is not a page-aligned host-physical address below 1 TiB")
    bad = (perm_arr == 0) | (perm_arr > np.uint64(EPT_PERMS))
    if bad.any():
        raise EptError(f"{first_bad(bad)}: permissions must be a non-empty combination of "
                       "EPT_READ/WRITE/EXEC")
    bad = ((perm_arr & np.uint64(EPT_WRITE)) != 0) & ((perm_arr & np.uint64(EPT_READ)) == 0)
    if bad.any():
        raise EptError(f"{first_bad(bad)}: write without read is an EPT misconfiguration")
    dup = np.flatnonzero(gpa_arr[1:] == gpa_arr[:-1])
    if dup.size:
        raise EptError(f"gpa 0x{int(gpa_arr[dup[0]]):x} is mapped twice", "give each gpa exactly one hpa")

    pt_prefix = gpa_arr >> np.uint64(21)
    needed = 1 + sum(count_distinct(gpa_arr >> np.uint64(shift)) for shift in (39, 30, 21))
    if len(table_hpas) < needed:
        raise EptError(f"the EPT needs {needed} table pages but only {len(table_hpas)} hpas were given",
                       "allocate more pages for the EPT (see ept_table_pages_needed)")
    used = [int(h) for h in table_hpas[:needed]]
    for hpa in used:
        if hpa < 0 or hpa % PAGE_SIZE or hpa >= HPA_LIMIT:
            raise EptError(f"EPT table hpa 0x{hpa:x} is not a page-aligned host-physical address")
    if len(set(used)) != len(used):
        raise EptError("the same hpa is given twice for EPT table pages")
    clash = np.isin(hpa_arr, np.array(used, dtype=np.uint64))
    if clash.any():
        raise EptError(f"hpa 0x{int(np.min(hpa_arr[clash])):x} is both an EPT table page and mapped "
                       "into the guest")

    free = iter(used)
    pml4_hpa = next(free)
    tables: dict[int, np.ndarray] = {pml4_hpa: np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)}
    children: dict[tuple[int, int], int] = {}  # (level of the child table, gpa prefix) -> hpa

    def child(parent_hpa: int, level: int, gpa: int) -> int:
        key = (level - 1, gpa >> (12 + 9 * (level - 1)))
        if key not in children:
            hpa = next(free)
            tables[hpa] = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
            children[key] = hpa
            index = (gpa >> (12 + 9 * (level - 1))) & 511
            tables[parent_hpa][index] = EptEntry(hpa, EPT_PERMS).raw()
        return children[key]

    leaves = hpa_arr | perm_arr | np.uint64(MEMTYPE_WB << EPT_MEMTYPE_SHIFT)
    slots = ((gpa_arr >> np.uint64(12)) & np.uint64(511)).astype(np.intp)
    # Mappings are sorted by gpa, so each page table's leaves are one contiguous run.
    starts = np.flatnonzero(np.concatenate(([True], pt_prefix[1:] != pt_prefix[:-1]))) if gpa_arr.size \
        else np.zeros(0, dtype=np.intp)
    ends = np.append(starts[1:], gpa_arr.size)
    for s, e in zip(starts.tolist(), ends.tolist()):
        table = pml4_hpa
        gpa = int(gpa_arr[s])
        for level in (4, 3, 2):
            table = child(table, level, gpa)
        tables[table][slots[s:e]] = leaves[s:e]
    return Eptp(pml4_hpa).raw(), {hpa: page.astype("<u8").tobytes() for hpa, page in tables.items()}


_EMPTY = np.zeros(0, dtype=np.uint64)
#: Bits a 4 KiB leaf (PTE) may have set: permissions, address, memory type, ignore-PAT.
_PTE_ALLOWED = EPT_PERMS | ADDRESS_MASK | 7 << EPT_MEMTYPE_SHIFT | EPT_IGNORE_PAT
_LEAF_TYPES = np.array(sorted(LEAF_MEMORY_TYPES), dtype=np.uint64)


@dataclass
class EptWalk:
    """What walking an EPT found: mappings (4 KiB granularity), tables, problems.

    The mappings are parallel arrays ``gpas``, ``hpas`` and ``perms`` (uint64, in walk
    order); :attr:`mappings` gives them as :class:`EptMapping` objects.
    """

    table_hpas: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    gpas: np.ndarray = field(default_factory=lambda: _EMPTY)
    hpas: np.ndarray = field(default_factory=lambda: _EMPTY)
    perms: np.ndarray = field(default_factory=lambda: _EMPTY)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def mappings(self) -> list[EptMapping]:
        return [EptMapping(g, h, p) for g, h, p in zip(self.gpas.tolist(), self.hpas.tolist(),
                                                        self.perms.tolist())]


def _clean_ptes(raws: np.ndarray) -> bool:
    """Whether every non-zero PTE in ``raws`` is one :func:`decode_entry` finds no problem in."""
    perms = raws & np.uint64(EPT_PERMS)
    memtype = (raws >> np.uint64(EPT_MEMTYPE_SHIFT)) & np.uint64(7)
    write_only = ((perms & np.uint64(EPT_WRITE)) != 0) & ((perms & np.uint64(EPT_READ)) == 0)
    return bool((perms != 0).all() and not (raws & np.uint64(~_PTE_ALLOWED & (2**64 - 1))).any()
                and not (raws & np.uint64(KEYID_ADDRESS_BITS)).any() and not write_only.any()
                and np.isin(memtype, _LEAF_TYPES).all())


def walk_ept(eptp: int, read_page: Callable[[int], bytes]) -> EptWalk:
    """Walk the EPT rooted at ``eptp``, reading table pages through ``read_page(hpa)``.

    Bad content never raises: every entry with reserved bits, a misconfigured
    permission or memory type, a table referenced twice or a leaf that maps an
    EPT table page is reported in ``problems`` with its location, and the
    offending entry is not followed.  Large pages are expanded into 4 KiB
    mappings.  Only exceptions from ``read_page`` propagate.
    """
    walk = EptWalk()
    pointer, problems = decode_eptp(eptp)
    walk.problems += [f"EPTP 0x{eptp:x}: {p}" for p in problems]
    if pointer.walk_length != PAGE_WALK_LENGTH or eptp & KEYID_ADDRESS_BITS:
        return walk
    visited: set[int] = set()
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(gpas: np.ndarray, hpas: np.ndarray, perms: np.ndarray) -> None:
        if gpas.size:
            chunks.append((gpas.astype(np.uint64), hpas.astype(np.uint64), perms.astype(np.uint64)))

    def visit(table_hpa: int, level: int, gpa_base: int, perms: int) -> None:
        if table_hpa in visited:
            walk.problems.append(f"{LEVEL_NAMES[level][:-1]} table at hpa 0x{table_hpa:x} "
                                 "is referenced more than once")
            return
        visited.add(table_hpa)
        walk.table_hpas.append(table_hpa)
        page = read_page(table_hpa)
        if len(page) != PAGE_SIZE:
            walk.problems.append(f"table at hpa 0x{table_hpa:x} read back {len(page)} bytes, not {PAGE_SIZE}")
            return
        raws = np.frombuffer(page, dtype="<u8")
        if level == 1:
            # A page table whose entries are all well formed (the usual case) in one step;
            # any other goes entry by entry below, for the exact problems.
            present = np.flatnonzero(raws)
            leaves = raws[present]
            if _clean_ptes(leaves):
                effective = leaves & np.uint64(perms & EPT_PERMS)
                keep = effective != 0
                add(np.uint64(gpa_base) + present[keep].astype(np.uint64) * np.uint64(PAGE_SIZE),
                    leaves[keep] & np.uint64(ADDRESS_MASK), effective[keep])
                return
        for index in np.flatnonzero(raws).tolist():
            raw = int(raws[index])
            gpa = gpa_base + index * LEVEL_SPAN[level]
            entry, issues = decode_entry(raw, level)
            if issues:
                where = f"{LEVEL_NAMES[level]} {index} in table at hpa 0x{table_hpa:x} (gpa 0x{gpa:x})"
                walk.problems += [f"{where}: {message}" for _, message in issues]
                continue
            effective = perms & entry.perms
            if level == 1 or entry.large:
                if effective:
                    offsets = np.arange(0, LEVEL_SPAN[level], PAGE_SIZE, dtype=np.uint64)
                    add(np.uint64(gpa) + offsets, np.uint64(entry.address) + offsets,
                        np.full(offsets.size, effective, dtype=np.uint64))
            else:
                visit(entry.address, level - 1, gpa, effective)

    visit(pointer.pml4_hpa, 4, 0, EPT_PERMS)
    if chunks:
        walk.gpas, walk.hpas, walk.perms = (np.concatenate([c[i] for c in chunks]) for i in range(3))
    tables = np.array(sorted(set(walk.table_hpas)), dtype=np.uint64)
    for i in np.flatnonzero(np.isin(walk.hpas, tables)).tolist():
        m = EptMapping(int(walk.gpas[i]), int(walk.hpas[i]), int(walk.perms[i]))
        walk.problems.append(f"{m}: maps an EPT table page into the guest")
    return walk


def mapping_digest(mappings: Iterable[EptMapping]) -> bytes:
    """SHA-384 over "KDEPTMAP" and (u64 gpa, u64 hpa, u64 perms) records in gpa order."""
    h = hashlib.sha384(b"KDEPTMAP")
    for m in sorted(mappings, key=lambda m: (m.gpa, m.hpa, m.perms)):
        h.update(struct.pack("<QQQ", m.gpa, m.hpa, m.perms))
    return h.digest()


def mapping_digest_arrays(gpas, hpas, perms) -> bytes:
    """:func:`mapping_digest` of parallel arrays (the same bytes, vectorised)."""
    gpa_arr, hpa_arr = u64_array(gpas, "gpa", EptError), u64_array(hpas, "hpa", EptError)
    perm_arr = u64_array(perms, "perms", EptError)
    if not gpa_arr.size == hpa_arr.size == perm_arr.size:
        raise EptError("gpa, hpa and perms lists have different lengths")
    order = np.lexsort((perm_arr, hpa_arr, gpa_arr))
    records = np.stack([gpa_arr[order], hpa_arr[order], perm_arr[order]], axis=1).astype("<u8")
    return hashlib.sha384(b"KDEPTMAP" + records.tobytes()).digest()
