"""Complete exits, the protected save area and hypercalls, for one running domain.

* :class:`VcpuSealer` reads, scrubs and restores the whole vCPU state QEMU's
  gdbstub describes (:data:`qemu_kd.formats.savearea.FULL_STATE`), in the
  orders QEMU accepts, and checks each step by reading the registers back.
* :func:`seal_save_area` / :func:`open_save_area` put that state (and a
  hypercall's register file) into the save-area page: an HMAC-SHA384 under a
  key only the platform holds, bound to KeyID, save-area hpa and the exit's
  sequence number; the caller encrypts the page with the domain key.
* :class:`ExitLog` is what the host sees: one :class:`ExitRecord` per exit
  (``next-exit``), and the one hypercall waiting for the host's reply
  (``hypercall-reply``), which may write exposed registers only.

The runtime (:mod:`qemu_kd.platform.runtime`) drives these on ``exit`` and
``resume``; the platform (:mod:`qemu_kd.platform.hardware`) keeps the domain's
state in step.  See docs/formats.md §14 and docs/hostport.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from qemu_kd.common.errors import KdError
from qemu_kd.formats.errors import FormatError
from qemu_kd.formats.hypercall import ExitRecord, HypercallReply, unexposed_writes
from qemu_kd.formats.savearea import (
    BY_NAME,
    FULL_STATE,
    G_PACKET_BYTES,
    MAC_SIZE,
    RESTORE_ORDER,
    SAVE_AREA_BYTES,
    SCRUB_ORDER,
    SCRUB_VALUES,
    SaveArea,
    check_target_registers,
    mac_input,
    target_registers,
)
from qemu_kd.formats.vmcs import exposed_registers
from qemu_kd.platform.domain import DomainStateError, GuestStateFieldError

log = logging.getLogger(__name__)

#: Exit records kept for ``next-exit`` (older ones are dropped).
RECORDS_KEPT = 64
#: Registers QEMU 7.2's gdbstub reads as 0 and whose writes it ignores: they hold
#: no guest value in QEMU's view, so a read-back never checks them.
WRITE_IGNORED = frozenset({"ftag", "fiseg", "fioff", "foseg", "fooff", "fop"})


class SaveAreaError(KdError):
    """The protected save area does not verify (tampered or never written)."""


class VcpuStateError(KdError):
    """QEMU did not take a register value the platform wrote (scrub or restore)."""


class ExitStateError(DomainStateError):
    """An exit command that does not fit the current exit (e.g. resuming a hypercall exit)."""


class StaleReplyError(DomainStateError):
    """hypercall-reply to an exit that is not waiting for one."""


class UnexposedRegisterError(GuestStateFieldError):
    """hypercall-reply writes a register the guest did not expose."""


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha384).digest()


def seal_save_area(area: SaveArea, key: bytes, save_hpa: int) -> bytes:
    """The save-area page (plaintext, MAC'd) for ``area``."""
    body = area.pack_body()
    mac = _hmac(key, mac_input(body, area.keyid, save_hpa))
    return (body + mac).ljust(SAVE_AREA_BYTES, b"\0")


def open_save_area(page: bytes, key: bytes, keyid: int, save_hpa: int, seq: int) -> SaveArea:
    """The verified record of exit ``seq`` from a decrypted save-area page.

    Raises SaveAreaError if the page does not parse, its MAC does not verify,
    or it is another exit's (an older, valid save area replayed).
    """
    refused = SaveAreaError(f"protected save area of key domain {keyid} does not verify (tampered)",
                            "destroy the domain")
    try:
        area, body_len = SaveArea.unpack_body(page)
    except FormatError:
        raise refused from None
    mac = page[body_len:body_len + MAC_SIZE]
    if not hmac.compare_digest(mac, _hmac(key, mac_input(page[:body_len], keyid, save_hpa))):
        raise refused
    if any(page[body_len + MAC_SIZE:]):
        raise refused
    if area.keyid != keyid or area.seq != seq:
        raise SaveAreaError(f"protected save area of key domain {keyid} belongs to exit {area.seq}, "
                            f"not to exit {seq} (replayed)", "destroy the domain")
    return area


class VcpuSealer:
    """Full-state capture, scrub and restore through QEMU's gdbstub (the caller holds its lock)."""

    def __init__(self, rsp):
        self.rsp = rsp

    def check_target(self) -> list[str]:
        """Why QEMU's target description differs from the pinned register list (empty if not)."""
        top = self.rsp.target_xml()
        docs = {"target.xml": top}
        for annex in _includes(top):
            docs[annex] = self.rsp.target_xml(annex)
        return check_target_registers(target_registers(docs))

    def capture(self) -> dict[str, int]:
        """Every register's value, from one ``g`` packet."""
        raw = self.rsp.read_all_registers()
        if len(raw) != G_PACKET_BYTES:
            raise VcpuStateError(f"QEMU's gdbstub sent {len(raw)} bytes of registers, the platform "
                                 f"expects {G_PACKET_BYTES}", "this QEMU describes other registers")
        out, offset = {}, 0
        for reg in FULL_STATE:
            out[reg.name] = int.from_bytes(raw[offset:offset + reg.size], "little")
            offset += reg.size
        return out

    def _write(self, order, values: dict[str, int]) -> None:
        for name in order:
            reg = BY_NAME[name]
            self.rsp.write_register(reg.number, reg.size, values[name])

    def _mismatches(self, want: dict[str, int]) -> list[str]:
        got = self.capture()
        return [name for name in want if name not in WRITE_IGNORED and got[name] != want[name]]

    def scrub(self) -> None:
        """Overwrite every register with its scrub value; check that QEMU shows only those."""
        self._write(SCRUB_ORDER, SCRUB_VALUES)
        left = self._mismatches(SCRUB_VALUES)
        if left:
            raise VcpuStateError(f"QEMU kept guest values in {', '.join(left)} after the scrub")

    def restore(self, values: dict[str, int]) -> None:
        """Write every register back in launch order; check that QEMU took them all."""
        self._write(RESTORE_ORDER, values)
        wrong = self._mismatches(values)
        if wrong:
            raise VcpuStateError(f"QEMU did not take the saved values of {', '.join(wrong)} on resume")


def _includes(xml: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb'<xi:include\s+href="([^"]+)"', xml)]


