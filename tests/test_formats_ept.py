import struct

import pytest
from hypothesis import given, settings, strategies as st

from qemu_kd.formats.ept import (
    EPT_EXEC,
    EPT_IGNORE_PAT,
    EPT_LARGE,
    EPT_READ,
    EPT_WRITE,
    EptEntry,
    EptError,
    EptMapping,
    Eptp,
    build_ept,
    ept_table_pages_needed,
    mapping_digest,
    walk_ept,
)
from qemu_kd.formats.errors import FieldValueError, OversizedError, ReservedBitsError, TruncatedError

RW = EPT_READ | EPT_WRITE
RWX = RW | EPT_EXEC
GiB = 1 << 30


def table_hpas(n, base=0x100000000):
    return [base + 0x1000 * i for i in range(n)]


def boundary_mappings():
    """4 KiB pages on both sides of PT, PD, PDPT and PML4 boundaries."""
    gpas = [0x0, 0x1000, 0x1FF000, 0x200000, 0x3FFFF000, 0x40000000,
            (1 << 39) - 0x1000, 1 << 39, (1 << 39) + 0x200000, (5 << 39) + 0x7FE00000]
    return [EptMapping(gpa, 0x200000 + 0x3000 * i, [EPT_READ, RW, RWX, EPT_READ | EPT_EXEC][i % 4])
            for i, gpa in enumerate(gpas)]


def test_build_and_walk_across_boundaries():
    maps = boundary_mappings()
    need = ept_table_pages_needed(m.gpa for m in maps)
    # 1 PML4, PDPTs for 3 PML4 slots, PDs for 5 1-GiB slots, PTs for 8 2-MiB slots.
    assert need == 1 + 3 + 5 + 8
    hpas = table_hpas(need)
    eptp, pages = build_ept(list(reversed(maps)), hpas)
    assert set(pages) == set(hpas) and all(len(p) == 4096 for p in pages.values())
    assert eptp == hpas[0] | 6 | 3 << 3
    walk = walk_ept(eptp, pages.__getitem__)
    assert walk.problems == []
    assert walk.mappings == sorted(maps, key=lambda m: m.gpa)
    assert walk.table_hpas == hpas                    # same order as the builder used them
    assert mapping_digest(walk.mappings) == mapping_digest(maps)


def test_leaf_entry_bits():
    eptp, pages = build_ept([EptMapping(0x5000, 0xABC000, EPT_READ | EPT_EXEC)], table_hpas(4))
    pt = pages[table_hpas(4)[3]]
    (raw,) = struct.unpack_from("<Q", pt, 8 * 5)
    assert raw == 0xABC000 | EPT_READ | EPT_EXEC | 6 << 3
    (pml4e,) = struct.unpack_from("<Q", pages[table_hpas(4)[0]], 0)
    assert pml4e == table_hpas(4)[1] | RWX


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(min_value=0, max_value=(1 << 36) - 1),
                       st.sampled_from([EPT_READ, RW, RWX, EPT_READ | EPT_EXEC, EPT_EXEC]),
                       min_size=0, max_size=40))
def test_round_trip_random_layouts(pages_by_gpn):
    maps = [EptMapping(gpn << 12, 0x1000000 + (i << 12), perms)
            for i, (gpn, perms) in enumerate(sorted(pages_by_gpn.items()))]
    hpas = table_hpas(ept_table_pages_needed(m.gpa for m in maps))
    eptp, pages = build_ept(maps, hpas)
    walk = walk_ept(eptp, pages.__getitem__)
    assert walk.ok
    assert walk.mappings == maps


def test_large_pages_expand():
    pml4, pdpt, pd = 0x10000, 0x11000, 0x12000
    tables = {pml4: bytearray(4096), pdpt: bytearray(4096), pd: bytearray(4096)}
    struct.pack_into("<Q", tables[pml4], 0, pdpt | RWX)
    struct.pack_into("<Q", tables[pdpt], 0, pd | RWX)
    struct.pack_into("<Q", tables[pd], 8 * 3, 0x40000000 | EPT_LARGE | 6 << 3 | RW)   # 2 MiB at gpa 6 MiB
    struct.pack_into("<Q", tables[pdpt], 8 * 2, 0x80000000 | EPT_LARGE | 6 << 3 | EPT_READ)  # 1 GiB at 2 GiB
    walk = walk_ept(Eptp(pml4).raw(), lambda hpa: bytes(tables[hpa]))
    assert walk.problems == []
    two_mib = [m for m in walk.mappings if m.gpa < GiB]
    assert len(two_mib) == 512
    assert two_mib[0] == EptMapping(0x600000, 0x40000000, RW)
    assert two_mib[-1] == EptMapping(0x7FF000, 0x401FF000, RW)
    one_gib = [m for m in walk.mappings if m.gpa >= GiB]
    assert len(one_gib) == 1 << 18
    assert one_gib[1] == EptMapping(2 * GiB + 0x1000, 0x80001000, EPT_READ)


