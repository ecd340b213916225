"""Key domains on the platform (in process): lifecycle, measurement, hash-kd, vmread, verify-ept.

``TenantGuest`` plays the tenant: it takes the host's layout (KeyID and
hpas from alloc), builds a tiny guest (image pages, zero pages, a VMCS, an
EPT), encrypts every page for its data physical address and wraps the key
for the platform.  test_hostport.py drives the same guest through the socket.
"""

import os
import random
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest

from leftovers import kd_ram_files

from qemu_kd.platform.domain import (
    DomainNotFoundError,
    DomainState,
    DomainStateError,
    DomainVerifyError,
    GuestStateFieldError,
    KeyIdExhaustedError,
    PageRequestError,
    SecretPageError,
)
from qemu_kd.formats.ept import (
    EPT_EXEC,
    EPT_READ,
    EPT_WRITE,
    EptMapping,
    build_ept,
    ept_table_pages_needed,
    mapping_digest,
)
from qemu_kd.formats.errors import UnknownFieldError
from qemu_kd.platform.identity import PlatformIdentity, RootCA
from qemu_kd.formats.keywrap import KeyUnwrapError, wrap_key
from qemu_kd.formats.measurement import PageType, host_verifiable_digest, measure_offline
from qemu_kd.crypto.mee import MemoryEncryptionEngine
from qemu_kd.platform.physmem import OwnershipError, PageState
from qemu_kd.platform.hardware import Platform
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vcpu import VcpuState
from qemu_kd.formats.vmcs import Vmcs

PAGE = 4096
RWX = EPT_READ | EPT_WRITE | EPT_EXEC
RW = EPT_READ | EPT_WRITE
ENC_EPT_POINTER = 0x201A
ENC_SAVE_AREA = 0x2200
ENC_HOST_FORCED_EXIT = 0x4200
ENC_GUEST_RIP = 0x681E
ENC_GUEST_CR3 = 0x6802
MEMORY = 16 << 20


@dataclass
class TenantGuest:
    """A small sealed guest for one host layout (all values the tenant knows)."""

    keyid: int
    key: bytes
    policy: Policy
    host_data: bytes
    vmcs: Vmcs
    vmcs_hpa: int
    save_hpa: int
    table_hpas: list[int]
    mappings: list[EptMapping]
    image: dict[int, bytes]            # gpa -> plaintext
    zero_gpas: list[int]
    hpa_of: dict[int, int]             # gpa -> hpa
    verifiable_gpas: set[int]
    ciphertext: dict[int, bytes] = field(default_factory=dict)   # hpa -> page
    plaintext: dict[int, bytes] = field(default_factory=dict)    # hpa -> page (tenant side only)
    wrapped: bytes = b""

    def page_entries(self):
        """(hpa, gpa, type, perms, host_verifiable) for add-pages."""
        perms = {m.gpa: m.perms for m in self.mappings}
        entries = [(self.vmcs_hpa, None, PageType.VMCS, 0), (self.save_hpa, None, PageType.SAVE, 0)]
        entries += [(h, None, PageType.EPT, 0) for h in self.table_hpas]
        entries += [(self.hpa_of[g], g, PageType.IMAGE, perms[g], g in self.verifiable_gpas) for g in self.image]
        return entries

    def zero_entries(self):
        perms = {m.gpa: m.perms for m in self.mappings}
        return [(self.hpa_of[g], g, perms[g]) for g in self.zero_gpas]

    def loaded_pages(self):
        """(hpas, concatenated ciphertext) the host writes with write-phys before add-pages."""
        hpas = sorted(self.ciphertext)
        return hpas, b"".join(self.ciphertext[h] for h in hpas)

    def expected_measurement(self):
        perms = {m.gpa: m.perms for m in self.mappings}
        pages = [(g, PageType.IMAGE, perms[g], p) for g, p in self.image.items()]
        pages += [(g, PageType.ZERO, perms[g], None) for g in self.zero_gpas]
        return measure_offline(pages, self.vmcs.guest_state_bytes(), self.policy)

    def expected_hash_kd(self):
        hpas = [self.vmcs_hpa, *self.table_hpas] + [self.hpa_of[g] for g in self.verifiable_gpas]
        return host_verifiable_digest((h, self.plaintext[h]) for h in hpas)


