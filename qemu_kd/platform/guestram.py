"""Guest RAM the platform fills before launch, from plaintext it already holds.

Launch puts the plaintext of every IMAGE page into guest RAM at its gpa.  Two
commands before it already have that plaintext in hand: measure-kd decrypts
every IMAGE page from DRAM to measure it (the pages are write-locked since
verify-ept passed, so DRAM cannot change before launch), and restore-kd
decrypts the snapshot's pages before it encrypts them into DRAM at their new
addresses.  Each writes the plaintext into a :class:`StagedRam` as it goes,
and the domain keeps it; launch takes it instead of decrypting every page out
of DRAM a second time, after checking that it holds exactly the pages the
verified EPT maps, each at its gpa (:meth:`StagedRam.matches`).  Anything else
is discarded and launch decrypts as before.

A StagedRam is the memory file QEMU will map (nothing runs in it until launch
has passed its checks) and the baseline the shadow sync compares guest RAM
with.  Destroying the domain before launch closes both, scrubbing the baseline.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from qemu_kd.formats.addresses import PAGE_SIZE
from qemu_kd.qemu.machine import GuestRam

MiB = 1 << 20
# fill_with hands runs of consecutive pages to its producer in pieces of at most this many
# pages (4 MiB), so the caller can pass a piece on (to be hashed) while it produces the next.
FILL_PIECE_PAGES = 1024

__all__ = ["StagedRam", "guest_memory_size"]


def guest_memory_size(gpas: np.ndarray) -> int:
    """The guest RAM size that holds every gpa: the top page, rounded up to 2 MiB (0 for none)."""
    if not gpas.size:
        return 0
    top = int(gpas.max()) + PAGE_SIZE
    return -(-top // (2 * MiB)) * 2 * MiB


class StagedRam:
    """Guest RAM of ``size`` bytes and its shadow baseline, filled page by page with plaintext."""

    def __init__(self, size: int):
        self.size = size
        self.ram: GuestRam | None = GuestRam(size)
        pages = size // PAGE_SIZE
        # Zero pages are mapped lazily: only the filled pages take memory, as in guest RAM.
        self.baseline: np.ndarray | None = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
        self._gpns: list[np.ndarray] = []
        self._hpas: list[np.ndarray] = []

    def fill(self, gpns: np.ndarray, hpas: np.ndarray, plain: np.ndarray) -> None:
        """Guest pages ``gpns`` (gpa / 4096) hold ``plain`` (n, 4096), the plaintext of DRAM's ``hpas``."""
        if self.ram is None or self.baseline is None:
            raise ValueError("staged guest RAM was already taken or closed")
        gpns = np.asarray(gpns, dtype=np.int64)
        plain = np.ascontiguousarray(plain, dtype=np.uint8).reshape(gpns.size, PAGE_SIZE)
        self.baseline[gpns] = plain
        self._write_ram(gpns, plain)
        self._gpns.append(gpns.copy())
        self._hpas.append(np.asarray(hpas, dtype=np.uint64).copy())

    def fill_with(self, gpns: np.ndarray, hpas: np.ndarray,
                  produce: Callable[[np.ndarray, int, int], None]) -> list[np.ndarray]:
        """:meth:`fill` with the plaintext written straight into the baseline, no copy between:
        for each piece of a run of consecutive gpns, ``gpns[first:last]`` (at most
        FILL_PIECE_PAGES), ``produce(rows, first, last)`` stores the plaintext of those pages into
        ``rows``, the baseline's (last - first, 4096) view of them, which then goes into the
        memory file.  Returns the views in order (the caller may read them; nothing else writes
        them before launch)."""
        if self.ram is None or self.baseline is None:
            raise ValueError("staged guest RAM was already taken or closed")
        gpns = np.asarray(gpns, dtype=np.int64).reshape(-1)
        if np.asarray(hpas).size != gpns.size:
            raise ValueError(f"{gpns.size} guest pages given with {np.asarray(hpas).size} hpas")
        if gpns.size and (int(gpns.min()) < 0 or int(gpns.max()) >= len(self.baseline)):
            raise ValueError(f"a guest page lies outside the {self.size}-byte guest RAM")
        filled: list[np.ndarray] = []
        breaks = (np.flatnonzero(np.diff(gpns) != 1) + 1).tolist()
        for run_first, run_last in zip([0, *breaks], [*breaks, gpns.size]):
            for first in range(run_first, run_last, FILL_PIECE_PAGES):
                last = min(first + FILL_PIECE_PAGES, run_last)
                gpn = int(gpns[first])
                rows = self.baseline[gpn:gpn + last - first]
                produce(rows, first, last)
                self._write_run(gpn, rows)
                filled.append(rows)
        self._gpns.append(gpns.copy())
        self._hpas.append(np.asarray(hpas, dtype=np.uint64).reshape(-1).copy())
        return filled

    def _write_ram(self, gpns: np.ndarray, plain: np.ndarray) -> None:
        """Write the pages into the memory file, one write per run of consecutive gpns.  The
        kernel allocates the file's pages as it writes; storing through this process's mapping
        would take a page fault for each page first (about half the time of a fill)."""
        if not gpns.size:
            return
        breaks = (np.flatnonzero(np.diff(gpns) != 1) + 1).tolist()
        for first, last in zip([0, *breaks], [*breaks, gpns.size]):
            self._write_run(int(gpns[first]), plain[first:last])

    def _write_run(self, gpn: int, rows: np.ndarray) -> None:
        """Write ``rows`` (contiguous pages) into the memory file from guest page ``gpn`` on."""
        data, offset = memoryview(rows.reshape(-1)), gpn * PAGE_SIZE
        while data:
            done = os.pwrite(self.ram.fd, data, offset)
            if done <= 0:
                raise OSError(f"guest RAM: a write at offset 0x{offset:x} stored nothing")
            data, offset = data[done:], offset + done

    def pages(self) -> tuple[np.ndarray, np.ndarray]:
        """(gpns, hpas) of the filled pages, by gpn."""
        gpns = np.concatenate(self._gpns) if self._gpns else np.zeros(0, dtype=np.int64)
        hpas = np.concatenate(self._hpas) if self._hpas else np.zeros(0, dtype=np.uint64)
        order = np.argsort(gpns, kind="stable")
        return gpns[order], hpas[order]

    def matches(self, size: int, gpns: np.ndarray, hpas: np.ndarray) -> bool:
        """Whether this RAM is of ``size`` bytes and holds exactly the pages ``hpas``, each at its
        gpn in ``gpns`` (the IMAGE pages as the verified EPT maps them), and nothing else."""
        if self.ram is None or self.ram.fd is None or size != self.size:
            return False
        mine_gpns, mine_hpas = self.pages()
        order = np.argsort(np.asarray(gpns, dtype=np.int64), kind="stable")
        return (mine_gpns.size == order.size
                and np.array_equal(mine_gpns, np.asarray(gpns, dtype=np.int64)[order])
                and np.array_equal(mine_hpas, np.asarray(hpas, dtype=np.uint64)[order]))

    def take(self) -> tuple[GuestRam, np.ndarray]:
        """The RAM (for QEMU to map) and the baseline (for the shadow sync): the caller owns them."""
        if self.ram is None or self.baseline is None:
            raise ValueError("staged guest RAM was already taken or closed")
        ram, baseline = self.ram, self.baseline
        self.ram = self.baseline = None
        return ram, baseline

    def close(self) -> None:
        """Scrub the baseline and close the RAM (its pages go with the file)."""
        from qemu_kd.common.scrub import scrub

        if self.baseline is not None:
            scrub(self.baseline)
            self.baseline = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None
