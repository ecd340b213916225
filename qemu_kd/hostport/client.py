"""Client of the host port: what the untrusted host VMM uses to drive the platform.

It imports only :mod:`qemu_kd.hostport.protocol` and :mod:`qemu_kd.common.errors`,
nothing of the platform itself, so a host VMM that uses it holds no key,
no decryption code and no platform state.  Every error reply is raised as a
:class:`HostPortError` subclass chosen by the reply's error code.

Large transfers (read-phys, write-phys, the page variants, add-pages) are
split into requests below the frame limit automatically.

Connecting retries for a short, bounded time while the platform is
momentarily unable to take the connection: its listen queue is full
(EAGAIN), it answered ``busy``, or the socket exists but refuses (a platform
between binding and listening).
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from qemu_kd.hostport.protocol import (
    MAX_DATA, PAGE_ENTRY_SIZE, SUPPORTED_VERSIONS, Allocation, EptVerdict, HostPortBadRequestError, HostPortBusyError, HostPortConnectionError, HostPortProtocolError, PageEntry, PlatformInfo, Reply, Request, pack_page_entries, pack_u64_array, pack_zero_entries, read_frame, unpack_u64_array,
)
from qemu_kd.formats.addresses import PAGE_SIZE

DEFAULT_TIMEOUT = 60.0
CLIENT_NAME = "qemu-kd host port client"
# Entries per add-pages request (well below the frame limit).
ENTRIES_PER_REQUEST = 1 << 20
# How long connecting keeps retrying a platform that is busy or whose listen queue is full.
CONNECT_RETRY = 10.0
# How long a socket file that refuses connections is retried (a platform about to listen);
# a stale socket left by a dead platform fails after this.
REFUSED_RETRY = 1.0
FIRST_BACKOFF = 0.005
MAX_BACKOFF = 0.2


def _packed(value, what: str) -> bytes:
    """bytes as given, or the ``pack()`` of a format object (Policy, WrappedKey)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    pack = getattr(value, "pack", None)
    if callable(pack):
        return pack()
    raise HostPortBadRequestError(f"{what} must be bytes or an object with pack()")


class _Retry:
    """Exponential back-off until a deadline."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.deadline = self.start + seconds
        self.delay = FIRST_BACKOFF

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def wait(self) -> bool:
        """Sleep before the next attempt; False (no sleep) once the deadline would pass."""
        if time.monotonic() + self.delay > self.deadline:
            return False
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, MAX_BACKOFF)
        return True


def _connect(path: Path, timeout: float | None, retry: _Retry) -> socket.socket:
    """A connected socket; every socket of a failed attempt is closed."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            return sock
        except OSError as exc:
            sock.close()
            transient = exc.errno == errno.EAGAIN or (
                exc.errno == errno.ECONNREFUSED and retry.elapsed() < REFUSED_RETRY and path.exists())
            if not (transient and retry.wait()):
                raise HostPortConnectionError(
                    f"cannot connect to the host port {path}: {exc.strerror or exc}",
                    "is the platform running? check the socket path") from None


