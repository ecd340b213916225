"""The launch measurement: a SHA-384 chain over page records.

Modelled on SEV-SNP's PAGE_INFO chain.  Each record is a :class:`PageInfo`
(112 bytes); the new digest is SHA-384 of the packed record, whose first 48
bytes are the previous digest.  The chain is, in this order:

1. a POLICY record: previous digest 48 zero bytes, contents = packed policy
   followed by 40 zero bytes, gpa 0, perms 0;
2. in strictly increasing gpa order, one record per IMAGE page (contents
   SHA-384(page)) and one ZERO_RUN record per maximal run of ZERO pages
   (consecutive gpas, one perms value, no IMAGE page between): gpa = the
   run's first page, contents = u64 little-endian page count followed by
   40 zero bytes;
3. a VMCS record last: contents SHA-384(Vmcs.guest_state_bytes()), gpa 0,
   perms 0.

Runs are maximal, so the records are a function of the page list and the
page list one of the records: every page's gpa, type and perms is bound.
Neither hpas nor keys enter any record, so the tenant can compute the value
offline and two hosts with different layouts get the same digest.  EPT and
SAVE pages are host-chosen and are not measured (verify-ept and the XTS
tweak cover them); the EPT's (gpa, perms) content is in the page records.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Sequence

import numpy as np

from qemu_kd.common.errors import KdError
from qemu_kd.formats.errors import (
    FieldValueError,
    ReservedBitsError,
    VersionError,
    require_bytes,
    require_fits,
    require_length,
)
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.addresses import PAGE_SIZE

DIGEST_SIZE = 48
PAGE_INFO_SIZE = 0x70
POLICY_RECORD = 0x10  # record type of the initial policy record (not a page type)
ZERO_RUN_RECORD = 0x11  # record type of a run of ZERO pages (not a page type)
_PAGE_INFO = struct.Struct("<48s48sHBBIQ")
_RUN_PADDING = bytes(DIGEST_SIZE - 8)
_sha384 = hashlib.sha384
# A PageInfo record without its previous digest (what add_pages builds in bulk).
_RECORD_TAIL = np.dtype([("contents", "u1", (DIGEST_SIZE,)), ("length", "<u2"), ("type", "u1"),
                         ("perms", "u1"), ("reserved", "<u4"), ("gpa", "<u8")])
assert _RECORD_TAIL.itemsize == PAGE_INFO_SIZE - DIGEST_SIZE


class PageType(IntEnum):
    """What a key-domain page holds (also the page-ownership table's type)."""

    IMAGE = 1
    ZERO = 2
    VMCS = 3
    EPT = 4
    SAVE = 5


RECORD_TYPES = {POLICY_RECORD, PageType.IMAGE, ZERO_RUN_RECORD, PageType.VMCS}


def zero_run_contents(pages: int) -> bytes:
    """The contents field of a ZERO_RUN record: u64 little-endian page count, 40 zero bytes."""
    return pages.to_bytes(8, "little") + _RUN_PADDING


class MeasurementError(KdError):
    """The launch measurement was extended in a way the protocol does not allow."""


@dataclass(frozen=True)
class PageInfo:
    """One measurement record (112 bytes, see docs/formats.md)."""

    prev_digest: bytes
    contents: bytes
    gpa: int
    page_type: int
    perms: int

    def pack(self) -> bytes:
        require_bytes("PageInfo previous digest", self.prev_digest, DIGEST_SIZE)
        require_bytes("PageInfo contents", self.contents, DIGEST_SIZE)
        require_fits("PageInfo gpa", self.gpa, 64)
        if self.page_type not in RECORD_TYPES:
            raise FieldValueError(f"PageInfo record type {self.page_type!r} is not measured")
        if not 0 <= self.perms <= 7:
            raise FieldValueError(f"PageInfo perms {self.perms!r} is not a combination of R/W/X bits")
        return _PAGE_INFO.pack(self.prev_digest, self.contents, PAGE_INFO_SIZE,
                               int(self.page_type), self.perms, 0, self.gpa)

    @classmethod
    def unpack(cls, data: bytes) -> "PageInfo":
        require_length("PageInfo record", data, PAGE_INFO_SIZE)
        prev, contents, length, page_type, perms, reserved, gpa = _PAGE_INFO.unpack(data)
        if length != PAGE_INFO_SIZE:
            raise VersionError(f"PageInfo length field is 0x{length:x}, expected 0x{PAGE_INFO_SIZE:x}",
                               "the record comes from another version of the format")
        if reserved or perms & ~7:
            raise ReservedBitsError("PageInfo: reserved bits in perms or bytes 0x64..0x67 are set")
        if page_type not in RECORD_TYPES:
            raise FieldValueError(f"PageInfo record type {page_type} is not a measured type")
        return cls(prev, contents, gpa, page_type, perms)

    def next_digest(self) -> bytes:
        return hashlib.sha384(self.pack()).digest()


class LaunchMeasurement:
    """Builds the launch digest incrementally (platform) or offline (tenant).

    The run of ZERO pages the last pages added end with stays open until a page that does
    not extend it, or :meth:`finalize`, closes it and chains its record: adding the same
    pages one by one, as gpa lists or as arrays, split anywhere, chains the same records.
    """

    def __init__(self, policy: Policy):
        self._policy = policy
        self._digest = bytes(DIGEST_SIZE)
        self._last_gpa: int | None = None
        # The open zero run: first gpa, page count (0: none open), perms.
        self._run_gpa = self._run_pages = self._run_perms = 0
        self._vmcs_contents: bytes | None = None
        self._final: bytes | None = None
        self._extend(policy.pack() + bytes(DIGEST_SIZE - 8), 0, POLICY_RECORD, 0)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def digest(self) -> bytes:
        """The chain value (48 bytes) over the records so far, an open zero run's record
        included as if it ended here; after finalize, the final value."""
        if self._final is not None:
            return self._final
        if not self._run_pages:
            return self._digest
        return _chain(self._digest, zero_run_contents(self._run_pages), self._run_gpa, ZERO_RUN_RECORD,
                      self._run_perms)

    def _extend(self, contents: bytes, gpa: int, record_type: int, perms: int) -> None:
        self._digest = _chain(self._digest, contents, gpa, record_type, perms)

    def _close_run(self) -> None:
        if self._run_pages:
            self._extend(zero_run_contents(self._run_pages), self._run_gpa, ZERO_RUN_RECORD, self._run_perms)
            self._run_pages = 0

    def _extends_run(self, gpa: int, perms: int) -> bool:
        """Whether a ZERO page at ``gpa`` with ``perms`` continues the open run."""
        return bool(self._run_pages) and perms == self._run_perms \
            and gpa == self._run_gpa + self._run_pages * PAGE_SIZE

    def _check_open(self) -> None:
        if self._final is not None:
            raise MeasurementError("the launch measurement is already finalized",
                                   "no pages can be added after launch")

    def add_page(self, gpa: int, page_type: PageType, perms: int, content: bytes | None) -> None:
        """Extend with one guest page: IMAGE with its plaintext, ZERO with None."""
        self._check_open()
        if page_type not in (PageType.IMAGE, PageType.ZERO):
            raise MeasurementError(
                f"{PageType(page_type).name if page_type in PageType._value2member_map_ else page_type} "
                "pages are not measured page by page",
                "measure the VMCS with add_vmcs; EPT and SAVE pages are host-chosen and not measured")
        if not isinstance(gpa, int) or gpa < 0 or gpa % PAGE_SIZE or gpa >> 64:
            raise MeasurementError(f"gpa {gpa!r} is not a page-aligned guest-physical address")
        if self._last_gpa is not None and gpa <= self._last_gpa:
            raise MeasurementError(
                f"page gpa 0x{gpa:x} added after gpa 0x{self._last_gpa:x}",
                "add image and zero pages in strictly increasing gpa order")
        if not 0 < perms <= 7:
            raise MeasurementError(f"page gpa 0x{gpa:x}: perms {perms!r} must be a non-empty R/W/X set")
        if page_type == PageType.ZERO:
            if content is not None:
                raise MeasurementError(f"zero page gpa 0x{gpa:x} must be added without content")
            if not self._extends_run(gpa, perms):
                self._close_run()
                self._run_gpa, self._run_perms = gpa, perms
            self._run_pages += 1
        else:
            if content is None or len(content) != PAGE_SIZE:
                raise MeasurementError(f"image page gpa 0x{gpa:x} needs exactly {PAGE_SIZE} bytes of content")
            self._close_run()
            self._extend(_sha384(content).digest(), gpa, PageType.IMAGE, perms)
        self._last_gpa = gpa

    def add_zero_pages(self, gpas: Iterable[int], perms: int) -> None:
        """Extend with ZERO pages at ``gpas`` (strictly increasing), all with ``perms``.

        The same records as calling :meth:`add_page` for each page, with the
        checks done once: a 256 MiB guest has 65 536 pages, mostly zero.
        """
        self._check_open()
        gpas = list(gpas)
        if not gpas:
            return
        if not 0 < perms <= 7:
            raise MeasurementError(f"zero pages: perms {perms!r} must be a non-empty R/W/X set")
        previous = self._last_gpa
        for gpa in gpas:
            if not isinstance(gpa, int) or gpa < 0 or gpa % PAGE_SIZE or gpa >> 64:
                raise MeasurementError(f"gpa {gpa!r} is not a page-aligned guest-physical address")
            if previous is not None and gpa <= previous:
                raise MeasurementError(f"page gpa 0x{gpa:x} added after gpa 0x{previous:x}",
                                       "add image and zero pages in strictly increasing gpa order")
            previous = gpa
        n = len(gpas)
        self._chain_pages(np.array(gpas, dtype=np.uint64), np.ones(n, dtype=bool),
                          np.full(n, perms, dtype=np.uint8), np.empty((0, DIGEST_SIZE), dtype=np.uint8))

    def add_pages(self, gpas: np.ndarray, types: np.ndarray, perms: np.ndarray,
                  image_pages: np.ndarray | Sequence[bytes]) -> None:
        """Extend with many guest pages at once: the records :meth:`add_page` would chain
        for each, with the checks done on arrays.

        ``gpas``, ``types`` (IMAGE or ZERO) and ``perms`` give one entry per page, gpas
        strictly increasing; ``image_pages`` holds the 4096-byte plaintext of every IMAGE
        page, in the same order (an (n, 4096) uint8 array or a sequence of buffers).
        """
        checked = self._check_pages(gpas, types, perms)
        if checked is None:
            return
        gpas, is_zero, perms = checked
        n_image = int(gpas.size - np.count_nonzero(is_zero))
        if len(image_pages) != n_image:
            raise MeasurementError(f"{n_image} image pages need their content, {len(image_pages)} were given")
        whole_pages = (isinstance(image_pages, np.ndarray) and image_pages.dtype == np.uint8
                       and image_pages.ndim == 2 and image_pages.shape[1] == PAGE_SIZE)
        if not whole_pages:
            for i, page in zip(np.flatnonzero(~is_zero).tolist(), image_pages):
                if len(page) != PAGE_SIZE:
                    raise MeasurementError(f"image page gpa 0x{int(gpas[i]):x} needs exactly {PAGE_SIZE} "
                                           "bytes of content")
        self._chain_pages(gpas, is_zero, perms, page_digests(image_pages))

    def add_hashed_pages(self, gpas: np.ndarray, types: np.ndarray, perms: np.ndarray,
                         image_digests: np.ndarray) -> None:
        """:meth:`add_pages` with the IMAGE pages' SHA-384 digests (:func:`page_digests`, an
        (n, 48) uint8 array) instead of their content, for a caller that hashed them elsewhere."""
        checked = self._check_pages(gpas, types, perms)
        if checked is None:
            return
        gpas, is_zero, perms = checked
        n_image = int(gpas.size - np.count_nonzero(is_zero))
        if not (isinstance(image_digests, np.ndarray) and image_digests.dtype == np.uint8
                and image_digests.shape == (n_image, DIGEST_SIZE)):
            raise MeasurementError(f"{n_image} image pages need their digests as an ({n_image}, "
                                   f"{DIGEST_SIZE}) uint8 array")
        self._chain_pages(gpas, is_zero, perms, image_digests)

    def _check_pages(self, gpas: np.ndarray, types: np.ndarray,
                     perms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The checks add_page makes, on arrays: (uint64 gpas, ZERO flags, uint8 perms), None
        for no pages."""
        self._check_open()
        gpas = np.asarray(gpas)
        types = np.asarray(types)
        perms = np.asarray(perms)
        n = gpas.size
        if types.shape != (n,) or perms.shape != (n,) or gpas.shape != (n,):
            raise MeasurementError("add_pages needs one gpa, type and perms entry per page")
        if not n:
            return None
        if gpas.dtype.kind not in "ui" or types.dtype.kind not in "ui" or perms.dtype.kind not in "ui":
            raise MeasurementError("add_pages takes integer arrays")
        if gpas.dtype.kind == "i" and (gpas < 0).any():
            raise MeasurementError(f"gpa {int(gpas[np.argmax(gpas < 0)])} is not a page-aligned "
                                   "guest-physical address")
        gpas = gpas.astype(np.uint64)
        unaligned = gpas % PAGE_SIZE != 0
        if unaligned.any():
            raise MeasurementError(f"gpa 0x{int(gpas[np.argmax(unaligned)]):x} is not a page-aligned "
                                   "guest-physical address")
        backwards = np.flatnonzero(gpas[1:] <= gpas[:-1])
        if backwards.size:
            i = int(backwards[0])
            raise MeasurementError(f"page gpa 0x{int(gpas[i + 1]):x} added after gpa 0x{int(gpas[i]):x}",
                                   "add image and zero pages in strictly increasing gpa order")
        if self._last_gpa is not None and int(gpas[0]) <= self._last_gpa:
            raise MeasurementError(f"page gpa 0x{int(gpas[0]):x} added after gpa 0x{self._last_gpa:x}",
                                   "add image and zero pages in strictly increasing gpa order")
        bad = (perms <= 0) | (perms > 7)
        if bad.any():
            i = int(np.argmax(bad))
            raise MeasurementError(f"page gpa 0x{int(gpas[i]):x}: perms {int(perms[i])} must be a "
                                   "non-empty R/W/X set")
        is_zero = types == PageType.ZERO
        other = (types != PageType.IMAGE) & ~is_zero
        if other.any():
            t = int(types[np.argmax(other)])
            name = PageType(t).name if t in PageType._value2member_map_ else str(t)
            raise MeasurementError(f"{name} pages are not measured page by page",
                                   "measure the VMCS with add_vmcs; EPT and SAVE pages are host-chosen "
                                   "and not measured")
        return gpas, is_zero, perms.astype(np.uint8)

    def _chain_pages(self, gpas: np.ndarray, is_zero: np.ndarray, perms: np.ndarray,
                     image_digests: np.ndarray) -> None:
        """Chain checked pages (uint64 gpas strictly increasing and above the last page,
        ZERO flags, uint8 perms, the IMAGE pages' content digests in order)."""
        n = gpas.size
        # extends[i]: page i is a ZERO page in the run of the page before it.
        extends = np.zeros(n, dtype=bool)
        extends[1:] = (is_zero[1:] & is_zero[:-1] & (gpas[1:] - gpas[:-1] == PAGE_SIZE)
                       & (perms[1:] == perms[:-1]))
        extends[0] = bool(is_zero[0]) and self._extends_run(int(gpas[0]), int(perms[0]))
        # Every other page starts a record: an IMAGE page's, or a new zero run's.
        starts = np.flatnonzero(~extends)
        if extends[0]:
            self._run_pages += int(starts[0]) if starts.size else n
        if not starts.size:
            self._last_gpa = int(gpas[-1])
            return
        self._close_run()
        pages = np.diff(starts, append=n)
        last = int(starts[-1])
        open_run = bool(is_zero[last])   # it may go on in the next pages added: chained later
        if open_run:
            starts, pages = starts[:-1], pages[:-1]
        records = np.zeros(starts.size, dtype=_RECORD_TAIL)
        records["length"] = PAGE_INFO_SIZE
        records["perms"] = perms[starts]
        records["gpa"] = gpas[starts]
        runs = is_zero[starts]
        records["type"] = np.where(runs, ZERO_RUN_RECORD, int(PageType.IMAGE))
        contents = records["contents"]
        contents[~runs] = image_digests
        contents[runs, :8] = pages[runs].astype("<u8").view(np.uint8).reshape(-1, 8)
        # Each record is SHA-384(previous digest || its last 64 bytes).
        tails = records.tobytes()
        digest, size = self._digest, _RECORD_TAIL.itemsize
        for offset in range(0, len(tails), size):
            digest = _sha384(digest + tails[offset:offset + size]).digest()
        self._digest = digest
        if open_run:
            self._run_gpa, self._run_pages, self._run_perms = int(gpas[last]), n - last, int(perms[last])
        self._last_gpa = int(gpas[-1])

    def add_vmcs(self, vmcs_guest_state: bytes) -> None:
        """Record the VMCS measured state; its record is chained last, at finalize."""
        self._check_open()
        if self._vmcs_contents is not None:
            raise MeasurementError("a VMCS was already measured", "a key domain has exactly one VMCS")
        self._vmcs_contents = hashlib.sha384(bytes(vmcs_guest_state)).digest()

    def finalize(self) -> bytes:
        """Close the open zero run, chain the VMCS record and return the final 48-byte launch digest."""
        if self._final is None:
            if self._vmcs_contents is None:
                raise MeasurementError("no VMCS was measured", "add the VMCS before launch")
            self._close_run()
            self._extend(self._vmcs_contents, 0, PageType.VMCS, 0)
            self._final = self._digest
        return self._final


def _chain(digest: bytes, contents: bytes, gpa: int, record_type: int, perms: int) -> bytes:
    """The chain value after one record (the bytes of PageInfo(...).pack(); fields checked by the caller)."""
    return _sha384(_PAGE_INFO.pack(digest, contents, PAGE_INFO_SIZE, int(record_type), perms, 0, gpa)).digest()


def page_digests(pages: np.ndarray | Sequence[bytes]) -> np.ndarray:
    """SHA-384 of each 4096-byte page, as an (n, 48) uint8 array: the contents field of an
    IMAGE page's record (the digests are joined into one buffer, not stored row by row)."""
    if isinstance(pages, np.ndarray):
        if pages.ndim != 2 or pages.dtype != np.uint8 or pages.shape[1] != PAGE_SIZE:
            raise MeasurementError(f"image pages must be an (n, {PAGE_SIZE}) uint8 array, "
                                   f"not {pages.shape} {pages.dtype}")
        if pages.strides[1] != 1:                   # hashlib needs each row contiguous
            pages = np.ascontiguousarray(pages)
    else:
        for page in pages:
            if len(page) != PAGE_SIZE:
                raise MeasurementError(f"an image page is {len(page)} bytes, not {PAGE_SIZE}")
    joined = b"".join([_sha384(page).digest() for page in pages])
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, DIGEST_SIZE)


def measure_offline(pages: Iterable[tuple[int, PageType, int, bytes | None]],
                    guest_state: bytes, policy: Policy) -> bytes:
    """Final launch digest of (gpa, type, perms, content) pages, sorted by gpa here."""
    m = LaunchMeasurement(policy)
    for gpa, page_type, perms, content in sorted(pages, key=lambda p: p[0]):
        m.add_page(gpa, page_type, perms, content)
    m.add_vmcs(guest_state)
    return m.finalize()


def host_verifiable_digest(pages: Iterable[tuple[int, bytes]]) -> bytes:
    """hash-kd digest: SHA-384 over "KDHASHKD" and (u64 hpa || 4096-byte plaintext) in hpa order."""
    h = hashlib.sha384(b"KDHASHKD")
    for hpa, plaintext in sorted(pages, key=lambda p: p[0]):
        if len(plaintext) != PAGE_SIZE:
            raise MeasurementError(f"host-verifiable page hpa 0x{hpa:x} is not {PAGE_SIZE} bytes")
        h.update(struct.pack("<Q", hpa))
        h.update(plaintext)
    return h.digest()