def seal_guest(keyid, hpas, kak_public, *, n_image=3, n_zero=2, debug=False, host_data=b"hd",
               canary=b"", gpr_canary=0, extra_mappings=(), tamper=None, rng_seed=1, host_forced_exit=True):
    """Build and encrypt a guest for the host's layout (hpas from alloc, ascending).

    Layout: hpas[0] VMCS, hpas[1] SAVE, then EPT tables, then data pages.
    ``extra_mappings`` are added to the EPT as given; ``tamper(tables)`` may
    edit the EPT table pages (dict hpa -> bytearray) before encryption.
    """
    rng = random.Random(rng_seed)
    policy = Policy.make(debug=debug)
    gpas = [0x1000 * i for i in range(n_image + n_zero)]
    n_tables = ept_table_pages_needed(gpas + [m.gpa for m in extra_mappings])
    vmcs_hpa, save_hpa = hpas[0], hpas[1]
    table_hpas = list(hpas[2:2 + n_tables])
    data_hpas = list(hpas[2 + n_tables:2 + n_tables + len(gpas)])
    assert len(data_hpas) == len(gpas), "allocate more pages for this guest"
    hpa_of = dict(zip(gpas, data_hpas))
    perms = {g: (RWX if i == 0 else RW) for i, g in enumerate(gpas)}
    mappings = [EptMapping(g, hpa_of[g], perms[g]) for g in gpas] + list(extra_mappings)
    eptp, tables = build_ept(mappings, table_hpas)
    tables = {h: bytearray(p) for h, p in tables.items()}
    if tamper:
        tamper(tables)
    image = {}
    for i, g in enumerate(gpas[:n_image]):
        page = bytearray(rng.randbytes(PAGE))
        if i == 1 and canary:
            page[100:100 + len(canary)] = canary
        image[g] = bytes(page)
    vcpu = VcpuState(rip=0x1200, rsp=0x3000, rbx=gpr_canary, cr3=0x2000)
    vmcs = Vmcs(guest=vcpu, ept_pointer=eptp, save_area_hpa=save_hpa, policy=policy,
                host_forced_exit=host_forced_exit)
    key = os.urandom(64)
    guest = TenantGuest(keyid, key, policy, host_data, vmcs, vmcs_hpa, save_hpa, table_hpas, mappings,
                        image, gpas[n_image:], hpa_of, {gpas[0]})
    guest.plaintext[vmcs_hpa] = vmcs.pack()
    guest.plaintext[save_hpa] = bytes(PAGE)
    guest.plaintext.update({h: bytes(p) for h, p in tables.items()})
    guest.plaintext.update({hpa_of[g]: p for g, p in image.items()})
    with MemoryEncryptionEngine(key) as mee:
        for hpa, page in guest.plaintext.items():
            guest.ciphertext[hpa] = mee.encrypt_pages(page, [keyid << 40 | hpa])
    for g in guest.zero_gpas:    # the platform fills these; the tenant only knows they are zero
        guest.plaintext[hpa_of[g]] = bytes(PAGE)
    guest.wrapped = wrap_key(key, kak_public, policy, host_data).pack()
    return guest


def guest_page_count(n_image=3, n_zero=2, extra_gpas=()):
    gpas = [0x1000 * i for i in range(n_image + n_zero)] + list(extra_gpas)
    return 2 + ept_table_pages_needed(gpas) + n_image + n_zero


def load_guest(platform, guest, shuffle_seed=None):
    """The host's part: write ciphertext with write-phys, create-kd, add pages."""
    hpas, data = guest.loaded_pages()
    platform.write_phys_pages(hpas, data)
    platform.create_kd(guest.keyid, guest.wrapped, guest.policy.pack(), guest.host_data)
    entries = guest.page_entries()
    zeros = guest.zero_entries()
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(entries)
        random.Random(shuffle_seed).shuffle(zeros)
    platform.add_zero_pages(guest.keyid, zeros)
    platform.add_pages(guest.keyid, entries)


@pytest.fixture
def platform(identity, tmp_path):
    p = Platform(identity, MEMORY, tmp_path / "platform")
    yield p
    p.close()


@pytest.fixture
def built(platform, identity):
    alloc = platform.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    load_guest(platform, guest)
    return platform, guest, alloc


# ------------------------------------------------------------------- KeyIDs


