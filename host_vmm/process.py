"""Start the host VMM as its own process and talk to it (used by ``qemu-kd run``)."""

from __future__ import annotations

import itertools
import os
import select
import socket
import subprocess
import sys
import time

from guest_agent.protocol import decode, encode, request
from qemu_kd.common.errors import KdError


class HostVmmError(KdError):
    """The host VMM process failed or refused a request."""


class HostVmmProcess:
    """``python -m host_vmm`` as a child process, with a request/response client."""

    def __init__(self, platform_socket: str, api_socket: str, timeout: float = 30.0):
        self.api_socket = api_socket
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host_vmm", "--platform", platform_socket, "--api", api_socket],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._ids = itertools.count(1)
        self._buf = bytearray()
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if line.strip() != "ready":
            err = self._stderr()
            self.stop()
            raise HostVmmError(f"the host VMM process did not start: {err or 'no output'}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(api_socket)

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        text = (self.proc.stderr.read() or "").strip().splitlines()
        return text[-1] if text else ""

    def call(self, command: str, /, timeout: float = 300.0, **args) -> dict:
        """One request to the host VMM; its result, or HostVmmError with its message."""
        cmd = command
        rid = next(self._ids)
        self.sock.sendall(encode(request(rid, cmd, **args)))
        deadline = time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                msg = decode(bytes(self._buf[:nl]))
                del self._buf[:nl + 1]
                if msg.get("id") != rid:
                    continue
                if not msg.get("ok"):
                    raise HostVmmError(msg.get("error", "host VMM error"))
                return msg.get("result", {})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostVmmError(f"the host VMM did not answer {cmd} in time")
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                raise HostVmmError(f"the host VMM process exited during {cmd}: "
                                   f"{self._stderr() or 'no message'}")
            self._buf += chunk

    def agent(self, cmd: str, wait: float = 60.0, **args) -> dict:
        """Relay one request to the guest agent through the host VMM."""
        return self.call("agent", timeout=wait + 30, agent_cmd=cmd, args=args, wait=wait)

    def stop(self, timeout: float = 20.0) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()
            self.sock = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        try:
            os.unlink(self.api_socket)
        except OSError:
            pass
