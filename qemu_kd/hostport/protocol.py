"""The host port's wire protocol: frames, messages and typed errors.

This module is shared by the platform's server and the untrusted host VMM's
client, so it imports nothing of the platform.  docs/hostport.md describes
every byte; in short, a frame is::

    u32 BE  frame length L   (bytes that follow, 4 <= L <= MAX_FRAME)
    u32 BE  header length H  (H <= L - 4, H <= MAX_HEADER)
    H bytes header: UTF-8 JSON object
    L-4-H bytes payload: binary, meaning given by the command

A request header is ``{"cmd": str, "id": int, "args": {...}}``; a reply
header is ``{"id": int, "ok": true, "result": {...}}`` or
``{"id": int|null, "ok": false, "error": {"code": str, "message": str,
"hint": str|null}}``.  The first request on a connection must be ``hello``.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from qemu_kd.common.errors import KdError

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_FRAME = 64 << 20
MAX_HEADER = 1 << 20
# Deepest nesting of arrays and objects a header may have (the header object itself is level 1).
MAX_HEADER_DEPTH = 32
# Most bytes one recv asks for: a frame's buffer grows with the data received, never with the
# length it announces.
RECV_CHUNK = 256 << 10
# Largest page-data transfer (read/write) in one request or reply; the client splits bigger ones.
MAX_DATA = 32 << 20
NO_GPA = (1 << 64) - 1
# File descriptors one frame may bring (a request passes at most one).  More is a protocol
# error: a host cannot fill the platform's descriptor table one frame at a time.
MAX_FDS = 4
# write-phys-pages from a file: the largest distance between two pages' data in the file.
MAX_FILE_STRIDE = 1 << 20
_U32 = struct.Struct(">I")

COMMANDS = (
    "hello", "platform-info", "alloc", "free", "read-phys", "write-phys", "read-phys-pages",
    "write-phys-pages", "create-kd", "add-pages", "add-zero-pages", "hash-kd", "vmread",
    "verify-ept", "measure-kd", "launch", "run", "exit", "resume", "destroy-kd",
    "domain-status", "list-domains", "debug-read",
    "next-exit", "hypercall-reply",
    "controls-stage", "controls-install", "controls-status", "controls-release",
    "snapshot-kd", "restore-kd",
)
#: Longest wait a next-exit request may ask for (seconds).
MAX_EXIT_WAIT = 60.0

# ----------------------------------------------------------------------------- errors


class HostPortError(KdError):
    """An error reply from the platform, or a failure to talk to it."""

    code = "internal"

    def __init__(self, message: str, hint: str | None = None, code: str | None = None):
        super().__init__(message, hint)
        if code is not None:
            self.code = code


class HostPortOwnershipError(HostPortError):
    """A page or KeyID does not belong to the requester (includes non-zero KeyID access)."""
    code = "ownership"


class HostPortAddressError(HostPortError):
    """An address or length is out of range or misaligned."""
    code = "address"


class HostPortStateError(HostPortError):
    """The key domain is in a state where the command is not allowed."""
    code = "state"


class HostPortNotFoundError(HostPortError):
    """No such key domain, reservation or VMCS field."""
    code = "not-found"


class HostPortBadRequestError(HostPortError):
    """The request's arguments or payload are malformed."""
    code = "bad-request"


class HostPortKeyIdExhaustedError(HostPortError):
    """All KeyIDs are in use."""
    code = "keyid-exhausted"


class HostPortUnwrapError(HostPortError):
    """The wrapped key does not open on this platform."""
    code = "unwrap-failed"


class HostPortVerifyError(HostPortError):
    """A control structure failed the platform's checks."""
    code = "verify-failed"


class HostPortRefusedError(HostPortError):
    """The platform refuses to reveal protected state (guest-state vmread, secret-page hash)."""
    code = "refused"