def test_alloc_reserves_keyids_lowest_first_and_free_returns_them(platform):
    a = platform.alloc(npages=2)
    b = platform.alloc(hpas=[0x800000, 0x801000])
    assert (a.keyid, b.keyid) == (1, 2)
    assert b.hpas == [0x800000, 0x801000]
    assert platform.memory.owner(0x800000).state == PageState.HOST
    assert platform.free(a.keyid) == 2
    assert platform.memory.owner(a.hpas[0]).state == PageState.FREE
    assert 1 in platform.platform_info().free_keyids
    assert platform.alloc(npages=1).keyid == 1


def test_alloc_answers_its_hpas_ascending_as_an_array_and_a_list(platform):
    first = platform.alloc(npages=3)
    assert first.hpa_array.dtype == np.uint64 and first.hpa_array.tolist() == first.hpas
    assert first.hpas == sorted(first.hpas) and len(set(first.hpas)) == 3
    picked = platform.alloc(hpas=[0x803000, 0x801000, 0x802000])
    assert picked.hpas == [0x801000, 0x802000, 0x803000] == picked.hpa_array.tolist()
    assert type(picked.hpas[0]) is int


def test_keyid_exhaustion_is_a_clear_error(platform):
    for expected in range(1, 64):
        assert platform.alloc(npages=1).keyid == expected
    with pytest.raises(KeyIdExhaustedError) as err:
        platform.alloc(npages=1)
    assert "no free KeyID: all 63 key domains are in use; destroy one with destroy-kd" in str(err.value)
    assert platform.platform_info().free_keyids == []
    platform.free(17)
    assert platform.alloc(npages=1).keyid == 17


def test_failed_alloc_releases_the_keyid(platform):
    a = platform.alloc(hpas=[0x10000])
    with pytest.raises(OwnershipError):
        platform.alloc(hpas=[0x20000, 0x10000])
    assert platform.memory.owner(0x20000).state == PageState.FREE   # all or nothing
    assert platform.platform_info().free_keyids[0] == a.keyid + 1


# ---------------------------------------------------------------- create-kd


def test_create_kd_needs_a_reservation_and_the_right_key(platform, identity):
    alloc = platform.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    with pytest.raises(DomainNotFoundError, match="not reserved"):
        platform.create_kd(alloc.keyid + 1, guest.wrapped, guest.policy.pack(), guest.host_data)
    with pytest.raises(KeyUnwrapError, match="does not open"):
        platform.create_kd(alloc.keyid, guest.wrapped, guest.policy.pack(), b"other host data")
    with pytest.raises(KeyUnwrapError):
        platform.create_kd(alloc.keyid, guest.wrapped, Policy.make(debug=True).pack(), guest.host_data)
    other = PlatformIdentity.create_throwaway(RootCA.create_throwaway())
    foreign = seal_guest(alloc.keyid, alloc.hpas, other.kak_public)
    with pytest.raises(KeyUnwrapError):
        platform.create_kd(alloc.keyid, foreign.wrapped, foreign.policy.pack(), foreign.host_data)
    domain = platform.create_kd(alloc.keyid, guest.wrapped, guest.policy.pack(), guest.host_data)
    assert domain.state == DomainState.CREATED
    assert domain.host_data == guest.host_data.ljust(32, b"\0")
    with pytest.raises(DomainStateError, match="already programmed"):
        platform.create_kd(alloc.keyid, guest.wrapped, guest.policy.pack(), guest.host_data)
    with pytest.raises(DomainStateError, match="destroy-kd"):
        platform.free(alloc.keyid)


# ---------------------------------------------------------------- add-pages


def test_add_pages_assigns_private_pages_and_fills_zero_pages(built):
    platform, guest, _ = built
    domain = platform.domain(guest.keyid)
    assert domain.state == DomainState.BUILDING
    assert platform.memory.pending_fill_count() == len(guest.zero_gpas)   # encrypted on first access
    for g in guest.image:
        assert platform.memory.owner(guest.hpa_of[g]).page_type == PageType.IMAGE
    assert platform.memory.owner(guest.vmcs_hpa).page_type == PageType.VMCS
    for g in guest.zero_gpas:
        hpa = guest.hpa_of[g]
        owner = platform.memory.owner(hpa)
        assert (owner.state, owner.keyid, owner.page_type) == (PageState.PRIVATE, guest.keyid, PageType.ZERO)
        dram = platform.read_phys(hpa, PAGE)
        assert dram != bytes(PAGE)                     # encrypted zeros, not zeros
        with MemoryEncryptionEngine(guest.key) as mee:
            assert mee.decrypt_pages(dram, [guest.keyid << 40 | hpa]) == bytes(PAGE)


