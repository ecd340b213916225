"""The bundle's records as arrays: a seal gives the bytes the record-by-record code gave, a
bundle read from a file keeps its records as views and checks them as PageRecord.unpack
checks each (the same first error), and the host VMM hands them to the platform as arrays
(no QEMU)."""

import hashlib
import importlib
import os

import numpy as np
import pytest

from synthetic import SYNTH_CMDLINE, SYNTH_INITRD, SYNTH_KERNEL
from serving import serving

from host_vmm.vmm import page_entries
from qemu_kd import tenant
from qemu_kd.formats.bundle import (
    PAGE_RECORD_SIZE,
    WRAPPED_KEY_SIZE,
    Bundle,
    PageRecord,
    PageRecords,
    ZeroPageRecord,
    ZeroRecords,
)
from qemu_kd.formats.ept import EptError, ept_table_pages_needed
from qemu_kd.formats.errors import FieldValueError, ReservedBitsError
from qemu_kd.formats.layout import HostLayout, pages_needed
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.policy import Policy
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import PAGE_ENTRY_DTYPE, HostPortBadRequestError, pack_page_entries
from qemu_kd.platform.hardware import Platform
from qemu_kd.platform.identity import PlatformIdentity, RootCA

MiB = 1 << 20
MEM = 64 * MiB
PAGE = 4096
seal_module = importlib.import_module("qemu_kd.tenant.seal")

# SHA-384 of the page and zero records of the seal below, as the record-by-record seal of
# the previous release wrote them (PageRecord / ZeroPageRecord objects, each packed).
PINNED_RECORDS_SHA384 = ("32bf7b8039f06c5720d4303c188b691c7bdf7c9fc1df7bdd5f9529a94b1ba0eb"
                         "76e8b47f6c9eee16cbbff81e0c158d0e")


@pytest.fixture(scope="module")
def sealed():
    root = RootCA.create_throwaway()
    identity = PlatformIdentity.create_throwaway(root)
    n = pages_needed(MEM)
    hpas = [0x400000 + PAGE * ((i * 7919) % n) for i in range(n)]     # scattered, as a host may
    layout = HostLayout(7, MEM, hpas, b"hd".ljust(32, b"\0"), identity.chain_pem())
    urandom = seal_module.os.urandom
    seal_module.os.urandom = lambda size: bytes(range(64))[:size]     # a fixed domain key
    try:
        bundle, _ = tenant.seal(SYNTH_KERNEL, SYNTH_INITRD, SYNTH_CMDLINE, MEM, Policy.make(), layout,
                                root.certificate, exposed_register_mask=0x3)
    finally:
        seal_module.os.urandom = urandom
    return bundle


def records_region(bundle: Bundle, raw: bytes) -> bytes:
    start = 0x40 + len(bundle.manifest.pack()) + WRAPPED_KEY_SIZE
    return raw[start:-32]


def test_a_seal_writes_the_records_the_record_by_record_seal_wrote(sealed):
    raw = sealed.pack()
    region = records_region(sealed, raw)
    assert hashlib.sha384(region).hexdigest() == PINNED_RECORDS_SHA384
    one_by_one = b"".join(p.pack() for p in sealed.pages) + b"".join(z.pack() for z in sealed.zero_pages)
    assert region == one_by_one
    assert raw[-32:] == hashlib.sha256(raw[:-32]).digest()


