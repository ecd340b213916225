"""The shadow sync finds the changed guest pages without allocating the guest's untouched RAM."""

import mmap
import os

import numpy as np
import pytest

from qemu_kd.formats.addresses import PAGE_SIZE
from qemu_kd.platform.runtime import SYNC_STEP_PAGES, DomainRuntime

PAGES = SYNC_STEP_PAGES * 2 + 100     # more than one comparison step, and a ragged end
HPA_BASE = 1 << 30


class MemfdMachine:
    """Guest RAM as QEMU has it: a memfd, mapped shared."""

    running = True

    def __init__(self, pages: int):
        self.ram_fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, pages * PAGE_SIZE)
        self.ram = mmap.mmap(self.ram_fd, pages * PAGE_SIZE, mmap.MAP_SHARED)

    def map_ram(self):
        return self.ram

    def allocated(self) -> int:
        return os.fstat(self.ram_fd).st_blocks * 512

    def close(self):
        self.ram.close()
        os.close(self.ram_fd)


class RecordingDomain:
    """What the sync stores into DRAM, by hpa."""

    keyid = 3

    def __init__(self):
        self.dram: dict[int, bytes] = {}

    def encrypt_into_dram(self, hpas, plain):
        for hpa, page in zip(np.asarray(hpas).tolist(), np.asarray(plain).reshape(-1, PAGE_SIZE)):
            self.dram[hpa] = page.tobytes()


@pytest.fixture
def runtime():
    machine = MemfdMachine(PAGES)
    rt = DomainRuntime(RecordingDomain(), identity=None)
    rt.machine = machine
    rt._snapshot = np.zeros((PAGES, PAGE_SIZE), dtype=np.uint8)
    rt.gpa_to_hpa = HPA_BASE + np.arange(PAGES, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    yield rt
    rt._snapshot = None
    machine.close()


def write_page(machine, page, fill):
    machine.ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = bytes([fill]) * PAGE_SIZE


def test_sync_finds_written_pages_and_leaves_holes_unallocated(runtime):
    machine, domain = runtime.machine, runtime.domain
    written = [0, 5, SYNC_STEP_PAGES - 1, SYNC_STEP_PAGES, PAGES - 1]
    for page in written:
        write_page(machine, page, page % 251 + 1)
    assert runtime.sync_shadow() == len(written)
    assert sorted(domain.dram) == [HPA_BASE + p * PAGE_SIZE for p in written]
    assert all(domain.dram[HPA_BASE + p * PAGE_SIZE] == bytes([p % 251 + 1]) * PAGE_SIZE for p in written)
    # Reading the whole RAM through the mapping would have allocated every page of it.
    assert machine.allocated() < 64 * PAGE_SIZE
    assert runtime.sync_shadow() == 0


def test_a_page_that_became_a_hole_syncs_as_zeros(runtime):
    machine, domain = runtime.machine, runtime.domain
    for page in (7, 8, 9):
        write_page(machine, page, 0xAB)
    assert runtime.sync_shadow() == 3
    machine.ram.madvise(mmap.MADV_REMOVE, 8 * PAGE_SIZE, PAGE_SIZE)   # page 8 is a hole again
    assert runtime.sync_shadow() == 1
    assert domain.dram[HPA_BASE + 8 * PAGE_SIZE] == bytes(PAGE_SIZE)
    assert runtime.sync_shadow() == 0


def test_without_a_file_every_page_is_compared(runtime):
    machine = runtime.machine
    write_page(machine, 42, 1)
    runtime.machine = type("Plain", (), {"running": True, "map_ram": lambda self: machine.ram})()
    assert runtime.sync_shadow() == 1
    runtime.machine = machine