def test_add_pages_rejects_bad_requests(platform, identity):
    alloc = platform.alloc(npages=guest_page_count() + 2)
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    load_guest(platform, guest)
    spare1, spare2 = alloc.hpas[-2], alloc.hpas[-1]
    k = guest.keyid
    with pytest.raises(PageRequestError, match="already added"):
        platform.add_pages(k, [(spare1, 0x0, PageType.IMAGE, RW)])
    with pytest.raises(PageRequestError, match="add-zero-pages"):
        platform.add_pages(k, [(spare1, 0x100000, PageType.ZERO, RW)])
    with pytest.raises(PageRequestError, match="exactly one VMCS"):
        platform.add_pages(k, [(spare1, None, PageType.VMCS, 0)])
    with pytest.raises(PageRequestError, match="SAVE page can never be host-verifiable"):
        platform.add_pages(k, [(spare1, None, PageType.SAVE, 0, True)])
    with pytest.raises(PageRequestError, match="page-aligned"):
        platform.add_pages(k, [(spare1, 0x100800, PageType.IMAGE, RW)])
    with pytest.raises(PageRequestError, match="perms"):
        platform.add_pages(k, [(spare1, 0x100000, PageType.IMAGE, 0)])
    with pytest.raises(PageRequestError, match="twice"):
        platform.add_pages(k, [(spare1, 0x100000, PageType.IMAGE, RW), (spare2, 0x100000, PageType.IMAGE, RW)])
    with pytest.raises(OwnershipError, match="PRIVATE"):     # a page that is already the domain's
        platform.add_pages(k, [(guest.vmcs_hpa, 0x100000, PageType.IMAGE, RW)])
    other = platform.alloc(npages=1)
    with pytest.raises(OwnershipError, match=f"allocated for KeyID {other.keyid}"):
        platform.add_pages(k, [(other.hpas[0], 0x100000, PageType.IMAGE, RW)])
    # Nothing of the refused requests stuck.
    assert platform.memory.owner(spare1).state == PageState.HOST
    platform.add_pages(k, [(spare1, 0x100000, PageType.IMAGE, RW)])
    assert platform.memory.owner(spare1).page_type == PageType.IMAGE


def test_gpas_already_added_are_found_across_many_batches():
    # The domain keeps the gpas added so far as a few sorted arrays (merged as batches come);
    # any gpa of any earlier batch must still be found, and the smallest one is reported.
    from qemu_kd.platform.domain import _GpaSet

    rng = np.random.default_rng(3)
    pool = rng.permutation(np.arange(1, 20_000, dtype=np.uint64) * PAGE)
    added, seen, start = _GpaSet(), set(), 0
    for size in [1, 1, 5, 300, 2, 2, 2, 4000, 7, 1, 900, 3, 3, 3, 3, 60, 1]:
        batch = pool[start:start + size]
        start += size
        assert added.smallest_of(batch) is None
        added.add(batch)
        seen.update(batch.tolist())
        probe = np.concatenate([rng.choice(pool[:start], 3), pool[start:start + 20]])
        clash = seen.intersection(probe.tolist())
        assert added.smallest_of(probe) == (min(clash) if clash else None)
        assert added.smallest_of(pool[start:]) is None
        assert len(added._parts) <= 2 * max(1, int(np.log2(start)) + 1)


# ------------------------------------------------------------- measurement


def test_measurement_matches_the_tenant_and_ignores_add_order(platform, identity, tmp_path):
    alloc = platform.alloc(npages=guest_page_count(n_image=5, n_zero=4))
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public, n_image=5, n_zero=4)
    load_guest(platform, guest, shuffle_seed=7)
    domain = platform.domain(guest.keyid)
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    digest = domain.finalize_measurement()
    assert digest == guest.expected_measurement()
    # Same guest on another layout (different hpas, different add order): same measurement.
    with Platform(identity, MEMORY, tmp_path / "other") as second:
        second.alloc(npages=50)
        alloc2 = second.alloc(npages=guest_page_count(n_image=5, n_zero=4))
        guest2 = seal_guest(alloc2.keyid, alloc2.hpas, identity.kak_public, n_image=5, n_zero=4)
        assert guest2.hpa_of != guest.hpa_of
        load_guest(second, guest2, shuffle_seed=99)
        assert second.verify_ept(guest2.keyid, alloc2.hpas).ok
        assert second.domain(guest2.keyid).finalize_measurement() == digest


