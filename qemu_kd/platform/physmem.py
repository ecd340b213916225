"""Host-physical memory ("DRAM") and its page-ownership table.

The platform owns a host-physical address space of ``size`` bytes in 4 KiB
pages.  It is backed by a sparse file created (mode 0600, never over an
existing file) in a private directory, mapped into the platform process and
unlinked at once: only the mapping (and the platform's own close-on-exec
descriptor, which stores runs of whole pages with one write each) holds the
memory, so it goes away with the platform process however that ends.  For PRIVATE pages DRAM holds ciphertext
(the encrypted shadow), for HOST and SHARED pages plaintext.

Every page has an owner, modelled on TDX's PAMT and SEV-SNP's RMP:

=========================  ===============================================
``FREE``                   nobody; reads return zeros, writes are refused
``HOST(keyid)``            allocated by the host for the domain that will use
                           KeyID ``keyid`` (see ``alloc``); host read/write
``SHARED(keyid)``          host-visible page of a key domain; host read/write
``PRIVATE(keyid, type)``   assigned to a key domain as IMAGE, ZERO, VMCS, EPT
                           or SAVE; host reads return ciphertext, host writes
                           are allowed only while the domain is being built
=========================  ===============================================

The host reaches DRAM only through data physical addresses with KeyID 0
(``keyid << 40 | hpa``).  A host write to a PRIVATE page whose domain is
write-locked (verified or launched) fails with :class:`OwnershipError` and is
counted as an integrity event, as an RMP violation is on SEV-SNP.  The
platform itself uses :meth:`PhysicalMemory.read_pages` and
:meth:`PhysicalMemory.write_pages`, which bypass the host rules.

This class is not thread-safe on its own; :class:`qemu_kd.platform.hardware.Platform`
serialises every access with its lock.
"""

from __future__ import annotations

import collections
import enum
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from qemu_kd.common.arrays import smallest_repeated, sorted_unique
from qemu_kd.common.errors import KdError
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.addresses import HPA_MASK, KEYID_SHIFT, MAX_KEYID, PAGE_SIZE
from qemu_kd.formats.addresses import DPA_LIMIT, u64_array

DEFAULT_MEMORY_SIZE = 1 << 30
MAX_MEMORY_SIZE = HPA_MASK + 1
DRAM_FILE_NAME = "dram"
# Integrity events kept in detail (the counter itself never wraps).
INTEGRITY_LOG_LENGTH = 256

HpaList = Iterable[int] | np.ndarray


class PageState(enum.IntEnum):
    """Who a host-physical page belongs to."""

    FREE = 0
    HOST = 1
    SHARED = 2
    PRIVATE = 3


@dataclass(frozen=True)
class PageOwner:
    """One entry of the page-ownership table."""

    state: PageState
    keyid: int = 0
    page_type: PageType | None = None

    def __str__(self) -> str:
        if self.state == PageState.FREE:
            return "FREE"
        if self.state == PageState.HOST:
            return f"HOST (allocated for KeyID {self.keyid})"
        if self.state == PageState.SHARED:
            return f"SHARED (key domain {self.keyid})"
        kind = self.page_type.name if self.page_type is not None else "?"
        return f"PRIVATE (key domain {self.keyid}, {kind})"


@dataclass(frozen=True)
class IntegrityEvent:
    """A refused host write to a protected page."""

    dpa: int
    keyid: int
    page_type: PageType | None


class PhysicalMemoryError(KdError):
    """Base class of host-physical memory errors."""


class AddressError(PhysicalMemoryError):
    """An address or length is out of range or not page-aligned."""


class OwnershipError(PhysicalMemoryError):
    """A page does not belong to whoever tries to use it."""


class HostKeyIdError(OwnershipError):
    """The host used a KeyID other than 0."""


class PageInUseError(OwnershipError):
    """A page that had to be FREE is not."""



