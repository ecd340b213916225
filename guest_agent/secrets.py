"""Where secrets released by the tenant land in the guest.

Secrets arrive inside the tenant session (``guest_agent.session``), never in
the clear on a host-visible channel.  They are written to files under a
tmpfs, readable only by root, and never echoed back.
"""

from __future__ import annotations

import os

ALLOWED_DIRS = ("/run/", "/tmp/")


def write_secret(path: str, data: bytes) -> None:
    real = os.path.realpath(path)
    if not real.startswith(ALLOWED_DIRS) or real != os.path.normpath(path):
        raise ValueError(f"secrets may only be written under {', '.join(ALLOWED_DIRS)}")
    os.makedirs(os.path.dirname(real), mode=0o700, exist_ok=True)
    write_file(real, data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)


def write_file(path: str, data: bytes, flags: int, mode: int) -> None:
    """Open ``path`` with ``flags`` (and ``mode`` if it is created) and write all of ``data``."""
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
