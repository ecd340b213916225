"""The host layout: page count, JSON format, the hpa convention, the expected EPTP."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qemu_kd.formats.ept import EPT_PERMS, build_ept_arrays, ept_table_pages_needed
from qemu_kd.formats.errors import MagicError, VersionError
from qemu_kd.formats.layout import (
    HostLayout,
    LayoutError,
    LayoutSizeError,
    ept_pages_needed,
    expected_eptp,
    pages_needed,
    plan,
)

MiB = 1 << 20
CHAIN = (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")


def make_layout(memory_size=64 * MiB, keyid=3, first=0x100000, order=None, **changes):
    n = pages_needed(memory_size)
    hpas = [first + 0x1000 * i for i in range(n)]
    if order == "reversed":
        hpas.reverse()
    values = dict(keyid=keyid, memory_size=memory_size, hpas=hpas, host_data=b"host-data",
                  platform_chain_pem=CHAIN)
    values.update(changes)
    return HostLayout(**values)


def test_pages_needed():
    # 64 MiB: 16384 guest pages, VMCS, save area, PML4 + PDPT + PD + 32 PTs.
    assert ept_pages_needed(64 * MiB) == 35
    assert pages_needed(64 * MiB) == 16384 + 2 + 35
    assert pages_needed(256 * MiB) == 65536 + 2 + 1 + 1 + 1 + 128
    assert pages_needed(4096) == 1 + 2 + 4
    # Crossing a 1 GiB boundary needs a second page directory.
    assert ept_pages_needed((1 << 30) + 2 * MiB) == ept_table_pages_needed(
        range(0, (1 << 30) + 2 * MiB, 4096)) == 1 + 1 + 2 + 513
    for bad in (0, -4096, 4095, 1.5, True):
        with pytest.raises(LayoutError, match="multiple of 4096"):
            pages_needed(bad)


def test_plan_follows_the_convention():
    layout = make_layout(order="reversed")
    p = plan(layout)
    hpas = layout.hpas
    assert p.vmcs == hpas[0] and p.save == hpas[1]
    assert p.ept == hpas[2:37] and p.pml4 == hpas[2]
    assert p.guest == hpas[37:] and len(p.guest) == 16384
    assert p.guest_hpa(0) == hpas[37] and p.guest_hpa(0x5000) == hpas[37 + 5]
    assert p.all_hpas() == hpas
    with pytest.raises(LayoutError):
        p.guest_hpa(64 * MiB)


def test_expected_eptp_is_what_the_builder_writes():
    layout = make_layout(order="reversed")
    p = plan(layout)
    n = len(p.guest)
    eptp, tables = build_ept_arrays(np.arange(n, dtype=np.uint64) * 4096, p.guest, [EPT_PERMS] * n, p.ept)
    assert expected_eptp(layout) == eptp == p.ept[0] | 6 | 3 << 3
    assert list(tables) == p.ept          # every EPT hpa is used, in layout order


def test_wrong_page_count_is_a_clear_error():
    good = make_layout()
    short = HostLayout(good.keyid, good.memory_size, good.hpas[:-1], good.host_data, CHAIN)
    with pytest.raises(LayoutSizeError, match=r"layout has 16420 pages, a 64 MiB guest needs 16421"):
        plan(short)
    with pytest.raises(LayoutSizeError):
        expected_eptp(HostLayout(3, 64 * MiB, good.hpas + [1 << 30], b"", CHAIN))


def test_json_round_trip_and_file(tmp_path):
    layout = make_layout()
    assert layout.host_data == b"host-data".ljust(32, b"\0")
    assert HostLayout.unpack(layout.pack()) == layout
    doc = json.loads(layout.pack())
    assert doc["format"] == "qemu-kd host layout" and doc["version"] == 1
    assert doc["hpas"][:2] == [0x100000, 0x101000] and doc["host_data"].startswith(b"host-data".hex())
    path = tmp_path / "layout.json"
    layout.write(path)
    assert HostLayout.read(path) == layout
    assert [p.name for p in tmp_path.iterdir()] == ["layout.json"]


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=63), st.integers(min_value=1, max_value=64),
       st.binary(max_size=32), st.randoms(use_true_random=False))
def test_round_trip_any_layout(keyid, pages, host_data, rnd):
    memory_size = pages * 4096
    hpas = [0x1000 * i for i in rnd.sample(range(1 << 16), pages_needed(memory_size))]
    layout = HostLayout(keyid, memory_size, hpas, host_data, CHAIN)
    again = HostLayout.unpack(layout.pack())
    assert again == layout and again.hpas == hpas
    assert plan(again).guest == hpas[-pages:]


def test_strict_parsing():
    good = json.loads(make_layout().pack())

    def unpack(doc):
        return HostLayout.unpack(json.dumps(doc).encode())

    with pytest.raises(MagicError):
        unpack({**good, "format": "qemu-kd bundle manifest"})
    with pytest.raises(VersionError):
        unpack({**good, "version": 2})
    with pytest.raises(LayoutError, match=r"unknown \['extra'\]"):
        unpack({**good, "extra": 1})
    with pytest.raises(LayoutError, match=r"missing \['host_data'\]"):
        unpack({k: v for k, v in good.items() if k != "host_data"})
    for keyid in (0, 64, True, "3"):
        with pytest.raises(LayoutError, match="KeyID|keyid"):
            unpack({**good, "keyid": keyid})
    with pytest.raises(LayoutError, match="multiple of 4096"):
        unpack({**good, "memory_size": 1000})
    with pytest.raises(LayoutError, match="list of integers"):
        unpack({**good, "hpas": "0x1000"})
    with pytest.raises(LayoutError, match="list of integers"):
        unpack({**good, "hpas": [4096, 8192.0]})
    with pytest.raises(LayoutError, match="twice"):
        unpack({**good, "hpas": [4096, 4096]})
    with pytest.raises(LayoutError, match="page-aligned"):
        unpack({**good, "hpas": [4097]})
    with pytest.raises(LayoutError, match="page-aligned"):
        unpack({**good, "hpas": [1 << 40]})
    with pytest.raises(LayoutError, match="host_data"):
        unpack({**good, "host_data": "00" * 33})
    with pytest.raises(LayoutError, match="host_data"):
        unpack({**good, "host_data": "zz"})
    with pytest.raises(LayoutError, match="PEM"):
        unpack({**good, "platform_chain_pem": "not a certificate"})
    with pytest.raises(LayoutError, match="not UTF-8 JSON"):
        HostLayout.unpack(b'{"format": "qemu-kd host layout", ')
    with pytest.raises(LayoutError, match="not UTF-8 JSON"):
        HostLayout.unpack(b"\xff\xfe")


def test_corrupted_file_names_the_file(tmp_path):
    path = tmp_path / "layout.json"
    path.write_bytes(make_layout().pack()[:-40])
    with pytest.raises(LayoutError, match=r"layout\.json: host layout is not UTF-8 JSON"):
        HostLayout.read(path)
    with pytest.raises(LayoutError, match="does not exist"):
        HostLayout.read(tmp_path / "missing.json")


def test_importable_without_keys_mee_or_platform():
    """The untrusted host VMM imports this module: it must not pull in secrets or the platform."""
    code = ("import sys, qemu_kd.formats.layout; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('qemu_kd', 'cryptography')))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    assert "qemu_kd.formats.layout" in loaded
    assert not any(m.startswith("cryptography") for m in loaded), loaded
    assert all(m == "qemu_kd" or m.split(".")[1] in ("common", "formats") for m in loaded if m.startswith("qemu_kd")), loaded
    assert "qemu_kd.formats.keywrap" not in loaded


# -- hpa checks: every entry, the first offender named ------------------------------------

def first_offender(hpas):
    """What a check of one entry after the other reports first: ("bad", hpa), ("twice", hpa)
    or None (written here independently of the module)."""
    seen = set()
    for hpa in hpas:
        if type(hpa) is not int or not (0 <= hpa < 1 << 40) or hpa % 4096:
            return "bad", hpa
        if hpa in seen:
            return "twice", hpa
        seen.add(hpa)
    return None


def layout_error(hpas):
    try:
        HostLayout(3, 4096, hpas, b"", CHAIN)
    except LayoutError as exc:
        return exc.message
    return None


def expected_error(hpas):
    found = first_offender(hpas)
    if found is None:
        return None
    kind, hpa = found
    if kind == "twice":
        return f"layout lists hpa 0x{hpa:x} twice"
    return f"layout hpa {hpa!r} is not a page-aligned host-physical address below 1 TiB"


ODD_ENTRIES = [4097, -4096, 1 << 40, (1 << 40) + 4096, 1 << 64, 8192.0, True, False, "4096", None]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40).map(lambda i: i * 4096), st.sampled_from(ODD_ENTRIES)),
                max_size=40),
       st.booleans())
def test_the_first_bad_or_repeated_hpa_is_reported(hpas, ascending):
    if ascending and all(type(h) is int for h in hpas):
        hpas = sorted(hpas)
    assert layout_error(hpas) == expected_error(hpas)


def test_a_repeat_before_a_bad_hpa_is_reported_first_and_the_reverse():
    assert layout_error([8192, 4096, 8192, 4097]) == "layout lists hpa 0x2000 twice"
    assert layout_error([8192, 4097, 4096, 8192]) == expected_error([8192, 4097, 4096, 8192])
    assert "4097" in layout_error([8192, 4097, 4096, 8192])
    # Of two repeated hpas, the one whose second entry comes first.
    assert layout_error([0x5000, 0x3000, 0x1000, 0x3000, 0x5000]) == "layout lists hpa 0x3000 twice"
    assert layout_error([0x5000, 0x3000, 0x1000, 0x5000, 0x3000]) == "layout lists hpa 0x5000 twice"


def test_a_large_layout_with_one_bad_entry_names_it():
    n = pages_needed(256 * MiB)
    hpas = [0x100000 + 4096 * i for i in range(n)]
    assert layout_error(hpas) is None
    for where, value, message in [(n - 1, hpas[n // 2], f"layout lists hpa 0x{hpas[n // 2]:x} twice"),
                                  (n // 3, 0x100001, "layout hpa 1048577 is not a page-aligned"),
                                  (n // 3, True, "layout hpa True is not a page-aligned")]:
        changed = list(hpas)
        changed[where] = value
        assert layout_error(changed).startswith(message)
        assert layout_error(changed[::-1]).startswith(message)


def test_hpas_may_be_an_array_and_stay_a_list_of_ints():
    hpas = np.arange(pages_needed(64 * MiB), dtype=np.uint64) * 4096 + 0x100000
    layout = HostLayout(3, 64 * MiB, hpas, b"", CHAIN)
    assert type(layout.hpas) is list and all(type(h) is int for h in layout.hpas[:3])
    assert layout == make_layout(first=0x100000, host_data=b"")
    assert HostLayout.unpack(layout.pack()) == layout
    with pytest.raises(LayoutError, match="0x101000 twice"):
        HostLayout(3, 64 * MiB, np.array([0x100000, 0x101000, 0x101000], dtype=np.uint64), b"", CHAIN)


@pytest.mark.parametrize("memory_size", [4096, 2 * MiB, 2 * MiB + 4096, 64 * MiB, 1 << 30,
                                         (1 << 30) + 4096, 3 * (1 << 30) + 5 * MiB])
def test_ept_pages_needed_counts_what_the_tables_need(memory_size):
    assert ept_pages_needed(memory_size) == ept_table_pages_needed(
        np.arange(0, memory_size, 4096, dtype=np.uint64))
