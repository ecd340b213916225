"""Serves a :class:`~qemu_kd.platform.hardware.Platform` on the host port (a Unix socket).

One thread accepts connections and one thread serves each connection.  A
malformed or oversized frame gets a ``protocol`` error reply and closes that
connection only; the platform and the other connections keep running.  The
socket file is created with mode 0600 and removed on close.

Resources are bounded: at most ``max_connections`` connections are served at
once (more are answered ``busy`` and closed), frame buffers grow only with the
bytes that arrive, and all connections together hold at most ``max_pending``
bytes of request frames (a frame that would exceed it is answered ``busy`` and
its connection closed).  Nothing a client sends can stop the accept loop.

Error replies carry a code (see docs/hostport.md) and the platform error's
one-line message.  Unexpected exceptions are answered with code ``internal``
and a generic message, so no internal detail (let alone decrypted data) can
leak through an error text.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from qemu_kd.platform.domain import (
    DomainNotFoundError,
    DomainStateError,
    DomainVerifyError,
    GuestStateFieldError,
    KeyIdExhaustedError,
    PageBatch,
    PageRequestError,
    SecretPageError,
)
from qemu_kd.common.errors import KdError
from qemu_kd.common.files import claim_socket_path
from qemu_kd.common.lateimports import LateImports
from qemu_kd.formats.errors import FormatError, UnknownFieldError
from qemu_kd.hostport.protocol import (
    COMMANDS, FLAG_HOST_VERIFIABLE, MAX_DATA, MAX_EXIT_WAIT, MAX_FILE_STRIDE, MAX_FRAME, MAX_HEADER, PROTOCOL_VERSION, SUPPORTED_VERSIONS, EptVerdict, HostPortBadRequestError, HostPortBusyError, HostPortError, HostPortProtocolError, Reply, Request, arg_hex, arg_int, pack_u64_array, read_frame, unpack_page_entries, unpack_u64_array, write_frame,
)
from qemu_kd.hostport.names import check_name
from qemu_kd.formats.addresses import PAGE_SIZE
from qemu_kd.formats.hypercall import HypercallReply, check_registers
from qemu_kd.formats.keywrap import KeyUnwrapError
from qemu_kd.formats.measurement import MeasurementError
from qemu_kd.platform.physmem import AddressError, OwnershipError
from qemu_kd.platform.hardware import MAX_DEBUG_READ, HostExitRefused, Platform
from qemu_kd.platform.controls import UpdateRefused

if TYPE_CHECKING:
    from qemu_kd.platform.snapshot import SnapshotService

log = logging.getLogger(__name__)

SERVER_NAME = "qemu-kd platform (EMULATED)"
# How long a frame may take to arrive once its first byte is in.
DEFAULT_FRAME_TIMEOUT = 60.0
# Connections served at once; more are answered "busy" and closed.
DEFAULT_MAX_CONNECTIONS = 64
# Bytes of request frames held (received, not yet answered) over all connections.
DEFAULT_MAX_PENDING = 256 << 20
# Pending connections the kernel queues before accept (it caps this at net.core.somaxconn).
LISTEN_BACKLOG = max(128, socket.SOMAXCONN)
MAX_WRAPPED_KEY = 4096
MAX_POLICY = 64
MAX_HOST_DATA = 32

Handler = Callable[[dict, memoryview], tuple[dict, bytes]]
# Pages read per preadv (two buffers each, below the kernel's IOV_MAX of 1024).
FILE_PAGES_PER_READ = 256


def read_file_pages(fd: int, count: int, offset: int, stride: int) -> np.ndarray:
    """``count`` pages from the host's open file ``fd``: page i is the 4096 bytes at
    ``offset + i * stride``.  Copied into platform memory first, every byte read once; the
    request is refused unless ``fd`` is a regular file, readable, holding every page."""
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise HostPortBadRequestError(f"write-phys-pages: cannot stat the file passed: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise HostPortBadRequestError("write-phys-pages: the file descriptor passed is not a regular file",
                                      "pass an open bundle or page file, not a pipe, socket or device")
    end = offset + (count - 1) * stride + PAGE_SIZE if count else offset
    if end > info.st_size:
        raise HostPortBadRequestError(f"write-phys-pages: the file passed holds {info.st_size} bytes; "
                                      f"{count} pages from offset {offset} need {end}")
    pages = np.empty((count, PAGE_SIZE), dtype=np.uint8)
    gap = bytearray(stride - PAGE_SIZE)
    for start in range(0, count, FILE_PAGES_PER_READ):
        stop = min(start + FILE_PAGES_PER_READ, count)
        buffers: list = []
        for i in range(start, stop):
            buffers.append(memoryview(pages[i]))
            if gap and i + 1 < stop:
                buffers.append(gap)
        got = _pread(fd, buffers, offset + start * stride)
        if got < (stop - start) * stride - len(gap):
            # A short read (a signal, or the end of the file): the rest page by page.
            page, into = divmod(got, stride)
            for i in range(start + page, stop):
                skip = into if i == start + page else 0
                if skip < PAGE_SIZE:
                    _pread_exactly(fd, memoryview(pages[i])[skip:], offset + i * stride + skip, end)
    return pages


def _pread(fd: int, buffers: list, position: int) -> int:
    try:
        return os.preadv(fd, buffers, position)
    except OSError as exc:
        raise HostPortBadRequestError(f"write-phys-pages: cannot read the file passed: {exc.strerror}") from None


def _pread_exactly(fd: int, view: memoryview, position: int, end: int) -> None:
    """Fill ``view`` from ``position``; refused if the file ends first."""
    while len(view):
        got = _pread(fd, [view], position)
        if not got:
            raise HostPortBadRequestError(f"write-phys-pages: the file passed ended early, at byte "
                                          f"{position} of {end}")
        view, position = view[got:], position + got


class _NeverRaised(Exception):
    """Stands for an exception type of a module not imported yet."""


def _types_of(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``module`` if it is imported, else :class:`_NeverRaised`."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name, _NeverRaised) for name in names)


def error_code(exc: BaseException) -> str:
    """The host-port error code for a platform exception."""
    # The daemon imports these modules once it serves (platform/daemon.py): until then none of
    # their exceptions can have been raised.
    LaunchError, SaveAreaError = _types_of("qemu_kd.platform.runtime", "LaunchError", "SaveAreaError")
    SnapshotRefused, = _types_of("qemu_kd.platform.snapshot", "SnapshotRefused")
    for types, code in (
        (HostPortError, None),
        (KeyIdExhaustedError, "keyid-exhausted"),
        (DomainNotFoundError, "not-found"),
        ((GuestStateFieldError, SecretPageError, HostExitRefused, UpdateRefused, SnapshotRefused),
         "refused"),
        (DomainStateError, "state"),
        (KeyUnwrapError, "unwrap-failed"),
        ((DomainVerifyError, MeasurementError, SaveAreaError), "verify-failed"),
        (LaunchError, "launch-failed"),
        (OwnershipError, "ownership"),
        (AddressError, "address"),
        (UnknownFieldError, "not-found"),
        ((FormatError, PageRequestError, KdError), "bad-request"),
    ):
        if isinstance(exc, types):
            return code or exc.code  # type: ignore[attr-defined]
    return "internal"


def error_reply(rid: int | None, cmd: str, exc: BaseException) -> Reply:
    """The error reply for a failed request.  Only a platform error's own message is
    sent; anything else becomes a generic ``internal`` error (details go to the log)."""
    code = error_code(exc)
    if not isinstance(exc, KdError) or (code == "internal" and not isinstance(exc, HostPortError)):
        # Only the type: the platform's log is readable by the host, like the reply.
        log.error("host port: %s failed unexpectedly: %s", cmd, type(exc).__name__)
        return Reply.failure(rid, "internal", f"internal platform error while running {cmd}",
                             "the request may not have taken effect; check the platform's log")
    log.info("host port: %s refused (%s): %s", cmd, code, exc.message)
    return Reply.failure(rid, code, exc.message, exc.hint)


def _close_all(fds: list[int]) -> None:
    """Close every file descriptor in ``fds`` and empty it."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


