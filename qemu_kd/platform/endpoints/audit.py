"""The debug audit log: one JSON line per audited host debugging action.

The host-facing QMP and gdb proxies write here whenever they refuse a request
because of the domain's policy, and whenever they let a request through that
only the DEBUG policy unlocks.  Each line is a JSON object::

    {"time": "2024-05-01T12:00:00.123456+00:00", "domain": "kd3",
     "endpoint": "gdb", "action": "m ffffffff81000000,40",
     "allowed": true, "policy": "debug"}

``policy`` is ``"debug"`` or ``"no-debug"``.  ``action`` is a short summary of
the request (command name and arguments, or packet kind and address); it never
holds data read from the guest, and data written to the guest is reduced to its
length.  The file is created with mode 0600 and only ever appended to.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from qemu_kd.common.errors import KdError

ENDPOINTS = ("qmp", "gdb", "hostport")
MAX_ACTION = 200


class AuditError(KdError):
    """The audit log cannot be written."""


def policy_name(debug: bool) -> str:
    return "debug" if debug else "no-debug"


def shorten(text: str, limit: int = MAX_ACTION) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters."""
    clean = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


@dataclass(frozen=True)
class AuditRecord:
    """One audited action (one line of the log)."""

    time: str
    domain: str
    endpoint: str
    action: str
    allowed: bool
    policy: str

    def pack(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def unpack(cls, line: bytes | str) -> "AuditRecord":
        try:
            obj = json.loads(line)
            record = cls(**{name: obj[name] for name in
                            ("time", "domain", "endpoint", "action", "allowed", "policy")})
        except (ValueError, TypeError, KeyError) as exc:
            raise AuditError(f"audit line is not a valid record: {exc}",
                             "the audit log may be truncated or edited") from None
        if record.endpoint not in ENDPOINTS or not isinstance(record.allowed, bool):
            raise AuditError(f"audit line has an unknown endpoint or verdict: {line!r:.80}")
        return record


class AuditLog:
    """Appends :class:`AuditRecord` lines to ``path`` (thread-safe)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, *, domain: str, endpoint: str, action: str, allowed: bool,
               debug: bool) -> AuditRecord:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown audit endpoint {endpoint!r}")
        rec = AuditRecord(time=datetime.now(timezone.utc).isoformat(), domain=domain,
                          endpoint=endpoint, action=shorten(action), allowed=allowed,
                          policy=policy_name(debug))
        data = rec.pack()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}",
                                 "check that its directory exists and is writable") from None
        return rec

    def records(self) -> list[AuditRecord]:
        """Every record in the log, oldest first (an absent log has none)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return [AuditRecord.unpack(line) for line in data.splitlines() if line.strip()]
