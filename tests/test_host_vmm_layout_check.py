"""The host VMM's check that a bundle places every page inside its own allocation (no platform)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from host_vmm import vmm
from host_vmm.vmm import BundleLayoutError, HostVmm, stray_hpas
from tests.test_formats_bundle import sample_bundle

PAGE = 4096


def reference(hpas: list[int], allocated: list[int]) -> list[int]:
    held = set(allocated)
    return [h for h in hpas if h not in held]


def check(hpas: list[int], allocated: list[int]) -> None:
    got = stray_hpas(np.array(hpas, dtype=np.uint64), np.array(allocated, dtype=np.uint64))
    assert got.dtype == np.uint64 and got.tolist() == reference(hpas, allocated)


def probes(allocated: list[int], rng: random.Random) -> list[int]:
    """Held pages, and near misses: just outside either end, in a gap, not page-aligned, 0, the top."""
    low, high = min(allocated), max(allocated)
    near = [low - PAGE, high + PAGE, low + 1, high + 1, high - 1, 0, (1 << 64) - PAGE, (1 << 40) - PAGE]
    near += [h + PAGE for h in allocated[:50]] + [h + 8 for h in allocated[:50]]
    held = rng.sample(allocated, min(len(allocated), 500))
    out = [h for h in held + near if 0 <= h < 1 << 64]
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_a_compact_allocation_is_looked_up_in_a_table(seed):
    rng = random.Random(seed)
    base = rng.randrange(1, 1 << 16) * PAGE
    allocated = [base + PAGE * i for i in rng.sample(range(3000), 1000)]     # ascending or not, gaps
    if seed % 2:
        allocated.sort()
    check(probes(allocated, rng), allocated)


@pytest.mark.parametrize("seed", range(6))
def test_an_allocation_too_wide_for_a_table_is_searched_sorted(seed):
    rng = random.Random(seed)
    allocated = [rng.randrange(0, 1 << 28) * PAGE for _ in range(1000)] + [0, (1 << 40) - PAGE]
    allocated = list(dict.fromkeys(allocated))
    assert (max(allocated) - min(allocated)) // PAGE + 1 > vmm._TABLE_PAGES
    check(probes(allocated, rng), allocated)


def test_nothing_strays_from_an_allocation_of_one_page_or_from_an_empty_bundle():
    check([0x5000, 0x6000, 0x4000, 0x5001], [0x5000])
    check([], [0x5000])
    check([0x5000], [])


def test_the_layout_check_names_how_many_pages_stray_and_the_first_in_bundle_order():
    bundle = sample_bundle()
    held = [p.hpa for p in bundle.pages] + [z.hpa for z in bundle.zero_pages]
    layout = SimpleNamespace(keyid=bundle.manifest.keyid, memory_size=bundle.manifest.memory_size,
                             host_data=bundle.manifest.host_data, hpas=held)
    host = SimpleNamespace(layout=layout)
    HostVmm.check_bundle_layout(host, bundle)                      # every page is the host's
    layout.hpas = [h for h in held if h not in (held[1], held[-1])]
    with pytest.raises(BundleLayoutError, match=rf"places 2 page\(s\) outside this host's allocation "
                                                rf"\(first at hpa {held[1]:#x}\)"):
        HostVmm.check_bundle_layout(host, bundle)
