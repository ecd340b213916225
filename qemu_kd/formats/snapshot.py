"""The snapshot file of a protected domain (version 2): what ``snapshot-kd`` writes.

The header says whose snapshot it is, in the clear (none of it is secret: the
host sees KeyIDs, measurements and policies anyway); the sections hold the
domain.  A section is either *sealed* (AES-256-GCM under a key only the
platform that took the snapshot can derive) or *raw* (guest memory, already
encrypted under the domain key by the memory-encryption engine).  The last 48
bytes are an HMAC-SHA-384 over everything before them.

Byte format (little-endian; docs/formats.md §16)::

    0x00  4   magic "KDSN"
    0x04  u16 version (2; version 1 stored every guest page and is refused)
    0x06  u16 section count n
    0x08  16  platform id of the platform that took it
    0x18  16  domain id (the platform names a domain at its first snapshot;
              restored domains keep it)
    0x28  u64 snapshot version (per domain id, monotonic on that platform)
    0x30  u32 KeyID the domain had when the snapshot was taken
    0x34  u32 reserved (0)
    0x38  48  launch measurement
    0x68  8   policy (formats/policy.py)
    0x70  32  host_data
    0x90  n sections: u16 section id, u16 kind (0 raw, 1 sealed),
              u32 reserved (0), u64 length, length bytes
          48  HMAC-SHA-384 of everything before it

A sealed section's bytes are a 12-byte nonce, then the ciphertext and the
16-byte GCM tag; its associated data is the 0x90-byte header and the section id
(:func:`sealed_aad`).  The file is sparse: the sealed page list flags the guest
pages that were all zeros, and the memory section holds only the other pages'
ciphertext.  This module holds no key: sealing and the MAC are the
caller's (``qemu_kd.platform.snapshot``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from qemu_kd.formats.errors import FormatError, MagicError, VersionError
from qemu_kd.formats.policy import HOST_DATA_SIZE, Policy

SNAPSHOT_MAGIC = b"KDSN"
SNAPSHOT_VERSION = 2
MAC_SIZE = 48
ID_SIZE = 16
MEASUREMENT_SIZE = 48
_HEADER = struct.Struct(f"<4sHH{ID_SIZE}s{ID_SIZE}sQII{MEASUREMENT_SIZE}s8s{HOST_DATA_SIZE}s")
HEADER_SIZE = _HEADER.size
_SECTION = struct.Struct("<HHIQ")

KIND_RAW = 0
KIND_SEALED = 1

#: Section ids.  DOMAIN: the domain key, VMCS page and runtime parameters (sealed);
#: VCPU: the save-area record of the snapshot's exit (sealed); DEVICES: QEMU's
#: migration stream without guest RAM (sealed); PAGES: the guest page list
#: (gpa, hpa, type, perms, flags) (sealed); MEMORY: the guest pages that are not
#: all zeros as the MEE encrypted them in DRAM, in PAGES order (raw).
SECTION_DOMAIN = 1
SECTION_VCPU = 2
SECTION_DEVICES = 3
SECTION_PAGES = 4
SECTION_MEMORY = 5
SECTION_NAMES = {SECTION_DOMAIN: "domain", SECTION_VCPU: "vcpu", SECTION_DEVICES: "devices",
                 SECTION_PAGES: "pages", SECTION_MEMORY: "memory"}
#: Which sections a version-2 snapshot has, and how each is stored.
SECTION_KINDS = {SECTION_DOMAIN: KIND_SEALED, SECTION_VCPU: KIND_SEALED, SECTION_DEVICES: KIND_SEALED,
                 SECTION_PAGES: KIND_SEALED, SECTION_MEMORY: KIND_RAW}


class SnapshotFormatError(FormatError):
    """The snapshot file is malformed."""


@dataclass
class SnapshotHeader:
    """Whose snapshot it is (the clear part)."""

    platform_id: bytes
    domain_id: bytes
    version: int
    keyid: int
    measurement: bytes
    policy: Policy
    host_data: bytes

    def pack(self, section_count: int) -> bytes:
        for name, value, size in (("platform id", self.platform_id, ID_SIZE),
                                  ("domain id", self.domain_id, ID_SIZE),
                                  ("measurement", self.measurement, MEASUREMENT_SIZE),
                                  ("host_data", self.host_data, HOST_DATA_SIZE)):
            if len(value) != size:
                raise SnapshotFormatError(f"snapshot {name} must be {size} bytes, not {len(value)}")
        return _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, section_count, self.platform_id,
                            self.domain_id, self.version, self.keyid, 0, self.measurement,
                            self.policy.pack(), self.host_data)

    @classmethod
    def unpack(cls, data: bytes) -> tuple["SnapshotHeader", int]:
        """The header and its section count."""
        if len(data) < HEADER_SIZE:
            raise SnapshotFormatError("the file is shorter than a snapshot header",
                                      "pass a file written by qemu-kd snapshot")
        (magic, version, count, platform_id, domain_id, snap_version, keyid, reserved, measurement,
         policy, host_data) = _HEADER.unpack_from(data, 0)
        if magic != SNAPSHOT_MAGIC:
            raise MagicError("the file is not a qemu-kd snapshot (no KDSN magic)",
                             "pass a file written by qemu-kd snapshot")
        if version != SNAPSHOT_VERSION:
            older = " (an older format: it stored every guest page)" if version < SNAPSHOT_VERSION else ""
            raise VersionError(f"snapshot format version {version} is not supported{older}; this platform "
                               f"reads version {SNAPSHOT_VERSION}", "take a new snapshot of the domain")
        if reserved:
            raise SnapshotFormatError("snapshot header: reserved bytes 0x34..0x37 are not zero")
        return cls(platform_id, domain_id, snap_version, keyid, measurement, Policy.unpack(policy),
                   host_data), count


@dataclass
class Snapshot:
    """A snapshot: header and sections (sealed ones as stored: nonce, ciphertext, tag)."""

    header: SnapshotHeader
    sections: dict[int, bytes | memoryview] = field(default_factory=dict)

    def pack_body(self) -> bytes:
        """Everything the MAC covers (the file without its last 48 bytes)."""
        missing = set(SECTION_KINDS) - set(self.sections)
        if missing:
            raise SnapshotFormatError("snapshot lacks its " + ", ".join(SECTION_NAMES[s] for s in sorted(missing))
                                      + " section")
        parts = [self.header.pack(len(self.sections))]
        for sid in sorted(self.sections):
            data = self.sections[sid]
            parts.append(_SECTION.pack(sid, SECTION_KINDS.get(sid, KIND_RAW), 0, len(data)))
            parts.append(bytes(data))
        return b"".join(parts)

    @classmethod
    def unpack_body(cls, data: bytes | memoryview) -> "Snapshot":
        """The snapshot in ``data`` (the file without its MAC); raises SnapshotFormatError."""
        view = memoryview(data)
        header, count = SnapshotHeader.unpack(bytes(view[:HEADER_SIZE]))
        offset = HEADER_SIZE
        sections: dict[int, bytes | memoryview] = {}
        for _ in range(count):
            if offset + _SECTION.size > len(view):
                raise SnapshotFormatError("the snapshot ends inside its section list (truncated)")
            sid, kind, reserved, length = _SECTION.unpack_from(view, offset)
            offset += _SECTION.size
            if sid not in SECTION_KINDS or sid in sections:
                raise SnapshotFormatError(f"snapshot section {sid} is unknown or appears twice")
            if kind != SECTION_KINDS[sid] or reserved:
                raise SnapshotFormatError(f"snapshot section {SECTION_NAMES[sid]} has kind {kind} "
                                          "or reserved bits set")
            if offset + length > len(view):
                raise SnapshotFormatError(f"the snapshot ends inside its {SECTION_NAMES[sid]} section "
                                          "(truncated)")
            sections[sid] = view[offset:offset + length]    # a view: the memory section is large
            offset += length
        if offset != len(view):
            raise SnapshotFormatError(f"{len(view) - offset} bytes follow the last snapshot section")
        missing = set(SECTION_KINDS) - set(sections)
        if missing:
            raise SnapshotFormatError("snapshot lacks its " + ", ".join(SECTION_NAMES[s] for s in sorted(missing))
                                      + " section")
        return cls(header, sections)


def sealed_aad(header_bytes: bytes, section_id: int) -> bytes:
    """A sealed section's associated data: the header it belongs to and its id."""
    return b"KDSN-SECTION" + bytes(header_bytes) + struct.pack("<H", section_id)