def test_permissions_are_anded_across_levels():
    eptp, pages = build_ept([EptMapping(0, 0x9000, RWX)], table_hpas(4))
    pages = {k: bytearray(v) for k, v in pages.items()}
    pml4 = table_hpas(4)[0]
    struct.pack_into("<Q", pages[pml4], 0, table_hpas(4)[1] | EPT_READ)
    walk = walk_ept(eptp, lambda hpa: bytes(pages[hpa]))
    assert walk.mappings == [EptMapping(0, 0x9000, EPT_READ)]


def _walk_with(entry_level, index, raw):
    """Build a small EPT, overwrite one entry, walk it."""
    hpas = table_hpas(4)
    eptp, pages = build_ept([EptMapping(0x3000, 0x9000, RW)], hpas)
    pages = {k: bytearray(v) for k, v in pages.items()}
    table = hpas[4 - entry_level]
    struct.pack_into("<Q", pages[table], 8 * index, raw)
    return walk_ept(eptp, lambda hpa: bytes(pages[hpa]))


@pytest.mark.parametrize("level,index,raw,needle", [
    (1, 3, 0x9000 | RW | 6 << 3 | 1 << 8, "reserved bits"),       # accessed flag
    (1, 3, 0x9000 | RW | 6 << 3 | 1 << 50, "reserved bits"),      # above MAXPHYADDR
    (1, 3, 0x9000 | RW | 6 << 3 | EPT_LARGE, "reserved bits"),    # bit 7 in a PTE
    (1, 3, 0x9000 | RW | 2 << 3, "memory type 2"),
    (1, 3, 0x9000 | EPT_WRITE | 6 << 3, "write without read"),
    (1, 3, (1 << 41) | 0x9000 | RW | 6 << 3, "KeyID"),
    (1, 7, 0x1000 << 12, "not-present entry"),
    (4, 0, 0x100000000 + 0x1000 | RWX | 6 << 3, "reserved bits"),    # memory type in a non-leaf entry
    (4, 0, 0x100000000 + 0x1000 | RWX | EPT_LARGE, "reserved bits"),  # large bit in a PML4E
    (2, 0, 0x201000 | RW | EPT_LARGE | 6 << 3, "reserved bits"),      # misaligned 2 MiB page
])
def test_reserved_and_misconfigured_entries_reported(level, index, raw, needle):
    walk = _walk_with(level, index, raw)
    assert walk.problems, "expected a problem"
    assert any(needle in p for p in walk.problems), walk.problems
    assert any("hpa 0x" in p for p in walk.problems)


def test_loops_and_self_maps_reported():
    hpas = table_hpas(4)
    # A PT entry that maps the PML4 page into the guest.
    walk = _walk_with(1, 4, hpas[0] | RW | 6 << 3)
    assert any("maps an EPT table page" in p for p in walk.problems)
    # A PDPT entry pointing back at the PML4: a loop, reported, not followed forever.
    walk = _walk_with(3, 1, hpas[0] | RWX)
    assert any("more than once" in p for p in walk.problems)


def test_bad_eptp_reported_not_raised():
    walk = walk_ept(0x1000 | 6 | 2 << 3, lambda hpa: bytes(4096))   # 3-level walk
    assert walk.mappings == [] and any("page-walk length" in p for p in walk.problems)
    walk = walk_ept(0x1000 | 6 | 3 << 3 | 1 << 6, lambda hpa: bytes(4096))  # A/D enable
    assert any("reserved bits" in p for p in walk.problems)
    walk = walk_ept(0x1000 | 6 | 3 << 3, lambda hpa: b"short")
    assert any("read back 5 bytes" in p for p in walk.problems)


def test_read_page_errors_propagate():
    def boom(hpa):
        raise OSError("device gone")
    with pytest.raises(OSError):
        walk_ept(Eptp(0x1000).raw(), boom)


