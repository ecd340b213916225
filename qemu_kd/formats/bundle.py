"""The sealed bundle: everything a host needs to build one key domain.

A bundle holds a public JSON manifest (who it is sealed for, policy,
expected measurement, host-verifiable digests), the wrapped key, one record
per ciphertext page (already encrypted by the tenant for its hpa) and one
record per zero page.  Nothing in it is secret: the pages are ciphertext
and the key is wrapped for the platform.

File layout (little-endian integers)::

    0x00  8   magic 89 51 4B 44 0D 0A 1A 0A ("\\x89QKD\\r\\n\\x1a\\n")
    0x08  u16 version (2)
    0x0A  u16 reserved (0)
    0x0C  u32 manifest length M
    0x10  u64 page-record count P
    0x18  u64 zero-record count Z
    0x20  32  reserved (0)
    0x40  M   manifest, UTF-8 JSON object
    ...   248 wrapped key (keywrap.WrappedKey)
    ...   P x 4120 page records
    ...   Z x 24 zero records
    ...   32  SHA-256 of every byte before it

See docs/formats.md for the records and the manifest keys.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from qemu_kd.formats.errors import (
    CorruptError,
    FieldValueError,
    FormatError,
    MagicError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    VersionError,
    require_bytes,
    require_length,
)
from qemu_kd.formats.keywrap import WRAPPED_KEY_SIZE, WrappedKey
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.addresses import PAGE_SIZE, MAX_KEYID, HPA_LIMIT
from qemu_kd.common.arrays import page_span, page_table
from qemu_kd.common.files import write_file_atomic

BUNDLE_MAGIC = b"\x89QKD\r\n\x1a\n"
BUNDLE_VERSION = 2
MANIFEST_FORMAT = "qemu-kd bundle manifest"
MANIFEST_VERSION = 1
MAX_MANIFEST_SIZE = 1 << 20
NO_GPA = (1 << 64) - 1
FLAG_HOST_VERIFIABLE = 1 << 0
#: The checksum: SHA-256 since version 2 (version 1 had SHA-384; the CPUs the platform runs on
#: hash SHA-256 about twice as fast, and the checksum only detects damage: formats.md §9.1).
CHECKSUM_SIZE = 32

_HEADER = struct.Struct("<8sHHIQQ32s")
_PAGE_HEAD = struct.Struct("<QQBBB5s")
_ZERO = struct.Struct("<QQB7s")
PAGE_RECORD_SIZE = _PAGE_HEAD.size + PAGE_SIZE
ZERO_RECORD_SIZE = _ZERO.size


class ManifestError(FormatError):
    """The manifest JSON is malformed or misses or adds keys."""


def _check_hpa(what: str, hpa: int) -> None:
    if not isinstance(hpa, int) or hpa < 0 or hpa % PAGE_SIZE or hpa >= HPA_LIMIT:
        raise FieldValueError(f"{what}: hpa {hpa!r} is not a page-aligned host-physical address")


def _check_gpa(what: str, gpa: int) -> None:
    if not isinstance(gpa, int) or gpa < 0 or gpa % PAGE_SIZE or gpa >= NO_GPA:
        raise FieldValueError(f"{what}: gpa {gpa!r} is not a page-aligned guest-physical address")


def _check_perms(what: str, perms: int) -> None:
    if not isinstance(perms, int) or not 0 < perms <= 7:
        raise FieldValueError(f"{what}: perms {perms!r} must be a non-empty R/W/X combination")


@dataclass(frozen=True)
class PageRecord:
    """One ciphertext page: where it goes and what it is.

    IMAGE pages have a gpa and perms; VMCS, EPT and SAVE pages are not mapped
    into the guest (gpa None, perms 0).  ``host_verifiable`` marks pages the
    host may check with hash-kd (VMCS and EPT always are).
    """

    hpa: int
    gpa: int | None
    page_type: PageType
    perms: int
    ciphertext: bytes
    host_verifiable: bool = False

    def validate(self) -> None:
        what = f"page record hpa 0x{self.hpa:x}" if isinstance(self.hpa, int) else "page record"
        _check_hpa(what, self.hpa)
        if self.page_type not in (PageType.IMAGE, PageType.VMCS, PageType.EPT, PageType.SAVE):
            raise FieldValueError(f"{what}: page type {self.page_type!r} cannot carry ciphertext "
                                  "(zero pages go in zero records)")
        if self.page_type == PageType.IMAGE:
            if self.gpa is None:
                raise FieldValueError(f"{what}: an IMAGE page needs a gpa")
            _check_gpa(what, self.gpa)
            _check_perms(what, self.perms)
        elif self.gpa is not None or self.perms:
            raise FieldValueError(f"{what}: {PageType(self.page_type).name} pages are not mapped "
                                  "into the guest (no gpa, perms 0)")
        require_bytes(f"{what} ciphertext", self.ciphertext, PAGE_SIZE)

    def pack(self) -> bytes:
        self.validate()
        flags = FLAG_HOST_VERIFIABLE if self.host_verifiable else 0
        gpa = NO_GPA if self.gpa is None else self.gpa
        return _PAGE_HEAD.pack(self.hpa, gpa, int(self.page_type), self.perms, flags, bytes(5)) \
            + bytes(self.ciphertext)

    @classmethod
    def unpack(cls, data: bytes) -> "PageRecord":
        require_length("bundle page record", data, PAGE_RECORD_SIZE)
        hpa, gpa, page_type, perms, flags, reserved = _PAGE_HEAD.unpack_from(data)
        if any(reserved) or flags & ~FLAG_HOST_VERIFIABLE:
            raise ReservedBitsError(f"bundle page record hpa 0x{hpa:x}: reserved bits are set")
        if page_type not in PageType._value2member_map_:
            raise FieldValueError(f"bundle page record hpa 0x{hpa:x}: unknown page type {page_type}")
        record = cls(hpa, None if gpa == NO_GPA else gpa, PageType(page_type), perms,
                     bytes(data[_PAGE_HEAD.size:]), bool(flags & FLAG_HOST_VERIFIABLE))
        record.validate()
        return record


@dataclass(frozen=True)
class ZeroPageRecord:
    """A guest page the platform fills with zeros itself."""

    hpa: int
    gpa: int
    perms: int

    def validate(self) -> None:
        what = f"zero record hpa 0x{self.hpa:x}" if isinstance(self.hpa, int) else "zero record"
        _check_hpa(what, self.hpa)
        _check_gpa(what, self.gpa)
        _check_perms(what, self.perms)

    def pack(self) -> bytes:
        self.validate()
        return _ZERO.pack(self.hpa, self.gpa, self.perms, bytes(7))

    @classmethod
    def unpack(cls, data: bytes) -> "ZeroPageRecord":
        require_length("bundle zero record", data, ZERO_RECORD_SIZE)
        hpa, gpa, perms, reserved = _ZERO.unpack_from(data)
        if any(reserved) or perms & ~7:
            raise ReservedBitsError(f"bundle zero record hpa 0x{hpa:x}: reserved bits are set")
        record = cls(hpa, gpa, perms)
        record.validate()
        return record


# The records as numpy sees them: the same bytes as _PAGE_HEAD + ciphertext, and as _ZERO.
PAGE_RECORD_DTYPE = np.dtype([("hpa", "<u8"), ("gpa", "<u8"), ("type", "u1"), ("perms", "u1"),
                              ("flags", "u1"), ("reserved", "u1", (5,)), ("ciphertext", "u1", (PAGE_SIZE,))])
ZERO_RECORD_DTYPE = np.dtype([("hpa", "<u8"), ("gpa", "<u8"), ("perms", "u1"), ("reserved", "u1", (7,))])
assert PAGE_RECORD_DTYPE.itemsize == PAGE_RECORD_SIZE and ZERO_RECORD_DTYPE.itemsize == ZERO_RECORD_SIZE
_CIPHERTEXT_TYPES = [int(PageType.IMAGE), int(PageType.VMCS), int(PageType.EPT), int(PageType.SAVE)]


def _valid_zero_fields(hpa: np.ndarray, gpa: np.ndarray, perms: np.ndarray) -> bool:
    """Whether every record passes ZeroPageRecord.validate (as arrays; no record named)."""
    return bool(((hpa % PAGE_SIZE == 0) & (hpa < HPA_LIMIT) & (gpa % PAGE_SIZE == 0)
                 & (gpa < np.uint64(NO_GPA)) & (perms > 0) & (perms <= 7)).all())


def _valid_page_records(arr: np.ndarray) -> bool:
    """Whether every record of a PAGE_RECORD_DTYPE array passes PageRecord.unpack's checks
    (as arrays; no record named)."""
    hpa, gpa, kind, perms = arr["hpa"], arr["gpa"], arr["type"], arr["perms"]
    image = kind == PageType.IMAGE
    mapped = (gpa != np.uint64(NO_GPA)) & (gpa % PAGE_SIZE == 0) & (perms > 0) & (perms <= 7)
    unmapped = (gpa == np.uint64(NO_GPA)) & (perms == 0)
    flags_known = (arr["flags"] | FLAG_HOST_VERIFIABLE) == FLAG_HOST_VERIFIABLE
    return bool((~arr["reserved"].any(axis=1) & flags_known
                 & (hpa % PAGE_SIZE == 0) & (hpa < HPA_LIMIT) & np.isin(kind, _CIPHERTEXT_TYPES)
                 & np.where(image, mapped, unmapped)).all())


class _Records:
    """A bundle's records of one kind in one structured array (the bytes the file holds),
    each a record object on demand.  Every record in it passed that record's checks;
    list-like: len, index, iterate, assign, append."""

    dtype: np.dtype
    record_type: type

    def __init__(self, records: "Iterable | np.ndarray" = ()):
        if isinstance(records, np.ndarray):
            if records.dtype != self.dtype or records.ndim != 1:
                raise FieldValueError(f"bundle records must be a 1-D {type(self).__name__} array")
            self._check_array(records)
            self.array = records
        else:
            self.array = self._from_objects(list(records))

    @classmethod
    def _from_objects(cls, records: list) -> np.ndarray:
        """Pack record objects, each checked (and failing) as its own pack() does."""
        data = b"".join(r.pack() for r in records)
        return np.frombuffer(bytearray(data), dtype=cls.dtype)

    @classmethod
    def unpack(cls, data: memoryview, count: int) -> "_Records":
        """``count`` records from ``data`` (no copy), checked as their unpack checks each."""
        return cls(np.frombuffer(data, dtype=cls.dtype, count=count))

    def _check_array(self, arr: np.ndarray) -> None:
        if not self._valid(arr):                 # one by one: the first bad record's own error
            for i in range(arr.size):
                self.record_type.unpack(arr[i:i + 1].tobytes())

    def _valid(self, arr: np.ndarray) -> bool:
        raise NotImplementedError

    def _record(self, row: np.void):
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.array.size)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._record(row) for row in self.array[index]]
        return self._record(self.array[index])

    def __iter__(self):
        return (self._record(row) for row in self.array)

    def __setitem__(self, index: int, record) -> None:
        row = np.frombuffer(record.pack(), dtype=self.dtype)[0]
        if not self.array.flags.writeable:
            self.array = self.array.copy()
        self.array[index] = row

    def append(self, record) -> None:
        self.array = np.concatenate([self.array, np.frombuffer(record.pack(), dtype=self.dtype)])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Records):
            return type(other) is type(self) and self.array.tobytes() == other.array.tobytes()
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} records)"

    def tobytes(self) -> bytes:
        """The records as the bundle file holds them."""
        return self.array.tobytes()

    @property
    def hpas(self) -> np.ndarray:
        return self.array["hpa"]


class PageRecords(_Records):
    """A bundle's ciphertext page records (PAGE_RECORD_DTYPE)."""

    dtype = PAGE_RECORD_DTYPE
    record_type = PageRecord

    def _valid(self, arr: np.ndarray) -> bool:
        return _valid_page_records(arr)

    def _record(self, row: np.void) -> PageRecord:
        gpa = int(row["gpa"])
        return PageRecord(int(row["hpa"]), None if gpa == NO_GPA else gpa, PageType(int(row["type"])),
                          int(row["perms"]), row["ciphertext"].tobytes(),
                          bool(row["flags"] & FLAG_HOST_VERIFIABLE))

    @property
    def ciphertext(self) -> np.ndarray:
        """Every page's ciphertext, an (n, 4096) uint8 view into the records."""
        return self.array["ciphertext"]


