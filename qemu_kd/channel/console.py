"""The guest console (ttyS0), driven with pexpect.

QEMU writes everything the guest prints on ttyS0 to a log file (the chardev's
``logfile=``), whether or not anyone is attached.  :class:`Console` attaches
to the console socket so tests and users can wait for patterns and type into
the guest's shell.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from qemu_kd.common.errors import GuestError


def log_tail(path: Path | None, lines: int = 15) -> str:
    """The last lines of a console log, for error messages."""
    if path is None:
        return ""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rstrip("\r") for line in text.splitlines()[-lines:])


def console_summary(path: Path | None, lines: int = 3) -> str:
    """One line for an error message: the last non-empty console lines and where the log is."""
    import re

    tail = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).strip() for line in log_tail(path, 40).splitlines()]
    tail = [line for line in tail if line][-lines:]
    if not tail:
        return ""
    return f"last console lines: {' | '.join(tail)} (full log: {path})"


class Console:
    """pexpect on the console socket; ``expect``/``sendline`` as usual."""

    def __init__(self, sock_path: str, log_path: Path | None = None, timeout: float = 30.0):
        self.log_path = log_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(sock_path)
        except OSError as exc:
            self.sock.close()
            raise GuestError(f"cannot attach to the guest console at {sock_path}: {exc}",
                             "is the domain still running?") from None
        self.child = pexpect.fdpexpect.fdspawn(self.sock.fileno(), timeout=timeout,
                                               encoding="utf-8", codec_errors="replace")

    def expect(self, pattern, timeout: float | None = None) -> str:
        """Wait for a regex (or list of them); return the text that matched."""
        try:
            self.child.expect(pattern, timeout=timeout)
        except pexpect.TIMEOUT:
            raise GuestError(f"console did not show {pattern!r} in time",
                             f"last console lines: {log_tail(self.log_path, 5)!r}") from None
        except pexpect.EOF:
            raise GuestError(f"console closed before showing {pattern!r}",
                             "the guest or QEMU has stopped") from None
        return self.child.after if isinstance(self.child.after, str) else ""

    def sendline(self, text: str = "") -> None:
        self.child.send(text + "\r")

    def run(self, command: str, timeout: float = 30.0) -> str:
        """Run a shell command on the console and return what it printed."""
        marker = "__KD_DONE__"
        self.sendline(f"{command}; echo {marker[:4]}''{marker[4:]}")
        self.child.expect(marker, timeout=timeout)
        out = self.child.before or ""
        lines = out.replace("\r", "").split("\n")
        return "\n".join(lines[1:]).strip()

    def close(self) -> None:
        self.sock.detach()  # pexpect owns the descriptor from here on
        try:
            self.child.close()
        except OSError:
            pass

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
