"""Host-physical memory: the sparse DRAM file, the ownership table and the host access rules."""

import numpy as np
import pytest

from qemu_kd.formats.measurement import PageType
from qemu_kd.platform.physmem import (
    AddressError,
    HostKeyIdError,
    OwnershipError,
    PageInUseError,
    PageOwner,
    PageState,
    PhysicalMemory,
    PhysicalMemoryError,
)

PAGE = 4096
SIZE = 64 << 20


@pytest.fixture
def mem(tmp_path):
    m = PhysicalMemory(SIZE, tmp_path / "dram")
    yield m
    m.close()


def test_dram_file_is_unlinked_once_mapped(tmp_path):
    m = PhysicalMemory(SIZE, tmp_path)             # a directory: the file goes inside
    path = tmp_path / "dram"
    assert m.path == path and m.npages == SIZE // PAGE
    assert not path.exists()                        # only the mapping holds DRAM: it dies with us
    with open("/proc/self/maps") as maps:
        assert any(line.rstrip().endswith(f"{path} (deleted)") for line in maps)
    m.write_pages([0x1000], b"\x5a" * PAGE)
    assert m.read_pages([0x1000]).tobytes() == b"\x5a" * PAGE
    m.close()
    m.close()                                       # idempotent


def test_bad_sizes_and_existing_file_are_clear_errors(tmp_path):
    for size in (0, 4095, -PAGE, 1 << 41):
        with pytest.raises(AddressError):
            PhysicalMemory(size, tmp_path / "x")
    (tmp_path / "taken").write_bytes(b"")
    with pytest.raises(PhysicalMemoryError, match="already exists"):
        PhysicalMemory(PAGE, tmp_path / "taken")


def test_ownership_transitions(mem):
    hpas = [0x3000, 0x1000, 0x2000]
    claimed = mem.claim_for_host(hpas, 5)
    assert sorted(claimed.tolist()) == sorted(hpas)
    assert mem.owner(0x1000) == PageOwner(PageState.HOST, 5)
    mem.assign_private([0x1000, 0x2000], 5, np.array([PageType.IMAGE, PageType.VMCS], dtype=np.uint8))
    assert mem.owner(0x2000) == PageOwner(PageState.PRIVATE, 5, PageType.VMCS)
    assert str(mem.owner(0x2000)) == "PRIVATE (key domain 5, VMCS)"
    mem.assign_shared([0x3000], 5)
    assert mem.owner(0x3000).state == PageState.SHARED
    assert mem.pages_owned_by(5).tolist() == [0x1000, 0x2000, 0x3000]
    assert mem.pages_owned_by(5, PageState.PRIVATE, PageType.IMAGE).tolist() == [0x1000]
    assert mem.release_keyid(5) == 3
    assert mem.owner(0x2000) == PageOwner(PageState.FREE)
    assert mem.count_free() == mem.npages


def test_claims_and_assignments_are_all_or_nothing(mem):
    mem.claim_for_host([0x5000], 1)
    with pytest.raises(PageInUseError, match="hpa 0x5000 is in use: HOST"):
        mem.claim_for_host([0x4000, 0x5000], 2)
    assert mem.owner(0x4000).state == PageState.FREE
    with pytest.raises(OwnershipError, match="not HOST \\(allocated for KeyID 2\\)"):
        mem.assign_private([0x5000], 2, PageType.IMAGE)
    with pytest.raises(OwnershipError, match="hpa 0x4000 is FREE"):
        mem.assign_private([0x5000, 0x4000], 1, PageType.IMAGE)
    assert mem.owner(0x5000).state == PageState.HOST


def test_address_errors(mem):
    with pytest.raises(AddressError, match="not aligned"):
        mem.claim_for_host([0x1800], 1)
    with pytest.raises(AddressError, match="beyond the end"):
        mem.claim_for_host([SIZE], 1)
    with pytest.raises(AddressError, match="more than once"):
        mem.claim_for_host([0x1000, 0x1000], 1)
    with pytest.raises(AddressError, match="KeyID 0"):
        mem.claim_for_host([0x1000], 0)
    with pytest.raises(AddressError, match="KeyID 64"):
        mem.claim_for_host([0x1000], 64)
    with pytest.raises(AddressError, match="runs past the end"):
        mem.host_read(SIZE - 8, 16)
    with pytest.raises(AddressError):
        mem.host_read(-1, 1)
    with pytest.raises(PageInUseError, match="free pages left"):
        mem.find_free(mem.npages + 1)


def test_find_free_gives_lowest_pages(mem):
    mem.claim_for_host([0x0, 0x2000], 3)
    assert mem.find_free(3).tolist() == [0x1000, 0x3000, 0x4000]