class ZeroRecords(_Records):
    """A bundle's zero-page records (ZERO_RECORD_DTYPE)."""

    dtype = ZERO_RECORD_DTYPE
    record_type = ZeroPageRecord

    @classmethod
    def _from_objects(cls, records: list) -> np.ndarray:
        fields = ([z.hpa for z in records], [z.gpa for z in records], [z.perms for z in records])
        if all(type(v) is int for column in fields for v in column):
            try:
                hpa, gpa = (np.array(column, dtype=np.uint64) for column in fields[:2])
                perms = np.array(fields[2], dtype=np.int64)
            except OverflowError:       # negative, or beyond 64 bits: pack says which one
                pass
            else:
                if _valid_zero_fields(hpa, gpa, perms):
                    out = np.zeros(len(records), dtype=cls.dtype)
                    out["hpa"], out["gpa"], out["perms"] = hpa, gpa, perms
                    return out
        return super()._from_objects(records)

    def _valid(self, arr: np.ndarray) -> bool:
        return not arr["reserved"].any() and _valid_zero_fields(arr["hpa"], arr["gpa"], arr["perms"])

    def _record(self, row: np.void) -> ZeroPageRecord:
        return ZeroPageRecord(int(row["hpa"]), int(row["gpa"]), int(row["perms"]))

    def __iter__(self):
        arr = self.array
        return (ZeroPageRecord(h, g, p) for h, g, p in
                zip(arr["hpa"].tolist(), arr["gpa"].tolist(), arr["perms"].tolist()))


