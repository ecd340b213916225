"""What the host hands the tenant before sealing: the host layout.

The host reserves a KeyID and allocates host-physical pages for one domain
(``alloc``), then sends the tenant a :class:`HostLayout`: the KeyID, the
guest memory size, every allocated hpa, host_data and the platform's
certificate chain.  The tenant seals for exactly these pages: the XTS tweak
of every page is ``keyid << 40 | hpa``, so the ciphertext is usable only at
these addresses under this KeyID.

How the hpas are used is a fixed convention (:func:`plan`), so host and
tenant agree on it without further negotiation::

    hpas[0]                 the VMCS page
    hpas[1]                 the protected save area
    hpas[2 : 2+n_ept]       EPT table pages, PML4 first (the EPTP points at hpas[2]),
                            then PDPTs, PDs and PTs in the order ept.build_ept takes them
    hpas[2+n_ept :]         guest pages: gpa i*4096 lives at this list's [i]

The file is JSON (see docs/tenant.md).  This module is imported by the
untrusted host VMM, so it depends only on :mod:`qemu_kd.formats.ept` and the error
modules: no keys, no memory-encryption engine, no platform code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from qemu_kd.formats.ept import LEVEL_SPAN, Eptp
from qemu_kd.formats.addresses import HPA_LIMIT, PAGE_SIZE
from qemu_kd.formats.errors import FormatError, MagicError, VersionError
from qemu_kd.common.files import write_file_atomic
from qemu_kd.formats.policy import HOST_DATA_SIZE
from qemu_kd.formats.addresses import MAX_KEYID

LAYOUT_FORMAT = "qemu-kd host layout"
LAYOUT_VERSION = 1
# Control pages before the EPT tables: the VMCS and the protected save area.
CONTROL_PAGES = 2
PEM_CERT_BEGIN = "-----BEGIN CERTIFICATE-----"
_KEYS = {"format", "version", "keyid", "memory_size", "hpas", "host_data", "platform_chain_pem"}


class LayoutError(FormatError):
    """A host layout is malformed or does not fit the guest it is used for."""


class LayoutSizeError(LayoutError):
    """The layout has the wrong number of pages for its memory size."""


def _check_memory_size(memory_size: object, what: str = "memory size") -> int:
    if not isinstance(memory_size, int) or isinstance(memory_size, bool) \
            or memory_size <= 0 or memory_size % PAGE_SIZE:
        raise LayoutError(f"layout {what} {memory_size!r} is not a positive multiple of {PAGE_SIZE} bytes",
                          "give the guest memory size in bytes, e.g. 268435456 for 256 MiB")
    return memory_size


def guest_page_count(memory_size: int) -> int:
    """Number of 4 KiB guest pages in ``memory_size`` bytes of guest RAM."""
    return _check_memory_size(memory_size) // PAGE_SIZE


def ept_pages_needed(memory_size: int) -> int:
    """EPT table pages (PML4, PDPTs, PDs, PTs) that map every gpa in [0, memory_size).

    What :func:`qemu_kd.formats.ept.ept_table_pages_needed` counts for these gpas: one PML4,
    and one table per 512 GiB (PDPT), 1 GiB (PD) and 2 MiB (PT) region the range touches:
    the spans of a PML4, PDPT and PD entry."""
    size = _check_memory_size(memory_size)
    return 1 + sum(-(-size // LEVEL_SPAN[level]) for level in (4, 3, 2))


def pages_needed(memory_size: int) -> int:
    """How many pages the host must allocate for a ``memory_size``-byte guest.

    Guest pages + 1 VMCS + 1 protected save area + EPT table pages.
    """
    return guest_page_count(memory_size) + CONTROL_PAGES + ept_pages_needed(memory_size)


def _bad_hpa(hpa: object) -> LayoutError:
    return LayoutError(f"layout hpa {hpa!r} is not a page-aligned host-physical address below 1 TiB",
                       "list the hpas alloc returned")


def _repeated_hpa(hpa: int) -> LayoutError:
    return LayoutError(f"layout lists hpa 0x{hpa:x} twice", "list every allocated page once")


def _checked_hpas(hpas: Iterable[int] | np.ndarray) -> list[int]:
    """``hpas`` as a list of ints once every one is a page-aligned hpa below 1 TiB and none
    repeats; else the error for the first entry (in list order) that is bad or a repeat.

    Plain ints are checked as one array (a layout lists some 65,000 of them); anything
    else (bools, floats, ints past 64 bits) is checked entry by entry, which finds the
    same first offender."""
    values = hpas.tolist() if isinstance(hpas, np.ndarray) else list(hpas)
    if not values:
        return values
    try:
        arr = np.array(values, dtype=np.int64) if set(map(type, values)) == {int} else None
    except OverflowError:
        arr = None
    if arr is None:
        seen: set[int] = set()
        for hpa in values:
            if not isinstance(hpa, int) or isinstance(hpa, bool) or hpa < 0 \
                    or hpa % PAGE_SIZE or hpa >= HPA_LIMIT:
                raise _bad_hpa(hpa)
            if hpa in seen:
                raise _repeated_hpa(hpa)
            seen.add(hpa)
        return values
    n = len(values)
    bad = (arr < 0) | (arr >= HPA_LIMIT) | (arr % PAGE_SIZE != 0)
    first_bad = int(np.argmax(bad)) if bad.any() else n
    first_repeat = n
    # alloc hands out hpas in ascending order: no sort is needed to see that none repeats.
    ascending = bool((arr[1:] > arr[:-1]).all())
    if not ascending and (np.diff(np.sort(arr)) == 0).any():
        # A stable sort keeps equal hpas in list order: every one after the first of its run
        # repeats an earlier entry, and the smallest such index is the first repeat.
        order = np.argsort(arr, kind="stable")
        repeats = order[1:][arr[order[1:]] == arr[order[:-1]]]
        first_repeat = int(repeats.min())
    if first_bad < n and first_bad <= first_repeat:
        raise _bad_hpa(values[first_bad])
    if first_repeat < n:
        raise _repeated_hpa(values[first_repeat])
    return values


def _describe_size(memory_size: int) -> str:
    if memory_size % (1 << 20) == 0:
        return f"{memory_size >> 20} MiB"
    return f"{memory_size}-byte"


@dataclass(frozen=True)
class HostLayout:
    """The host's allocation for one domain, as handed to the tenant (JSON).

    ``host_data`` is the 32-byte value the host binds into the domain (it is
    zero-padded here if shorter); ``platform_chain_pem`` is the certificate
    chain from platform-info, platform certificate first.
    """

    keyid: int
    memory_size: int
    hpas: list[int]
    host_data: bytes = bytes(HOST_DATA_SIZE)
    platform_chain_pem: bytes = b""
    # Filled by __post_init__: the page count the memory size needs.
    _needed: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.keyid, int) or isinstance(self.keyid, bool) \
                or not 1 <= self.keyid <= MAX_KEYID:
            raise LayoutError(f"layout KeyID {self.keyid!r} is not a key-domain KeyID (1..{MAX_KEYID})",
                              "use the KeyID alloc reserved")
        _check_memory_size(self.memory_size)
        if not isinstance(self.host_data, (bytes, bytearray)) or len(self.host_data) > HOST_DATA_SIZE:
            raise LayoutError(f"layout host_data must be at most {HOST_DATA_SIZE} bytes")
        object.__setattr__(self, "host_data", bytes(self.host_data).ljust(HOST_DATA_SIZE, b"\0"))
        if isinstance(self.platform_chain_pem, str):
            object.__setattr__(self, "platform_chain_pem", self.platform_chain_pem.encode("ascii", "replace"))
        if not isinstance(self.platform_chain_pem, (bytes, bytearray)):
            raise LayoutError("layout platform_chain_pem must be PEM bytes")
        object.__setattr__(self, "platform_chain_pem", bytes(self.platform_chain_pem))
        hpas = _checked_hpas(self.hpas)
        object.__setattr__(self, "hpas", hpas)
        object.__setattr__(self, "_needed", pages_needed(self.memory_size))

    # ----------------------------------------------------------- checking

    def check_size(self) -> None:
        """LayoutSizeError unless the page count is exactly what the memory size needs."""
        if len(self.hpas) != self._needed:
            raise LayoutSizeError(
                f"layout has {len(self.hpas)} pages, a {_describe_size(self.memory_size)} guest needs "
                f"{self._needed}",
                "allocate qemu_kd.formats.layout.pages_needed(memory_size) pages for the domain")

    # ------------------------------------------------------------ JSON

    def pack(self) -> bytes:
        try:
            chain = self.platform_chain_pem.decode("ascii")
        except UnicodeDecodeError:
            raise LayoutError("layout platform_chain_pem is not ASCII PEM text") from None
        doc = {
            "format": LAYOUT_FORMAT, "version": LAYOUT_VERSION,
            "keyid": self.keyid, "memory_size": self.memory_size,
            "host_data": self.host_data.hex(), "platform_chain_pem": chain,
            "hpas": self.hpas,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def unpack(cls, data: bytes) -> "HostLayout":
        """Parse a layout strictly: unknown or missing keys and wrong types are errors."""
        try:
            doc = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LayoutError(f"host layout is not UTF-8 JSON: {exc}",
                              "pass the layout file the host wrote, unchanged") from None
        if not isinstance(doc, dict) or doc.get("format") != LAYOUT_FORMAT:
            raise MagicError("this is not a qemu-kd host layout (its 'format' is not "
                             f"{LAYOUT_FORMAT!r})", "pass the layout file the host wrote")
        if doc.get("version") != LAYOUT_VERSION:
            raise VersionError(f"host layout version {doc.get('version')!r} is not supported "
                               f"(expected {LAYOUT_VERSION})", "use the same qemu-kd version on host and tenant")
        if set(doc) != _KEYS:
            extra, missing = sorted(set(doc) - _KEYS), sorted(_KEYS - set(doc))
            raise LayoutError(f"host layout keys differ from version {LAYOUT_VERSION}: "
                              f"unknown {extra}, missing {missing}")
        for name in ("keyid", "memory_size"):
            if not isinstance(doc[name], int) or isinstance(doc[name], bool):
                raise LayoutError(f"host layout {name} must be an integer, not {doc[name]!r}")
        hpas = doc["hpas"]
        if not isinstance(hpas, list) or not set(map(type, hpas)) <= {int}:
            raise LayoutError("host layout hpas must be a list of integers")
        host_data = doc["host_data"]
        try:
            host_data = bytes.fromhex(host_data) if isinstance(host_data, str) else None
        except ValueError:
            host_data = None
        if host_data is None or len(host_data) != HOST_DATA_SIZE:
            raise LayoutError(f"host layout host_data must be {HOST_DATA_SIZE} bytes as hex")
        chain = doc["platform_chain_pem"]
        if not isinstance(chain, str) or not chain.isascii() or PEM_CERT_BEGIN not in chain:
            raise LayoutError("host layout platform_chain_pem is not a PEM certificate chain",
                              "copy the chain from platform-info unchanged")
        return cls(keyid=doc["keyid"], memory_size=doc["memory_size"], hpas=hpas,
                   host_data=host_data, platform_chain_pem=chain.encode("ascii"))

    def write(self, path: Path | str) -> None:
        """Write atomically (temporary file in the same directory, then rename)."""
        write_file_atomic(path, self.pack())

    @classmethod
    def read(cls, path: Path | str) -> "HostLayout":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LayoutError(f"host layout {path} does not exist",
                              "pass the layout file the host wrote") from None
        except IsADirectoryError:
            raise LayoutError(f"host layout {path} is a directory", "pass the layout file") from None
        except OSError as exc:
            raise LayoutError(f"cannot read host layout {path}: {exc.strerror}") from None
        try:
            return cls.unpack(data)
        except FormatError as exc:
            raise type(exc)(f"{path}: {exc.message}", exc.hint) from None


@dataclass(frozen=True)
class LayoutPlan:
    """Which allocated hpa holds what (see module docstring)."""

    keyid: int
    memory_size: int
    vmcs: int
    save: int
    ept: list[int]
    guest: list[int]

    def guest_hpa(self, gpa: int) -> int:
        """The hpa that backs guest-physical page ``gpa``."""
        if not isinstance(gpa, int) or gpa < 0 or gpa % PAGE_SIZE or gpa >= self.memory_size:
            raise LayoutError(f"gpa {gpa!r} is not a page of this {self.memory_size}-byte guest")
        return self.guest[gpa // PAGE_SIZE]

    @property
    def pml4(self) -> int:
        return self.ept[0]

    def all_hpas(self) -> list[int]:
        """Every hpa of the plan, in layout order (what verify-ept's allocation is)."""
        return [self.vmcs, self.save, *self.ept, *self.guest]


def plan(layout: HostLayout) -> LayoutPlan:
    """Split the layout's hpas by the fixed convention; LayoutSizeError on a wrong count."""
    layout.check_size()
    n_ept = ept_pages_needed(layout.memory_size)
    hpas = layout.hpas
    return LayoutPlan(keyid=layout.keyid, memory_size=layout.memory_size,
                      vmcs=hpas[0], save=hpas[1],
                      ept=hpas[CONTROL_PAGES:CONTROL_PAGES + n_ept],
                      guest=hpas[CONTROL_PAGES + n_ept:])


def expected_eptp(layout: HostLayout) -> int:
    """The EPT pointer a correctly sealed VMCS holds for this layout.

    PML4 at hpas[2], memory type WB (6), page-walk length 4 (encoded 3 << 3):
    exactly what ``ept.build_ept`` produces.  The host compares it with vmread.
    """
    return Eptp(plan(layout).pml4).raw()