def test_host_access_only_with_keyid_zero(mem):
    mem.claim_for_host([0x1000], 1)
    mem.host_write(0x1000, b"plain")
    assert mem.host_read(0x1000, 5) == b"plain"
    for keyid in (1, 63):
        dpa = keyid << 40 | 0x1000
        with pytest.raises(HostKeyIdError, match=f"KeyID {keyid} refused"):
            mem.host_read(dpa, 5)
        with pytest.raises(HostKeyIdError):
            mem.host_write(dpa, b"x")
        with pytest.raises(HostKeyIdError):
            mem.host_read_pages([dpa])
        with pytest.raises(HostKeyIdError):
            mem.host_write_pages([0x1000, dpa], bytes(2 * PAGE))
    assert mem.host_read(0x1000, 5) == b"plain"


def test_host_writes_need_an_allocated_page(mem):
    with pytest.raises(OwnershipError, match="FREE"):
        mem.host_write(0x7000, b"x")
    mem.claim_for_host([0x7000], 2)
    # A write spanning into a FREE page is refused as a whole.
    with pytest.raises(OwnershipError, match="hpa 0x8000 refused: the page is FREE"):
        mem.host_write(0x7FFE, b"abcd")
    assert mem.host_read(0x7FFE, 2) == b"\0\0"
    assert mem.host_read(0x9000, 4) == b"\0\0\0\0"     # reads of FREE pages see zeros


def test_gather_and_scatter_keep_order(mem):
    hpas = [0x9000, 0x2000, 0x5000]
    mem.claim_for_host(hpas, 4)
    data = b"".join(bytes([i + 1]) * PAGE for i in range(3))
    mem.host_write_pages(hpas, data)
    assert mem.host_read_pages(hpas) == data
    assert mem.host_read(0x2000, 1) == b"\x02"
    assert mem.read_pages([0x5000, 0x9000]).tobytes() == bytes([3]) * PAGE + bytes([1]) * PAGE
    with pytest.raises(AddressError, match="bytes of page data"):
        mem.host_write_pages(hpas, data[:-1])


def test_private_pages_writable_only_until_locked(mem):
    mem.claim_for_host([0x1000, 0x2000], 7)
    mem.host_write_pages([0x1000], b"c" * PAGE)
    mem.assign_private([0x1000, 0x2000], 7, PageType.IMAGE)
    mem.host_write(0x1000, b"still building")          # allowed before the lock
    assert mem.host_written([0x1000, 0x2000]).tolist() == [True, False]
    mem.set_write_locked(7, True)
    before = mem.host_read(0x1000, PAGE)
    with pytest.raises(OwnershipError, match="PRIVATE IMAGE page of key domain 7"):
        mem.host_write(0x1000, b"after launch")
    with pytest.raises(OwnershipError):
        mem.host_write_pages([0x2000], bytes(PAGE))
    assert mem.integrity_events == 2
    assert [(e.dpa, e.keyid, e.page_type) for e in mem.integrity_log] == [
        (0x1000, 7, PageType.IMAGE), (0x2000, 7, PageType.IMAGE)]
    assert mem.host_read(0x1000, PAGE) == before          # host reads still return what DRAM holds
    # Other domains are unaffected by domain 7's lock.
    mem.claim_for_host([0x3000], 8)
    mem.assign_private([0x3000], 8, PageType.IMAGE)
    mem.host_write(0x3000, b"ok")
    assert mem.integrity_events == 2


def test_release_scrubs_pages(mem):
    hpas = [0x10000 + PAGE * i for i in range(4)] + [0x40000]
    mem.claim_for_host(hpas, 9)
    mem.host_write_pages(hpas, b"\xAA" * (PAGE * len(hpas)))
    mem.assign_private(hpas[:2], 9, PageType.IMAGE)
    mem.set_write_locked(9, True)
    assert mem.release_keyid(9) == len(hpas)
    assert mem.host_read_pages(hpas) == bytes(PAGE * len(hpas))
    assert not mem.is_write_locked(9)
    mem.claim_for_host(hpas, 9)
    mem.host_write(hpas[0], b"fresh")                     # a new owner can write again


def test_platform_writes_bypass_host_rules(mem):
    mem.claim_for_host([0x1000], 3)
    mem.assign_private([0x1000], 3, PageType.ZERO)
    mem.set_write_locked(3, True)
    mem.write_pages([0x1000], b"\x11" * PAGE)
    assert mem.read_pages([0x1000]).tobytes() == b"\x11" * PAGE
    assert mem.integrity_events == 0


def test_closed_memory_refuses_access(tmp_path):
    m = PhysicalMemory(PAGE * 4, tmp_path / "d")
    m.close()
    with pytest.raises(PhysicalMemoryError, match="closed"):
        m.host_read(0, 1)


