"""ZERO pages are measured as runs: one ZERO_RUN record per maximal run of consecutive zero
pages with one perms value (docs/formats.md §5.3).  Each run still binds every page's gpa,
type and perms, and every way of adding the pages chains the same records."""

import hashlib
import struct

import numpy as np
import pytest

from qemu_kd.formats.measurement import LaunchMeasurement, PageType, measure_offline
from qemu_kd.formats.policy import Policy

PAGE = 0x1000
GUEST_STATE = b"synthetic guest state"
IMAGE_A = bytes(range(256)) * 16
IMAGE_B = b"\x5a" * PAGE


def zeros(first: int, count: int, perms: int = 7) -> list[tuple]:
    return [(first + i * PAGE, PageType.ZERO, perms, None) for i in range(count)]


# Runs of 10, 10 and 4 zero pages: split by an IMAGE page, then by a gap and a perms change.
BASE = (zeros(0x0, 10) + [(0xA000, PageType.IMAGE, 7, IMAGE_A)] + zeros(0xB000, 10)
        + zeros(0x20000, 4, perms=3) + [(0x30000, PageType.IMAGE, 5, IMAGE_B)])


def _by_hand(records: list[tuple]) -> bytes:
    """The chain from the documented bytes: ("run", gpa, pages, perms) or ("image", gpa, content, perms)."""
    def record(prev, contents, record_type, perms, gpa):
        return hashlib.sha384(struct.pack("<48s48sHBBIQ", prev, contents, 0x70, record_type, perms, 0,
                                          gpa)).digest()

    d = record(bytes(48), Policy.make().pack() + bytes(40), 0x10, 0, 0)
    for kind, gpa, what, perms in records:
        if kind == "run":
            d = record(d, struct.pack("<Q", what) + bytes(40), 0x11, perms, gpa)
        else:
            d = record(d, hashlib.sha384(what).digest(), 1, perms, gpa)
    return record(d, hashlib.sha384(GUEST_STATE).digest(), 3, 0, 0)


def _offline(pages) -> bytes:
    return measure_offline(pages, GUEST_STATE, Policy.make())


def _arrays(pages, cuts=()) -> bytes:
    """The digest through add_pages, the pages cut into several calls at ``cuts``."""
    m = LaunchMeasurement(Policy.make())
    bounds = [0, *cuts, len(pages)]
    for lo, hi in zip(bounds, bounds[1:]):
        part = pages[lo:hi]
        m.add_pages(np.array([p[0] for p in part], dtype=np.uint64), np.array([int(p[1]) for p in part]),
                    np.array([p[2] for p in part], dtype=np.uint8),
                    np.array([np.frombuffer(p[3], dtype=np.uint8) for p in part if p[3] is not None],
                             dtype=np.uint8).reshape(-1, PAGE))
    m.add_vmcs(GUEST_STATE)
    return m.finalize()


def _mixed(pages) -> bytes:
    """One by one for IMAGE pages, add_zero_pages for each stretch of zero pages of one perms."""
    m = LaunchMeasurement(Policy.make())
    i = 0
    while i < len(pages):
        gpa, page_type, perms, content = pages[i]
        if page_type == PageType.IMAGE:
            m.add_page(gpa, page_type, perms, content)
            i += 1
            continue
        j = i
        while j < len(pages) and pages[j][1] == PageType.ZERO and pages[j][2] == perms:
            j += 1
        m.add_zero_pages([p[0] for p in pages[i:j]], perms)
        i = j
    m.add_vmcs(GUEST_STATE)
    return m.finalize()


def test_one_record_per_zero_run_as_documented():
    assert _offline(BASE) == _by_hand([("run", 0x0, 10, 7), ("image", 0xA000, IMAGE_A, 7),
                                       ("run", 0xB000, 10, 7), ("run", 0x20000, 4, 3),
                                       ("image", 0x30000, IMAGE_B, 5)])
    # A run ends at a perms change even with the next gpa contiguous.
    assert _offline(zeros(0x0, 3) + zeros(0x3000, 2, perms=3)) == _by_hand(
        [("run", 0x0, 3, 7), ("run", 0x3000, 2, 3)])


def _without(pages, gpa):
    return [p for p in pages if p[0] != gpa]


def _replace(pages, gpa, new):
    return [new if p[0] == gpa else p for p in pages]


VARIANTS = {
    "a zero page moved up by one page at a run's end": _replace(BASE, 0x14000, (0x15000, PageType.ZERO, 7, None)),
    "a zero page moved down by one page at a run's start": _replace(BASE, 0x20000,
                                                                    (0x1F000, PageType.ZERO, 3, None)),
    "a zero page with other perms in the middle of a run": _replace(BASE, 0x5000, (0x5000, PageType.ZERO, 3, None)),
    "a run split by an image page of zeros": _replace(BASE, 0x5000, (0x5000, PageType.IMAGE, 7, bytes(PAGE))),
    "a run split by a gap": _without(BASE, 0x5000),
    "a zero page dropped at a run's end": _without(BASE, 0x9000),
    "the last zero page dropped": _without(BASE, 0x23000),
    "a zero page dropped at a run's start": _without(BASE, 0x0),
    "a zero page added at a run's end": BASE[:-1] + zeros(0x24000, 1, perms=3) + BASE[-1:],
    "a zero page filling the gap between two runs": sorted(BASE + zeros(0x15000, 1), key=lambda p: p[0]),
    "a run with other perms": [(g, t, 3 if t == PageType.ZERO and g < 0xA000 else p, c) for g, t, p, c in BASE],
    "a run's gpas all shifted by one page": [(g + PAGE if t == PageType.ZERO and 0xA000 < g < 0x20000 else g,
                                              t, p, c) for g, t, p, c in BASE],
}


def test_every_change_to_a_zero_run_changes_the_digest():
    digests = {"base": _offline(BASE)} | {name: _offline(pages) for name, pages in VARIANTS.items()}
    names = {}
    for name, digest in digests.items():
        assert digest not in names, f"{name!r} measures as {names.get(digest)!r}"
        names[digest] = name


@pytest.mark.parametrize("name", ["base", *VARIANTS])
def test_page_by_page_and_array_apis_chain_the_same_records(name):
    pages = BASE if name == "base" else VARIANTS[name]
    expected = _offline(pages)
    assert _arrays(pages) == expected
    assert _mixed(pages) == expected
    # Cut anywhere (inside runs too), the open run carries over to the next call.
    for cut in range(1, len(pages)):
        assert _arrays(pages, [cut]) == expected, cut
    assert _arrays(pages, list(range(1, len(pages)))) == expected


def test_reading_the_digest_mid_run_leaves_the_run_open():
    m = LaunchMeasurement(Policy.make())
    seen = []
    for page in BASE:
        m.add_page(*page)
        seen.append(m.digest)
    m.add_vmcs(GUEST_STATE)
    assert m.finalize() == _offline(BASE)
    # The value read after a prefix is that prefix's chain with its last run closed there.
    for n in (3, 10, 11, 15):
        prefix = LaunchMeasurement(Policy.make())
        prefix.add_pages(np.array([p[0] for p in BASE[:n]], dtype=np.uint64),
                         np.array([int(p[1]) for p in BASE[:n]]), np.array([p[2] for p in BASE[:n]]),
                         [p[3] for p in BASE[:n] if p[3] is not None])
        assert prefix.digest == seen[n - 1], n
