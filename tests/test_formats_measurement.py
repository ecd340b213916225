import hashlib
import struct

import pytest
from hypothesis import given, settings, strategies as st

from qemu_kd.formats.errors import (
    FieldValueError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    VersionError,
)
from qemu_kd.formats.measurement import (
    PAGE_INFO_SIZE,
    POLICY_RECORD,
    ZERO_RUN_RECORD,
    LaunchMeasurement,
    MeasurementError,
    PageInfo,
    PageType,
    host_verifiable_digest,
    measure_offline,
    page_digests,
)
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vcpu import VcpuState
from qemu_kd.formats.vmcs import Vmcs

PAGES = [
    (0x0, PageType.IMAGE, 7, bytes(range(256)) * 16),
    (0x1000, PageType.IMAGE, 3, b"\xA5" * 4096),
    (0x2000, PageType.ZERO, 3, None),
    (0x100000, PageType.IMAGE, 5, b"qemu-kd".ljust(4096, b"\0")),
]
GUEST_STATE = b"synthetic guest state"

# Computed once from the documented chaining rule and pinned: a change here
# changes every sealed guest's expected measurement.
GOLDEN_NO_DEBUG = bytes.fromhex(
    "e1599cba1260b170c028b82aaeb083879a9ace870ebdc6693c2aca57cb763d8c"
    "dee72080de2f7aa36e01d02799df89da")
GOLDEN_DEBUG = bytes.fromhex(
    "6e29dc21400285f60da85d83e06069f29796d133017ffc403bdae0fe3f0301f7"
    "385dc423010f57376559247f5824dfa5")
GOLDEN_NO_PAGES = bytes.fromhex(
    "4fa9b11e9a94cd3861af64ee61f07b84d585a1caa677d7c552df4b222d6cd2dc"
    "9825077c06c20b48ac8dc5919ada65b6")
GOLDEN_VMCS_GUEST_STATE_SHA384 = bytes.fromhex(
    "3c9e9e6b7b812f1cd45089e195f2dc1016f0ffce9e21a8523ca7828cb06fa9fe"
    "e1cd711930f8643bcd1f1318bab44bfd")


def test_golden_vectors():
    assert measure_offline(PAGES, GUEST_STATE, Policy.make()) == GOLDEN_NO_DEBUG
    assert measure_offline(PAGES, GUEST_STATE, Policy.make(debug=True)) == GOLDEN_DEBUG
    assert measure_offline([], GUEST_STATE, Policy.make()) == GOLDEN_NO_PAGES
    gs = Vmcs(guest=VcpuState(rip=0x100200, rsi=0x7000, rsp=0x8FF0)).guest_state_bytes()
    assert hashlib.sha384(gs).digest() == GOLDEN_VMCS_GUEST_STATE_SHA384


def _record(prev, contents, record_type, perms, gpa):
    return struct.pack("<48s48sHBBIQ", prev, contents, 0x70, record_type, perms, 0, gpa)


def test_chaining_rule_as_documented():
    """Recompute the chain by hand from docs/formats.md."""
    policy = Policy.make()
    d = hashlib.sha384(_record(bytes(48), policy.pack() + bytes(40), 0x10, 0, 0)).digest()
    for gpa, page_type, perms, content in PAGES:
        if content is None:                     # the one ZERO page: a run of one page
            d = hashlib.sha384(_record(d, struct.pack("<Q", 1) + bytes(40), 0x11, perms, gpa)).digest()
        else:
            d = hashlib.sha384(_record(d, hashlib.sha384(content).digest(), page_type, perms, gpa)).digest()
    d = hashlib.sha384(_record(d, hashlib.sha384(GUEST_STATE).digest(), 3, 0, 0)).digest()
    assert d == GOLDEN_NO_DEBUG


def test_incremental_equals_offline_and_vmcs_is_chained_last():
    m = LaunchMeasurement(Policy.make())
    start = m.digest
    m.add_vmcs(GUEST_STATE)                 # may come first; still chained last
    assert m.digest == start
    for page in PAGES:
        before = m.digest
        m.add_page(*page)
        assert m.digest != before
    assert m.finalize() == GOLDEN_NO_DEBUG
    assert m.digest == GOLDEN_NO_DEBUG and m.finalize() == GOLDEN_NO_DEBUG


