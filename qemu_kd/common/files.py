"""File and socket helpers: atomic writes and claiming a Unix socket path."""

from __future__ import annotations

import os
from pathlib import Path

from qemu_kd.common.errors import KdError
import socket
import stat


def write_file_atomic(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise






class ListenPathError(KdError):
    """A proxy cannot listen on the path it was given."""


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a listening socket: remove a dead socket left by an earlier
    run, refuse a live one or any other file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenPathError(f"{path} exists and is not a socket", "choose another listen path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ListenPathError(f"another process is already listening on {path}",
                          "close the other proxy first")