# -- the sealed sections' contents ------------------------------------------------------------

_DOMAIN = struct.Struct("<64sIIQQ")    # key, tsc_khz (0: none), reserved, mem_size, save-area hpa
VMCS_BYTES = 4096
PAGE_BYTES = 4096
_PAGE = struct.Struct("<QQBBB5x")      # gpa, hpa, page type, perms, flags
_PAGE_ROW = np.dtype({"names": ["gpa", "hpa", "type", "perms", "flags"],
                      "formats": ["<u8", "<u8", "u1", "u1", "u1"],
                      "offsets": [0, 8, 16, 17, 18], "itemsize": _PAGE.size})
#: Page-list flag: the page was all zeros; the memory section holds nothing for it.
PAGE_FLAG_ZERO = 0x01


@dataclass
class DomainSection:
    """What the platform needs to bring the domain back (sealed: it holds the domain key)."""

    key: bytes = field(repr=False)
    tsc_khz: int | None
    mem_size: int
    save_hpa: int
    vmcs: bytes = field(repr=False)

    def pack(self) -> bytes:
        if len(self.vmcs) != VMCS_BYTES:
            raise SnapshotFormatError(f"the VMCS page is {VMCS_BYTES} bytes")
        return _DOMAIN.pack(self.key, self.tsc_khz or 0, 0, self.mem_size, self.save_hpa) + self.vmcs

    @classmethod
    def unpack(cls, data: bytes) -> "DomainSection":
        if len(data) != _DOMAIN.size + VMCS_BYTES:
            raise SnapshotFormatError("the snapshot's domain section has the wrong size")
        key, tsc_khz, _reserved, mem_size, save_hpa = _DOMAIN.unpack_from(data, 0)
        return cls(key, tsc_khz or None, mem_size, save_hpa, bytes(data[_DOMAIN.size:]))