def _pack_zero_records(zeros: list[ZeroPageRecord]) -> bytes:
    """``b"".join(z.pack() for z in zeros)``, with the checks done on arrays.  Any record
    that fails them is packed one by one, so it raises the error its own pack raises."""
    return ZeroRecords(zeros).tobytes()


def _unpack_zero_records(data: memoryview, count: int) -> ZeroRecords:
    """``count`` zero records from ``data``, checked as ZeroPageRecord.unpack checks each:
    on arrays, falling back to record by record (and its error) when one fails."""
    return ZeroRecords.unpack(data, count)


def _is_keyid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_KEYID


_HEX_FIELDS = {"platform_id": 16, "host_data": 32, "measurement": 48,
               "host_verifiable_digest": 48, "ept_mapping_digest": 48}
_LOWER_HEX = re.compile(r"(?:[0-9a-f]{2})*")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: an object that names a key twice is refused (no "last one wins")."""
    doc: dict = {}
    for key, value in pairs:
        if key in doc:
            raise ManifestError(f"bundle manifest names the key {key!r} twice",
                                "a manifest is written with each key once; this one was edited or forged")
        doc[key] = value
    return doc


def _no_constant(name: str) -> object:
    raise ManifestError(f"bundle manifest holds {name}, which is not JSON")


def _manifest_hex(name: str, value: object, size: int) -> bytes:
    """A byte string from the manifest: exactly ``2 * size`` lowercase hex digits."""
    if not isinstance(value, str) or len(value) != 2 * size:
        raise ManifestError(f"bundle manifest {name} must be {size} bytes as {2 * size} lowercase "
                            "hex digits")
    if not _LOWER_HEX.fullmatch(value):
        raise ManifestError(f"bundle manifest {name} is not lowercase hex (digits 0-9 and a-f only)")
    return bytes.fromhex(value)


@dataclass(frozen=True)
class BundleManifest:
    """The public part of a bundle (JSON; byte strings as lowercase hex)."""

    platform_id: bytes
    policy: Policy
    measurement: bytes
    host_data: bytes
    memory_size: int
    keyid: int
    host_verifiable_digest: bytes
    ept_mapping_digest: bytes
    info: dict[str, str] = field(default_factory=dict)

    def pack(self) -> bytes:
        for name, size in _HEX_FIELDS.items():
            require_bytes(f"manifest {name}", getattr(self, name), size)
        if not isinstance(self.memory_size, int) or self.memory_size <= 0 or self.memory_size % PAGE_SIZE:
            raise FieldValueError(f"manifest memory_size {self.memory_size!r} is not a positive page multiple")
        if not _is_keyid(self.keyid):
            raise FieldValueError(f"manifest keyid {self.keyid!r} is not a key-domain KeyID (1..{MAX_KEYID})")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.info.items()):
            raise FieldValueError("manifest info must map strings to strings")
        doc = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "policy": self.policy.pack().hex(), "debug": self.policy.debug,
            "memory_size": self.memory_size, "keyid": self.keyid, "info": dict(self.info),
            **{name: getattr(self, name).hex() for name in _HEX_FIELDS},
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def unpack(cls, data: bytes) -> "BundleManifest":
        try:
            doc = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_unique_keys,
                             parse_constant=_no_constant)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"bundle manifest is not UTF-8 JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise MagicError("bundle manifest does not declare itself a qemu-kd bundle manifest")
        if doc.get("version") != MANIFEST_VERSION:
            raise VersionError(f"bundle manifest version {doc.get('version')!r} is not supported "
                               f"(expected {MANIFEST_VERSION})")
        expected = {"format", "version", "policy", "debug", "memory_size", "keyid", "info", *_HEX_FIELDS}
        if set(doc) != expected:
            extra, missing = sorted(set(doc) - expected), sorted(expected - set(doc))
            raise ManifestError(f"bundle manifest keys differ from version {MANIFEST_VERSION}: "
                                f"unknown {extra}, missing {missing}")
        values = {name: _manifest_hex(name, doc[name], size) for name, size in _HEX_FIELDS.items()}
        policy = Policy.unpack(_manifest_hex("policy", doc["policy"], 8))
        if doc["debug"] is not policy.debug:
            raise ManifestError("bundle manifest 'debug' disagrees with its policy")
        size = doc["memory_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % PAGE_SIZE:
            raise ManifestError(f"bundle manifest memory_size {size!r} is not a positive page multiple")
        if not _is_keyid(doc["keyid"]):
            raise ManifestError(f"bundle manifest keyid {doc['keyid']!r} is not a key-domain KeyID "
                                f"(1..{MAX_KEYID})")
        info = doc["info"]
        if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
            raise ManifestError("bundle manifest info must map strings to strings")
        return cls(policy=policy, memory_size=size, keyid=doc["keyid"], info=info, **values)


class _Checksum:
    """The bundle checksum of ``parts`` (buffers, in order), computed in a thread of its own:
    hashlib lets go of the GIL while it hashes, so writing the file or checking the records
    goes on meanwhile on another CPU.  :meth:`digest` waits for it."""

    def __init__(self, parts: Iterable) -> None:
        self._hash = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(list(parts),), daemon=True,
                                        name="bundle-checksum")
        self._thread.start()

    def _run(self, parts: list) -> None:
        try:
            for part in parts:
                self._hash.update(part)
        except BaseException as exc:    # noqa: BLE001 - handed to the caller of digest()
            self._error = exc

    def digest(self) -> bytes:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.digest()


def _check_checksum(checksum: _Checksum, stored: memoryview) -> None:
    if checksum.digest() != bytes(stored):
        raise CorruptError("bundle checksum does not match: the file is damaged",
                           "copy the bundle again from the tenant")


#: The widest range (in pages, lowest to highest address) :func:`_has_duplicates` marks in a
#: table of its own (one byte a page) for each address it is given: a guest's gpas and the
#: hpas of one DRAM span little more than their number.  Wider ones are sorted.
_TABLE_PAGES_PER_ADDRESS = 16


def _has_duplicates(values: np.ndarray) -> bool:
    """Whether an address appears twice in ``values`` (uint64)."""
    if values.size < 2:
        return False
    low, pages = page_span(values)
    if pages <= _TABLE_PAGES_PER_ADDRESS * values.size and not (values % PAGE_SIZE).any():
        return int(np.count_nonzero(page_table(values, low, pages))) < values.size
    ordered = np.sort(values)
    return bool((ordered[1:] == ordered[:-1]).any())


@dataclass
class Bundle:
    """A complete sealed bundle (see module docstring).

    ``pages`` and ``zero_pages`` may be given as lists of records; they are kept as
    :class:`PageRecords` and :class:`ZeroRecords` (one array each, the file's bytes).
    """

    manifest: BundleManifest
    wrapped_key: WrappedKey
    pages: PageRecords = field(default_factory=PageRecords)
    zero_pages: ZeroRecords = field(default_factory=ZeroRecords)

    def __post_init__(self) -> None:
        if not isinstance(self.pages, PageRecords):
            self.pages = PageRecords(self.pages)
        if not isinstance(self.zero_pages, ZeroRecords):
            self.zero_pages = ZeroRecords(self.zero_pages)

    def validate(self) -> None:
        if _has_duplicates(np.concatenate([self.pages.hpas, self.zero_pages.hpas])):
            raise FieldValueError("bundle uses the same hpa for two pages")
        page_gpas = self.pages.array["gpa"]
        if _has_duplicates(np.concatenate([page_gpas[page_gpas != np.uint64(NO_GPA)],
                                           self.zero_pages.array["gpa"]])):
            raise FieldValueError("bundle maps the same gpa twice")
        if np.count_nonzero(self.pages.array["type"] == PageType.VMCS) > 1:
            raise FieldValueError("bundle holds more than one VMCS page")

    def _parts(self) -> list:
        """The file's bytes before its checksum, in three buffers: header, manifest and
        wrapped key; the page records; the zero records (the arrays' own bytes, not copied)."""
        self.validate()
        manifest = self.manifest.pack()
        head = _HEADER.pack(BUNDLE_MAGIC, BUNDLE_VERSION, 0, len(manifest), len(self.pages),
                            len(self.zero_pages), bytes(32)) + manifest + self.wrapped_key.pack()
        return [head] + [memoryview(np.ascontiguousarray(records.array).view(np.uint8).reshape(-1))
                         for records in (self.pages, self.zero_pages)]

    def pack(self) -> bytes:
        body = b"".join(self._parts())
        return body + hashlib.sha256(body).digest()

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "Bundle":
        """Parse and check a bundle.  Its records stay views into ``data`` (no copy)."""
        view = memoryview(data).cast("B")
        if len(view) < len(BUNDLE_MAGIC) or bytes(view[:len(BUNDLE_MAGIC)]) != BUNDLE_MAGIC:
            raise MagicError("not a qemu-kd bundle (bad magic)", "pass a bundle written by the tenant's seal")
        if len(view) < _HEADER.size:
            raise TruncatedError(f"bundle is truncated: {len(view)} bytes, shorter than its header")
        _, version, reserved, manifest_len, n_pages, n_zero, reserved2 = _HEADER.unpack_from(view)
        if version != BUNDLE_VERSION:
            raise VersionError(f"bundle version {version} is not supported (expected {BUNDLE_VERSION})",
                               "seal the guest again with this version of qemu-kd")
        if reserved or any(reserved2):
            raise ReservedBitsError("bundle header: reserved bytes are not zero")
        if manifest_len > MAX_MANIFEST_SIZE:
            raise OversizedError(f"bundle manifest claims {manifest_len} bytes (limit {MAX_MANIFEST_SIZE})")
        total = (_HEADER.size + manifest_len + WRAPPED_KEY_SIZE + n_pages * PAGE_RECORD_SIZE
                 + n_zero * ZERO_RECORD_SIZE + CHECKSUM_SIZE)
        if len(view) < total:
            raise TruncatedError(f"bundle is truncated: {len(view)} bytes, its header needs {total}",
                                 "the file was cut short; copy it again")
        if len(view) > total:
            raise OversizedError(f"bundle has {len(view) - total} bytes after its end",
                                 "the file was damaged or concatenated with something else")
        # The checksum is hashed while the records are checked; nothing is returned before it
        # matches, and a damaged file is reported as damaged, whatever else the damage broke.
        checksum = _Checksum([view[:total - CHECKSUM_SIZE]])
        try:
            bundle = cls._unpack_parts(view, manifest_len, n_pages, n_zero)
        except FormatError:
            _check_checksum(checksum, view[total - CHECKSUM_SIZE:])
            raise
        _check_checksum(checksum, view[total - CHECKSUM_SIZE:])
        return bundle

    @classmethod
    def _unpack_parts(cls, view: memoryview, manifest_len: int, n_pages: int, n_zero: int) -> "Bundle":
        """The bundle in ``view`` (its length checked), its records checked; not its checksum."""
        offset = _HEADER.size
        manifest = BundleManifest.unpack(view[offset:offset + manifest_len])
        offset += manifest_len
        wrapped = WrappedKey.unpack(view[offset:offset + WRAPPED_KEY_SIZE])
        offset += WRAPPED_KEY_SIZE
        pages = PageRecords.unpack(view[offset:offset + n_pages * PAGE_RECORD_SIZE], n_pages)
        offset += n_pages * PAGE_RECORD_SIZE
        zeros = ZeroRecords.unpack(view[offset:offset + n_zero * ZERO_RECORD_SIZE], n_zero)
        bundle = cls(manifest, wrapped, pages, zeros)
        bundle.validate()
        return bundle

    def write(self, path: Path, *, durable: bool = True) -> None:
        """Write atomically (temporary file in the same directory, then rename); fsynced
        unless ``durable`` is False (a bundle loaded right away and then deleted)."""
        parts = self._parts()
        checksum = _Checksum(parts)        # hashed while the parts are written

        def file_parts() -> Iterator:
            yield from parts
            yield checksum.digest()

        write_file_atomic(path, file_parts(), durable=durable)

    @classmethod
    def read(cls, path: Path) -> "Bundle":
        bundle, file, _ = cls.open(path)
        file.close()
        return bundle

    @classmethod
    def open(cls, path: Path) -> tuple["Bundle", BinaryIO, int]:
        """The bundle at ``path``, the file it was read from (still open: the caller closes it)
        and how many bytes were read and checked."""
        path = Path(path)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            raise FormatError(f"bundle {path} does not exist", "pass the path of a sealed bundle") from None
        except IsADirectoryError:
            raise FormatError(f"bundle {path} is a directory", "pass the path of a sealed bundle") from None
        try:
            data = file.read()
            return cls.unpack(data), file, len(data)
        except FormatError as exc:
            file.close()
            raise type(exc)(f"{path}: {exc.message}", exc.hint) from None
        except BaseException:
            file.close()
            raise

    def ciphertext_in_file(self, size: int) -> tuple[int, int]:
        """Where the page records' ciphertext lies in the ``size``-byte file this bundle was
        read from: (offset of the first page's, distance from one page's to the next)."""
        records = size - CHECKSUM_SIZE - len(self.zero_pages) * ZERO_RECORD_SIZE - len(self.pages) * PAGE_RECORD_SIZE
        return records + _PAGE_HEAD.size, PAGE_RECORD_SIZE

    def page_for_hpa(self, hpa: int) -> PageRecord | None:
        found = np.flatnonzero(self.pages.hpas == np.uint64(hpa)) if 0 <= hpa < 1 << 64 else []
        return self.pages[int(found[0])] if len(found) else None