def test_deferred_fill_runs_before_anything_observes_the_pages(mem):
    calls = []

    def filler(hpas):
        calls.append(hpas.tolist())
        mem.write_pages(hpas, b"\x5a" * (PAGE * hpas.size))

    hpas = [0x1000, 0x2000, 0x3000, 0x4000]
    mem.claim_for_host(hpas, 2)
    mem.assign_private(hpas, 2, PageType.ZERO)
    mem.defer_fill(hpas, 2, filler)
    assert mem.pending_fill_count() == 4 and calls == []
    assert mem.host_read(0x2000 + 5, 2) == b"\x5a\x5a"
    assert calls == [[0x2000]]
    mem.host_write_pages([0x3000], bytes(PAGE))                # whole page replaced: nothing to fill
    mem.host_write(0x4000 + 10, b"ab")                         # partial write: fill the rest first
    assert mem.host_read(0x4000 + 8, 6) == b"\x5a\x5aab\x5a\x5a"
    assert mem.read_pages([0x1000, 0x3000]).tobytes() == b"\x5a" * PAGE + bytes(PAGE)
    assert calls == [[0x2000], [0x4000], [0x1000]]
    assert mem.pending_fill_count() == 0
    mem.claim_for_host([0x9000], 3)
    with pytest.raises(OwnershipError, match="PRIVATE pages of key domain 2"):
        mem.defer_fill([0x9000], 2, filler)


def test_release_drops_pending_fills(mem):
    mem.claim_for_host([0x1000], 4)
    mem.assign_private([0x1000], 4, PageType.ZERO)
    mem.defer_fill([0x1000], 4, lambda hpas: pytest.fail("filled a released page"))
    mem.release_keyid(4)
    assert mem.pending_fill_count() == 0
    assert mem.host_read(0x1000, 8) == bytes(8)


@pytest.mark.parametrize("order", ["runs", "scattered"])
def test_page_writes_land_where_asked_in_runs_or_scattered(mem, order):
    # Runs of consecutive pages are written to the DRAM file in one write each, pages
    # scattered one by one through the mapping: either way each page lands at its hpa
    # and the pages around stay as they were.
    rng = np.random.default_rng(7)
    if order == "runs":
        pages = [*range(0x10, 0x30), *range(0x40, 0x60), *range(0x5, 0x9), 0x70]
    else:
        pages = rng.permutation(np.arange(0x100, 0x140))[:40].tolist()
    hpas = [p * PAGE for p in pages]
    mem.claim_for_host(hpas, 3)
    data = rng.integers(0, 256, (len(hpas), PAGE), dtype=np.uint8)
    mem.host_write_pages(hpas, data[::-1][::-1])         # a view (not a fresh array) as input
    assert np.array_equal(mem.read_pages(hpas), data)
    for hpa in (min(hpas) - PAGE, max(hpas) + PAGE, 0x30 * PAGE, 0x3F * PAGE, 0x9 * PAGE):
        if hpa not in hpas:
            assert mem.read_pages([hpa]).tobytes() == bytes(PAGE)
    # The platform's own writes take the same path.
    mem.write_pages(hpas[:3], bytes(3 * PAGE))
    assert not mem.read_pages(hpas[:3]).any() and np.array_equal(mem.read_pages(hpas[3:]), data[3:])


def test_refused_page_write_stores_nothing(mem):
    # One FREE page in the middle of a run: the whole request is refused before any write.
    mem.claim_for_host([0x1000, 0x2000, 0x4000], 2)
    with pytest.raises(OwnershipError, match="hpa 0x3000 refused: the page is FREE"):
        mem.host_write_pages([0x1000, 0x2000, 0x3000, 0x4000], b"\x77" * (4 * PAGE))
    assert not mem.read_pages([0x1000, 0x2000, 0x3000, 0x4000]).any()


def test_view_pages_shows_dram_without_a_copy_for_consecutive_pages(mem):
    # measure-kd decrypts straight from DRAM: consecutive pages are a read-only view of it,
    # other lists a copy; pending pages are produced first either way.
    rng = np.random.default_rng(5)
    hpas = [p * PAGE for p in range(0x20, 0x28)]
    data = rng.integers(0, 256, (len(hpas), PAGE), dtype=np.uint8)
    mem.write_pages(hpas, data)
    view = mem.view_pages(hpas)
    assert np.array_equal(view, data) and not view.flags.writeable
    mem.write_pages(hpas[:1], bytes(PAGE))
    assert not view[0].any()                             # DRAM itself, not a copy
    scattered = [hpas[5], hpas[1], hpas[6]]
    assert np.array_equal(mem.view_pages(scattered), data[[5, 1, 6]])
    with pytest.raises(ValueError):
        mem.view_pages(hpas)[0, 0] = 1
    mem.claim_for_host([0x1000, 0x2000], 2)
    mem.assign_private([0x1000, 0x2000], 2, PageType.ZERO)
    mem.defer_fill([0x1000, 0x2000], 2, lambda h: mem.write_pages(h, b"\x33" * (PAGE * h.size)))
    assert mem.view_pages([0x1000, 0x2000]).tobytes() == b"\x33" * (2 * PAGE)
    assert mem.pending_fill_count() == 0