@contextmanager
def _closing(fds: list[int]) -> Iterator[list[int]]:
    """Close every file descriptor in ``fds`` (as it is when the block ends)."""
    try:
        yield fds
    finally:
        _close_all(fds)


class FrameBudget:
    """The bytes of request frames the server holds, over all connections, and their limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    @contextmanager
    def account(self) -> Iterator[Callable[[int], None]]:
        """A charge function for one frame; everything it took is given back on exit."""
        taken = 0

        def charge(nbytes: int) -> None:
            nonlocal taken
            with self._lock:
                if self.held + nbytes > self.limit:
                    raise HostPortBusyError(
                        f"the platform already holds {self.held >> 20} MiB of unfinished requests "
                        f"(limit {self.limit >> 20} MiB)", "retry once other transfers have finished")
                self.held += nbytes
            taken += nbytes

        try:
            yield charge
        finally:
            with self._lock:
                self.held -= taken


#: The requests that use the modules a server's ``later`` imports (QEMU runtime, proxies, snapshots).
NEEDS_LATER = frozenset({"launch", "snapshot-kd", "restore-kd"})


class HostPortServer:
    """The host port: one Unix socket, one thread per connection."""

    def __init__(self, platform: Platform, socket_path: Path | str, *,
                 frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 snapshots: SnapshotService | Callable[[], SnapshotService] | None = None,
                 later: LateImports | None = None):
        """``snapshots`` serves snapshot-kd and restore-kd (without it they are refused): the
        service, or a function that makes it when the first of them arrives.  ``later`` are
        modules only some requests need (:data:`NEEDS_LATER`): importing them starts once the
        first request past ``platform-info`` is answered, and those requests wait for it."""
        self.platform = platform
        self.snapshots = snapshots
        self._snapshots_lock = threading.Lock()
        self.later = later
        self.socket_path = Path(socket_path)
        self.frame_timeout = frame_timeout
        self.max_connections = max_connections
        self._budget = FrameBudget(max_pending)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._conn_lock = threading.Lock()
        self._stopping = threading.Event()
        self._handlers: dict[str, Handler] = {
            "platform-info": self._platform_info,
            "alloc": self._alloc,
            "free": self._free,
            "read-phys": self._read_phys,
            "write-phys": self._write_phys,
            "read-phys-pages": self._read_phys_pages,
            "write-phys-pages": self._write_phys_pages,
            "create-kd": self._create_kd,
            "add-pages": self._add_pages,
            "add-zero-pages": self._add_zero_pages,
            "hash-kd": self._hash_kd,
            "vmread": self._vmread,
            "verify-ept": self._verify_ept,
            "measure-kd": self._measure_kd,
            "launch": self._launch,
            "run": self._keyid_command(platform.run),
            "exit": self._keyid_command(platform.exit),
            "resume": self._keyid_command(platform.resume),
            "destroy-kd": self._destroy_kd,
            "domain-status": self._domain_status,
            "list-domains": self._list_domains,
            "debug-read": self._debug_read,
            "next-exit": self._next_exit,
            "hypercall-reply": self._hypercall_reply,
            "controls-stage": self._controls_stage,
            "controls-install": self._controls_install,
            "controls-status": self._controls_status,
            "controls-release": self._controls_release,
            "snapshot-kd": self._snapshot_kd,
            "restore-kd": self._restore_kd,
        }
        self.frames_refused = 0
        self.connections_refused = 0

    # ------------------------------------------------------------- lifecycle

    def start(self) -> "HostPortServer":
        if len(os.fsencode(self.socket_path)) >= 108:
            raise KdError(f"host-port socket path {self.socket_path} is too long for a Unix socket",
                          "use a shorter runtime directory")
        claim_socket_path(self.socket_path, "another platform")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            # Nobody can connect before listen(), so tightening the mode here leaves no window.
            os.chmod(self.socket_path, 0o600)
            listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            listener.close()
            raise KdError(f"cannot serve the host port on {self.socket_path}: {exc.strerror}",
                          "check that the directory exists and is writable") from None
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="hostport-accept", daemon=True)
        self._accept_thread.start()
        log.info("host port listening on %s", self.socket_path)
        return self

    def close(self) -> None:
        """Stop accepting, close every connection, remove the socket file."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._wake_accept_loop()
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.socket_path.unlink(missing_ok=True)
        with self._conn_lock:
            connections = list(self._connections.items())
        for conn, _ in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in connections:
            if thread.ident is not None and thread is not threading.current_thread():
                thread.join(timeout=5)

    def _wake_accept_loop(self) -> None:
        """Unblock the accept loop's ``accept()`` (it waits without a timeout) with a connection
        of our own; the loop sees ``_stopping`` and ends."""
        if self._listener is None or self._accept_thread is None or not self._accept_thread.is_alive():
            return
        waker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            waker.setblocking(False)
            waker.connect(self._listener.getsockname())
        except OSError:
            pass    # the loop has ended already, or its socket file is gone: join bounds the wait
        finally:
            waker.close()

    def __enter__(self) -> "HostPortServer":
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection_count(self) -> int:
        with self._conn_lock:
            return len(self._connections)

    @property
    def pending_bytes(self) -> int:
        """Bytes of request frames held right now (received, not yet answered)."""
        return self._budget.held

    def _accept_loop(self) -> None:
        listener = self._listener
        if listener is None:
            raise KdError("the host port is not listening", "start the server first")
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # Out of file descriptors, say: wait a little instead of spinning.
                log.warning("host port: accept failed: %s", exc.strerror or exc)
                self._stopping.wait(0.05)
                continue
            if self._stopping.is_set():     # close() woke us (or a client came too late)
                conn.close()
                return
            try:
                self._admit(conn)
            except Exception as exc:  # noqa: BLE001 - one connection's failure never ends the loop
                log.error("host port: could not take a new connection: %s: %s", type(exc).__name__, exc)
                self._forget(conn)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        """Serve ``conn`` on a thread of its own, or turn it away (connection limit, no thread)."""
        conn.settimeout(None)
        thread = threading.Thread(target=self._serve, args=(conn,), name="hostport-conn", daemon=True)
        with self._conn_lock:
            admitted = len(self._connections) < self.max_connections
            if admitted:
                self._connections[conn] = thread
        if not admitted:
            self._turn_away(conn, f"the platform already serves {self.max_connections} host-port connections",
                            "close idle connections or retry shortly")
            return
        try:
            thread.start()
        except RuntimeError as exc:
            self._forget(conn)
            log.error("host port: cannot start a thread for a new connection (%s); closing it", exc)
            self._turn_away(conn, "the platform cannot serve another connection right now",
                            "retry shortly")

    def _forget(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.pop(conn, None)

    def _turn_away(self, conn: socket.socket, message: str, hint: str) -> None:
        """Answer a connection that will not be served with one ``busy`` frame, then close it."""
        self.connections_refused += 1
        log.warning("host port: refusing a connection: %s", message)
        try:
            # A fresh connection's send buffer takes this small frame at once: never block the loop.
            conn.setblocking(False)
            conn.send(Reply.failure(None, "busy", message, hint).pack())
        except OSError:
            pass
        finally:
            conn.close()

    # ------------------------------------------------------------ connection

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._conversation(conn)
        except OSError:
            pass
        except Exception as exc:  # noqa: BLE001 - ends this connection only, never the platform
            log.error("host port: connection ended by an unexpected %s", type(exc).__name__)
        finally:
            with self._conn_lock:
                self._connections.pop(conn, None)
            try:
                conn.close()
            except OSError:
                pass

    def _refuse(self, conn: socket.socket, rid: int | None, message: str, hint: str | None = None,
                code: str = "protocol") -> None:
        """Answer a protocol violation (or a ``busy`` refusal); the caller then closes the connection."""
        self.frames_refused += 1
        log.warning("host port: closing a connection after a %s error: %s", code, message)
        try:
            write_frame(conn, Reply.failure(rid, code, message, hint).frame())
        except OSError:
            pass

    def _conversation(self, conn: socket.socket) -> None:
        greeted = False
        while not self._stopping.is_set():
            # The frame's bytes count against the shared budget until its reply is sent;
            # file descriptors that came with it are closed once it is answered.
            fds: list[int] = []
            with self._budget.account() as charge, _closing(fds):
                try:
                    frame = read_frame(conn, frame_timeout=self.frame_timeout, charge=charge, fds=fds)
                except (HostPortProtocolError, HostPortBusyError) as exc:
                    _close_all(fds)
                    self._refuse(conn, None, exc.message, exc.hint, exc.code)
                    return
                except socket.timeout:
                    self._refuse(conn, None, f"frame not completed within {self.frame_timeout:g} s")
                    return
                if frame is None:
                    return
                try:
                    request = Request.from_frame(frame)
                except HostPortProtocolError as exc:
                    rid = frame.header.get("id")
                    self._refuse(conn, rid if isinstance(rid, int) and not isinstance(rid, bool) else None,
                                 exc.message, exc.hint)
                    return
                if request.cmd == "hello":
                    try:
                        reply = Reply(request.id, True, self._hello(request.args))
                    except HostPortProtocolError as exc:
                        self._refuse(conn, request.id, exc.message, exc.hint)
                        return
                    greeted = True
                    write_frame(conn, reply.frame())
                    continue
                if not greeted:
                    self._refuse(conn, request.id, f"the first request must be hello, not {request.cmd[:64]!r}",
                                 "send hello with the protocol versions the client speaks")
                    return
                try:
                    charge(self._file_bytes(request, fds))    # pages read from a passed file
                except HostPortBusyError as exc:
                    _close_all(fds)
                    self._refuse(conn, request.id, exc.message, exc.hint, exc.code)
                    return
                reply = self._dispatch(request, fds)
                _close_all(fds)           # the host's file is let go of before the reply
                conn.sendall(reply)
                if self.later is not None and request.cmd != "platform-info":
                    self.later.start()      # while the caller works on what it was given

    @staticmethod
    def _file_bytes(request: Request, fds: list[int]) -> int:
        """The bytes a write-phys-pages from a passed file will hold in platform memory."""
        count = request.args.get("count")
        if fds and request.cmd == "write-phys-pages" and isinstance(count, int) \
                and 0 < count <= MAX_DATA // PAGE_SIZE:
            return count * PAGE_SIZE
        return 0

    def _dispatch(self, request: Request, fds: list[int] | None = None) -> bytes:
        """Run one request; the packed reply frame (an error reply if anything fails)."""
        handler = self._handlers.get(request.cmd)
        if handler is None:
            return Reply.failure(request.id, "unknown-command", f"unknown host-port command {request.cmd[:64]!r}",
                                 f"commands: {', '.join(COMMANDS)}").pack()
        try:
            if self.later is not None and request.cmd in NEEDS_LATER:
                self.later.wait()
            if request.cmd == "write-phys-pages":
                result, payload = self._write_phys_pages(request.args, memoryview(request.payload), fds or [])
            elif fds:
                raise HostPortBadRequestError(f"{request.cmd[:64]} takes no file descriptor",
                                              "only write-phys-pages reads from a passed file")
            else:
                result, payload = handler(request.args, memoryview(request.payload))
            return Reply(request.id, True, result, payload).pack()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            return error_reply(request.id, request.cmd, exc).pack()

    # --------------------------------------------------------------- commands

    def _hello(self, args: dict) -> dict:
        versions = args.get("versions")
        if versions is None and "version" in args:
            versions = [args["version"]]
        if not isinstance(versions, list) or not all(isinstance(v, int) for v in versions):
            raise HostPortProtocolError("hello needs 'versions': a list of protocol version numbers")
        common = sorted(set(versions) & set(SUPPORTED_VERSIONS))
        if not common:
            raise HostPortProtocolError(
                f"no common protocol version: the client speaks {versions}, this platform "
                f"speaks {list(SUPPORTED_VERSIONS)}", "use a host VMM that matches this platform")
        return {"version": common[-1], "server": SERVER_NAME, "max_frame": MAX_FRAME,
                "max_header": MAX_HEADER, "max_data": MAX_DATA, "commands": list(COMMANDS),
                "preferred_version": PROTOCOL_VERSION}

    def _platform_info(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        return self.platform.platform_info().pack(), b""

    def _alloc(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255) if args.get("keyid") is not None else None
        if args.get("npages") is not None:
            if len(payload):
                raise HostPortBadRequestError("alloc takes npages or an hpa list, not both")
            allocation = self.platform.alloc(npages=arg_int(args, "npages", minimum=1), keyid=keyid)
        else:
            hpas = unpack_u64_array(payload, "alloc hpa list")
            if not hpas.size:
                raise HostPortBadRequestError("alloc needs npages or a non-empty hpa list")
            allocation = self.platform.alloc(hpas=hpas, keyid=keyid)
        return {"keyid": allocation.keyid, "count": int(allocation.hpa_array.size)}, \
            pack_u64_array(allocation.hpa_array)

    def _free(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        return {"freed_pages": self.platform.free(arg_int(args, "keyid", minimum=1, maximum=255))}, b""

    def _read_phys(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        dpa = arg_int(args, "dpa")
        length = arg_int(args, "length", maximum=MAX_DATA)
        return {"length": length}, self.platform.read_phys(dpa, length)

    def _write_phys(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        self.platform.write_phys(arg_int(args, "dpa"), payload)
        return {"written": len(payload)}, b""

    def _read_phys_pages(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        dpas = unpack_u64_array(payload, "page address list")
        if dpas.size * PAGE_SIZE > MAX_DATA:
            raise HostPortBadRequestError(f"read-phys-pages of {dpas.size} pages exceeds "
                                          f"{MAX_DATA // PAGE_SIZE} pages per request")
        return {"count": int(dpas.size)}, self.platform.read_phys_pages(dpas)

    def _write_phys_pages(self, args: dict, payload: memoryview, fds: list[int] = ()) -> tuple[dict, bytes]:
        count = arg_int(args, "count", maximum=MAX_DATA // PAGE_SIZE)
        source = args.get("file")
        if source is None:
            if fds:
                raise HostPortBadRequestError("write-phys-pages got a file descriptor but no 'file' argument")
            if len(payload) != count * (8 + PAGE_SIZE):
                raise HostPortBadRequestError(f"write-phys-pages payload is {len(payload)} bytes; {count} pages "
                                              f"need {count * (8 + PAGE_SIZE)} (addresses then data)")
            dpas = unpack_u64_array(payload[:8 * count])
            self.platform.write_phys_pages(dpas, payload[8 * count:])
            return {"count": count}, b""
        # The data comes from a file the host passed with the request (SCM_RIGHTS).
        if not isinstance(source, dict):
            raise HostPortBadRequestError("write-phys-pages 'file' must be an object: offset, stride")
        offset = arg_int(source, "offset", maximum=(1 << 62))
        stride = arg_int(source, "stride", minimum=PAGE_SIZE, maximum=MAX_FILE_STRIDE)
        if len(fds) != 1:
            raise HostPortBadRequestError(f"write-phys-pages from a file needs exactly one file descriptor "
                                          f"with the request, not {len(fds)}")
        if len(payload) != 8 * count:
            raise HostPortBadRequestError(f"write-phys-pages payload is {len(payload)} bytes; {count} page "
                                          f"addresses need {8 * count}")
        dpas = unpack_u64_array(payload)
        self.platform.write_phys_pages(dpas, read_file_pages(fds[0], count, offset, stride))
        return {"count": count}, b""

    def _create_kd(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        wrapped = arg_hex(args, "wrapped_key", max_bytes=MAX_WRAPPED_KEY)
        policy = arg_hex(args, "policy", max_bytes=MAX_POLICY)
        host_data = arg_hex(args, "host_data", max_bytes=MAX_HOST_DATA, default=b"")
        domain = self.platform.create_kd(keyid, wrapped, policy, host_data)
        return {"keyid": domain.keyid, "state": domain.state.value}, b""

    @staticmethod
    def _batch(payload: memoryview) -> PageBatch:
        entries = unpack_page_entries(payload)
        return PageBatch(entries["hpa"], entries["gpa"], entries["type"].astype(np.int64),
                         entries["perms"].astype(np.int64),
                         (entries["flags"] & FLAG_HOST_VERIFIABLE) != 0)

    def _add_pages(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        batch = self._batch(payload)
        self.platform.add_pages(keyid, batch)
        return {"added": len(batch)}, b""

    def _add_zero_pages(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        batch = self._batch(payload)
        self.platform.add_zero_pages(keyid, batch)
        return {"added": len(batch)}, b""

    def _hash_kd(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        if args.get("staged"):
            return {"digest": self.platform.controls.staged_hash(keyid).hex()}, b""
        hpas = unpack_u64_array(payload, "hash-kd hpa list").tolist() if args.get("selected") else None
        return {"digest": self.platform.hash_kd(keyid, hpas).hex()}, b""

    def _vmread(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        encoding = arg_int(args, "encoding", maximum=0xFFFFFFFF)
        if args.get("staged"):
            return {"value": self.platform.controls.staged_vmread(keyid, encoding)}, b""
        return {"value": self.platform.vmread(keyid, encoding)}, b""

    def _verify_ept(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        if args.get("staged"):
            return self.platform.controls.staged_verify_ept(keyid), b""
        allocation = unpack_u64_array(payload, "host allocation")
        v = self.platform.verify_ept(keyid, allocation)
        return EptVerdict(v.ok, v.reasons, v.mapping_digest, v.mapped_pages, v.table_pages).pack(), b""

    def _measure_kd(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        return {"measurement": self.platform.measure_kd(keyid).hex()}, b""

    def _launch(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        name = args.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise HostPortBadRequestError("launch: name must be a string")
            check_name(name)
        endpoints = self.platform.launch(keyid, name)
        return {"endpoints": endpoints, "name": self.platform.domain_names.get(keyid)}, b""

    @staticmethod
    def _keyid_command(method: Callable[[int], None]) -> Handler:
        def handler(args: dict, payload: memoryview) -> tuple[dict, bytes]:
            keyid = arg_int(args, "keyid", minimum=1, maximum=255)
            method(keyid)
            return {"keyid": keyid}, b""
        return handler

    def _destroy_kd(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        return {"freed_pages": self.platform.destroy_kd(arg_int(args, "keyid", minimum=1, maximum=255))}, b""


    def _domain_status(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        return self.platform.domain_status(arg_int(args, "keyid", minimum=1, maximum=255)), b""

    def _list_domains(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        return {"domains": self.platform.list_domains()}, b""

    def _debug_read(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        gpa = arg_int(args, "gpa")
        length = arg_int(args, "length", maximum=min(MAX_DATA, MAX_DEBUG_READ))
        return {"length": length}, self.platform.debug_read(keyid, gpa, length)

    def _next_exit(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        after = arg_int(args, "after", default=0)
        wait = args.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_EXIT_WAIT:
            raise HostPortBadRequestError(f"argument 'wait' must be 0..{MAX_EXIT_WAIT:g} seconds")
        record, last = self.platform.next_exit(keyid, after, float(wait))
        return {"exit": record, "last_seq": last}, b""

    def _hypercall_reply(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        reply = HypercallReply(seq=arg_int(args, "seq", minimum=1),
                               outputs=check_registers(args.get("outputs", {}), "hypercall-reply outputs"),
                               status=arg_int(args, "status", default=0))
        self.platform.hypercall_reply(keyid, reply)
        return {"keyid": keyid, "seq": reply.seq}, b""

    # ------------------------------------------------ control updates (docs/protocol.md)

    def _controls_stage(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        return self.platform.controls.stage(keyid, bytes(payload)), b""

    def _controls_install(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        return self.platform.controls.install(keyid, arg_int(args, "version", minimum=1)), b""

    def _controls_release(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        hpas = unpack_u64_array(payload, "offered hpas")
        return {"released": self.platform.controls.release(keyid, hpas)}, b""

    def _controls_status(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        return self.platform.controls.status(arg_int(args, "keyid", minimum=1, maximum=255)), b""

    # -- snapshots (platform/snapshot.py, docs/snapshots.md) ------------------------------

    def _snapshot_service(self, cmd: str) -> SnapshotService:
        with self._snapshots_lock:
            if self.snapshots is None:
                raise KdError(f"{cmd}: this platform keeps no snapshot state",
                              "serve it with the platform daemon (qemu-kd platform serve)")
            if callable(self.snapshots):
                self.snapshots = self.snapshots()
            return self.snapshots

    @staticmethod
    def _path_arg(args: dict, cmd: str) -> str:
        path = args.get("path")
        if not isinstance(path, str) or not path or "\0" in path or not os.path.isabs(path):
            raise HostPortBadRequestError(f"{cmd}: path must be an absolute file path")
        return path

    def _snapshot_kd(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        keyid = arg_int(args, "keyid", minimum=1, maximum=255)
        taken = self._snapshot_service("snapshot-kd").take(keyid, self._path_arg(args, "snapshot-kd"))
        return {"keyid": keyid, "path": taken.path, "domain_id": taken.domain_id.hex(),
                "version": taken.version, "size": taken.size}, b""

    def _restore_kd(self, args: dict, payload: memoryview) -> tuple[dict, bytes]:
        path = self._path_arg(args, "restore-kd")
        name = args.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise HostPortBadRequestError("restore-kd: name must be a string")
            check_name(name)
        domain_id = arg_hex(args, "domain_id", max_bytes=16, default=b"") or None
        measurement = arg_hex(args, "measurement", max_bytes=48, default=b"") or None
        restored = self._snapshot_service("restore-kd").restore(path, name, domain_id=domain_id,
                                                                measurement=measurement)
        return {"keyid": restored.keyid, "name": restored.name, "endpoints": restored.endpoints,
                "domain_id": restored.domain_id.hex(), "version": restored.version}, b""


def serve(platform: Platform, socket_path: Path | str) -> HostPortServer:
    """Start serving ``platform`` on ``socket_path``; close the returned server to stop."""
    return HostPortServer(platform, socket_path).start()
