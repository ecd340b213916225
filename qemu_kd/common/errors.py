"""Exception types shared by every part of qemu-kd.

Every error a user can cause is a :class:`KdError`: one line that says what is
wrong, and a hint that says what to do.  The CLI prints ``str(err)`` and exits
with ``err.exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations


class KdError(Exception):
    """Base class: a clear one-line message plus an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(KdError):
    """Bad command-line input or a missing prerequisite."""

    exit_code = 2


class GuestImageError(KdError):
    """The guest kernel or initramfs is missing or cannot be built."""


class QemuError(KdError):
    """QEMU could not be started, died, or misbehaved."""


class GuestError(KdError):
    """The guest did not become ready or its agent misbehaved."""