@dataclass
class PageList:
    """The snapshot's guest pages, in order (one array per column).  ``zero``: the pages that
    were all zeros; the memory section holds the ciphertext of the others only, in this order."""

    gpas: np.ndarray      # uint64
    hpas: np.ndarray      # uint64
    types: np.ndarray     # uint8
    perms: np.ndarray     # uint8
    zero: np.ndarray | None = None      # bool (None: no page is zero)

    def __post_init__(self) -> None:
        self.gpas = np.asarray(self.gpas, dtype=np.uint64)
        self.hpas = np.asarray(self.hpas, dtype=np.uint64)
        self.types = np.asarray(self.types, dtype=np.uint8)
        self.perms = np.asarray(self.perms, dtype=np.uint8)
        self.zero = (np.zeros(self.gpas.size, dtype=bool) if self.zero is None
                     else np.asarray(self.zero, dtype=bool))
        if not self.gpas.size == self.hpas.size == self.types.size == self.perms.size == self.zero.size:
            raise SnapshotFormatError("the snapshot's page list columns differ in length")

    @property
    def data_pages(self) -> int:
        """How many pages the memory section holds (those not flagged zero)."""
        return int(self.zero.size - np.count_nonzero(self.zero))

    def memory_size(self) -> int:
        """The size the memory section must have for this page list."""
        return self.data_pages * PAGE_BYTES

    def pack(self) -> bytes:
        rows = np.zeros(self.gpas.size, dtype=_PAGE_ROW)
        rows["gpa"], rows["hpa"], rows["type"], rows["perms"] = self.gpas, self.hpas, self.types, self.perms
        rows["flags"] = np.where(self.zero, PAGE_FLAG_ZERO, 0)
        return rows.tobytes()

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "PageList":
        if len(data) % _PAGE.size:
            raise SnapshotFormatError("the snapshot's page list has the wrong size")
        rows = np.frombuffer(data, dtype=_PAGE_ROW)
        flags = rows["flags"]
        if (flags & ~np.uint8(PAGE_FLAG_ZERO)).any():
            raise SnapshotFormatError("the snapshot's page list has unknown page flags set")
        if np.frombuffer(data, dtype=np.uint8).reshape(-1, _PAGE.size)[:, 19:].any():
            raise SnapshotFormatError("the snapshot's page list has reserved bytes set")
        return cls(rows["gpa"].copy(), rows["hpa"].copy(), rows["type"].copy(), rows["perms"].copy(),
                   (flags & PAGE_FLAG_ZERO).astype(bool))