@dataclass
class _Pending:
    record: ExitRecord
    reply: HypercallReply | None = None


@dataclass
class ExitHooks:
    """How the runtime performs a guest-initiated exit and its resume.

    The platform supplies these so the domain's state (LAUNCHED/EXITED) moves
    with the vCPU under the platform lock; a runtime on its own uses its own
    exit and resume.
    """

    exit: Callable[..., ExitRecord]          # (reason, hypercall=None, timeout=None)
    resume: Callable[[int], SaveArea | None]  # (seq)


class ExitLog:
    """Exit records for the host, and the hypercall waiting for its reply."""

    def __init__(self, keyid: int, keep: int = RECORDS_KEPT):
        self.keyid = keyid
        self._cond = threading.Condition()
        self._records: deque[ExitRecord] = deque(maxlen=keep)
        self._seq = 0
        self._pending: _Pending | None = None
        self.closed = False

    def next_seq(self) -> int:
        with self._cond:
            self._seq += 1
            return self._seq

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._records[-1].seq if self._records else 0

    def publish(self, record: ExitRecord) -> None:
        with self._cond:
            self._records.append(record)
            if record.reason == "hypercall":
                self._pending = _Pending(record)
            self._cond.notify_all()

    def next_after(self, after: int, wait: float) -> dict | None:
        """The first record with ``seq > after`` (packed, with ``pending``), waiting up to ``wait`` s."""
        deadline = time.monotonic() + max(0.0, wait)
        with self._cond:
            while True:
                for record in self._records:
                    if record.seq > after:
                        pending = self._pending is not None and self._pending.record.seq == record.seq \
                            and self._pending.reply is None
                        return {**record.pack(), "pending": pending}
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def answer(self, reply: HypercallReply) -> None:
        """Accept the host's reply for the waiting hypercall, or refuse it with a reason."""
        with self._cond:
            p = self._pending
            if p is None or p.record.seq != reply.seq or p.reply is not None:
                waiting = f" (exit {p.record.seq} is)" if p is not None and p.reply is None else ""
                raise StaleReplyError(f"key domain {self.keyid}: no hypercall exit {reply.seq} is waiting "
                                      f"for a reply{waiting}", "take the sequence number from next-exit")
            bad = unexposed_writes(reply.outputs, p.record.mask)
            if bad:
                shown = ", ".join(exposed_registers(p.record.mask)) or "none"
                raise UnexposedRegisterError(
                    f"hypercall-reply to exit {reply.seq} writes {', '.join(bad)}, which the guest did not "
                    f"expose (exposed: {shown})", "write only the registers the exit record lists")
            p.reply = reply
            self._cond.notify_all()

    def await_reply(self, seq: int, timeout: float) -> HypercallReply | None:
        """The host's reply to hypercall exit ``seq``, or None after ``timeout`` s (or on close).

        Either way the exit stops waiting: a later reply is stale.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            try:
                while True:
                    p = self._pending
                    if p is None or p.record.seq != seq:
                        return None
                    if p.reply is not None:
                        return p.reply
                    remaining = deadline - time.monotonic()
                    if self.closed or remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            finally:
                if self._pending is not None and self._pending.record.seq == seq:
                    self._pending = None

    def close(self) -> None:
        """Wake every waiter (the domain is going away)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
