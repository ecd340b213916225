"""The guest console (ttyS0), driven with pexpect.

QEMU writes everything the guest prints on ttyS0 to a log file (the chardev's
``logfile=``), whether or not anyone is attached.  :class:`Console` attaches
to the console socket so tests and users can wait for patterns and type into
the guest's shell.

The guest's shell asks the terminal questions (busybox's line editor sends
``ESC[6n``, "where is the cursor?", before each prompt).  A terminal answers
them on its input; in a pipe or a file they are only noise, and a replayed log
would make the terminal answer into the guest's shell.  :func:`strip_queries`
and :class:`QueryFilter` take them out.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from qemu_kd.common.errors import GuestError, GuestImageError


#: Terminal queries and reports: device status (``CSI 5n``, ``CSI 6n``, ``CSI ?6n``),
#: device attributes (``CSI c``, ``CSI >c``, ``CSI =c``, and their answers ``CSI ?...c``),
#: window reports (``CSI 11t``, ``CSI 13t``-``16t``, ``CSI 18t``-``21t``), mode requests
#: (``CSI ?...$p``) and OSC colour queries (``OSC 10;? BEL``).
QUERY_RE = re.compile(rb"\x1b\[(?:[?>=]?[0-9;]*[nc]|(?:1[13-689]|2[01])t|\??[0-9;]*\$p)"
                      rb"|\x1b\](?:[0-9]+;)+\?(?:\x07|\x1b\\)")
#: The start of a query that a read may have cut in two (held back until the rest comes).
_PARTIAL_RE = re.compile(rb"\x1b(?:\[[?>=]?[0-9;]*\$?|\](?:[0-9]+;?)*\??\x1b?)?")
_MAX_HELD = 64


def strip_queries(data: bytes) -> bytes:
    """``data`` without terminal queries (see :data:`QUERY_RE`)."""
    return QUERY_RE.sub(b"", data)


class QueryFilter:
    """:func:`strip_queries` for a stream read in chunks: a query cut between two
    chunks is held back until the next one, and :meth:`flush` returns what is held."""

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        data = strip_queries(self._held + data)
        self._held = b""
        start = data.rfind(b"\x1b")
        if start >= 0 and len(data) - start <= _MAX_HELD and _PARTIAL_RE.fullmatch(data, start):
            data, self._held = data[:start], data[start:]
        return data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


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


#: What the kernel prints when an initramfs archive does not unpack (the boot goes on
#: with whatever was unpacked before it, so the guest may still come up).
INITRAMFS_FAILED = b"Initramfs unpacking failed"


def check_initramfs_unpacked(path: Path | None) -> None:
    """Raise :class:`GuestImageError` if the console log shows the initramfs did not unpack."""
    if path is None:
        return
    try:
        text = path.read_bytes()
    except OSError:
        return
    at = text.find(INITRAMFS_FAILED)
    if at < 0:
        return
    line = text[at:].split(b"\n", 1)[0].decode(errors="replace").strip()
    raise GuestImageError(f"the guest kernel could not unpack the initrd: {line}",
                          "an archive appended to the initramfs is corrupt or in a format the "
                          "kernel cannot read; add files with 'qemu-kd guest build --add/--overlay'; "
                          f"console log: {path}")


class Console:
    """pexpect on the console socket; ``expect``/``sendline`` as usual."""

    def __init__(self, sock_path: str, log_path: Path | None = None, timeout: float = 30.0):
        # pexpect loads here, not with the module: the platform daemon, the host VMM and
        # qemu-kd run import this module for its log helpers and never open a console.
        import pexpect.fdpexpect

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
        import pexpect

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
