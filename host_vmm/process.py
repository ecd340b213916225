"""Start the host VMM as its own process and talk to it (used by ``qemu-kd run``).

The child dies with the thread that started it (``PR_SET_PDEATHSIG``), so a
killed ``qemu-kd run`` leaves no host VMM behind.

The child's stderr is read all the time (so its log can never fill the pipe and
stall it); its log records are passed on to this process's logging, and the
last lines are kept for error messages.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time

from guest_agent.protocol import decode, encode, request
from qemu_kd.common.errors import KdError
from qemu_kd.common.process import die_with_parent

log = logging.getLogger(__name__)

ERROR_PREFIX = "host-vmm: error:"     # the child's one-line error (see host_vmm.service)
STDERR_TAIL = 200
# A record in qemu_kd.common.log's format: date, time, logger, level, message.
_RECORD = re.compile(r"^\S+ \S+ (\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)$")


class HostVmmError(KdError):
    """The host VMM process failed or refused a request."""


class HostVmmProcess:
    """``python -m host_vmm`` as a child process, with a request/response client."""

    def __init__(self, platform_socket: str, api_socket: str, timeout: float = 30.0, *,
                 wait_platform: float = 0.0, wait_ready: bool = True):
        """Start ``python -m host_vmm``; with ``wait_ready`` (the default) return once it serves.

        ``wait_platform``: the platform daemon is starting too; the child waits up to that
        many seconds for its socket (so both processes start at the same time).  Without
        ``wait_ready``, call :meth:`wait_ready` before the first request.
        """
        self.api_socket = api_socket
        argv = [sys.executable, "-m", "host_vmm", "--platform", platform_socket, "--api", api_socket]
        if wait_platform:
            argv += ["--wait-platform", str(wait_platform)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=die_with_parent())
        self.sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._buf = bytearray()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True,
                                               name="host-vmm-stderr")
        self._stderr_reader.start()
        if wait_ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the child serves and connect to it (HostVmmError if it does not start)."""
        if self.sock is not None:
            return
        api_socket = self.api_socket
        deadline = time.monotonic() + timeout
        line = ""
        ended = False
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                ended = line == ""      # its stdout closed: the process is ending
                break
            if self.proc.poll() is not None:
                break
        if line.strip() != "ready":
            if ended:
                try:    # let it end, so that its error line is read
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            err = self._stderr()
            self.stop()
            raise HostVmmError(f"the host VMM process did not start: {err or 'no output'}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(api_socket)
        except OSError as exc:
            sock.close()
            self.stop()
            raise HostVmmError(f"cannot connect to the host VMM process on {api_socket}: "
                               f"{exc.strerror or exc}") from None
        self.sock = sock

    def _drain_stderr(self) -> None:
        try:
            for line in self.proc.stderr:
                line = line.rstrip("\n")
                self._stderr_tail.append(line)
                record = _RECORD.match(line)
                if record:
                    name, level, message = record.groups()
                    log.log(logging.getLevelName(level), "host VMM %s: %s", name, message)
        except (OSError, ValueError):
            pass   # the stream was closed by stop()

    def _stderr(self) -> str:
        """The child's error line (or its last line of stderr) once it has exited."""
        if self.proc.poll() is None:
            return ""
        self._stderr_reader.join(timeout=2)
        lines = [line.strip() for line in list(self._stderr_tail) if line.strip()]
        errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
        return (errors or lines or [""])[-1]

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
                log.warning("the host VMM (pid %d) did not stop within %g s; killing it",
                            self.proc.pid, timeout)
                self.proc.kill()
                self.proc.wait()
        self._stderr_reader.join(timeout=2)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        try:
            os.unlink(self.api_socket)
        except OSError:
            pass
