"""The host-facing gdb endpoint of a domain: an RSP server in front of QEMU's gdbstub.

QEMU's gdbstub takes one client, and the platform already holds that
connection (:class:`~qemu_kd.qemu.gdbstub.RspClient`), so the proxy relays through
it.  One gdb session is served at a time.

Without the DEBUG policy the proxy never sends a byte to the gdbstub (any byte
reaching a running QEMU gdbstub stops the VM) and answers everything itself:

* the handshake (``qSupported``, ``QStartNoAckMode``, threads, ``vCont?``) and a
  target description that names only the architecture;
* ``?`` with a stop reply and ``g`` with every general register marked
  unavailable and a placeholder RIP of 0: gdb 13 drops the connection when the
  registers cannot be read at attach, and this tells it nothing;
* ``p`` with ``E.<policy message>`` (gdb prints the text), ``qRcmd`` (gdb's
  ``monitor``) with the message as console output and ``E01``; ``G``, ``P``,
  ``m``, ``M``, ``X``, ``Z``/``z`` and single-steps with ``E01`` (gdb 13 cannot
  parse a textual error for these);
* ``c``: the guest is already running, so the proxy just waits for gdb's
  interrupt (Ctrl-C) and reports ``T02``;
* ``D`` and ``k`` end the session; the guest never stopped.

With DEBUG the session stops the vCPU when gdb attaches (``on_stop`` or the
gdbstub), relays every request, audits each one that reads or changes the
guest, and when the session ends (``D``, ``k`` or a dropped connection) removes
the breakpoints it inserted and resumes the vCPU if it was running at attach,
unless the platform refuses to run it (``may_run``: an exited domain).

Bad checksums get a ``-`` (while acknowledgements are on), stray bytes are
ignored, packets larger than :data:`MAX_PACKET` are answered with ``E01``, and
a client that disappears mid-command leaves the proxy and the guest intact.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from typing import Callable

from qemu_kd.platform.endpoints.audit import AuditError, AuditLog
from qemu_kd.common.errors import KdError
from qemu_kd.qemu.gdbstub import RspClient, RspError, checksum, frame, unescape
from qemu_kd.platform.endpoints.allowlists import HmpAction, judge_hmp
from qemu_kd.common.files import claim_socket_path

log = logging.getLogger(__name__)

PACKET_SIZE = 0x1000         # advertised to gdb; QEMU's own limit
MAX_PACKET = 4 * PACKET_SIZE  # largest client packet accepted (escaped bytes)
SEND_TIMEOUT = 10.0           # a gdb that does not read its replies is dropped
RELEASE_TIMEOUT = 5.0         # waiting for the vCPU to stop when a session ends
THREAD = "01"
TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
              b"<target><architecture>i386:x86-64</architecture></target>")
# rax..r15 unavailable, rip 0 (see the module docstring).
NO_DEBUG_REGISTERS = b"x" * (16 * 16) + b"0" * 16
# Other packets that read guest memory (refused without DEBUG).
READS = (b"qCRC", b"qSearch")
# Packets about features this stub does not have (tracepoints, symbol lookup,
# relocation): answered "unsupported" without asking QEMU, in both modes.
LOCAL_EMPTY = frozenset({b"vMustReplyEmpty", b"qTStatus", b"qTfV", b"qTsV", b"qTfP", b"qTsP",
                         b"qOffsets", b"qSymbol", b"QThreadEvents", b"QNonStop",
                         b"QPassSignals", b"QProgramSignals", b"QCatchSyscalls"})


class GdbProxyError(KdError):
    """The gdb proxy cannot start."""


class _SessionEnd(Exception):
    """The gdb client went away or the proxy is closing."""


def summarize(packet: bytes) -> str:
    """The audit summary of a request packet: never the data it carries."""
    kind = packet[:1]
    if kind in (b"M", b"X"):
        head = packet[1:].split(b":", 1)[0]
        return f"{kind.decode()} {head.decode(errors='replace')}"
    if kind == b"G":
        return f"G ({len(packet) // 2} bytes)"
    if kind == b"P":
        return f"P {packet[1:].split(b'=', 1)[0].decode(errors='replace')}"
    if packet.startswith(b"qRcmd,"):
        try:
            return "monitor " + bytes.fromhex(packet[6:].decode()).decode(errors="replace")
        except ValueError:
            return "monitor (undecodable)"
    if kind in (b"m", b"p", b"Z", b"z"):
        return f"{kind.decode()} {packet[1:].decode(errors='replace')}"
    return packet[:60].decode(errors="replace")


def monitor_refusal(packet: bytes, domain: str) -> str | None:
    """Why gdb's ``monitor`` command in a qRcmd packet is refused even with DEBUG, or None.

    The same HMP allow-list as on the QMP endpoint, without run control: that
    belongs to gdb itself and to QMP stop/cont (the platform's exit and resume).
    """
    try:
        line = bytes.fromhex(packet[6:].decode()).decode()
    except (ValueError, UnicodeDecodeError):
        return "the monitor command is not hex-encoded text"
    verdict = judge_hmp(line, debug=True, run_control=False)
    if verdict.action is HmpAction.REFUSED:
        return (f"monitor '{verdict.command[:40]}' is not available through the gdb endpoint of "
                f"key domain {domain}, even with the DEBUG policy; use gdb's own commands, "
                "or QMP stop/cont")
    return None


def is_output(reply: bytes) -> bool:
    """A console-output packet (``O`` + hex), as opposed to ``OK``."""
    return reply[:1] == b"O" and reply != b"OK"


def is_step(packet: bytes) -> bool:
    if packet[:1] in (b"s", b"S"):
        return True
    if packet.startswith(b"vCont;"):
        return any(action[:1] in (b"s", b"S", b"r") for action in packet[6:].split(b";"))
    return False


def is_continue(packet: bytes) -> bool:
    if packet[:1] in (b"c", b"C"):
        return True
    return packet.startswith(b"vCont;") and not is_step(packet)


class _ClientChannel:
    """Packets from and to one gdb client, with acks, NAKs and an interrupt byte."""

    def __init__(self, sock: socket.socket, wake: socket.socket):
        self.sock = sock
        self.wake = wake
        self.ack = True
        self._buf = bytearray()
        self._last = b""
        self.interrupted = False
        self._oversized = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: bytes) -> None:
        data = frame(payload)
        self._last = data
        self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            raise _SessionEnd() from None

    def fill(self, timeout: float | None) -> bool:
        """Read what the client sent (waiting up to ``timeout``); False on timeout."""
        ready, _, _ = select.select([self.sock, self.wake], [], [], timeout)
        if self.wake in ready:
            raise _SessionEnd()
        if not ready:
            return False
        try:
            chunk = self.sock.recv(65536)
        except OSError:
            raise _SessionEnd() from None
        if not chunk:
            raise _SessionEnd()
        self._buf += chunk
        return True

    def next_packet(self, timeout: float | None = None) -> bytes | None:
        """The next valid packet body (unescaped); None when only an interrupt or nothing came."""
        while True:
            packet = self._parse()
            if packet is not None or self.interrupted:
                return packet
            if not self.fill(timeout):
                return None

    def take_interrupt(self) -> None:
        """While the vCPU runs, look only for Ctrl-C; keep other bytes for later."""
        idx = self._buf.find(b"\x03")
        if idx >= 0:
            del self._buf[idx:idx + 1]
            self.interrupted = True

    def _parse(self) -> bytes | None:
        buf = self._buf
        while buf:
            if self._oversized:
                end = buf.find(b"#")
                if end < 0:
                    buf.clear()
                    return None
                if len(buf) < end + 3:
                    return None
                del buf[:end + 3]
                self._oversized = False
                if self.ack:
                    self._write(b"+")
                self.send(b"E01")
                continue
            byte = buf[0]
            if byte == 0x03:
                del buf[:1]
                self.interrupted = True
                continue
            if byte == ord("-"):
                del buf[:1]
                if self.ack and self._last:
                    self._write(self._last)
                continue
            if byte != ord("$"):
                del buf[:1]      # acks and stray bytes
                continue
            end = buf.find(b"#")
            if end < 0:
                if len(buf) > MAX_PACKET:
                    buf.clear()
                    self._oversized = True
                return None
            if end - 1 > MAX_PACKET:
                del buf[:end]
                self._oversized = True
                continue
            if len(buf) < end + 3:
                return None
            body = bytes(buf[1:end])
            sent = bytes(buf[end + 1:end + 3])
            del buf[:end + 3]
            if sent.lower() != f"{checksum(body):02x}".encode():
                if self.ack:
                    self._write(b"-")
                continue
            if self.ack:
                self._write(b"+")
            return unescape(body)
        return None


class _Session:
    """One gdb client."""

    def __init__(self, proxy: "GdbProxy", chan: _ClientChannel):
        self.proxy = proxy
        self.chan = chan
        self.debug = proxy.debug
        # The platform's gdbstub connection; used only while holding ``lock``.
        self.rsp: RspClient | None = proxy.rsp
        self.lock = proxy.rsp_lock
        self.attached = False
        self.resume_at_end = False
        self.paused_by_callback = False
        self.running = False          # the vCPU runs on this session's behalf (DEBUG)
        self.breakpoints: set[bytes] = set()
        self.last_stop = b"T05thread:" + THREAD.encode() + b";"

    # -- helpers ----------------------------------------------------------------------------
    def refusal_text(self) -> str:
        return f"key domain {self.proxy.domain} was not sealed with the DEBUG policy"

    def audit(self, packet: bytes, allowed: bool) -> bool:
        """Log the request; False if the log cannot be written (then nothing is relayed)."""
        try:
            self.proxy.audit.record(domain=self.proxy.domain, endpoint="gdb",
                                    action=summarize(packet), allowed=allowed, debug=self.debug)
        except AuditError as exc:
            log.error("gdb endpoint of %s: %s refused: %s", self.proxy.domain,
                      summarize(packet), exc)
            return False
        return True

    def run(self) -> None:
        log.info("gdb endpoint of %s: session started (%s)", self.proxy.domain,
                 "DEBUG" if self.debug else "no DEBUG policy")
        try:
            while True:
                packet = self.chan.next_packet()
                if packet is None:
                    self.chan.interrupted = False   # Ctrl-C while stopped: nothing to do
                    continue
                if not self.handle(packet):
                    return
        except _SessionEnd:
            return
        finally:
            if self.debug:
                self.release()
            log.info("gdb endpoint of %s: session ended", self.proxy.domain)

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, packet: bytes) -> bool:
        """Answer one packet; False ends the session."""
        chan = self.chan
        kind = packet[:1]
        if self.debug and not self.attached:
            self.attach()
        if packet.startswith(b"qSupported"):
            chan.send(f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;QStartNoAckMode+;"
                      "vContSupported+".encode())
        elif packet == b"QStartNoAckMode":
            chan.send(b"OK")
            chan.ack = False
        elif packet == b"?":
            chan.send(self.last_stop)
        elif packet.startswith(b"qAttached"):
            chan.send(b"1")
        elif packet == b"qC":
            chan.send(b"QC" + THREAD.encode())
        elif packet == b"qfThreadInfo":
            chan.send(b"m" + THREAD.encode())
        elif packet == b"qsThreadInfo":
            chan.send(b"l")
        elif kind == b"H" or (kind == b"T" and packet[1:].isalnum()):
            chan.send(b"OK")
        elif packet.split(b":", 1)[0] in LOCAL_EMPTY:
            chan.send(b"")
        elif packet == b"vCont?":
            chan.send(b"vCont;c;C;s;S" if self.debug else b"vCont;c;C")
        elif kind == b"D":
            chan.send(b"OK")
            return False
        elif kind == b"k":
            return False
        elif self.debug:
            self.relay(packet)
        else:
            self.refuse(packet)
        return True

    # -- without DEBUG ----------------------------------------------------------------------
    def refuse(self, packet: bytes) -> None:
        chan = self.chan
        kind = packet[:1]
        if packet.startswith(b"qXfer:features:read:"):
            chan.send(self.local_xfer(packet))
        elif kind == b"g":
            chan.send(NO_DEBUG_REGISTERS)
        elif is_continue(packet):
            self.wait_for_interrupt()
        elif kind == b"p":
            self.audit(packet, False)
            chan.send(b"E." + self.refusal_text().encode())
        elif packet.startswith(b"qRcmd,"):
            self.audit(packet, False)
            chan.send(b"O" + (f"refused: {self.refusal_text()}\n").encode().hex().encode())
            chan.send(b"E01")
        elif (kind and kind in b"GPmMXZz") or is_step(packet) or packet.startswith(READS):
            self.audit(packet, False)
            chan.send(b"E01")
        else:
            chan.send(b"")   # not supported

    def local_xfer(self, packet: bytes) -> bytes:
        try:
            annex, span = packet[len(b"qXfer:features:read:"):].rsplit(b":", 1)
            offset, length = (int(x, 16) for x in span.split(b","))
        except ValueError:
            return b"E00"
        if annex != b"target.xml":
            return b"E00"
        chunk = TARGET_XML[offset:offset + length]
        return (b"l" if offset + length >= len(TARGET_XML) else b"m") + chunk

    def wait_for_interrupt(self) -> None:
        """A continue without DEBUG: the guest already runs; report a stop on Ctrl-C."""
        while not self.chan.interrupted:
            self.chan.fill(None)
            self.chan.take_interrupt()
        self.chan.interrupted = False
        self.chan.send(b"T02thread:" + THREAD.encode() + b";")

    # -- with DEBUG -------------------------------------------------------------------------
    def attach(self) -> None:
        """Stop the vCPU for the debugger; remember whether it ran."""
        self.attached = True
        proxy = self.proxy
        was_running = None
        if proxy.on_stop is not None:
            try:
                result = proxy.on_stop()
            except Exception:  # noqa: BLE001 - fall back to stopping through the gdbstub
                result = None
            else:
                self.paused_by_callback = True
                was_running = True if result is None else bool(result)
        with self.lock:
            try:
                self.rsp.discard_pending()
                # A running gdbstub stops the VM on the packet's first byte and drops the
                # rest (reply T02); a stopped one answers with T05.  Either way: one stop
                # reply, and QEMU clears stale breakpoints.
                self.rsp.send_packet(b"?")
                reply = self.rsp.read_stop_reply()
            except RspError as exc:
                log.warning("gdb endpoint of %s: cannot stop the vCPU on attach: %s",
                            self.proxy.domain, exc)
                return
        self.last_stop = reply
        if was_running is None:
            was_running = reply.startswith(b"T02")
            self.paused_by_callback = False
        self.resume_at_end = was_running

    def relay(self, packet: bytes) -> None:
        chan = self.chan
        harmless = packet.startswith(b"qXfer:features:read:")
        if is_continue(packet) or is_step(packet):
            self.resume_and_wait(packet)    # checks, audits and relays under the run lock
            return
        reason = monitor_refusal(packet, self.proxy.domain) if packet.startswith(b"qRcmd,") else None
        if reason:
            self.refuse_with(packet, reason)
            return
        if not harmless and not self.audit(packet, True):
            chan.send(b"E01")    # fail closed: nothing unaudited reaches the guest
            return
        with self.lock:
            try:
                reply = self.rsp.request(packet)
            except RspError as exc:
                log.warning("gdb endpoint of %s: gdbstub failed on %s: %s",
                            self.proxy.domain, summarize(packet), exc)
                reply = b"E01"
        if packet[:1] == b"Z" and reply == b"OK":
            self.breakpoints.add(packet[1:])
        elif packet[:1] == b"z" and reply == b"OK":
            self.breakpoints.discard(packet[1:])
        if packet.startswith(b"qRcmd,") and is_output(reply):
            # QEMU sends monitor output as O packets before the final OK.
            chan.send(reply)
            with self.lock:
                try:
                    while True:
                        reply = self.rsp.read_packet()
                        if not is_output(reply):
                            break
                        chan.send(reply)
                except RspError:
                    reply = b"E01"
        chan.send(reply)

    def refuse_with(self, packet: bytes, reason: str) -> None:
        """Refuse a DEBUG request: audited, the reason as console output, then ``E01``."""
        self.audit(packet, False)
        self.chan.send(b"O" + f"refused: {reason}\n".encode().hex().encode())
        self.chan.send(b"E01")

    def run_refusal(self) -> str | None:
        """Why the platform does not let the vCPU run now, or None."""
        return self.proxy.may_run() if self.proxy.may_run is not None else None

    def send_run(self, packet: bytes, only_if_paused: bool = False) -> str | None:
        """Send ``packet`` (a continue or step) upstream unless the platform refuses to run
        the vCPU now; returns the refusal.  The caller holds the upstream lock.

        The check and the send happen under the proxy's ``run_lock``, which the
        platform holds while it marks a domain exited (before it pauses the vCPU)
        and while it resumes one, so no continue slips in between the check and an
        exit.  ``only_if_paused``: send nothing if QEMU runs the vCPU already
        (``vcpu_paused``).
        """
        proxy = self.proxy
        with proxy.run_lock:
            reason = self.run_refusal()
            if reason is None and only_if_paused and proxy.vcpu_paused is not None \
                    and not proxy.vcpu_paused():
                return "the vCPU is running already"
            if reason is None:
                self.rsp.discard_pending()
                self.rsp.send_packet(packet)
        return reason

    def resume_and_wait(self, packet: bytes) -> None:
        """Continue or step, relay gdb's Ctrl-C, and forward the stop reply."""
        proxy = self.proxy
        use_callback = (is_continue(packet) and self.paused_by_callback
                        and proxy.on_cont is not None)
        reason = None if use_callback else self.run_refusal()
        if reason:
            self.refuse_with(packet, reason)
            return
        if not self.audit(packet, True):
            self.chan.send(b"E01")    # fail closed: nothing unaudited reaches the guest
            return
        try:
            if use_callback:
                with self.lock:
                    self.rsp.discard_pending()
                proxy.on_cont()
                self.paused_by_callback = False
            with self.lock:
                # Held from the continue to its stop reply, so nobody else reads that reply.
                reason = None if use_callback else self.send_run(packet)
                if reason is None:
                    self.running = True
                    reply = self.wait_stop()
            if reason:      # the domain was exited between the check above and the send
                self.chan.send(b"O" + f"refused: {reason}\n".encode().hex().encode())
                self.chan.send(b"E01")
                return
        except RspError as exc:
            log.warning("gdb endpoint of %s: %s failed: %s", proxy.domain, summarize(packet), exc)
            self.chan.send(b"E01")
            return
        except KdError as exc:
            log.info("gdb endpoint of %s: %s refused: %s", proxy.domain, summarize(packet), exc)
            self.chan.send(b"E." + str(exc).encode()[:200])
            return
        self.running = False
        self.last_stop = reply
        self.chan.send(reply)

    def wait_stop(self) -> bytes:
        """Wait (holding the upstream lock) for the stop reply; Ctrl-C from gdb interrupts."""
        sent_interrupt = False
        while True:
            if self.rsp.packet_ready():
                return self.rsp.read_stop_reply()
            if self.chan.interrupted and not sent_interrupt:
                self.rsp.send_interrupt()
                sent_interrupt = True
                self.chan.interrupted = False
            ready, _, _ = select.select([self.rsp, self.chan.sock, self.chan.wake],
                                        [], [], None)
            if self.chan.wake in ready:
                raise _SessionEnd()
            if self.chan.sock in ready:
                self.chan.fill(0)
                self.chan.take_interrupt()

    def release(self) -> None:
        """End of a DEBUG session: remove our breakpoints and let the guest run again."""
        if not self.attached:
            return
        try:
            with self.lock:
                if self.running:
                    # Stopped already (a stop reply is waiting) or running: a stopped
                    # gdbstub ignores the interrupt byte, a running one stops and replies.
                    self.rsp.send_interrupt()
                    if self.rsp.wait_stop_reply(RELEASE_TIMEOUT) is None:
                        log.warning("gdb endpoint of %s: the vCPU did not stop within %g s "
                                    "after the session ended", self.proxy.domain,
                                    RELEASE_TIMEOUT)
                        return   # QEMU does not answer; leave it to the platform
                    self.running = False
                for key in sorted(self.breakpoints):
                    self.rsp.request(b"z" + key)
                self.breakpoints.clear()
                if self.resume_at_end and not self.paused_by_callback:
                    # Never onto an exited vCPU: its registers are scrubbed; the platform's
                    # resume (QMP cont) restores them and runs it.  Nor onto one the
                    # platform resumed meanwhile: a running stub stops on any packet.
                    reason = self.send_run(b"c", only_if_paused=True)
                    if reason:
                        log.info("gdb endpoint of %s: not resuming the vCPU after the session: %s",
                                 self.proxy.domain, reason)
            if self.resume_at_end and self.paused_by_callback and self.proxy.on_cont:
                self.proxy.on_cont()
        except (RspError, KdError, OSError) as exc:
            # QEMU is gone or refuses; the platform notices on its own.
            log.warning("gdb endpoint of %s: cleanup after the session failed: %s",
                        self.proxy.domain, exc)


class GdbProxy:
    """An RSP server on ``listen_path`` (a Unix socket) for one domain's vCPU.

    ``rsp`` is the platform's connection to QEMU's gdbstub; ``rsp_lock`` (a
    :class:`threading.Lock` or ``RLock``) must be held by anyone else who uses
    it.  The proxy holds it for each relayed request and for the whole time a
    gdb continue is pending; that ends when the vCPU stops (a breakpoint, a
    Ctrl-C in gdb, or a QMP ``stop``).  ``on_stop`` / ``on_cont`` (DEBUG only)
    pause and resume the vCPU on attach and detach; ``on_stop`` may return
    ``False`` when the vCPU was already paused.  Without them the proxy pauses
    through the gdbstub.

    ``may_run`` returns why the vCPU must not run now (or None); the proxy asks it
    before every continue or step it sends, including the one that resumes the
    guest when a session ends, and holds ``run_lock`` from the question until the
    packet is sent (inside ``rsp_lock``).  The platform holds ``run_lock`` while it
    marks the domain exited, before it pauses the vCPU, and while it resumes the
    vCPU, and never takes ``rsp_lock`` while holding it.  ``vcpu_paused`` tells
    whether QEMU has the vCPU stopped: the resume at a session's end is skipped
    when it runs already (the platform resumed it meanwhile), because a running
    gdbstub stops the vCPU on any packet.
    """

    handover_wait = RELEASE_TIMEOUT + 1.0   # a new client waits this long for the last session

    def __init__(self, listen_path: str, rsp: RspClient, *, debug: bool, domain: str,
                 audit: AuditLog, on_stop: Callable[[], object] | None = None,
                 on_cont: Callable[[], object] | None = None, rsp_lock=None,
                 may_run: Callable[[], str | None] | None = None, run_lock=None,
                 vcpu_paused: Callable[[], bool] | None = None):
        self.listen_path = str(listen_path)
        self.rsp = rsp
        self.debug = debug
        self.domain = domain
        self.audit = audit
        self.on_stop = on_stop
        self.on_cont = on_cont
        # Returns why the vCPU must not run now (e.g. the domain is exited), or None.
        # Checked, together with sending the continue, under ``run_lock``.
        self.may_run = may_run
        self.run_lock = run_lock if run_lock is not None else threading.RLock()
        # Whether QEMU has the vCPU stopped: asked before the resume at a session's end.
        self.vcpu_paused = vcpu_paused
        self.rsp_lock = rsp_lock if rsp_lock is not None else threading.RLock()
        self._server: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._session_lock = threading.Lock()
        self._active: socket.socket | None = None
        self._workers: set[threading.Thread] = set()
        self._closed = False

    def start(self) -> None:
        """Listen on ``listen_path``; sessions are served in background threads."""
        claim_socket_path(self.listen_path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(self.listen_path)
            os.chmod(self.listen_path, 0o600)
            server.listen(4)
        except OSError as exc:
            server.close()
            raise GdbProxyError(f"cannot listen on {self.listen_path}: {exc.strerror}",
                                "check that the directory exists and is writable") from None
        self._server = server
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"gdb-proxy-{self.domain}")
        self._thread.start()
        log.info("gdb endpoint of %s listening on %s", self.domain, self.listen_path)

    def close(self) -> None:
        """Stop listening, end the session (cleaning up after it) and remove the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        for worker in list(self._workers):
            worker.join(timeout=RELEASE_TIMEOUT + 5)
        if self._server is not None:
            self._server.close()
            try:
                os.unlink(self.listen_path)
            except OSError:
                pass
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "GdbProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connections --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._server is not None
        while True:
            ready, _, _ = select.select([self._server, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            conn.settimeout(SEND_TIMEOUT)
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"gdb-session-{self.domain}")
            self._workers.add(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        # A session whose client just left may still be cleaning up: wait for it a little.
        if not self._session_lock.acquire(timeout=self.handover_wait):
            self._turn_away(conn)
            return
        try:
            if not self._closed:
                _Session(self, _ClientChannel(conn, self._wake_r)).run()
        finally:
            conn.close()
            self._session_lock.release()
            self._workers.discard(threading.current_thread())

    def _turn_away(self, conn: socket.socket) -> None:
        """A second debugger: answer its first packet with an error and hang up."""
        log.info("gdb endpoint of %s: another debugger is attached; turning a client away",
                 self.domain)
        chan = _ClientChannel(conn, self._wake_r)
        try:
            if chan.next_packet(timeout=SEND_TIMEOUT) is not None:
                chan.send(f"E.another debugger is attached to key domain {self.domain}".encode())
        except _SessionEnd:
            pass
        finally:
            conn.close()
            self._workers.discard(threading.current_thread())
