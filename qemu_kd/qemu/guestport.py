"""The request server behind the guest port (ttyS2).

The guest port stands in for the processor instructions a protected guest
uses (its identity and policy, attestation reports, sealing keys, the tenant
authority key).  For a protected domain only the platform is attached to it,
with its own handlers (:mod:`qemu_kd.platform.runtime`); the host never sees
its traffic.  A plain run attaches a server that answers ``info`` with
``protected: false`` and refuses the rest.  Messages use the agent's
newline-delimited JSON framing (``guest_agent.protocol``).
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

from guest_agent.protocol import MAX_LINE, ProtocolError, decode, encode, error, reply

Handler = Callable[[dict], dict]


class GuestPortServer(threading.Thread):
    """Answers guest-port requests on a connected socket until it closes."""

    def __init__(self, sock: socket.socket, handlers: dict[str, Handler]):
        super().__init__(name="guest-port", daemon=True)
        self.sock = sock
        self.handlers = handlers
        self.requests = 0
        self.errors = 0
        self._stop_event = threading.Event()

    def _answer(self, line: bytes) -> dict:
        try:
            msg = decode(line)
        except ProtocolError as exc:
            return error(None, f"malformed guest-port request: {exc}")
        req_id, cmd = msg.get("id"), msg.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return error(req_id, f"unknown guest-port command {cmd!r}")
        try:
            return reply(req_id, handler(msg))
        except Exception as exc:  # noqa: BLE001 - a bad request never stops the port
            return error(req_id, f"{cmd}: {exc}")

    def run(self) -> None:
        buf = bytearray()
        self.sock.settimeout(0.5)
        while not self._stop_event.is_set():
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                line = bytes(buf[:nl]).strip(b"\r")
                del buf[:nl + 1]
                if not line:
                    continue
                answer = self._answer(line)
                self.requests += 1
                self.errors += not answer.get("ok")
                try:
                    self.sock.sendall(encode(answer))
                except OSError:
                    return
            if len(buf) > MAX_LINE:
                buf.clear()

    def stop(self) -> None:
        self._stop_event.set()
        try:
            self.sock.close()
        except OSError:
            pass
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2)