class HostPortClient:
    """One connection to the platform's host port."""

    def __init__(self, socket_path: Path | str, timeout: float | None = DEFAULT_TIMEOUT,
                 client_name: str = CLIENT_NAME, connect_retry: float = CONNECT_RETRY):
        self.socket_path = Path(socket_path)
        self._lock = threading.Lock()
        self._next_id = 1
        self._sock: socket.socket | None = None
        retry = _Retry(connect_retry)
        while True:
            self._sock = _connect(self.socket_path, timeout, retry)
            try:
                hello = self._call("hello", {"versions": list(SUPPORTED_VERSIONS), "client": client_name})[0]
                break
            except HostPortBusyError:
                self.close()
                if not retry.wait():
                    raise
            except BaseException:
                self.close()
                raise
        self.protocol_version = int(hello.get("version", 0))
        self.server = str(hello.get("server", ""))
        self.max_data = min(int(hello.get("max_data", MAX_DATA)), MAX_DATA)

    # ------------------------------------------------------------- plumbing

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "HostPortClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, cmd: str, args: dict | None = None, payload: bytes = b"",
              fds: Sequence[int] = ()) -> tuple[dict, bytes]:
        """One request and its reply; ``fds`` travel with the request's first bytes (SCM_RIGHTS)."""
        with self._lock:
            if self._sock is None:
                raise HostPortConnectionError("the host-port connection is closed")
            rid = self._next_id
            self._next_id += 1
            try:
                head, body = Request(cmd, rid, args or {}, payload).frame().pack_parts()
                try:
                    sent = socket.send_fds(self._sock, [head], list(fds)) if fds else 0
                    self._sock.sendall(head[sent:])
                    if len(body):
                        self._sock.sendall(body)
                except (BrokenPipeError, ConnectionResetError):
                    # The platform closed the connection; it may have said why (busy) first.
                    pass
                frame = read_frame(self._sock)
            except socket.timeout:
                self.close()
                raise HostPortConnectionError(f"the platform did not answer {cmd} in time",
                                              "the connection was closed; reconnect") from None
            except OSError as exc:
                self.close()
                raise HostPortConnectionError(f"host-port connection broke during {cmd}: {exc}") from None
            except HostPortProtocolError:
                self.close()
                raise
            if frame is None:
                self.close()
                raise HostPortConnectionError(f"the platform closed the connection during {cmd}")
            reply = Reply.from_frame(frame)
        if reply.id is not None and reply.id != rid:
            self.close()
            raise HostPortProtocolError(f"reply id {reply.id} does not match request id {rid}")
        if not reply.ok:
            assert reply.error is not None
            if reply.error.code in ("protocol", "busy"):
                self.close()
            raise reply.error.exception()
        return reply.result, bytes(reply.payload)

    # ------------------------------------------------------------- commands

    def platform_info(self) -> PlatformInfo:
        return PlatformInfo.unpack(self._call("platform-info")[0])

    def alloc(self, npages: int | None = None, hpas: Iterable[int] | None = None,
              keyid: int | None = None) -> Allocation:
        """Reserve a KeyID (or extend reservation ``keyid``) with ``npages`` or the given ``hpas``."""
        args: dict = {"keyid": keyid} if keyid is not None else {}
        payload = b""
        if npages is not None:
            args["npages"] = npages
        if hpas is not None:
            payload = pack_u64_array(hpas)
        result, data = self._call("alloc", args, payload)
        return Allocation(int(result["keyid"]), unpack_u64_array(data).tolist())

    def free(self, keyid: int) -> int:
        return int(self._call("free", {"keyid": keyid})[0]["freed_pages"])

    def read_phys(self, dpa: int, length: int) -> bytes:
        """DRAM bytes through KeyID 0 (ciphertext for private pages)."""
        if length <= self.max_data:
            return self._call("read-phys", {"dpa": dpa, "length": length})[1]
        return b"".join(self._call("read-phys", {"dpa": dpa + offset,
                                                 "length": min(self.max_data, length - offset)})[1]
                        for offset in range(0, length, self.max_data))

    def write_phys(self, dpa: int, data: bytes) -> None:
        view = memoryview(data).cast("B")
        for offset in range(0, max(len(view), 1), self.max_data):
            self._call("write-phys", {"dpa": dpa + offset}, bytes(view[offset:offset + self.max_data]))

    def read_phys_pages(self, dpas: Sequence[int] | np.ndarray) -> bytes:
        """Whole pages at the given KeyID-0 addresses, concatenated."""
        dpas = np.asarray(dpas, dtype=np.uint64).reshape(-1)
        per = max(1, self.max_data // PAGE_SIZE)
        out = bytearray()
        for start in range(0, dpas.size, per):
            out += self._call("read-phys-pages", {}, pack_u64_array(dpas[start:start + per]))[1]
        return bytes(out)

    def write_phys_pages(self, dpas: Sequence[int] | np.ndarray, data: bytes | np.ndarray) -> None:
        """Write whole pages at KeyID-0 addresses: ``data`` is 4096 * len(dpas) bytes, or an
        (n, 4096) uint8 array (a strided view will do: each request copies its part once)."""
        dpas = np.asarray(dpas, dtype=np.uint64).reshape(-1)
        if isinstance(data, np.ndarray):
            pages = data
            if pages.dtype != np.uint8 or pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
                raise HostPortBadRequestError("page data must be an (n, 4096) uint8 array")
        else:
            view = memoryview(data).cast("B")
            if len(view) % PAGE_SIZE:
                raise HostPortBadRequestError(f"{len(view)} bytes of data for {dpas.size} pages")
            pages = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        if pages.shape[0] != dpas.size:
            raise HostPortBadRequestError(f"{pages.shape[0] * PAGE_SIZE} bytes of data for {dpas.size} pages")
        per = max(1, self.max_data // PAGE_SIZE - 1)
        for start in range(0, dpas.size, per):
            chunk = dpas[start:start + per]
            payload = np.empty(chunk.size * (8 + PAGE_SIZE), dtype=np.uint8)
            payload[:8 * chunk.size] = chunk.astype("<u8").view(np.uint8)
            payload[8 * chunk.size:].reshape(chunk.size, PAGE_SIZE)[:] = pages[start:start + chunk.size]
            self._call("write-phys-pages", {"count": int(chunk.size)}, memoryview(payload))

    def write_phys_pages_from_file(self, dpas: Sequence[int] | np.ndarray, fd: int, offset: int,
                                   stride: int = PAGE_SIZE) -> None:
        """Write whole pages at KeyID-0 addresses, read by the platform from the open file ``fd``
        (passed over the socket): page i's 4096 bytes start at ``offset + i * stride``.  The
        data never travels through the socket."""
        dpas = np.asarray(dpas, dtype=np.uint64).reshape(-1)
        per = max(1, self.max_data // PAGE_SIZE)
        for start in range(0, dpas.size, per):
            chunk = dpas[start:start + per]
            self._call("write-phys-pages", {"count": int(chunk.size),
                                            "file": {"offset": offset + start * stride, "stride": stride}},
                       pack_u64_array(chunk), fds=[fd])

    def create_kd(self, keyid: int, wrapped_key, policy, host_data: bytes = b"") -> None:
        """Program the reserved ``keyid`` with the tenant's wrapped key, policy and host_data."""
        self._call("create-kd", {"keyid": keyid, "wrapped_key": _packed(wrapped_key, "wrapped_key").hex(),
                                 "policy": _packed(policy, "policy").hex(), "host_data": bytes(host_data).hex()})

    def _add(self, cmd: str, keyid: int, payload: bytes) -> int:
        added = 0
        step = ENTRIES_PER_REQUEST * PAGE_ENTRY_SIZE
        for offset in range(0, len(payload), step):
            added += int(self._call(cmd, {"keyid": keyid}, payload[offset:offset + step])[0]["added"])
        return added

    def add_pages(self, keyid: int, entries: Iterable[PageEntry | tuple]) -> int:
        """Assign loaded pages: PageEntry objects or (hpa, gpa, type, perms[, host_verifiable])."""
        return self._add("add-pages", keyid, pack_page_entries(entries))

    def add_zero_pages(self, keyid: int, entries: Iterable[tuple[int, int, int]]) -> int:
        """Assign pages the platform fills with encrypted zeros: (hpa, gpa, perms) tuples."""
        return self._add("add-zero-pages", keyid, pack_zero_entries(entries))

    def hash_kd(self, keyid: int, hpas: Iterable[int] | None = None) -> bytes:
        """SHA-384 over (hpa || plaintext) of the domain's host-verifiable pages (or just ``hpas``)."""
        if hpas is None:
            result = self._call("hash-kd", {"keyid": keyid})[0]
        else:
            result = self._call("hash-kd", {"keyid": keyid, "selected": True}, pack_u64_array(hpas))[0]
        return bytes.fromhex(result["digest"])

    def vmread(self, keyid: int, encoding: int) -> int:
        return int(self._call("vmread", {"keyid": keyid, "encoding": encoding})[0]["value"])

    def verify_ept(self, keyid: int, host_allocation: Iterable[int]) -> EptVerdict:
        return EptVerdict.unpack(self._call("verify-ept", {"keyid": keyid}, pack_u64_array(host_allocation))[0])

    def measure_kd(self, keyid: int) -> bytes:
        """The launch measurement (48 bytes) of a verified domain, to compare with the bundle's."""
        return bytes.fromhex(self._call("measure-kd", {"keyid": keyid})[0]["measurement"])

    def launch(self, keyid: int, name: str | None = None) -> dict[str, str]:
        """Launch a verified domain (vCPU left paused) named ``name`` (default: the next free
        ``kdN``); returns its host-visible endpoints."""
        args: dict = {"keyid": keyid}
        if name is not None:
            args["name"] = name
        endpoints = self._call("launch", args)[0]["endpoints"]
        if not isinstance(endpoints, dict):
            raise HostPortProtocolError("launch result has no endpoints object")
        return {str(k): str(v) for k, v in endpoints.items()}

    def snapshot_kd(self, keyid: int, path: str | Path) -> dict:
        """Write an encrypted snapshot of the running domain to ``path`` (absolute; the platform
        writes it).  Returns ``path``, ``domain_id`` (hex), ``version`` and ``size``
        (docs/snapshots.md)."""
        return self._call("snapshot-kd", {"keyid": keyid, "path": str(path)})[0]

    def restore_kd(self, path: str | Path, name: str | None = None, *, domain_id: bytes | None = None,
                   measurement: bytes | None = None) -> dict:
        """Restore the snapshot at ``path`` as a new launched domain (vCPU paused until ``run``),
        refused unless it is of ``domain_id`` / ``measurement`` when given.  Returns ``keyid``,
        ``name``, ``endpoints`` (as launch's), ``domain_id`` and ``version``."""
        args: dict = {"path": str(path)}
        if name is not None:
            args["name"] = name
        if domain_id is not None:
            args["domain_id"] = bytes(domain_id).hex()
        if measurement is not None:
            args["measurement"] = bytes(measurement).hex()
        result = self._call("restore-kd", args)[0]
        if not isinstance(result.get("endpoints"), dict):
            raise HostPortProtocolError("restore-kd result has no endpoints object")
        return result

    def run(self, keyid: int) -> None:
        """Let a launched domain's vCPU run."""
        self._call("run", {"keyid": keyid})

    def exit(self, keyid: int) -> None:
        """Force an exit: the platform seals the vCPU registers into the protected save area."""
        self._call("exit", {"keyid": keyid})

    def resume(self, keyid: int) -> None:
        """Resume an exited domain from its save area."""
        self._call("resume", {"keyid": keyid})

    def next_exit(self, keyid: int, after: int = 0, wait: float = 0.0) -> dict | None:
        """The first exit record with a sequence number above ``after``, waiting up to ``wait`` s.

        A record is a dict: ``seq``, ``keyid``, ``reason`` (host, hypercall,
        interval), ``pending``, and for a hypercall ``leaf``, ``leaf_name``,
        ``exposed`` and ``inputs`` (the exposed registers only).  None when no
        exit came in time.
        """
        result = self._call("next-exit", {"keyid": keyid, "after": after, "wait": wait})[0]
        return result.get("exit")

    def hypercall_reply(self, keyid: int, seq: int, outputs: dict[str, int] | None = None,
                        status: int = 0) -> None:
        """Answer hypercall exit ``seq``: write exposed output registers; the guest resumes."""
        self._call("hypercall-reply", {"keyid": keyid, "seq": seq, "outputs": dict(outputs or {}),
                                       "status": status})

    def destroy_kd(self, keyid: int) -> int:
        return int(self._call("destroy-kd", {"keyid": keyid})[0]["freed_pages"])

    def domain_status(self, keyid: int) -> dict:
        """State, policy, measurement and host endpoints of one domain (no guest data)."""
        return self._call("domain-status", {"keyid": keyid})[0]

    def list_domains(self) -> list[dict]:
        """domain_status of every key domain on the platform."""
        domains = self._call("list-domains")[0].get("domains")
        if not isinstance(domains, list):
            raise HostPortProtocolError("list-domains result has no domains list")
        return domains

    def debug_read(self, keyid: int, gpa: int, length: int) -> bytes:
        """Plaintext guest memory: refused unless the domain's measured policy has DEBUG (audited)."""
        return self._call("debug-read", {"keyid": keyid, "gpa": gpa, "length": length})[1]

    # -- control updates the guest made (docs/protocol.md) ------------------------------

    def controls_stage(self, keyid: int, update: bytes) -> dict:
        """Hand the platform a control update the guest returned; it is checked and kept for
        verification.  Result: version, base_version, ops (counts), digest (hash-kd after install)."""
        return self._call("controls-stage", {"keyid": keyid}, bytes(update))[0]

    def staged_hash_kd(self, keyid: int) -> bytes:
        """hash-kd of the host-verifiable pages as the staged update would leave them."""
        return bytes.fromhex(self._call("hash-kd", {"keyid": keyid, "staged": True})[0]["digest"])

    def staged_vmread(self, keyid: int, encoding: int) -> int:
        """vmread of the staged VMCS (the installed one if the update carries none)."""
        return int(self._call("vmread", {"keyid": keyid, "encoding": encoding, "staged": True})[0]["value"])

    def staged_verify_ept(self, keyid: int) -> dict:
        """verify-ept of the staged EPT: verdict_ok, reasons, mapping_digest, mapped_pages, changes, ops."""
        return self._call("verify-ept", {"keyid": keyid, "staged": True})[0]

    def controls_install(self, keyid: int, version: int) -> dict:
        """Install the staged update ``version``; the platform checks it again and applies it."""
        return self._call("controls-install", {"keyid": keyid, "version": version})[0]

    def controls_status(self, keyid: int) -> dict:
        """Installed version, mapped memory, exit interval and interval exits of a running domain."""
        return self._call("controls-status", {"keyid": keyid})[0]

    def controls_release(self, keyid: int, hpas: Iterable[int]) -> int:
        """Give back pages allocated for a running domain that no update took (scrubbed, FREE)."""
        return int(self._call("controls-release", {"keyid": keyid}, pack_u64_array(hpas))[0]["released"])