def test_independent_of_host_layout():
    """The API takes no hpas: two layouts of the same content give one digest."""
    from qemu_kd.formats.ept import EptMapping, build_ept, walk_ept
    contents = {gpa: content for gpa, _, _, content in PAGES}
    perms = {gpa: p for gpa, _, p, _ in PAGES}
    digests = []
    for base in (0x40000000, 0x7000000):
        maps = [EptMapping(gpa, base + 0x5000 * i, perms[gpa]) for i, gpa in enumerate(contents)]
        eptp, tables = build_ept(maps, [base - 0x1000 * (i + 1) for i in range(8)])
        walk = walk_ept(eptp, tables.__getitem__)
        pages = [(m.gpa, PageType.ZERO if contents[m.gpa] is None else PageType.IMAGE, m.perms,
                  contents[m.gpa]) for m in walk.mappings]
        digests.append(measure_offline(pages, GUEST_STATE, Policy.make()))
    assert digests[0] == digests[1] == GOLDEN_NO_DEBUG


def test_everything_measured_changes_the_digest():
    base = measure_offline(PAGES, GUEST_STATE, Policy.make())
    variants = [
        [(PAGES[0][0], PAGES[0][1], PAGES[0][2], b"\x01" + PAGES[0][3][1:])] + PAGES[1:],
        [(PAGES[0][0], PAGES[0][1], 5, PAGES[0][3])] + PAGES[1:],
        [(0x3000, PageType.ZERO, 3, None) if p[1] == PageType.ZERO else p for p in PAGES],
        [(0x2000, PageType.IMAGE, 3, bytes(4096)) if p[1] == PageType.ZERO else p for p in PAGES],
        PAGES[:-1],
    ]
    for pages in variants:
        assert measure_offline(pages, GUEST_STATE, Policy.make()) != base
    assert measure_offline(PAGES, GUEST_STATE + b"!", Policy.make()) != base


def test_protocol_errors():
    m = LaunchMeasurement(Policy.make())
    m.add_page(0x2000, PageType.ZERO, 3, None)
    with pytest.raises(MeasurementError, match="increasing gpa"):
        m.add_page(0x1000, PageType.IMAGE, 3, bytes(4096))
    with pytest.raises(MeasurementError, match="increasing gpa"):
        m.add_page(0x2000, PageType.ZERO, 3, None)
    with pytest.raises(MeasurementError, match="not measured page by page"):
        m.add_page(0x3000, PageType.EPT, 3, bytes(4096))
    with pytest.raises(MeasurementError, match="exactly 4096"):
        m.add_page(0x3000, PageType.IMAGE, 3, bytes(10))
    with pytest.raises(MeasurementError, match="without content"):
        m.add_page(0x3000, PageType.ZERO, 3, bytes(4096))
    with pytest.raises(MeasurementError, match="page-aligned"):
        m.add_page(0x3001, PageType.ZERO, 3, None)
    with pytest.raises(MeasurementError, match="no VMCS"):
        m.finalize()
    m.add_vmcs(b"x")
    with pytest.raises(MeasurementError, match="already measured"):
        m.add_vmcs(b"y")
    m.finalize()
    with pytest.raises(MeasurementError, match="finalized"):
        m.add_page(0x9000, PageType.ZERO, 3, None)


digests = st.binary(min_size=48, max_size=48)


@settings(max_examples=50)
@given(digests, digests, st.integers(min_value=0, max_value=(1 << 64) - 1),
       st.sampled_from([POLICY_RECORD, 1, ZERO_RUN_RECORD, 3]), st.integers(min_value=0, max_value=7))
def test_page_info_round_trip(prev, contents, gpa, record_type, perms):
    rec = PageInfo(prev, contents, gpa, record_type, perms)
    packed = rec.pack()
    assert len(packed) == PAGE_INFO_SIZE
    assert PageInfo.unpack(packed) == rec
    assert rec.next_digest() == hashlib.sha384(packed).digest()


def test_page_info_negative():
    good = bytearray(PageInfo(bytes(48), bytes(48), 0x1000, 1, 3).pack())
    with pytest.raises(TruncatedError):
        PageInfo.unpack(bytes(good[:-1]))
    with pytest.raises(OversizedError):
        PageInfo.unpack(bytes(good) + b"\0")
    bad = bytearray(good); bad[0x60] = 0x71
    with pytest.raises(VersionError):
        PageInfo.unpack(bytes(bad))
    bad = bytearray(good); bad[0x65] = 1
    with pytest.raises(ReservedBitsError):
        PageInfo.unpack(bytes(bad))
    bad = bytearray(good); bad[0x63] = 0x08
    with pytest.raises(ReservedBitsError):
        PageInfo.unpack(bytes(bad))
    for page_type in (2, 4):         # ZERO pages are measured as runs; EPT pages are never measured
        bad = bytearray(good); bad[0x62] = page_type
        with pytest.raises(FieldValueError):
            PageInfo.unpack(bytes(bad))