def test_a_bundle_read_back_is_the_bundle_written(sealed, tmp_path):
    for durable in (True, False):
        path = tmp_path / f"guest-{durable}.kd"
        sealed.write(path, durable=durable)
        again = Bundle.read(path)
        assert again == sealed
        assert list(again.pages) == list(sealed.pages) and list(again.zero_pages) == list(sealed.zero_pages)
        assert again.pages.ciphertext.shape == (len(sealed.pages), PAGE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest-False.kd", "guest-True.kd"]


def _damage(raw: bytes, bundle: Bundle, record: int, offset: int, value: bytes) -> bytes:
    """``raw`` with page record ``record`` changed at ``offset`` and the checksum fixed."""
    start = 0x40 + len(bundle.manifest.pack()) + WRAPPED_KEY_SIZE + record * PAGE_RECORD_SIZE
    body = bytearray(raw[:-32])
    body[start + offset:start + offset + len(value)] = value
    return bytes(body) + hashlib.sha256(body).digest()


@pytest.mark.parametrize("record, offset, value, error", [
    (40, 0, b"\x01", FieldValueError),                  # hpa not page-aligned
    (40, 5, b"\x01", FieldValueError),                  # hpa beyond 1 TiB
    (40, 8, b"\xff" * 8, FieldValueError),              # an IMAGE page without a gpa
    (40, 17, b"\x00", FieldValueError),                 # IMAGE perms 0
    (40, 16, b"\x02", FieldValueError),                 # ZERO cannot carry ciphertext
    (40, 16, b"\x09", FieldValueError),                 # unknown page type
    (40, 18, b"\x02", ReservedBitsError),               # undefined flag
    (40, 20, b"\x01", ReservedBitsError),               # reserved byte
    (0, 8, b"\x00" * 8, FieldValueError),               # the VMCS mapped into the guest
    (1, 17, b"\x07", FieldValueError),                  # SAVE page with perms
])
def test_a_damaged_record_gets_the_error_its_own_unpack_gives(sealed, record, offset, value, error):
    raw = _damage(sealed.pack(), sealed, record, offset, value)
    start = 0x40 + len(sealed.manifest.pack()) + WRAPPED_KEY_SIZE + record * PAGE_RECORD_SIZE
    with pytest.raises(error) as single:
        PageRecord.unpack(raw[start:start + PAGE_RECORD_SIZE])
    with pytest.raises(error) as bulk:
        Bundle.unpack(raw)
    assert bulk.value.message == single.value.message


def test_two_records_for_one_hpa_or_gpa_are_refused(sealed):
    raw = sealed.pack()
    first_hpa = raw[0x40 + len(sealed.manifest.pack()) + WRAPPED_KEY_SIZE:][:8]
    with pytest.raises(FieldValueError, match="same hpa"):
        Bundle.unpack(_damage(raw, sealed, 50, 0, first_hpa))
    image = next(i for i, p in enumerate(sealed.pages) if p.page_type == PageType.IMAGE)
    gpa = sealed.pages[image].gpa.to_bytes(8, "little")
    with pytest.raises(FieldValueError, match="same gpa"):
        Bundle.unpack(_damage(raw, sealed, image + 1, 8, gpa))


def test_records_given_as_objects_are_checked_as_their_pack_checks():
    with pytest.raises(FieldValueError, match="IMAGE page needs a gpa"):
        PageRecords([PageRecord(0x1000, None, PageType.IMAGE, 7, bytes(PAGE))])
    with pytest.raises(FieldValueError, match="perms"):
        ZeroRecords([ZeroPageRecord(0x1000, 0x2000, 9)])
    records = PageRecords([PageRecord(0x1000, 0x0, PageType.IMAGE, 7, b"\1" * PAGE)])
    records[0] = PageRecord(0x5000, 0x3000, PageType.IMAGE, 3, b"\2" * PAGE, True)
    records.append(PageRecord(0x6000, None, PageType.VMCS, 0, b"\3" * PAGE, True))
    assert [(p.hpa, p.gpa, p.page_type, p.perms, p.host_verifiable) for p in records] == [
        (0x5000, 0x3000, PageType.IMAGE, 3, True), (0x6000, None, PageType.VMCS, 0, True)]
    with pytest.raises(FieldValueError, match="array"):
        PageRecords(np.zeros(2, dtype=np.uint8))


def test_the_host_vmm_hands_the_records_over_as_entries(sealed):
    entries = page_entries(sealed)
    assert entries.tobytes() == pack_page_entries([(p.hpa, p.gpa, int(p.page_type), p.perms, p.host_verifiable)
                                                   for p in sealed.pages])


def test_table_pages_needed_counts_distinct_tables():
    rng = np.random.default_rng(5)
    gpas = (rng.choice(1 << 24, size=3000, replace=False).astype(np.uint64) * np.uint64(PAGE)).tolist()
    by_set = 1 + sum(len({gpa >> shift for gpa in gpas}) for shift in (39, 30, 21))
    assert ept_table_pages_needed(gpas) == ept_table_pages_needed(np.array(gpas, dtype=np.uint64)) == by_set
    assert ept_table_pages_needed([]) == 1
    with pytest.raises(EptError, match="-4096"):
        ept_table_pages_needed([-PAGE])


# ------------------------------------------------------- page data as an array, over the socket

@pytest.fixture
def client(tmp_path):
    identity = PlatformIdentity.create_throwaway(RootCA.create_throwaway())
    with serving(Platform(identity, 16 * MiB, tmp_path / "platform"), frame_timeout=5) as (path, _):
        with HostPortClient(path, timeout=10) as c:
            yield c


def test_page_data_from_a_strided_array_lands_as_from_bytes(client):
    client.max_data = 3 * PAGE                  # several requests
    alloc = client.alloc(npages=7)
    records = np.zeros(7, dtype=[("head", "u1", (24,)), ("data", "u1", (PAGE,))])
    records["data"] = np.frombuffer(os.urandom(7 * PAGE), dtype=np.uint8).reshape(7, PAGE)
    hpas = list(reversed(alloc.hpas))
    client.write_phys_pages(np.array(hpas, dtype=np.uint64), records["data"])
    assert client.read_phys_pages(hpas) == records["data"].tobytes()
    with pytest.raises(HostPortBadRequestError, match="for 6 pages"):
        client.write_phys_pages(hpas[:6], records["data"])
    with pytest.raises(HostPortBadRequestError, match=r"\(n, 4096\) uint8"):
        client.write_phys_pages(hpas, records["data"].astype(np.uint16))
    entries = np.zeros(0, dtype=PAGE_ENTRY_DTYPE)
    assert pack_page_entries(entries) == b""