class HostPortLaunchError(HostPortError):
    """VM entry refused (failed VM-entry checks) or the guest could not be started."""
    code = "launch-failed"


class HostPortProtocolError(HostPortError):
    """Malformed frame, oversized frame, missing hello, version mismatch."""
    code = "protocol"


class HostPortUnknownCommandError(HostPortError):
    """The platform does not know the command."""
    code = "unknown-command"


class HostPortInternalError(HostPortError):
    """The platform failed unexpectedly; the request had no effect that can be relied on."""
    code = "internal"


class HostPortBusyError(HostPortError):
    """The platform turned the connection away for now (too many connections or frame bytes)."""
    code = "busy"


class HostPortConnectionError(HostPortError):
    """The host port cannot be reached, or the connection broke."""
    code = "connection"


class HostPortNameTakenError(HostPortError):
    """launch with a domain name a live domain (on any platform of the machine) already has."""
    code = "name-taken"


ERROR_CLASSES: dict[str, type[HostPortError]] = {
    cls.code: cls for cls in (
        HostPortOwnershipError, HostPortAddressError, HostPortStateError, HostPortNotFoundError,
        HostPortBadRequestError, HostPortKeyIdExhaustedError, HostPortUnwrapError, HostPortVerifyError,
        HostPortRefusedError, HostPortLaunchError, HostPortProtocolError, HostPortUnknownCommandError,
        HostPortInternalError, HostPortBusyError, HostPortNameTakenError,
        HostPortConnectionError,
    )
}


@dataclass(frozen=True)
class ErrorInfo:
    """The ``error`` object of a failed reply."""

    code: str
    message: str
    hint: str | None = None

    def pack(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}

    @classmethod
    def unpack(cls, obj: Any) -> "ErrorInfo":
        if not isinstance(obj, dict) or not isinstance(obj.get("code"), str) \
                or not isinstance(obj.get("message"), str) \
                or not isinstance(obj.get("hint"), (str, type(None))):
            raise HostPortProtocolError("error reply without a valid code/message/hint")
        return cls(obj["code"], obj["message"], obj.get("hint"))

    def exception(self) -> HostPortError:
        cls = ERROR_CLASSES.get(self.code, HostPortError)
        return cls(self.message, self.hint, code=self.code)


# ----------------------------------------------------------------------------- frames


@dataclass
class Frame:
    """One frame: JSON header object plus binary payload."""

    header: dict
    payload: bytes | bytearray | memoryview = b""

    def pack(self) -> bytes:
        head, payload = self.pack_parts()
        return head + bytes(payload)

    def pack_parts(self) -> tuple[bytes, memoryview]:
        """The frame as (length prefix, header length and header; payload), so a large
        payload is sent as it is instead of copied into one buffer first."""
        header = json.dumps(self.header, separators=(",", ":"), allow_nan=False).encode()
        if len(header) > MAX_HEADER:
            raise HostPortBadRequestError(f"frame header of {len(header)} bytes exceeds {MAX_HEADER}")
        payload = memoryview(self.payload).cast("B")
        length = 4 + len(header) + len(payload)
        if length > MAX_FRAME:
            raise HostPortBadRequestError(
                f"frame of {length} bytes exceeds the maximum of {MAX_FRAME} bytes",
                "split the request (the client does this for page data)")
        return _U32.pack(length) + _U32.pack(len(header)) + header, payload

    @classmethod
    def unpack(cls, body: bytes | bytearray | memoryview) -> "Frame":
        """Decode the bytes after the length prefix."""
        body = memoryview(body)
        if len(body) < 4:
            raise HostPortProtocolError(f"frame of {len(body)} bytes has no header length")
        (hlen,) = _U32.unpack(body[:4])
        check_header_length(hlen, len(body))
        header = parse_header(body[4:4 + hlen])
        return cls(header, body[4 + hlen:])


