"""Host-side client of the guest agent on the shared channel.

It waits on the agent's ``ready`` event (never on sleeps), sends requests with
ids and matches replies; every wait has a deadline.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Callable

from guest_agent.protocol import MAX_LINE, ProtocolError, decode, encode, request

from qemu_kd.common.errors import GuestError



UNREACHABLE_HINT = "the domain is launched but unreachable; destroy it and check the platform's log"


def connect_shared_channel(path: str | None, hint: str = UNREACHABLE_HINT) -> socket.socket:
    """A connection to a launched domain's shared channel; the socket is closed if it fails."""
    if not path:
        raise GuestError("the platform named no shared channel for the launched domain",
                         "destroy the domain and check the platform's log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise GuestError(f"cannot connect to the domain's shared channel {path}: {exc.strerror or exc}",
                         hint) from None
    return sock

class AgentClient:
    """Talks to ``guest_agent`` over a connected stream socket."""

    def __init__(self, sock: socket.socket, diagnose: Callable[[], str] | None = None):
        self.sock = sock
        self.diagnose = diagnose or (lambda: "")
        self.ready: dict | None = None
        self.events: list[dict] = []
        self._buf = bytearray()
        self._ids = itertools.count(1)

    def _fail(self, message: str, hint: str | None = None) -> GuestError:
        extra = self.diagnose()
        if extra:
            message = f"{message}; {extra}"
        return GuestError(message, hint)

    def _read_message(self, deadline: float, what: str) -> dict:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip(b"\r")
                del self._buf[:nl + 1]
                if not line:
                    continue
                try:
                    return decode(line)
                except ProtocolError:
                    continue  # noise on the line (e.g. before the agent started)
            if len(self._buf) > MAX_LINE:
                raise self._fail("guest agent sent an overlong line")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"guest agent did not answer {what} in time",
                                 "the guest may be hung or slow; see the console log")
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionError:
                chunk = b""
            except OSError as exc:
                raise self._fail(f"shared channel failed while waiting for {what}: {exc}") from None
            if not chunk:
                raise self._fail(f"shared channel closed while waiting for {what}",
                                 "QEMU or the guest has stopped")
            self._buf += chunk

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while self.ready is None:
            msg = self._read_message(deadline, "with 'ready'")
            if msg.get("event") == "ready":
                self.ready = msg
            elif "event" in msg:
                self.events.append(msg)
        return self.ready

    def call(self, cmd: str, wait: float = 30.0, **args) -> dict:
        req_id = next(self._ids)
        try:
            # A large request (a file chunk) drains only as fast as the guest reads it: the
            # send gets the whole wait, not the short timeout left from the last read.
            self.sock.settimeout(wait)
            self.sock.sendall(encode(request(req_id, cmd, **args)))
        except OSError as exc:
            raise self._fail(f"cannot send {cmd!r} to the guest agent: {exc}") from None
        deadline = time.monotonic() + wait
        while True:
            msg = self._read_message(deadline, f"{cmd!r}")
            if "event" in msg:
                if msg["event"] == "ready":
                    self.ready = msg
                else:
                    self.events.append(msg)
                continue
            if msg.get("id") != req_id:
                continue
            if not msg.get("ok"):
                raise GuestError(f"guest agent refused {cmd!r}: {msg.get('error')}")
            return msg.get("result", {})

    def ping(self, timeout: float = 10.0) -> bool:
        return bool(self.call("ping", wait=timeout).get("pong"))

    def exec(self, argv: list[str], timeout: float | None = 60.0, **extra) -> dict:
        """Run ``argv`` in the guest; ``timeout`` None lets it run until it ends."""
        wait = 24 * 3600.0 if timeout is None else timeout + 10
        return self.call("exec", wait=wait, argv=argv, timeout=timeout, **extra)

    def poweroff(self, timeout: float = 10.0) -> None:
        self.call("poweroff", wait=timeout)