def test_host_verifiable_digest():
    a = host_verifiable_digest([(0x2000, b"\1" * 4096), (0x1000, b"\2" * 4096)])
    assert a == host_verifiable_digest([(0x1000, b"\2" * 4096), (0x2000, b"\1" * 4096)])
    expected = hashlib.sha384(b"KDHASHKD" + struct.pack("<Q", 0x1000) + b"\2" * 4096
                              + struct.pack("<Q", 0x2000) + b"\1" * 4096).digest()
    assert a == expected
    assert a != host_verifiable_digest([(0x3000, b"\1" * 4096), (0x1000, b"\2" * 4096)])


def test_add_zero_pages_equals_page_by_page():
    one, bulk = LaunchMeasurement(Policy.make()), LaunchMeasurement(Policy.make())
    gpas = [0x0, 0x1000, 0x5000, 0x200000]
    for gpa in gpas:
        one.add_page(gpa, PageType.ZERO, 3, None)
    bulk.add_zero_pages(gpas[:2], 3)
    bulk.add_zero_pages([], 3)
    bulk.add_zero_pages(gpas[2:], 3)
    assert bulk.digest == one.digest
    one.add_page(0x201000, PageType.IMAGE, 7, b"\x01" * 4096)
    bulk.add_page(0x201000, PageType.IMAGE, 7, b"\x01" * 4096)
    assert bulk.digest == one.digest
    with pytest.raises(MeasurementError, match="strictly increasing"):
        bulk.add_zero_pages([0x300000, 0x300000], 3)
    with pytest.raises(MeasurementError, match="strictly increasing"):
        bulk.add_zero_pages([0x1000], 3)
    with pytest.raises(MeasurementError, match="page-aligned"):
        bulk.add_zero_pages([0x300001], 3)
    with pytest.raises(MeasurementError, match="perms"):
        bulk.add_zero_pages([0x300000], 0)
    assert bulk.digest == one.digest                      # failed calls change nothing


# -- the measurement does not depend on the host's TSC frequency ---------------------------

def test_same_guest_measures_the_same_on_hosts_with_different_tsc(monkeypatch):
    """The default command line is measured without tsc_early_khz; the platform adds its own."""
    from types import SimpleNamespace

    import qemu_kd.platform.runtime as runtime
    import qemu_kd.qemu.launch as launch
    from qemu_kd.formats import bootlayout
    from qemu_kd.tenant.measure import measure
    from synthetic import fake_bzimage

    kernel, initrd, mem = fake_bzimage(), b"initrd" * 999, 64 << 20
    seen = {}
    for host_khz in (2_100_000, 3_700_123):
        monkeypatch.setattr(launch, "host_tsc_khz", lambda khz=host_khz: khz)
        monkeypatch.setattr(runtime, "host_tsc_khz", lambda khz=host_khz: khz)
        cmdline = launch.full_cmdline()
        digest = measure(kernel, initrd, cmdline, mem, Policy.make())
        # What that host's platform then does in guest RAM at launch.
        lay = bootlayout.build_boot_layout(kernel, initrd, cmdline, mem)
        ram = bytearray(mem)
        for gpa, page in lay.pages().items():
            ram[gpa:gpa + len(page)] = page
        machine = SimpleNamespace(map_ram=lambda: ram, write_ram=lambda gpa, data: ram.__setitem__(
            slice(gpa, gpa + len(data)), data))
        domain = SimpleNamespace(keyid=1, policy=Policy.make(), measurement=None)
        rt = runtime.DomainRuntime(domain, identity=None)
        rt.machine, rt.mem_size = machine, mem
        rt._complete_cmdline(lay.vcpu.rsi)
        line = bytes(ram[bootlayout.CMDLINE_GPA:ram.index(b"\0", bootlayout.CMDLINE_GPA)]).decode()
        seen[host_khz] = (digest, line, rt._info({})["tsc_khz"])
    (d1, line1, khz1), (d2, line2, khz2) = seen.values()
    assert d1 == d2
    assert line1.endswith(" tsc_early_khz=2100000") and line2.endswith(" tsc_early_khz=3700123")
    assert (khz1, khz2) == (2_100_000, 3_700_123)


