"""The host VMM's answers to its guest's hypercalls.

A :class:`HypercallResponder` thread follows the domain's exit records
(``next-exit``) on a host-port connection of its own and answers each pending
hypercall with ``hypercall-reply``: ECHO writes the exposed inputs back,
HOST_TIME writes the host's wall-clock time into rax, other leaves get status
``STATUS_UNSUPPORTED`` unless a handler was registered for them.  It sees only
what every host sees: the leaf and the registers the guest exposed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from qemu_kd.formats.hypercall import ECHO, HOST_TIME, STATUS_UNSUPPORTED, ExitRecord, HypercallReply
from qemu_kd.hostport.protocol import HostPortConnectionError, HostPortError, HostPortNotFoundError

log = logging.getLogger(__name__)

#: How long one next-exit request waits before the thread checks whether to stop.
POLL_WAIT = 1.0

Handler = Callable[[ExitRecord], HypercallReply]


def answer_echo(record: ExitRecord) -> HypercallReply:
    return HypercallReply(record.seq, {name: record.inputs[name] for name in record.exposed
                                       if name in record.inputs})


def answer_host_time(record: ExitRecord) -> HypercallReply:
    if "rax" not in record.exposed:
        return HypercallReply(record.seq, {}, STATUS_UNSUPPORTED)
    return HypercallReply(record.seq, {"rax": time.time_ns()})


DEFAULT_HANDLERS: dict[int, Handler] = {ECHO: answer_echo, HOST_TIME: answer_host_time}


class HypercallResponder(threading.Thread):
    """Answers a domain's hypercalls until stopped or the domain is gone."""

    def __init__(self, client_factory: Callable[[], object], keyid: int,
                 handlers: dict[int, Handler] | None = None):
        super().__init__(name=f"hypercalls-kd{keyid}", daemon=True)
        self.client_factory = client_factory
        self.keyid = keyid
        self.handlers = dict(DEFAULT_HANDLERS if handlers is None else handlers)
        self.answered = 0
        self.refused: list[str] = []
        self._stop_event = threading.Event()
        self._client = None

    def answer(self, record: ExitRecord) -> HypercallReply:
        handler = self.handlers.get(record.leaf)
        return handler(record) if handler else HypercallReply(record.seq, {}, STATUS_UNSUPPORTED)

    def run(self) -> None:
        try:
            self._client = self.client_factory()
        except HostPortError as exc:
            log.warning("hypercall responder for kd%d cannot connect: %s", self.keyid, exc)
            return
        after = 0
        try:
            while not self._stop_event.is_set():
                try:
                    data = self._client.next_exit(self.keyid, after=after, wait=POLL_WAIT)
                except (HostPortNotFoundError, HostPortConnectionError):
                    return      # the domain (or the platform) is gone
                except HostPortError as exc:
                    log.info("hypercall responder for kd%d: next-exit: %s", self.keyid, exc)
                    self._stop_event.wait(POLL_WAIT)
                    continue
                if data is None:
                    continue
                after = int(data["seq"])
                if data.get("reason") != "hypercall" or not data.get("pending"):
                    continue
                reply = self.answer(ExitRecord.unpack(data))
                try:
                    self._client.hypercall_reply(self.keyid, reply.seq, reply.outputs, reply.status)
                    self.answered += 1
                except HostPortError as exc:
                    self.refused.append(exc.message)
                    log.info("hypercall responder for kd%d: reply refused: %s", self.keyid, exc)
        finally:
            self._client.close()

    def stop(self, wait: bool = True) -> None:
        """Stop following exits; ``wait``: until the thread has ended (its pending next-exit
        returns within POLL_WAIT, or at once when the domain is destroyed)."""
        self._stop_event.set()
        if wait and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=POLL_WAIT + 5)