def parse_header(raw: bytes | bytearray | memoryview) -> dict:
    """A frame header: a UTF-8 JSON object nested at most MAX_HEADER_DEPTH levels deep."""
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except RecursionError:
        raise HostPortProtocolError(f"frame header is nested more than {MAX_HEADER_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise HostPortProtocolError(f"frame header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise HostPortProtocolError("frame header is not a JSON object")
    if _nesting_exceeds(header, MAX_HEADER_DEPTH):
        raise HostPortProtocolError(f"frame header is nested more than {MAX_HEADER_DEPTH} levels deep")
    return header


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects in ``value`` nest deeper than ``limit`` (iterative: no recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def check_frame_length(length: int) -> None:
    """Validate the u32 length prefix before reading the frame body."""
    if length < 4:
        raise HostPortProtocolError(f"frame length {length} is shorter than the header-length field")
    if length > MAX_FRAME:
        raise HostPortProtocolError(f"frame of {length} bytes exceeds the maximum of {MAX_FRAME} bytes",
                                    "split large transfers into several requests")


def check_header_length(hlen: int, body_length: int) -> None:
    """Validate the header length against the frame's body length before reading the header."""
    if hlen > MAX_HEADER or hlen > body_length - 4:
        raise HostPortProtocolError(f"header length {hlen} does not fit in a frame of {body_length} bytes "
                                    f"(limit {MAX_HEADER})")


def _recv(sock: socket.socket, size: int, fds: list[int] | None) -> bytes:
    """``sock.recv(size)``; with ``fds``, any file descriptors that came with the bytes are
    appended to it (the caller closes them).  Without, the kernel closes any that came."""
    if fds is None:
        return sock.recv(size)
    data, received, _, _ = socket.recv_fds(sock, size, MAX_FDS)
    fds.extend(received)
    if len(fds) > MAX_FDS:
        raise HostPortProtocolError(f"a frame came with more than {MAX_FDS} file descriptors",
                                    "pass one open file with write-phys-pages, nothing with other requests")
    return data


def _receive(sock: socket.socket, buf: bytearray, total: int, deadline: float | None,
             charge: Callable[[int], None] | None, fds: list[int] | None = None) -> None:
    """Append to ``buf`` until it holds ``total`` bytes.

    The buffer grows only with data that has arrived, so a length prefix alone costs
    nothing.  ``charge`` is told of every chunk before it is kept (it may refuse by
    raising); ``deadline`` (time.monotonic) bounds the whole read.
    """
    while len(buf) < total:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("frame not completed in time")
            sock.settimeout(left)
        chunk = _recv(sock, min(RECV_CHUNK, total - len(buf)), fds)
        if not chunk:
            raise HostPortProtocolError(f"connection closed in the middle of a frame ({len(buf)} of {total} bytes)")
        if charge is not None:
            charge(len(chunk))
        buf += chunk


def read_frame(sock: socket.socket, *, frame_timeout: float | None = None,
               charge: Callable[[int], None] | None = None, fds: list[int] | None = None) -> Frame | None:
    """Read one frame; None on a clean end of stream before any byte.

    ``frame_timeout`` bounds how long a frame may take to arrive once its first byte
    is in (socket.timeout when exceeded).  ``charge`` is called with the size of every
    chunk of the frame body as it arrives (the server's memory budget).  The length
    prefix and the header length are checked before any of what they announce is read.
    ``fds`` collects the file descriptors that arrive with the frame's bytes (SCM_RIGHTS);
    the caller closes them, whatever happens.
    Raises HostPortProtocolError for malformed or oversized frames.
    """
    idle_timeout = sock.gettimeout()
    first = _recv(sock, 4, fds)
    if not first:
        return None
    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
    prefix = bytearray(first)
    try:
        _receive(sock, prefix, 4, deadline, None, fds)
        (length,) = _U32.unpack(prefix)
        check_frame_length(length)
        body = bytearray()
        _receive(sock, body, 4, deadline, charge, fds)
        check_header_length(_U32.unpack(body)[0], length)
        _receive(sock, body, length, deadline, charge, fds)
    finally:
        if deadline is not None:
            sock.settimeout(idle_timeout)
    return Frame.unpack(body)


def write_frame(sock: socket.socket, frame: Frame) -> None:
    sock.sendall(frame.pack())


# --------------------------------------------------------------------------- messages


@dataclass
class Request:
    """A command sent to the platform."""

    cmd: str
    id: int
    args: dict = field(default_factory=dict)
    payload: bytes | bytearray | memoryview = b""

    def frame(self) -> Frame:
        return Frame({"cmd": self.cmd, "id": self.id, "args": self.args}, self.payload)

    def pack(self) -> bytes:
        return self.frame().pack()

    @classmethod
    def from_frame(cls, frame: Frame) -> "Request":
        h = frame.header
        if not isinstance(h.get("cmd"), str):
            raise HostPortProtocolError("request header has no string 'cmd'")
        if not isinstance(h.get("id"), int) or isinstance(h.get("id"), bool):
            raise HostPortProtocolError("request header has no integer 'id'")
        args = h.get("args", {})
        if not isinstance(args, dict):
            raise HostPortProtocolError("request 'args' is not a JSON object")
        return cls(h["cmd"], h["id"], args, frame.payload)

    @classmethod
    def unpack(cls, body: bytes) -> "Request":
        return cls.from_frame(Frame.unpack(body))


@dataclass
class Reply:
    """The platform's answer to one request."""

    id: int | None
    ok: bool
    result: dict = field(default_factory=dict)
    payload: bytes | bytearray | memoryview = b""
    error: ErrorInfo | None = None

    def frame(self) -> Frame:
        if self.ok:
            return Frame({"id": self.id, "ok": True, "result": self.result}, self.payload)
        assert self.error is not None
        return Frame({"id": self.id, "ok": False, "error": self.error.pack()})

    def pack(self) -> bytes:
        return self.frame().pack()

    @classmethod
    def from_frame(cls, frame: Frame) -> "Reply":
        h = frame.header
        rid = h.get("id")
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            raise HostPortProtocolError("reply 'id' is not an integer")
        if h.get("ok") is True:
            result = h.get("result", {})
            if not isinstance(result, dict):
                raise HostPortProtocolError("reply 'result' is not a JSON object")
            return cls(rid, True, result, frame.payload)
        if h.get("ok") is False:
            return cls(rid, False, error=ErrorInfo.unpack(h.get("error")))
        raise HostPortProtocolError("reply header has no boolean 'ok'")

    @classmethod
    def unpack(cls, body: bytes) -> "Reply":
        return cls.from_frame(Frame.unpack(body))

    @classmethod
    def failure(cls, rid: int | None, code: str, message: str, hint: str | None = None) -> "Reply":
        return cls(rid, False, error=ErrorInfo(code, message, hint))


# ----------------------------------------------------------------- argument helpers


def arg_int(args: dict, name: str, *, minimum: int = 0, maximum: int = (1 << 64) - 1,
            default: int | None = None) -> int:
    value = args.get(name, default)
    if value is None:
        raise HostPortBadRequestError(f"argument '{name}' is missing")
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise HostPortBadRequestError(f"argument '{name}' must be an integer in {minimum}..{maximum}")
    return value


def arg_hex(args: dict, name: str, *, max_bytes: int, default: bytes | None = None) -> bytes:
    value = args.get(name)
    if value is None:
        if default is None:
            raise HostPortBadRequestError(f"argument '{name}' is missing")
        return default
    if not isinstance(value, str):
        raise HostPortBadRequestError(f"argument '{name}' must be a hex string")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise HostPortBadRequestError(f"argument '{name}' is not valid hex") from None
    if len(data) > max_bytes:
        raise HostPortBadRequestError(f"argument '{name}' is longer than {max_bytes} bytes")
    return data


def pack_u64_array(values: Iterable[int] | np.ndarray) -> bytes:
    """Little-endian u64 array (address lists in payloads)."""
    if isinstance(values, np.ndarray):
        return values.astype("<u8").tobytes()
    return np.array(list(values), dtype="<u8").tobytes()


def unpack_u64_array(data: bytes | bytearray | memoryview, what: str = "address list") -> np.ndarray:
    if len(data) % 8:
        raise HostPortBadRequestError(f"{what} payload of {len(data)} bytes is not a whole number of u64s")
    return np.frombuffer(bytes(data), dtype="<u8").astype(np.uint64)


# ----------------------------------------------------------------------- page entries

PAGE_ENTRY_DTYPE = np.dtype([("hpa", "<u8"), ("gpa", "<u8"), ("type", "u1"), ("perms", "u1"),
                             ("flags", "<u2"), ("reserved", "<u4")])
PAGE_ENTRY_SIZE = PAGE_ENTRY_DTYPE.itemsize  # 24
FLAG_HOST_VERIFIABLE = 1 << 0
PAGE_TYPE_ZERO = 2


@dataclass(frozen=True)
class PageEntry:
    """One page of an add-pages / add-zero-pages request (24 bytes, little-endian).

    ``gpa`` is None (NO_GPA on the wire) for VMCS, EPT and SAVE pages.
    """

    hpa: int
    gpa: int | None
    page_type: int
    perms: int
    host_verifiable: bool = False

    def pack(self) -> bytes:
        return pack_page_entries([self])

    @classmethod
    def unpack(cls, data: bytes) -> "PageEntry":
        if len(data) != PAGE_ENTRY_SIZE:
            raise HostPortBadRequestError(f"page entry is {len(data)} bytes, not {PAGE_ENTRY_SIZE}")
        arr = unpack_page_entries(data)
        gpa = int(arr["gpa"][0])
        return cls(int(arr["hpa"][0]), None if gpa == NO_GPA else gpa, int(arr["type"][0]),
                   int(arr["perms"][0]), bool(arr["flags"][0] & FLAG_HOST_VERIFIABLE))


def pack_page_entries(entries: Iterable[PageEntry | tuple] | np.ndarray) -> bytes:
    """Pack PageEntry objects, (hpa, gpa, type, perms[, verifiable]) tuples, or a
    structured array of PAGE_ENTRY_DTYPE (the fast path for large guests)."""
    if isinstance(entries, np.ndarray):
        if entries.dtype != PAGE_ENTRY_DTYPE:
            raise HostPortBadRequestError("page-entry array must have dtype PAGE_ENTRY_DTYPE")
        return entries.tobytes()
    hpas, gpas, types, perms, flags = [], [], [], [], []
    for e in entries:
        if isinstance(e, PageEntry):
            row = (e.hpa, e.gpa, e.page_type, e.perms, e.host_verifiable)
        else:
            row = tuple(e)
            if len(row) == 4:
                row += (False,)
            elif len(row) != 5:
                raise HostPortBadRequestError(f"page entry {row!r} is not (hpa, gpa, type, perms[, verifiable])")
        hpas.append(row[0])
        gpas.append(NO_GPA if row[1] is None else row[1])
        types.append(row[2])
        perms.append(row[3])
        flags.append(FLAG_HOST_VERIFIABLE if row[4] else 0)
    arr = np.zeros(len(hpas), dtype=PAGE_ENTRY_DTYPE)
    for name, values in (("hpa", hpas), ("gpa", gpas), ("type", types), ("perms", perms), ("flags", flags)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            bad = next(v for v in values if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
            raise HostPortBadRequestError(f"page entry {name} {bad!r} is not an integer")
        try:
            arr[name] = np.array(values, dtype=arr.dtype[name].newbyteorder("="))
        except OverflowError:
            bits = arr.dtype[name].itemsize * 8
            raise HostPortBadRequestError(f"a page entry {name} does not fit in {bits} unsigned bits") from None
    return arr.tobytes()


def pack_zero_entries(entries: Iterable[tuple[int, int, int]] | np.ndarray) -> bytes:
    """Pack (hpa, gpa, perms) zero-page tuples as page entries of type ZERO, or a structured
    array of PAGE_ENTRY_DTYPE whose entries are all of type ZERO (the fast path)."""
    if isinstance(entries, np.ndarray):
        if entries.dtype == PAGE_ENTRY_DTYPE and (entries["type"] != PAGE_TYPE_ZERO).any():
            raise HostPortBadRequestError("a zero-page entry array holds entries of another type")
        return pack_page_entries(entries)
    return pack_page_entries((hpa, gpa, PAGE_TYPE_ZERO, perms) for hpa, gpa, perms in entries)


def unpack_page_entries(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a page-entry payload into a structured array (checks reserved bits)."""
    if len(data) % PAGE_ENTRY_SIZE:
        raise HostPortBadRequestError(
            f"page-entry payload of {len(data)} bytes is not a multiple of {PAGE_ENTRY_SIZE}")
    arr = np.frombuffer(bytes(data), dtype=PAGE_ENTRY_DTYPE)
    undefined_flags = np.uint16(0xFFFF ^ FLAG_HOST_VERIFIABLE)
    if arr.size and ((arr["reserved"] != 0).any() or (arr["flags"] & undefined_flags).any()):
        raise HostPortBadRequestError("page entry has reserved bits set")
    return arr


# ------------------------------------------------------------------------ results


@dataclass(frozen=True)
class PlatformInfo:
    """platform-info result."""

    chain_pem: bytes
    keyid_bits: int
    free_keyids: list[int]
    accelerator: str
    memory_size: int
    page_size: int
    integrity_events: int
    free_pages: int = 0          # the host's free pool: FREE pages of physical memory

    def pack(self) -> dict:
        return {"chain_pem": self.chain_pem.decode("ascii"), "keyid_bits": self.keyid_bits,
                "free_keyids": list(self.free_keyids), "accelerator": self.accelerator,
                "memory_size": self.memory_size, "page_size": self.page_size,
                "integrity_events": self.integrity_events, "free_pages": self.free_pages}

    @classmethod
    def unpack(cls, obj: dict) -> "PlatformInfo":
        try:
            return cls(obj["chain_pem"].encode("ascii"), int(obj["keyid_bits"]),
                       [int(k) for k in obj["free_keyids"]], str(obj["accelerator"]),
                       int(obj["memory_size"]), int(obj["page_size"]), int(obj["integrity_events"]),
                       int(obj.get("free_pages", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HostPortProtocolError(f"malformed platform-info result: {exc!r}") from None


@dataclass(frozen=True)
class Allocation:
    """alloc result: the reserved KeyID and the hpas (ascending) now HOST-owned for it."""

    keyid: int
    hpas: list[int]


@dataclass(frozen=True)
class EptVerdict:
    """verify-ept result."""

    ok: bool
    reasons: list[str]
    mapping_digest: bytes
    mapped_pages: int
    table_pages: int

    def pack(self) -> dict:
        return {"verdict_ok": self.ok, "reasons": list(self.reasons),
                "mapping_digest": self.mapping_digest.hex(), "mapped_pages": self.mapped_pages,
                "table_pages": self.table_pages}

    @classmethod
    def unpack(cls, obj: dict) -> "EptVerdict":
        try:
            reasons = obj["reasons"]
            if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
                raise TypeError("reasons is not a list of strings")
            return cls(bool(obj["verdict_ok"]), reasons, bytes.fromhex(obj["mapping_digest"]),
                       int(obj["mapped_pages"]), int(obj["table_pages"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HostPortProtocolError(f"malformed verify-ept result: {exc!r}") from None