def test_a_command_line_without_room_refuses_the_launch(monkeypatch):
    from types import SimpleNamespace

    import qemu_kd.platform.runtime as runtime

    ram = bytearray(64 << 20)
    ram[0x7000 + 0x202:0x7000 + 0x206] = b"HdrS"
    struct.pack_into("<H", ram, 0x7000 + 0x206, 0x020F)
    struct.pack_into("<I", ram, 0x7000 + 0x228, 0x20000)
    struct.pack_into("<I", ram, 0x7000 + 0x238, 10)          # cmdline_size 10
    ram[0x20000:0x2000A] = b"0123456789"
    monkeypatch.setattr(runtime, "host_tsc_khz", lambda: 1000)
    rt = runtime.DomainRuntime(SimpleNamespace(keyid=3), identity=None)
    rt.machine, rt.mem_size = SimpleNamespace(map_ram=lambda: ram), len(ram)
    with pytest.raises(runtime.LaunchError, match="key domain 3: the kernel command line cannot take"):
        rt._complete_cmdline(0x7000)


# ------------------------------------------------------------ many pages at once

def _bulk(pages, *, split: int | None = None) -> bytes:
    """The digest of ``pages`` through add_pages (in two calls when ``split`` is given)."""
    import numpy as np

    m = LaunchMeasurement(Policy.make())
    parts = [pages] if split is None else [pages[:split], pages[split:]]
    for part in parts:
        m.add_pages(np.array([p[0] for p in part], dtype=np.uint64), np.array([int(p[1]) for p in part]),
                    np.array([p[2] for p in part]), [p[3] for p in part if p[1] == PageType.IMAGE])
    m.add_vmcs(GUEST_STATE)
    return m.finalize()


def test_pages_added_at_once_chain_the_records_added_one_by_one():
    assert _bulk(PAGES) == GOLDEN_NO_DEBUG
    assert _bulk(PAGES, split=2) == GOLDEN_NO_DEBUG
    many = [(0x1000 * i, PageType.IMAGE if i % 5 == 0 else PageType.ZERO, 1 + i % 7,
             bytes([i % 256]) * 4096 if i % 5 == 0 else None) for i in range(300)]
    assert _bulk(many) == measure_offline(many, GUEST_STATE, Policy.make())
    assert _bulk([]) == measure_offline([], GUEST_STATE, Policy.make())


@pytest.mark.parametrize("pages, message", [
    ([(0x2000, PageType.ZERO, 3, None), (0x1000, PageType.ZERO, 3, None)], "after gpa 0x2000"),
    ([(0x1000, PageType.ZERO, 3, None), (0x1000, PageType.ZERO, 3, None)], "after gpa 0x1000"),
    ([(0x1800, PageType.ZERO, 3, None)], "not a page-aligned"),
    ([(0x1000, PageType.ZERO, 0, None)], "perms 0"),
    ([(0x1000, PageType.ZERO, 8, None)], "perms 8"),
    ([(0x1000, PageType.EPT, 3, None)], "not measured page by page"),
    ([(0x1000, 9, 3, None)], "9 pages are not measured"),
    ([(0x1000, PageType.IMAGE, 3, bytes(10))], "exactly 4096"),
])
def test_pages_added_at_once_are_checked_as_one_by_one(pages, message):
    with pytest.raises(MeasurementError, match=message):
        _bulk(pages)


def test_pages_added_at_once_need_one_content_per_image_page_and_come_after_the_last():
    import numpy as np

    m = LaunchMeasurement(Policy.make())
    with pytest.raises(MeasurementError, match="1 image pages need their content, 0"):
        m.add_pages(np.array([0]), np.array([1]), np.array([7]), [])
    with pytest.raises(MeasurementError, match="not a page-aligned"):
        m.add_pages(np.array([-4096]), np.array([2]), np.array([7]), [])
    m.add_page(0x5000, PageType.ZERO, 3, None)
    with pytest.raises(MeasurementError, match="0x5000 added after gpa 0x5000"):
        m.add_pages(np.array([0x5000]), np.array([2]), np.array([3]), [])
    m.add_vmcs(GUEST_STATE)
    m.finalize()
    with pytest.raises(MeasurementError, match="already finalized"):
        m.add_pages(np.array([0x6000]), np.array([2]), np.array([3]), [])