class PhysicalMemory:
    """Sparse-file-backed DRAM with a page-ownership table."""

    def __init__(self, size: int = DEFAULT_MEMORY_SIZE, path: Path | str = DRAM_FILE_NAME):
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise AddressError(f"memory size {size!r} is not a positive multiple of {PAGE_SIZE} bytes",
                               "give the size in bytes, e.g. 1073741824 for 1 GiB")
        if size > MAX_MEMORY_SIZE:
            raise AddressError(f"memory size 0x{size:x} exceeds the 40-bit host-physical space",
                               "use at most 1 TiB")
        path = Path(path)
        if path.is_dir():
            path = path / DRAM_FILE_NAME
        self.size = size
        self.npages = size // PAGE_SIZE
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise PhysicalMemoryError(f"{path} already exists",
                                      "another platform uses this directory; give a fresh one") from None
        except OSError as exc:
            raise PhysicalMemoryError(f"cannot create the DRAM file {path}: {exc.strerror}",
                                      "give a writable private directory") from None
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise PhysicalMemoryError(f"cannot map {size} bytes of DRAM from {path}: {exc.strerror}") from None
        finally:
            # The mapping keeps the memory; no name is left for anyone to find it by.
            path.unlink(missing_ok=True)
        # Kept (close-on-exec) to store runs of whole pages with one write each (_store).
        self._fd = fd
        self._pages = np.frombuffer(self._mm, dtype=np.uint8).reshape(self.npages, PAGE_SIZE)
        self._state = np.zeros(self.npages, dtype=np.uint8)
        self._keyid = np.zeros(self.npages, dtype=np.uint8)
        self._type = np.zeros(self.npages, dtype=np.uint8)
        # PRIVATE pages the host wrote after they were assigned.
        self._host_written = np.zeros(self.npages, dtype=bool)
        # Pages whose content is produced on first access (see defer_fill).
        self._pending_fill = np.zeros(self.npages, dtype=bool)
        self._fillers: dict[int, Callable[[np.ndarray], None]] = {}
        self._write_locked = np.zeros(MAX_KEYID + 1, dtype=bool)
        self._integrity_events = 0
        self._integrity_log: collections.deque[IntegrityEvent] = collections.deque(
            maxlen=INTEGRITY_LOG_LENGTH)
        self._closed = False

    # ----------------------------------------------------------------- basics

    def close(self) -> None:
        """Unmap the DRAM (its file was removed when it was mapped)."""
        if self._closed:
            return
        self._closed = True
        del self._pages
        self._mm.close()
        os.close(self._fd)

    def __enter__(self) -> "PhysicalMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise PhysicalMemoryError("physical memory is closed")

    @property
    def integrity_events(self) -> int:
        """Number of refused host writes to protected pages so far."""
        return self._integrity_events

    @property
    def integrity_log(self) -> list[IntegrityEvent]:
        """The most recent integrity events, oldest first."""
        return list(self._integrity_log)

    # -------------------------------------------------------------- addresses

    def page_indices(self, hpas: HpaList, *, what: str = "hpa", unique: bool = True) -> np.ndarray:
        """Validate page-aligned, in-range hpas and return their page numbers (int64)."""
        arr = u64_array(hpas, what, AddressError)
        if arr.size:
            misaligned = arr % PAGE_SIZE != 0
            if misaligned.any():
                bad = int(arr[np.argmax(misaligned)])
                raise AddressError(f"{what} 0x{bad:x} is not aligned to {PAGE_SIZE} bytes",
                                   "give page addresses (multiples of 0x1000)")
            outside = arr >= self.size
            if outside.any():
                bad = int(arr[np.argmax(outside)])
                raise AddressError(f"{what} 0x{bad:x} is beyond the end of physical memory (0x{self.size:x})",
                                   "use platform-info to see the memory size")
        idx = (arr // PAGE_SIZE).astype(np.int64)
        if unique and idx.size > 1:
            repeated = smallest_repeated(idx)
            if repeated is not None:
                bad = repeated * PAGE_SIZE
                raise AddressError(f"{what} 0x{bad:x} appears more than once in one request",
                                   "list every page once")
        return idx

    def _host_dpa(self, dpa: int, what: str) -> int:
        if not isinstance(dpa, int) or isinstance(dpa, bool) or dpa < 0 or dpa >= DPA_LIMIT:
            raise AddressError(f"{what} {dpa!r} is not a 46-bit data physical address")
        keyid = dpa >> KEYID_SHIFT
        if keyid:
            raise HostKeyIdError(f"host access with KeyID {keyid} refused (data physical address 0x{dpa:x})",
                                 "the host may use only KeyID 0: pass a plain hpa")
        return dpa

    def _host_page_dpas(self, dpas: HpaList) -> np.ndarray:
        arr = u64_array(dpas, "data physical address", AddressError)
        if arr.size:
            keyids = arr >> np.uint64(KEYID_SHIFT)
            if (keyids != 0).any():
                i = int(np.argmax(keyids != 0))
                raise HostKeyIdError(
                    f"host access with KeyID {int(keyids[i])} refused (data physical address 0x{int(arr[i]):x})",
                    "the host may use only KeyID 0: pass plain hpas")
        return self.page_indices(arr, what="hpa")

    def _range_pages(self, start: int, length: int) -> np.ndarray:
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise AddressError(f"length {length!r} is not a non-negative integer")
        if start + length > self.size:
            raise AddressError(f"range 0x{start:x}+0x{length:x} runs past the end of physical memory "
                               f"(0x{self.size:x})", "use platform-info to see the memory size")
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        return np.arange(start // PAGE_SIZE, (start + length - 1) // PAGE_SIZE + 1, dtype=np.int64)

    # -------------------------------------------------------- ownership table

    def owner(self, hpa: int) -> PageOwner:
        """The ownership-table entry of one page."""
        (i,) = self.page_indices([hpa])
        return self._owner_at(int(i))

    def _owner_at(self, i: int) -> PageOwner:
        state = PageState(int(self._state[i]))
        if state == PageState.FREE:
            return PageOwner(state)
        page_type = PageType(int(self._type[i])) if state == PageState.PRIVATE else None
        return PageOwner(state, int(self._keyid[i]), page_type)

    def owner_arrays(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(state, keyid, page type) arrays for page numbers ``idx`` (already validated)."""
        return self._state[idx], self._keyid[idx], self._type[idx]

    def pages_owned_by(self, keyid: int, state: PageState | None = None,
                       page_type: PageType | None = None) -> np.ndarray:
        """hpas (ascending, uint64) of the pages owned by ``keyid``, optionally filtered."""
        mask = (self._keyid == keyid) & (self._state != PageState.FREE)
        if state is not None:
            mask &= self._state == state
        if page_type is not None:
            mask &= self._type == page_type
        return np.flatnonzero(mask).astype(np.uint64) * np.uint64(PAGE_SIZE)

    def private_keyids(self, dpa: int | None = None, length: int = 0,
                       dpas: HpaList | None = None) -> set[int]:
        """KeyIDs owning PRIVATE or SHARED pages in a byte range or a page list (empty if the input
        is invalid): the running domains whose guest RAM a host access must be synced with."""
        try:
            if dpas is not None:
                idx = self._host_page_dpas(dpas)
            else:
                idx = self._range_pages(self._host_dpa(dpa, "address"), length)
        except PhysicalMemoryError:
            return set()
        guest = (self._state[idx] == PageState.PRIVATE) | (self._state[idx] == PageState.SHARED)
        return set(sorted_unique(self._keyid[idx][guest]).tolist())

    def count_free(self) -> int:
        return int(np.count_nonzero(self._state == PageState.FREE))

    def _first_mismatch(self, idx: np.ndarray, ok: np.ndarray) -> tuple[int, PageOwner]:
        i = int(idx[np.argmax(~ok)])
        return i * PAGE_SIZE, self._owner_at(i)

    def find_free(self, npages: int) -> np.ndarray:
        """The lowest ``npages`` FREE hpas (not yet claimed)."""
        if not isinstance(npages, int) or isinstance(npages, bool) or npages <= 0:
            raise AddressError(f"page count {npages!r} is not a positive integer")
        free = np.flatnonzero(self._state == PageState.FREE)
        if free.size < npages:
            raise PageInUseError(f"only {free.size} free pages left, {npages} requested",
                                 "free or destroy other domains, or start the platform with more memory")
        return free[:npages].astype(np.uint64) * np.uint64(PAGE_SIZE)

    def claim_for_host(self, hpas: HpaList, keyid: int) -> np.ndarray:
        """FREE -> HOST(keyid) for every page, or nothing at all.  Returns the hpas."""
        _check_keyid(keyid)
        idx = self.page_indices(hpas)
        ok = self._state[idx] == PageState.FREE
        if not ok.all():
            hpa, owner = self._first_mismatch(idx, ok)
            raise PageInUseError(f"hpa 0x{hpa:x} is in use: {owner}", "pick FREE pages")
        self._set(idx, PageState.HOST, keyid, 0)
        return idx.astype(np.uint64) * np.uint64(PAGE_SIZE)

    def assign_private(self, hpas: HpaList, keyid: int, page_types: PageType | np.ndarray) -> np.ndarray:
        """HOST(keyid) -> PRIVATE(keyid, type) for every page, or nothing at all.

        Returns the page numbers.  The DRAM content is left as it is (the
        caller decides whether it is loaded ciphertext or must be filled).
        """
        _check_keyid(keyid)
        idx = self.page_indices(hpas)
        ok = (self._state[idx] == PageState.HOST) & (self._keyid[idx] == keyid)
        if not ok.all():
            hpa, owner = self._first_mismatch(idx, ok)
            raise OwnershipError(f"hpa 0x{hpa:x} is {owner}, not HOST (allocated for KeyID {keyid})",
                                 f"add only pages that alloc gave to KeyID {keyid}, each once")
        self._set(idx, PageState.PRIVATE, keyid, page_types)
        return idx

    def assign_shared(self, hpas: HpaList, keyid: int) -> np.ndarray:
        """HOST(keyid) -> SHARED(keyid) for every page, or nothing at all."""
        _check_keyid(keyid)
        idx = self.page_indices(hpas)
        ok = (self._state[idx] == PageState.HOST) & (self._keyid[idx] == keyid)
        if not ok.all():
            hpa, owner = self._first_mismatch(idx, ok)
            raise OwnershipError(f"hpa 0x{hpa:x} is {owner}, not HOST (allocated for KeyID {keyid})")
        self._set(idx, PageState.SHARED, keyid, 0)
        return idx

    def _set(self, idx: np.ndarray, state: PageState, keyid: int, page_types: int | np.ndarray) -> None:
        self._state[idx] = state
        self._keyid[idx] = keyid
        self._type[idx] = page_types
        self._host_written[idx] = False
        self._pending_fill[idx] = False

    def release_keyid(self, keyid: int) -> int:
        """Scrub and free every page owned by ``keyid``; returns how many."""
        _check_keyid(keyid)
        idx = np.flatnonzero((self._keyid == keyid) & (self._state != PageState.FREE))
        self._scrub(idx)
        self._set(idx, PageState.FREE, 0, 0)
        self._write_locked[keyid] = False
        self._fillers.pop(keyid, None)
        return int(idx.size)

    def convert_pages(self, hpas: HpaList, keyid: int, shared: bool) -> None:
        """PRIVATE(keyid) -> SHARED(keyid), or back (as a ZERO page), for every page or none.

        DRAM is left as it is: the caller stores the plaintext (shared) or the
        encrypted zeros (private again)."""
        _check_keyid(keyid)
        idx = self.page_indices(hpas)
        want = PageState.PRIVATE if shared else PageState.SHARED
        ok = (self._state[idx] == want) & (self._keyid[idx] == keyid)
        if not ok.all():
            hpa, owner = self._first_mismatch(idx, ok)
            raise OwnershipError(f"hpa 0x{hpa:x} is {owner}, not {want.name} of KeyID {keyid}")
        if shared:
            self._set(idx, PageState.SHARED, keyid, 0)
        else:
            self._set(idx, PageState.PRIVATE, keyid, PageType.ZERO)

    def release_pages(self, hpas: HpaList, keyid: int) -> int:
        """Scrub and free some of ``keyid``'s pages (a control update gave them back); all or none."""
        _check_keyid(keyid)
        idx = self.page_indices(hpas)
        ok = (self._keyid[idx] == keyid) & (self._state[idx] != PageState.FREE)
        if not ok.all():
            hpa, owner = self._first_mismatch(idx, ok)
            raise OwnershipError(f"hpa 0x{hpa:x} is {owner}, not a page of KeyID {keyid}")
        self._scrub(idx)
        self._set(idx, PageState.FREE, 0, 0)
        return int(idx.size)

    def defer_fill(self, hpas: HpaList, keyid: int, filler: Callable[[np.ndarray], None]) -> None:
        """Produce the content of ``keyid``'s pages at ``hpas`` lazily.

        ``filler(hpas)`` must store the pages' content with :meth:`write_pages`;
        it runs just before anything reads or partly writes one of them (host
        access, :meth:`read_pages`).  Until then DRAM holds nothing for them, so
        adding many zero pages costs no encryption up front, yet nobody can
        observe the difference.  Used for ZERO pages, whose ciphertext is the
        domain's encryption of zeros at each page's address.
        """
        _check_keyid(keyid)
        idx = self.page_indices(hpas)
        if idx.size and ((self._state[idx] != PageState.PRIVATE) | (self._keyid[idx] != keyid)).any():
            raise OwnershipError(f"deferred pages must be PRIVATE pages of key domain {keyid}")
        self._fillers[keyid] = filler
        self._pending_fill[idx] = True

    def pending_fill_count(self) -> int:
        return int(np.count_nonzero(self._pending_fill))

    def pending_fill(self, hpas: HpaList) -> np.ndarray:
        """For each page, whether its content is still to be produced by its filler."""
        return self._pending_fill[self.page_indices(hpas, unique=False)]

    def _materialize(self, idx: np.ndarray) -> None:
        """Run the fillers of pending pages among ``idx``."""
        if not idx.size:
            return
        pending = idx[self._pending_fill[idx]]
        if not pending.size:
            return
        pending = sorted_unique(pending)
        for keyid in sorted_unique(self._keyid[pending]).tolist():
            mine = pending[self._keyid[pending] == keyid]
            self._fillers[keyid](mine.astype(np.uint64) * np.uint64(PAGE_SIZE))
            self._pending_fill[mine] = False

    def _scrub(self, idx: np.ndarray) -> None:
        """Zero pages in DRAM, giving the space back to the file system where possible."""
        if not idx.size:
            return
        idx = np.sort(idx)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [idx.size]))
        for s, e in zip(starts.tolist(), ends.tolist()):
            first, count = int(idx[s]), e - s
            try:
                # Punch a hole: the pages read back as zeros and the file stays sparse.
                self._mm.madvise(mmap.MADV_REMOVE, first * PAGE_SIZE, count * PAGE_SIZE)
            except (OSError, AttributeError, ValueError):
                self._pages[first:first + count] = 0

    def set_write_locked(self, keyid: int, locked: bool) -> None:
        """Lock (verified/launched) or unlock host writes to ``keyid``'s PRIVATE pages."""
        _check_keyid(keyid)
        self._write_locked[keyid] = bool(locked)

    def is_write_locked(self, keyid: int) -> bool:
        return bool(self._write_locked[keyid])

    def host_written(self, hpas: HpaList) -> np.ndarray:
        """For each page, whether the host wrote it after it became PRIVATE."""
        return self._host_written[self.page_indices(hpas, unique=False)]

    # --------------------------------------------------------- platform access

    def read_pages(self, hpas: HpaList) -> np.ndarray:
        """Copy of the DRAM content of whole pages, shape (n, 4096) (platform only)."""
        self._check_open()
        idx = self.page_indices(hpas, unique=False)
        self._materialize(idx)
        return self._pages[idx]

    def view_pages(self, hpas: HpaList) -> np.ndarray:
        """The DRAM content of whole pages, shape (n, 4096), read-only (platform only).  Pages at
        consecutive hpas are a view of DRAM itself, no copy (it changes with DRAM: use it before
        anything else writes them); other lists give a copy, as :meth:`read_pages`."""
        self._check_open()
        idx = self.page_indices(hpas, unique=False)
        self._materialize(idx)
        if idx.size and int(idx[-1]) - int(idx[0]) == idx.size - 1 and (np.diff(idx) == 1).all():
            pages = self._pages[int(idx[0]):int(idx[-1]) + 1]
        else:
            pages = self._pages[idx]
        pages.flags.writeable = False
        return pages

    def write_pages(self, hpas: HpaList, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Store whole pages into DRAM (platform only: no ownership rules)."""
        self._check_open()
        idx = self.page_indices(hpas)
        self._store(idx, _as_pages(data, idx.size))
        self._pending_fill[idx] = False

    # ------------------------------------------------------------- host access

    def host_read(self, dpa: int, length: int) -> bytes:
        """Bytes of DRAM at a KeyID-0 data physical address: ciphertext for PRIVATE pages."""
        self._check_open()
        start = self._host_dpa(dpa, "read address")
        self._materialize(self._range_pages(start, length))
        return self._mm[start:start + length]

    def host_write(self, dpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes at a KeyID-0 data physical address, if every touched page allows it."""
        self._check_open()
        start = self._host_dpa(dpa, "write address")
        view = memoryview(data).cast("B")
        idx = self._range_pages(start, len(view))
        self._check_host_writable(idx, start)
        self._materialize(idx)
        self._mm[start:start + len(view)] = view
        self._note_host_written(idx)

    def host_read_pages(self, dpas: HpaList) -> bytes:
        """Whole pages at KeyID-0 data physical addresses, concatenated."""
        self._check_open()
        idx = self._host_page_dpas(dpas)
        self._materialize(idx)
        return self._pages[idx].tobytes()

    def host_write_pages(self, dpas: HpaList, data: bytes | bytearray | memoryview) -> None:
        """Write whole pages at KeyID-0 data physical addresses (all or none)."""
        self._check_open()
        idx = self._host_page_dpas(dpas)
        pages = _as_pages(data, idx.size)
        self._check_host_writable(idx, None)
        self._store(idx, pages)
        self._pending_fill[idx] = False       # whole pages replaced: nothing left to fill
        self._note_host_written(idx)

    def _store(self, idx: np.ndarray, pages: np.ndarray) -> None:
        """DRAM pages ``idx`` (checked, in range) become ``pages`` (n, 4096).  Each run of
        consecutive pages is one write to the DRAM file: the kernel puts the data straight
        into the file's pages, where storing through the mapping would first take a page
        fault for every page not touched yet (about half the time of a bundle's load).
        Pages scattered one by one are stored through the mapping."""
        if not idx.size:
            return
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        if breaks.size > idx.size // 8:
            self._pages[idx] = pages
            return
        pages = np.ascontiguousarray(pages)
        data = memoryview(pages.reshape(-1))
        for first, last in zip([0, *breaks.tolist()], [*breaks.tolist(), idx.size]):
            view, position = data[first * PAGE_SIZE:last * PAGE_SIZE], int(idx[first]) * PAGE_SIZE
            while view:
                done = os.pwrite(self._fd, view, position)
                if done <= 0:
                    raise PhysicalMemoryError(f"DRAM: a write at hpa 0x{position:x} stored nothing")
                view, position = view[done:], position + done

    def _check_host_writable(self, idx: np.ndarray, start: int | None) -> None:
        if not idx.size:
            return
        state = self._state[idx]
        free = state == PageState.FREE
        if free.any():
            hpa = int(idx[np.argmax(free)]) * PAGE_SIZE
            raise OwnershipError(f"host write to hpa 0x{hpa:x} refused: the page is FREE",
                                 "alloc the page before writing it")
        locked = (state == PageState.PRIVATE) & self._write_locked[self._keyid[idx]]
        if locked.any():
            i = int(idx[np.argmax(locked)])
            keyid, page_type = int(self._keyid[i]), PageType(int(self._type[i]))
            self._integrity_events += 1
            self._integrity_log.append(IntegrityEvent(i * PAGE_SIZE, keyid, page_type))
            raise OwnershipError(
                f"host write to hpa 0x{i * PAGE_SIZE:x} refused: it is a PRIVATE {page_type.name} page "
                f"of key domain {keyid}, which is no longer being built",
                "private pages accept host writes only before verify-ept and launch; "
                "this attempt was counted as an integrity event")

    def _note_host_written(self, idx: np.ndarray) -> None:
        if idx.size:
            self._host_written[idx] |= self._state[idx] == PageState.PRIVATE


def _check_keyid(keyid: int) -> None:
    if not isinstance(keyid, int) or isinstance(keyid, bool) or not 1 <= keyid <= MAX_KEYID:
        raise AddressError(f"KeyID {keyid!r} is not a key-domain KeyID (1..{MAX_KEYID})")




def _as_pages(data: bytes | bytearray | memoryview | np.ndarray, count: int) -> np.ndarray:
    if isinstance(data, np.ndarray):
        arr = data.reshape(-1).view(np.uint8) if data.dtype != np.uint8 else data.reshape(-1)
    else:
        arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if arr.size != count * PAGE_SIZE:
        raise AddressError(f"{arr.size} bytes of page data given for {count} pages "
                           f"({count * PAGE_SIZE} bytes expected)")
    return arr.reshape(count, PAGE_SIZE)
