"""The guest agent: serves requests from the host on the shared channel.

Started by the guest's init as ``python3 -m guest_agent``.  It opens the
shared channel once and keeps it open (a closed port drops input), sends a
``ready`` event, then answers one request per line.  A malformed line gets an
error reply; nothing a host sends stops the agent except ``poweroff``.
"""

from __future__ import annotations

import base64
import itertools
import os
import select
import platform
import subprocess
import sys
import termios
import tty

from . import __version__
from .protocol import (MAX_LINE, MAX_OUTPUT, ProtocolError, decode, encode, error, event, reply,
                       request)

SHARED_PORT = "/dev/ttyS1"
GUEST_PORT = "/dev/ttyS2"
GUEST_PORT_TIMEOUT = 20.0


def open_port(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    if os.isatty(fd):
        tty.setraw(fd, termios.TCSANOW)
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


class LineChannel:
    """Newline-delimited messages over a file descriptor."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = bytearray()

    def send(self, message: dict) -> None:
        data = encode(message)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def receive(self, timeout: float) -> dict:
        """The next complete message, waiting at most ``timeout`` seconds."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip(b"\r")
                del self._buf[:nl + 1]
                if line:
                    return decode(line)
                continue
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise TimeoutError("no answer")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("port closed")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                self._buf.clear()
                raise ProtocolError("overlong line")

    def lines(self):
        """Yield raw lines; an overlong line is yielded as ``None`` once, then skipped."""
        skipping = False
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            self._buf += chunk
            while True:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    if len(self._buf) > MAX_LINE:
                        self._buf.clear()
                        if not skipping:
                            skipping = True
                            yield None
                    break
                line = bytes(self._buf[:nl]).strip(b"\r")
                del self._buf[:nl + 1]
                if skipping:
                    skipping = False
                    continue
                if line:
                    yield line


def _clip(data: bytes, encoding: str) -> tuple[str, bool]:
    truncated = len(data) > MAX_OUTPUT
    data = data[:MAX_OUTPUT]
    if encoding == "base64":
        return base64.b64encode(data).decode(), truncated
    return data.decode("utf-8", errors="replace"), truncated


class Agent:
    """Request handlers, keyed by command name (``do_<cmd>``)."""

    def __init__(self, channel: LineChannel, guest_port: LineChannel | None = None):
        self.channel = channel
        self.guest_port = guest_port
        self.running = True
        self.receiver = None
        self._port_ids = itertools.count(1)

    def platform_call(self, cmd: str, **args) -> dict:
        """One request to the platform on the guest port (stands for a processor instruction)."""
        if self.guest_port is None:
            raise RuntimeError("this guest has no guest port")
        req_id = next(self._port_ids)
        self.guest_port.send(request(req_id, cmd, **args))
        while True:
            try:
                msg = self.guest_port.receive(GUEST_PORT_TIMEOUT)
            except TimeoutError:
                raise RuntimeError("no platform answered on the guest port "
                                   "(is this an unprotected guest?)") from None
            if msg.get("id") != req_id:
                continue
            if not msg.get("ok"):
                raise RuntimeError(f"platform refused {cmd}: {msg.get('error')}")
            return msg.get("result", {})

    def do_report(self, req: dict) -> dict:
        """An attestation report over the caller's 64-byte report_data (hex)."""
        data = req.get("report_data", "")
        try:
            raw = bytes.fromhex(data) if isinstance(data, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 64:
            raise ValueError("report needs 'report_data': 64 bytes as 128 hex digits")
        return self.platform_call("report", report_data=raw.hex())

    def do_attest(self, req: dict) -> dict:
        """A report binding the tenant's nonce and a fresh agent key (for secret release)."""
        from .secrets import SecretReceiver, report_data_for

        nonce = _hex_arg(req, "nonce", 16, 64)
        self.receiver = SecretReceiver()
        report_data = report_data_for(nonce, self.receiver.public_key)
        result = self.platform_call("report", report_data=report_data.hex())
        return {**result, "public_key": self.receiver.public_key.hex(),
                "report_data": report_data.hex()}

    def do_put_secret(self, req: dict) -> dict:
        """Open a secret encrypted to the attested key and store it in a guest file."""
        from .secrets import write_secret

        if getattr(self, "receiver", None) is None:
            raise ValueError("put_secret needs a preceding attest")
        path = req.get("path")
        if not isinstance(path, str):
            raise ValueError("put_secret needs a 'path'")
        eph = _hex_arg(req, "ephemeral_key", 97, 97)
        nonce = _hex_arg(req, "nonce", 12, 12)
        ciphertext = base64.b64decode(req.get("ciphertext", ""), validate=True)
        try:
            secret = self.receiver.open(eph, nonce, ciphertext, path)
        except Exception:  # noqa: BLE001 - InvalidTag and bad points alike
            raise ValueError("secret does not open with the attested key") from None
        write_secret(path, secret)
        return {"written": len(secret), "path": path}

    def do_derive_key(self, req: dict) -> dict:
        """A sealing key bound to this domain's measurement (hex), from the platform."""
        label = req.get("label", "")
        if not isinstance(label, str) or len(label) > 256:
            raise ValueError("derive_key needs a 'label' string of at most 256 characters")
        return self.platform_call("derive-key", label=label)

    def ready_event(self) -> dict:
        return event("ready", version=__version__, kernel=platform.release(),
                     python=platform.python_version())

    def do_ping(self, req: dict) -> dict:
        return {"pong": True}

    def do_exec(self, req: dict) -> dict:
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("exec needs 'argv': a non-empty list of strings")
        timeout = req.get("timeout", 60)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError("exec 'timeout' must be a positive number of seconds")
        encoding = req.get("encoding", "text")
        if encoding not in ("text", "base64"):
            raise ValueError("exec 'encoding' must be 'text' or 'base64'")
        stdin = req.get("stdin", "")
        if not isinstance(stdin, str):
            raise ValueError("exec 'stdin' must be a string")
        try:
            proc = subprocess.run(argv, input=stdin.encode(), capture_output=True,
                                  timeout=timeout)
        except FileNotFoundError:
            return {"rc": 127, "stdout": "", "stderr": f"{argv[0]}: not found",
                    "timed_out": False, "truncated": False}
        except subprocess.TimeoutExpired as exc:
            out, t1 = _clip(exc.stdout or b"", encoding)
            err, t2 = _clip(exc.stderr or b"", encoding)
            return {"rc": -9, "stdout": out, "stderr": err, "timed_out": True,
                    "truncated": t1 or t2}
        out, t1 = _clip(proc.stdout, encoding)
        err, t2 = _clip(proc.stderr, encoding)
        return {"rc": proc.returncode, "stdout": out, "stderr": err, "timed_out": False,
                "truncated": t1 or t2}

    def do_poweroff(self, req: dict) -> dict:
        self.running = False
        return {"poweroff": True}

    def handle(self, line: bytes | None) -> None:
        if line is None:
            self.channel.send(error(None, f"line exceeds the {MAX_LINE}-byte limit"))
            return
        try:
            req = decode(line)
        except ProtocolError as exc:
            self.channel.send(error(None, f"malformed request: {exc}"))
            return
        req_id = req.get("id")
        cmd = req.get("cmd")
        handler = getattr(self, f"do_{cmd}", None) if isinstance(cmd, str) else None
        if handler is None:
            self.channel.send(error(req_id, f"unknown command {cmd!r}"))
            return
        try:
            result = handler(req)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            self.channel.send(error(req_id, f"{cmd}: {exc}"))
            return
        self.channel.send(reply(req_id, result))

    def serve(self) -> None:
        self.channel.send(self.ready_event())
        for line in self.channel.lines():
            self.handle(line)
            if not self.running:
                break


def _hex_arg(req: dict, name: str, min_len: int, max_len: int) -> bytes:
    value = req.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or not min_len <= len(raw) <= max_len:
        raise ValueError(f"'{name}' must be {min_len}..{max_len} bytes as hex")
    return raw


def power_off() -> None:
    """Leave the guest: without ACPI, ``poweroff`` only halts, so reboot (QEMU runs -no-reboot)."""
    os.sync()
    try:
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("b")
    except OSError:
        os.system("reboot -f")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    port = argv[0] if argv else SHARED_PORT
    gport_path = argv[1] if len(argv) > 1 else GUEST_PORT
    try:
        gport = LineChannel(open_port(gport_path))
    except OSError:
        gport = None
    agent = Agent(LineChannel(open_port(port)), gport)
    agent.serve()
    if not agent.running:
        power_off()
    return 0