def test_page_digests_are_each_page_s_sha384():
    import numpy as np

    rng = np.random.default_rng(14)
    pages = rng.integers(0, 256, (7, 4096), dtype=np.uint8)
    pages[3] = 0                                            # a zero page among them
    expected = [hashlib.sha384(page.tobytes()).digest() for page in pages]
    for source in (pages, [page.tobytes() for page in pages], pages[::-1][::-1]):
        digests = page_digests(source)
        assert digests.shape == (7, 48) and digests.dtype == np.uint8
        assert [row.tobytes() for row in digests] == expected
    # Every other row of a larger array: not contiguous, still each row's digest.
    wide = np.zeros((14, 4096), dtype=np.uint8)
    wide[::2] = pages
    assert [row.tobytes() for row in page_digests(wide[::2])] == expected
    assert page_digests([]).shape == (0, 48)
    for bad in (np.zeros((2, 100), dtype=np.uint8), np.zeros(4096, dtype=np.uint8),
                np.zeros((1, 1024), dtype=np.uint32), [bytes(4096), bytes(4095)]):
        with pytest.raises(MeasurementError, match="4096"):
            page_digests(bad)


def test_pages_added_at_once_from_an_array_chain_as_one_by_one():
    import numpy as np

    rng = np.random.default_rng(3)
    count = 301                                            # odd, over several records per type
    types = np.where(rng.random(count) < 0.3, int(PageType.IMAGE), int(PageType.ZERO))
    gpas = np.arange(count, dtype=np.uint64) * 4096 + 0x100000
    perms = (np.arange(count) % 7 + 1).astype(np.uint8)
    n_image = int((types == PageType.IMAGE).sum())
    contents = np.zeros((2 * n_image, 4096), dtype=np.uint8)
    contents[::2] = rng.integers(0, 256, (n_image, 4096), dtype=np.uint8)
    contents[0] = 0                                        # an IMAGE page of zeros is still an image page
    image = contents[::2]                                  # a view with a stride
    rows = iter(image)
    pages = [(int(g), PageType(int(t)), int(p), next(rows).tobytes() if t == PageType.IMAGE else None)
             for g, t, p in zip(gpas, types, perms)]
    m = LaunchMeasurement(Policy.make())
    m.add_pages(gpas, types, perms, image)
    m.add_vmcs(GUEST_STATE)
    assert m.finalize() == measure_offline(pages, GUEST_STATE, Policy.make())
    with pytest.raises(MeasurementError, match="exactly 4096"):
        LaunchMeasurement(Policy.make()).add_pages(gpas[:1], np.array([1]), perms[:1],
                                                   np.zeros((1, 100), dtype=np.uint8))


def test_pages_added_with_their_digests_chain_as_with_their_content():
    import numpy as np

    many = [(0x1000 * i, PageType.IMAGE if i % 7 in (0, 1) else PageType.ZERO, 7 if i < 40 else 3,
             bytes([i]) * 4096 if i % 7 in (0, 1) else None) for i in range(60)]
    gpas = np.array([p[0] for p in many], dtype=np.uint64)
    types = np.array([int(p[1]) for p in many])
    perms = np.array([p[2] for p in many])
    contents = [p[3] for p in many if p[3] is not None]
    hashed = LaunchMeasurement(Policy.make())
    for lo, hi in ((0, 23), (23, 24), (24, 60)):                  # split inside runs too
        hashed.add_hashed_pages(gpas[lo:hi], types[lo:hi], perms[lo:hi],
                                page_digests([p[3] for p in many[lo:hi] if p[3] is not None]))
    hashed.add_vmcs(GUEST_STATE)
    assert hashed.finalize() == measure_offline(many, GUEST_STATE, Policy.make()) == _bulk(many)
    m = LaunchMeasurement(Policy.make())
    for bad in (page_digests(contents)[:-1], page_digests(contents).astype(np.uint16),
                np.zeros((len(contents), 32), dtype=np.uint8)):
        with pytest.raises(MeasurementError, match="need their digests"):
            m.add_hashed_pages(gpas, types, perms, bad)
    with pytest.raises(MeasurementError, match="perms 0"):
        m.add_hashed_pages(gpas, types, perms * 0, page_digests(contents))