def test_host_rewrite_of_image_page_during_build_changes_the_measurement(built):
    platform, guest, alloc = built
    hpa = guest.hpa_of[0x1000]
    platform.write_phys(hpa + 8, b"\xff" * 8)       # allowed while building
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    assert platform.domain(guest.keyid).finalize_measurement() != guest.expected_measurement()


def test_overwritten_zero_page_stops_the_launch(built):
    platform, guest, alloc = built
    platform.write_phys(guest.hpa_of[guest.zero_gpas[0]], b"junk")
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    with pytest.raises(DomainVerifyError, match="overwritten after add-zero-pages"):
        platform.domain(guest.keyid).finalize_measurement()


def test_measurement_fills_guest_ram_with_the_image_for_launch(built):
    platform, guest, alloc = built
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    domain = platform.domain(guest.keyid)
    domain.finalize_measurement()
    staged = domain.take_staged_ram()
    try:
        ram, _baseline = staged.ram.map, staged.baseline
        for gpa, plain in guest.image.items():
            assert ram[gpa:gpa + PAGE] == plain
            assert staged.baseline[gpa // PAGE].tobytes() == plain
        for gpa in guest.zero_gpas:
            assert ram[gpa:gpa + PAGE] == bytes(PAGE)
        gpns = np.array([g // PAGE for g in guest.image], dtype=np.int64)
        hpas = np.array([guest.hpa_of[g] for g in guest.image], dtype=np.uint64)
        # Launch uses it only for exactly the image pages the EPT maps, each at its gpa.
        assert staged.matches(staged.size, gpns[::-1], hpas[::-1])
        assert not staged.matches(staged.size, gpns, hpas[::-1])
        assert not staged.matches(staged.size, gpns[:-1], hpas[:-1])
        assert not staged.matches(staged.size + 2 * 1024 * 1024, gpns, hpas)
    finally:
        staged.close()


@pytest.mark.parametrize("piece, batch", [(2, 2048), (3, 4), (1, 1)])
def test_measurement_decrypts_each_piece_of_a_run_from_its_own_pages(platform, identity, monkeypatch,
                                                                     piece, batch):
    # measure-kd decrypts runs of image pages straight into guest RAM in pieces (and the guest's
    # pages in batches): every piece must come from its own pages, and be hashed in order.
    import qemu_kd.platform.domain as domain_module
    import qemu_kd.platform.guestram as guestram_module

    monkeypatch.setattr(guestram_module, "FILL_PIECE_PAGES", piece)
    monkeypatch.setattr(domain_module, "BATCH_PAGES", batch)
    alloc = platform.alloc(npages=guest_page_count(n_image=7, n_zero=3))
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public, n_image=7, n_zero=3)
    load_guest(platform, guest, shuffle_seed=5)
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    domain = platform.domain(guest.keyid)
    assert domain.finalize_measurement() == guest.expected_measurement()
    staged = domain.take_staged_ram()
    try:
        for gpa, plain in guest.image.items():
            assert staged.ram.map[gpa:gpa + PAGE] == plain
            assert staged.baseline[gpa // PAGE].tobytes() == plain
        for gpa in guest.zero_gpas:
            assert staged.ram.map[gpa:gpa + PAGE] == bytes(PAGE) and not staged.baseline[gpa // PAGE].any()
    finally:
        staged.close()


def test_a_measured_domain_destroyed_before_launch_leaves_no_guest_ram(built):
    platform, guest, alloc = built
    before = kd_ram_files()
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    platform.domain(guest.keyid).launch_measurement()
    assert kd_ram_files() > before
    platform.destroy_kd(guest.keyid)
    assert kd_ram_files() == before


def test_a_refused_measurement_leaves_no_guest_ram(built):
    platform, guest, alloc = built
    before = kd_ram_files()
    platform.write_phys(guest.hpa_of[guest.zero_gpas[0]], b"junk")
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    with pytest.raises(DomainVerifyError):
        platform.domain(guest.keyid).launch_measurement()
    assert kd_ram_files() == before


# ----------------------------------------------------------------- hash-kd


def test_hash_kd_covers_vmcs_ept_and_marked_pages_only(built):
    platform, guest, _ = built
    assert platform.hash_kd(guest.keyid) == guest.expected_hash_kd()
    assert platform.hash_kd(guest.keyid, [guest.vmcs_hpa]) == host_verifiable_digest(
        [(guest.vmcs_hpa, guest.plaintext[guest.vmcs_hpa])])
    secret = guest.hpa_of[0x1000]                    # image page not marked verifiable
    with pytest.raises(SecretPageError, match=f"0x{secret:x}"):
        platform.hash_kd(guest.keyid, [guest.vmcs_hpa, secret])
    with pytest.raises(SecretPageError):
        platform.hash_kd(guest.keyid, [guest.save_hpa])
    with pytest.raises(SecretPageError):
        platform.hash_kd(guest.keyid, [guest.hpa_of[guest.zero_gpas[0]]])


# ------------------------------------------------------------------ vmread


def test_vmread_returns_controls_and_refuses_guest_state(built):
    platform, guest, _ = built
    k = guest.keyid
    assert platform.vmread(k, ENC_EPT_POINTER) == guest.vmcs.ept_pointer
    assert platform.vmread(k, ENC_SAVE_AREA) == guest.save_hpa
    assert platform.vmread(k, ENC_HOST_FORCED_EXIT) == 1
    for enc in (ENC_GUEST_RIP, ENC_GUEST_CR3):
        with pytest.raises(GuestStateFieldError, match="guest-state field"):
            platform.vmread(k, enc)
    with pytest.raises(UnknownFieldError):
        platform.vmread(k, 0x7FFE)


def test_vmread_of_a_vmcs_sealed_for_another_hpa_is_a_verify_error(platform, identity):
    alloc = platform.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    # The host swaps the VMCS and SAVE ciphertext: each now sits at the wrong hpa.
    guest.ciphertext[guest.vmcs_hpa], guest.ciphertext[guest.save_hpa] = (
        guest.ciphertext[guest.save_hpa], guest.ciphertext[guest.vmcs_hpa])
    load_guest(platform, guest)
    with pytest.raises(DomainVerifyError, match="does not decrypt to a valid VMCS"):
        platform.vmread(guest.keyid, ENC_EPT_POINTER)


# -------------------------------------------------------------- verify-ept


def test_verify_ept_accepts_the_tenants_layout(built):
    platform, guest, alloc = built
    verdict = platform.verify_ept(guest.keyid, alloc.hpas)
    assert verdict.ok and verdict.reasons == []
    assert verdict.mapping_digest == mapping_digest(guest.mappings)
    assert verdict.mapped_pages == len(guest.mappings)
    assert verdict.table_pages == len(guest.table_hpas)
    assert platform.domain(guest.keyid).state == DomainState.VERIFIED


def verify_bad_layout(platform, identity, *, extra_mappings=lambda alloc, other: (),
                      tamper=None, allocation=lambda alloc: alloc.hpas):
    other = platform.alloc(npages=1)                       # someone else's reservation
    alloc = platform.alloc(npages=guest_page_count(extra_gpas=[0x100000]))
    extras = list(extra_mappings(alloc, other))
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public, extra_mappings=extras, tamper=tamper)
    load_guest(platform, guest)
    verdict = platform.verify_ept(guest.keyid, allocation(alloc))
    assert not verdict.ok
    assert platform.domain(guest.keyid).state == DomainState.BUILDING
    return verdict, guest


def test_verify_ept_reports_alias(platform, identity):
    verdict, guest = verify_bad_layout(
        platform, identity, extra_mappings=lambda alloc, other: [EptMapping(0x100000, alloc.hpas[-1], RW)])
    assert f"alias: hpa 0x{guest.hpa_of[guest.zero_gpas[-1]]:x} is mapped at gpa 0x4000 and at gpa 0x100000" \
        in verdict.reasons


def test_verify_ept_reports_foreign_domain_hpa(platform, identity):
    verdict, _ = verify_bad_layout(
        platform, identity, extra_mappings=lambda alloc, other: [EptMapping(0x100000, other.hpas[0], RW)])
    assert any(r.startswith("foreign: gpa 0x100000 maps hpa") and "belongs to KeyID 1" in r
               for r in verdict.reasons), verdict.reasons


def test_verify_ept_reports_unallocated_hpa(platform, identity):
    stray = MEMORY - PAGE
    verdict, _ = verify_bad_layout(
        platform, identity, extra_mappings=lambda alloc, other: [EptMapping(0x100000, stray, RW)])
    assert f"unallocated: gpa 0x100000 maps hpa 0x{stray:x}, which is not in the host's allocation" \
        in verdict.reasons


def test_verify_ept_reports_control_page_mapped_into_guest(platform, identity):
    verdict, guest = verify_bad_layout(
        platform, identity, extra_mappings=lambda alloc, other: [EptMapping(0x100000, alloc.hpas[0], RW)])
    assert (f"control-page: gpa 0x100000 maps hpa 0x{guest.vmcs_hpa:x}, the domain's VMCS page, "
            "into the guest") in verdict.reasons


def test_verify_ept_reports_reserved_bits(platform, identity):
    def set_reserved_bit(tables):
        pt = tables[max(tables)]          # the PT: last table the builder used
        (entry,) = struct.unpack_from("<Q", pt, 8)
        struct.pack_into("<Q", pt, 8, entry | 1 << 52)

    verdict, _ = verify_bad_layout(platform, identity, tamper=set_reserved_bit)
    assert any(r.startswith("reserved-bits: PTE 1 in table at hpa") and "reserved bits" in r
               for r in verdict.reasons), verdict.reasons


def test_verify_ept_reports_a_page_the_host_left_out(platform, identity):
    verdict, guest = verify_bad_layout(
        platform, identity, allocation=lambda alloc: alloc.hpas[:-1])
    assert any(r.startswith("unallocated:") for r in verdict.reasons)


def test_verify_ept_with_an_empty_allocation_reports_every_mapped_page(platform, identity):
    verdict, guest = verify_bad_layout(platform, identity, allocation=lambda alloc: [])
    unallocated = [r for r in verdict.reasons if r.startswith("unallocated:")]
    assert not verdict.ok and len(unallocated) == len(guest.mappings)
    assert all(r.endswith("which is not in the host's allocation") for r in unallocated)


def test_verify_ept_checks_pages_are_mapped_as_measured(platform, identity):
    alloc = platform.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    entries = guest.page_entries()
    image = [i for i, e in enumerate(entries) if e[2] == PageType.IMAGE]
    a, b, c = image
    # The host lies about where two pages go and about the perms of a third.
    entries[a], entries[b] = (entries[a][0], entries[b][1], *entries[a][2:]), \
        (entries[b][0], entries[a][1], *entries[b][2:])
    entries[c] = (*entries[c][:3], EPT_READ, False)
    hpas, data = guest.loaded_pages()
    platform.write_phys_pages(hpas, data)
    platform.create_kd(guest.keyid, guest.wrapped, guest.policy.pack(), guest.host_data)
    platform.add_pages(guest.keyid, entries)
    platform.add_zero_pages(guest.keyid, guest.zero_entries()[:-1])     # one zero page never added
    verdict = platform.verify_ept(guest.keyid, alloc.hpas)
    checks = sorted({r.split(":")[0] for r in verdict.reasons})
    assert checks == ["gpa-mismatch", "perms-mismatch", "unassigned"], verdict.reasons
    assert (f"gpa-mismatch: page hpa 0x{entries[a][0]:x} was added for gpa 0x{entries[a][1]:x} but the EPT "
            f"maps it at gpa 0x{entries[b][1]:x}") in verdict.reasons


def test_verify_failure_keeps_building_and_success_locks_host_writes(platform, identity):
    alloc = platform.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    load_guest(platform, guest)
    assert not platform.verify_ept(guest.keyid, alloc.hpas[:-1]).ok
    platform.write_phys(guest.hpa_of[0x1000], b"still building")     # still allowed
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    with pytest.raises(OwnershipError, match="no longer being built"):
        platform.write_phys(guest.hpa_of[0x1000], b"too late")
    assert platform.platform_info().integrity_events == 1


# -------------------------------------------------------------- lifecycle


def test_write_after_launch_is_an_ownership_error_and_integrity_event(built):
    platform, guest, alloc = built
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    domain = platform.domain(guest.keyid)
    domain.mark_launched()
    hpa = guest.hpa_of[0x2000]
    before = platform.read_phys(hpa, PAGE)
    for _ in range(2):
        with pytest.raises(OwnershipError, match="PRIVATE IMAGE page"):
            platform.write_phys_pages([hpa], bytes(PAGE))
    assert platform.read_phys(hpa, PAGE) == before
    assert platform.platform_info().integrity_events == 2
    assert platform.read_phys(hpa, PAGE) == guest.ciphertext[hpa]     # reads still give ciphertext


def test_host_reads_sync_the_shadow_of_running_domains_they_touch(built):
    platform, guest, alloc = built
    spare = platform.alloc(npages=1)
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    domain = platform.domain(guest.keyid)
    synced = []
    domain.shadow_sync = lambda: synced.append(domain.keyid)
    platform.read_phys(guest.hpa_of[0x1000], 16)
    assert synced == []                              # not running yet: DRAM is current
    domain.mark_launched()
    platform.read_phys(spare.hpas[0], PAGE)
    platform.read_phys_pages(spare.hpas)
    assert synced == []                              # reads that touch no page of the domain
    platform.read_phys(guest.hpa_of[0x1000] - 8, 16)
    platform.read_phys_pages([spare.hpas[0], guest.vmcs_hpa])
    assert synced == [guest.keyid, guest.keyid]


def test_platform_without_workdir_uses_a_private_runtime_directory(identity, tmp_path, monkeypatch):
    monkeypatch.setenv("QEMU_KD_RUNTIME", str(tmp_path / "run"))
    p = Platform(identity, MEMORY)
    assert p.workdir.parent == tmp_path / "run" and p.workdir.name.startswith(f"platform-{os.getpid()}-")
    assert not (p.workdir / "dram").exists()         # unlinked once mapped: it dies with the process
    assert oct(p.workdir.stat().st_mode & 0o777) == oct(0o700)
    p.close()
    assert not p.workdir.exists()


def test_invalid_transitions_name_current_and_attempted_state(built, identity):
    platform, guest, alloc = built
    domain = platform.domain(guest.keyid)
    with pytest.raises(DomainStateError, match="BUILDING to LAUNCHED"):
        domain.mark_launched()
    with pytest.raises(DomainStateError, match="BUILDING to EXITED"):
        domain.mark_exited()
    assert platform.verify_ept(guest.keyid, alloc.hpas).ok
    with pytest.raises(DomainStateError, match="VERIFIED: add-pages is allowed only in CREATED, BUILDING"):
        platform.add_pages(guest.keyid, [(alloc.hpas[-1], 0x100000, PageType.IMAGE, RW)])
    domain.mark_launched()
    assert domain.state == DomainState.LAUNCHED
    with pytest.raises(DomainStateError, match="LAUNCHED: add-zero-pages"):
        platform.add_zero_pages(guest.keyid, [(alloc.hpas[-1], 0x100000, RW)])
    with pytest.raises(DomainStateError, match="LAUNCHED: launch is allowed only in VERIFIED"):
        domain.finalize_measurement()
    domain.mark_exited()
    domain.mark_launched()                         # resume
    assert domain.state == DomainState.LAUNCHED
    fresh = platform.alloc(npages=1)
    # The wrapped key binds policy and host_data, not the KeyID, so it programs any reservation.
    platform.create_kd(fresh.keyid, guest.wrapped, guest.policy.pack(), guest.host_data)
    with pytest.raises(DomainStateError, match="CREATED without a VMCS"):
        platform.verify_ept(fresh.keyid, fresh.hpas)


def test_destroy_scrubs_frees_and_forgets(built):
    platform, guest, alloc = built
    domain = platform.domain(guest.keyid)
    freed = platform.destroy_kd(guest.keyid)
    assert freed == len(alloc.hpas)
    assert domain.state == DomainState.DESTROYED
    for hpa in alloc.hpas:
        assert platform.memory.owner(hpa).state == PageState.FREE
        assert platform.read_phys(hpa, PAGE) == bytes(PAGE)
    assert guest.keyid in platform.platform_info().free_keyids
    with pytest.raises(DomainNotFoundError):
        platform.vmread(guest.keyid, ENC_EPT_POINTER)
    with pytest.raises(DomainStateError, match="key is gone"):
        domain.decrypt_pages(np.array([alloc.hpas[0]], dtype=np.uint64))
    with pytest.raises(DomainStateError, match="DESTROYED to DESTROYED"):
        domain.destroy()

