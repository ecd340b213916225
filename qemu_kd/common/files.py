"""File and socket helpers: atomic writes and claiming a Unix socket path."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import Iterable

from qemu_kd.common.errors import KdError


def write_file_atomic(path: Path | str, data: bytes | Iterable[bytes | memoryview], mode: int = 0o644, *,
                      durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    ``data`` is the file's bytes, or its parts in order (bytes-like objects written one
    after the other, never joined into one copy).

    The temporary file beside ``path`` has an unpredictable name and is created
    with ``O_EXCL | O_NOFOLLOW`` (a planted file or symlink is never written
    through); its data is fsynced before the rename, and the directory after it,
    unless ``durable`` is False (a file that need not outlive a crash of the machine).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            for part in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(part)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not durable:
        return
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class ListenPathError(KdError):
    """A server cannot listen on the socket path it was given."""


def claim_socket_path(path: Path | str, what: str = "another process") -> None:
    """Make ``path`` free for a listening Unix socket.

    A socket that nobody listens on any more (left by a dead process) is
    removed.  A live socket, any other kind of file, or a socket that cannot
    be probed (for example for lack of permission) is refused and left alone.
    """
    path = str(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenPathError(f"{path} exists and is not a socket", "remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        raise ListenPathError(f"cannot check the existing socket {path}: {exc.strerror}",
                              "check the permissions of the socket and its directory") from None
    finally:
        probe.close()
    raise ListenPathError(f"{what} is already listening on {path}", "stop it first or choose another path")
