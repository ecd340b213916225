"""A small client for QEMU's gdbstub (the GDB remote serial protocol).

The platform uses it to load and save vCPU state, and the host-facing gdb
proxy relays through it.  It is deliberately small: packets, checksums,
acknowledgements, register read/write, memory read, and the few asynchronous
pieces a relayed ``continue`` needs (sending a packet without waiting, the
interrupt byte, polling for and waiting on a stop reply).
QEMU quirks: register writes get an empty reply until the client
has read ``target.xml``, so :meth:`RspClient.connect` reads it first.
"""

from __future__ import annotations

import select
import socket
import time

from qemu_kd.common.errors import QemuError
from qemu_kd.formats.vcpu import VcpuState

MAX_PACKET = 1 << 20
INTERRUPT = b"\x03"
STOP_KINDS = (b"T", b"S", b"W", b"X")   # stop replies: signal, signal, exited, terminated


class RspError(QemuError):
    """The gdbstub refused a request or broke the protocol."""


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(payload: bytes) -> bytes:
    """Escape the bytes RSP reserves ($, #, } and *)."""
    out = bytearray()
    for b in payload:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(payload: bytes) -> bytes:
    out = bytearray()
    it = iter(payload)
    for b in it:
        if b == 0x7D:
            out.append(next(it, 0) ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """One RSP packet: ``$payload#cc``."""
    body = escape(payload)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


def le_hex(value: int, size: int) -> str:
    return value.to_bytes(size, "little").hex()


def from_le_hex(text: str) -> int:
    return int.from_bytes(bytes.fromhex(text), "little")


class RspClient:
    """A blocking RSP client over a Unix socket."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ack = True

    # -- transport -----------------------------------------------------------------
    def connect(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise RspError(f"gdbstub socket {self.path} does not answer",
                                   "check that QEMU is running") from None
                time.sleep(0.02)
        sock.settimeout(self.timeout)
        self._sock = sock
        reply = self.request(b"QStartNoAckMode")
        if reply == b"OK":
            self._ack = False
        self.target_xml()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        """The socket's descriptor, so the client can be passed to :func:`select.select`."""
        return self._connected_sock().fileno()

    def _connected_sock(self) -> socket.socket:
        if self._sock is None:
            raise RspError("gdbstub client is not connected")
        return self._sock

    def _sendall(self, data: bytes) -> None:
        try:
            self._connected_sock().sendall(data)
        except OSError as exc:
            raise RspError(f"gdbstub connection failed: {exc}") from None

    def _recv_more(self) -> None:
        sock = self._connected_sock()
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise RspError("gdbstub did not answer in time", "QEMU may be hung") from None
        except OSError as exc:
            raise RspError(f"gdbstub connection failed: {exc}") from None
        if not chunk:
            raise RspError("gdbstub closed the connection", "QEMU may have exited")
        self._buf += chunk
        if len(self._buf) > MAX_PACKET * 2:
            raise RspError("gdbstub sent an oversized packet")

    def _recv_available(self) -> None:
        """Read whatever has already arrived, without blocking."""
        sock = self._connected_sock()
        while select.select([sock], [], [], 0)[0]:
            self._recv_more()

    def read_packet(self) -> bytes:
        """The next packet from the stub (unescaped), whatever it is.

        Blocks up to the client timeout.  Acknowledgements, stray bytes and
        notifications are consumed on the way.
        """
        while True:
            while self._buf[:1] in (b"+", b"-"):
                del self._buf[:1]
            if not self._buf:
                self._recv_more()
                continue
            if self._buf[:1] not in (b"$", b"%"):
                # Stray byte (e.g. a Ctrl-C echo): drop it.
                del self._buf[:1]
                continue
            end = self._buf.find(b"#")
            if end < 0 or len(self._buf) < end + 3:
                self._recv_more()
                continue
            notification = self._buf[:1] == b"%"
            body = bytes(self._buf[1:end])
            cs = bytes(self._buf[end + 1:end + 3])
            del self._buf[:end + 3]
            ok = cs.lower() == f"{checksum(body):02x}".encode()
            if self._ack and not notification:
                self._sendall(b"+" if ok else b"-")
            if not ok:
                if self._ack:
                    continue  # the stub resends
                raise RspError("gdbstub packet has a bad checksum")
            if notification:
                continue
            return unescape(body)

    def send_packet(self, payload: bytes) -> None:
        """Send one packet and return at once (the reply is read with :meth:`read_packet`,
        or, for a continue or step, :meth:`read_stop_reply`)."""
        self._sendall(frame(payload))

    def send_interrupt(self) -> None:
        """Send the interrupt byte (gdb's Ctrl-C): a running VM stops and the pending
        continue gets its stop reply; a stopped gdbstub ignores it."""
        self._sendall(INTERRUPT)

    def discard_pending(self) -> None:
        """Drop everything the stub sent that nobody asked for (e.g. the stop reply QEMU
        sends when the VM is paused through QMP)."""
        sock = self._connected_sock()
        while select.select([sock], [], [], 0)[0]:
            try:
                chunk = sock.recv(65536)
            except OSError as exc:
                raise RspError(f"gdbstub connection failed: {exc}") from None
            if not chunk:
                raise RspError("gdbstub closed the connection", "QEMU may have exited")
        self._buf.clear()

    def packet_ready(self) -> bool:
        """Whether a whole packet has arrived, without blocking.

        Readable is not enough: QEMU acknowledges every packet with ``+``, even in
        no-ack mode, so only a complete ``$...#cc`` counts.
        """
        self._recv_available()
        start = self._buf.find(b"$")
        if start < 0:
            self._buf.clear()          # only acks and stray bytes so far
            return False
        end = self._buf.find(b"#", start)
        return end >= 0 and len(self._buf) >= end + 3

    def read_stop_reply(self) -> bytes:
        """The next stop reply (anything else is skipped); blocks up to the client timeout."""
        while True:
            packet = self.read_packet()
            if packet[:1] in STOP_KINDS:
                return packet

    def wait_stop_reply(self, timeout: float) -> bytes | None:
        """The next stop reply, or None if none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.packet_ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._connected_sock()], [], [], remaining)[0]:
                return None
        return self.read_stop_reply()

    def request(self, payload: bytes) -> bytes:
        """Send one packet and return its reply.

        QEMU sends an unsolicited stop reply (``T02thread:..;``) when the VM is
        paused through QMP; for anything but stop-related requests such
        packets are not the answer and are skipped.
        """
        self.send_packet(payload)
        expects_stop_reply = payload[:1] in (b"?", b"c", b"s", b"v")
        while True:
            reply = self.read_packet()
            if not expects_stop_reply and reply[:1] in (b"T", b"S") and reply[1:3].isalnum():
                continue
            return reply

    # -- commands -----------------------------------------------------------------
    def target_xml(self, annex: str = "target.xml") -> bytes:
        """A target-description document (``target.xml`` or one it includes)."""
        out = bytearray()
        offset = 0
        while True:
            reply = self.request(f"qXfer:features:read:{annex}:{offset:x},ffb".encode())
            if not reply or reply[:1] not in (b"m", b"l"):
                raise RspError(f"gdbstub refused to send {annex}: {reply[:32]!r}")
            out += reply[1:]
            offset += len(reply) - 1
            if reply[:1] == b"l":
                return bytes(out)

    def read_all_registers(self) -> bytes:
        """Every register at once (the ``g`` packet), as raw bytes in gdb order."""
        reply = self.request(b"g")
        if not reply or reply.startswith(b"E") or len(reply) % 2:
            raise RspError(f"gdbstub refused to read the registers: {reply[:8]!r}")
        return bytes.fromhex(reply.decode())

    def read_register(self, number: int) -> int:
        reply = self.request(f"p{number:x}".encode())
        if not reply or reply.startswith(b"E"):
            raise RspError(f"gdbstub refused to read register {number}: {reply!r}")
        return from_le_hex(reply.decode())

    def write_register(self, number: int, size: int, value: int) -> None:
        reply = self.request(f"P{number:x}={le_hex(value, size)}".encode())
        if reply != b"OK":
            raise RspError(f"gdbstub refused to write register {number}: {reply!r}")

    def read_memory(self, addr: int, length: int) -> bytes:
        reply = self.request(f"m{addr:x},{length:x}".encode())
        if reply.startswith(b"E") or len(reply) != 2 * length:
            raise RspError(f"gdbstub refused to read memory at {addr:#x}: {reply[:8]!r}")
        return bytes.fromhex(reply.decode())

    def load_vcpu(self, state: VcpuState) -> None:
        """Write the vCPU state in the order QEMU needs for a direct long-mode entry."""
        for _name, number, size, value in state.load_sequence():
            self.write_register(number, size, value)

    def save_vcpu(self) -> VcpuState:
        """Read back the registers a :class:`VcpuState` holds (GDTR is not exposed)."""
        state = VcpuState()
        for name, number, _size, _value in state.load_sequence():
            setattr(state, name, self.read_register(number))
        return state

    def __enter__(self) -> "RspClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