def test_build_errors():
    maps = [EptMapping(0, 0x9000, RW), EptMapping(1 << 30, 0xA000, RW)]
    with pytest.raises(EptError, match="needs 6 table pages"):
        build_ept(maps, table_hpas(5))
    with pytest.raises(EptError, match="mapped twice"):
        build_ept([EptMapping(0, 0x9000, RW), EptMapping(0, 0xA000, RW)], table_hpas(4))
    with pytest.raises(EptError, match="write without read"):
        build_ept([EptMapping(0, 0x9000, EPT_WRITE)], table_hpas(4))
    with pytest.raises(EptError, match="both an EPT table page"):
        build_ept([EptMapping(0, 0x9000, RW)], [0x9000, 0xA000, 0xB000, 0xC000])
    with pytest.raises(EptError, match="not a page-aligned"):
        build_ept([EptMapping(0x10, 0x9000, RW)], table_hpas(4))


@given(st.integers(min_value=0, max_value=(1 << 28) - 1).map(lambda n: n << 12),
       st.integers(min_value=1, max_value=7).filter(lambda p: p not in (2, 6)),
       st.sampled_from([0, 1, 4, 5, 6]), st.booleans())
def test_entry_round_trip(address, perms, memtype, ignore_pat):
    e = EptEntry(address, perms, memtype, ignore_pat)
    assert EptEntry.unpack(e.pack(), level=1) == e


@given(st.integers(min_value=0, max_value=(1 << 28) - 1).map(lambda n: n << 12),
       st.sampled_from([0, 6]))
def test_eptp_round_trip(address, memtype):
    p = Eptp(address, memtype)
    assert Eptp.unpack(p.pack()) == p


def test_entry_and_eptp_negative():
    good = EptEntry(0x5000, RW, 6).pack()
    with pytest.raises(TruncatedError):
        EptEntry.unpack(good[:7])
    with pytest.raises(OversizedError):
        EptEntry.unpack(good + b"\0")
    with pytest.raises(ReservedBitsError):
        EptEntry.unpack(struct.pack("<Q", 0x5000 | RW | 6 << 3 | 1 << 9))
    with pytest.raises(FieldValueError):
        EptEntry.unpack(struct.pack("<Q", 0x5000 | EPT_WRITE | 6 << 3))
    with pytest.raises(ReservedBitsError):
        Eptp.unpack(struct.pack("<Q", 0x5000 | 6 | 3 << 3 | 1 << 7))
    with pytest.raises(ReservedBitsError):
        Eptp.unpack(struct.pack("<Q", 0x5000 | 6 | 1 << 3))
    assert EptEntry(0x5000, RW, 6, ignore_pat=True).raw() & EPT_IGNORE_PAT


def test_array_builder_and_digest_match_the_mapping_versions():
    import numpy as np
    from qemu_kd.formats.ept import build_ept_arrays, mapping_digest_arrays
    maps = boundary_mappings()
    hpas = table_hpas(ept_table_pages_needed(m.gpa for m in maps))
    shuffled = list(reversed(maps))
    by_arrays = build_ept_arrays(np.array([m.gpa for m in shuffled], dtype=np.uint64),
                                 [m.hpa for m in shuffled], [m.perms for m in shuffled], hpas)
    assert by_arrays == build_ept(maps, hpas)
    assert mapping_digest_arrays([m.gpa for m in shuffled], [m.hpa for m in shuffled],
                                 [m.perms for m in shuffled]) == mapping_digest(maps)
    with pytest.raises(EptError, match="write without read"):
        build_ept_arrays([0], [0x9000], [EPT_WRITE], table_hpas(4))
    with pytest.raises(EptError, match="mapped twice"):
        build_ept_arrays([0, 0], [0x9000, 0xA000], [RW, RW], table_hpas(4))
    with pytest.raises(EptError, match="different lengths"):
        build_ept_arrays([0, 0x1000], [0x9000], [RW], table_hpas(4))


def test_a_bad_pte_is_reported_and_its_good_neighbours_still_map():
    """A page table with one malformed entry is walked entry by entry: the same mappings as the
    whole-table path for the rest, and the one problem."""
    hpas = table_hpas(4)
    good = [EptMapping(i * 0x1000, 0x100000 + i * 0x1000, RW) for i in range(16)]
    eptp, pages = build_ept(good, hpas)
    assert walk_ept(eptp, pages.__getitem__).mappings == good and not walk_ept(eptp, pages.__getitem__).problems
    pages = {k: bytearray(v) for k, v in pages.items()}
    struct.pack_into("<Q", pages[hpas[3]], 8 * 5, 0x105000 | RW | 6 << 3 | 1 << 8)   # accessed flag
    walk = walk_ept(eptp, lambda hpa: bytes(pages[hpa]))
    assert walk.mappings == good[:5] + good[6:]
    assert len(walk.problems) == 1 and "PTE 5" in walk.problems[0]
